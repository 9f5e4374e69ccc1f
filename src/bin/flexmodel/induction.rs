//! `flexmodel induction`: induction scores of every head on repeated random tokens.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use flexmodel::analysis::induction::{self, repeated_random_tokens, top_heads};
use flexmodel::{Checkpoint, read_tokens_file};

use crate::layout::{LayoutArgs, Plan};

/// Options of `flexmodel induction`.
#[derive(Args, Debug)]
pub struct InductionArgs {
    /// `smollm2`, `gemma3-270m`, a .gguf file or a Hugging Face model directory.
    #[arg(long)]
    model: String,
    /// Repeated sequences, one per line (token ids separated by spaces, each line a
    /// sequence followed by itself), instead of random ones.
    #[arg(long, conflicts_with_all = ["seq_len", "batch", "seed"])]
    tokens_file: Option<PathBuf>,
    /// Length of each random sequence before it repeats (each line is twice as long).
    #[arg(long, required_unless_present = "tokens_file")]
    seq_len: Option<usize>,
    /// Number of random sequences.
    #[arg(long, required_unless_present = "tokens_file")]
    batch: Option<usize>,
    /// Seed of the random tokens.
    #[arg(long, required_unless_present = "tokens_file")]
    seed: Option<u64>,
    /// Directory for `induction_scores.safetensors` and the figures.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    layout: LayoutArgs,
}

/// Measures the scores, writes them and the figures, prints the top heads.
pub fn run(args: InductionArgs) -> anyhow::Result<()> {
    let checkpoint = Checkpoint::open(&args.model)?;
    let (vocab, context) = (checkpoint.config.vocab_size(), checkpoint.config.context());
    let tokens = match (&args.tokens_file, args.seq_len, args.batch, args.seed) {
        (Some(path), ..) => {
            let batch = read_tokens_file(path, vocab)?;
            anyhow::ensure!(
                batch.attention_mask().is_none(),
                "{}: induction needs lines of equal length (each a sequence repeated twice)",
                path.display()
            );
            batch.tokens().clone()
        }
        (None, Some(seq_len), Some(batch), Some(seed)) => {
            anyhow::ensure!(
                seq_len <= context / 2,
                "--seq-len {seq_len} repeated twice is longer than the model's context of {context} tokens"
            );
            repeated_random_tokens(batch, seq_len, vocab, seed)?
        }
        _ => anyhow::bail!("give --tokens-file, or --seq-len, --batch and --seed"),
    };
    anyhow::ensure!(
        tokens.dim(1)? <= context,
        "the sequences are longer than the model's context of {context} tokens"
    );
    let plan = Plan {
        batches: std::slice::from_ref(&tokens),
        ..Plan::default()
    };
    let mut model = args.layout.build(&checkpoint, &args.model, plan)?;
    let measured = induction::measure(&mut model, &tokens)?;
    let written = measured
        .save(&args.out)
        .with_context(|| format!("writing the results to {}", args.out.display()))?;
    println!("top induction heads (layer, head, score):");
    for (layer, head, score) in top_heads(&measured.scores, 10)? {
        println!("  L{layer}H{head}  {score:.3}");
    }
    for path in written {
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
