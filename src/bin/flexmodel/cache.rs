//! `flexmodel cache`: stream the activations of a corpus to disk as a Hugging Face
//! `datasets` dataset, resumable (see the library's `dataset` module).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use flexmodel::Checkpoint;
use flexmodel::dataset::{Corpus, DatasetPlan, DatasetSpec, DatasetStatus, Positions, StoredDType};

use crate::hook_args::Hooks;
use crate::layout::{LayoutArgs, Plan};
use crate::pass_args::PassArgs;

/// Options of `flexmodel cache`.
#[derive(Args, Debug)]
pub struct CacheArgs {
    /// `smollm2`, `gemma3-270m`, a .gguf file or a Hugging Face model directory.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    corpus: CorpusArgs,
    /// Hook points to store, a column each: exact names or globs.
    #[arg(long = "hook", required = true, num_args = 1..)]
    hooks: Vec<String>,
    /// `NAME=zero-head:H`, `NAME=scale:F` or `NAME=add:FILE.safetensors` (repeatable).
    #[arg(long = "edit")]
    edits: Vec<String>,
    /// The dataset's directory: new, empty, or one to resume.
    #[arg(long)]
    out: PathBuf,
    /// Tokens per sequence (a row).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    seq_len: u64,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,
    /// Use at most this many tokens of the corpus (whole sequences of them).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_tokens: Option<u64>,
    /// How the values are stored (bf16: rounded to bfloat16, held in float16).
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
    /// The most megabytes (10^6 bytes) of one shard file.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    shard_mb: u64,
    /// Every position of a sequence, or only its last.
    #[arg(long, value_enum, default_value_t = PositionsArg::All)]
    positions: PositionsArg,
    #[command(flatten)]
    pass: PassArgs,
    #[command(flatten)]
    layout: LayoutArgs,
}

/// Where the corpus comes from.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct CorpusArgs {
    /// A text file, tokenized whole and cut into sequences.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Token ids separated by whitespace, the lines one after the other, cut into
    /// sequences.
    #[arg(long)]
    tokens_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DTypeArg {
    F32,
    Bf16,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PositionsArg {
    All,
    Last,
}

/// Writes (or finishes) the dataset and prints a summary line.
pub fn run(args: CacheArgs) -> anyhow::Result<()> {
    let hooks = Hooks::parse(&[], &args.edits)?;
    let checkpoint = Checkpoint::open(&args.model)?;
    let corpus = match (&args.corpus.text, &args.corpus.tokens_file) {
        (Some(text), _) => Corpus::from_text(text, &checkpoint.tokenizer)?,
        (None, Some(tokens)) => Corpus::from_tokens_file(tokens, checkpoint.config.vocab_size())?,
        (None, None) => anyhow::bail!("give --text or --tokens-file"),
    };
    let mut spec = DatasetSpec::new(checkpoint.weights.fingerprint()?, args.hooks.clone());
    spec.edits = hooks
        .edits
        .iter()
        .map(|e| e.fingerprint())
        .collect::<flexmodel::Result<_>>()?;
    spec.saes = args.layout.saes.clone();
    spec.seq_len = args.seq_len as usize;
    spec.batch = args.batch as usize;
    spec.max_tokens = args.max_tokens.map(|n| n as usize);
    spec.shard_bytes = args.shard_mb * 1_000_000;
    spec.dtype = match args.dtype {
        DTypeArg::F32 => StoredDType::F32,
        DTypeArg::Bf16 => StoredDType::Bf16,
    };
    spec.positions = match args.positions {
        PositionsArg::All => Positions::All,
        PositionsArg::Last => Positions::Last,
    };
    let plan = DatasetPlan::new(&checkpoint.config, corpus, spec)?.with_scope(args.pass.scope());
    let out = &args.out;
    if plan.status(out)? == DatasetStatus::Complete {
        println!(
            "{} is complete already: {} sequences of {} tokens in {} shards; nothing to do",
            out.display(),
            plan.rows(),
            plan.spec().seq_len,
            plan.shards()
        );
        return Ok(());
    }
    let mut model = args.layout.build(
        &checkpoint,
        &args.model,
        Plan {
            batches: &[],
            targets: hooks.targets(),
            scope: args.pass.scope(),
        },
    )?;
    hooks.register(&mut model)?;
    let summary = model
        .cache_activations(&plan, out)
        .with_context(|| format!("caching activations into {}", out.display()))?;
    let seconds = summary.elapsed.as_secs_f64().max(1e-9);
    let peak = flexmodel_actors::peak_rss_bytes()
        .map(|b| format!(", peak RSS {:.0} MB", b as f64 / 1e6))
        .unwrap_or_default();
    println!(
        "cached {} sequences of {} tokens ({} hook points) into {}: {} shards; this run wrote {} sequences in {} shards, {:.1} MB in {:.1} s ({:.0} tokens/s, {:.1} MB/s){peak}",
        summary.rows,
        plan.spec().seq_len,
        plan.columns().len(),
        out.display(),
        summary.shards,
        summary.rows_written,
        summary.shards_written,
        summary.bytes_written as f64 / 1e6,
        seconds,
        (summary.rows_written * plan.spec().seq_len) as f64 / seconds,
        summary.bytes_written as f64 / 1e6 / seconds,
    );
    Ok(())
}
