//! `flexmodel bench`: the wall time of one forward pass over a random batch.

use std::time::Instant;

use anyhow::{Context, ensure};
use candle_core::{Device, Tensor};
use clap::Args;
use flexmodel::{Checkpoint, NoHooks};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};

use crate::layout::LayoutArgs;

/// Options of `flexmodel bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// `smollm2`, a .gguf file or a Hugging Face model directory.
    #[arg(long)]
    model: String,
    /// Sequences per batch.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Tokens per sequence.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    seq: u32,
    /// Timed forward passes (after one warm-up pass).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    iters: u32,
    /// End with a JSON line of the statistics.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    layout: LayoutArgs,
}

/// Times `iters` forward passes and prints their median, mean and minimum.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    args.layout.require_single_shard()?;
    let checkpoint = Checkpoint::open(&args.model)?;
    let model = checkpoint.load_model()?;
    let (batch, seq) = (args.batch as usize, args.seq as usize);
    ensure!(
        seq <= model.config().max_position_embeddings,
        "--seq {seq} is longer than the model's context of {} tokens",
        model.config().max_position_embeddings
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let vocab = model.config().vocab_size as u32;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let tokens = Tensor::from_vec(ids, (batch, seq), &Device::Cpu)?;

    model
        .forward(&tokens, &mut NoHooks)
        .context("warm-up pass")?;
    let progress = ProgressBar::new(args.iters as u64).with_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    progress.set_message("forward passes");
    let mut times_ms = Vec::with_capacity(args.iters as usize);
    for _ in 0..args.iters {
        let start = Instant::now();
        model.forward(&tokens, &mut NoHooks)?;
        times_ms.push(start.elapsed().as_secs_f64() * 1e3);
        progress.inc(1);
    }
    progress.finish_and_clear();

    let stats = Stats::of(&mut times_ms);
    let tokens_per_s = (batch * seq) as f64 / (stats.median_ms / 1e3);
    println!(
        "{}: batch {batch} × {seq} tokens, {} passes: median {:.1} ms, mean {:.1} ms, min {:.1} ms ({tokens_per_s:.0} tokens/s)",
        args.model, args.iters, stats.median_ms, stats.mean_ms, stats.min_ms
    );
    if args.json {
        let json = serde_json::json!({
            "model": args.model,
            "batch": batch,
            "seq": seq,
            "iters": args.iters,
            "tp": args.layout.tp,
            "pp": args.layout.pp,
            "dp": args.layout.dp,
            "median_ms": stats.median_ms,
            "mean_ms": stats.mean_ms,
            "min_ms": stats.min_ms,
            "tokens_per_s": tokens_per_s,
        });
        println!("{json}");
    }
    Ok(())
}

/// Summary statistics of a set of timings.
struct Stats {
    median_ms: f64,
    mean_ms: f64,
    min_ms: f64,
}

impl Stats {
    /// Sorts `times` and summarizes them (`times` is not empty).
    fn of(times: &mut [f64]) -> Self {
        times.sort_by(f64::total_cmp);
        let n = times.len();
        let median_ms = if n % 2 == 1 {
            times[n / 2]
        } else {
            (times[n / 2 - 1] + times[n / 2]) / 2.0
        };
        Self {
            median_ms,
            mean_ms: times.iter().sum::<f64>() / n as f64,
            min_ms: times[0],
        }
    }
}
