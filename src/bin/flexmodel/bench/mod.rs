//! `flexmodel bench`: the wall time of one forward pass over a random batch, with
//! `--generate N` of generating N tokens from it, or with `--cache-tokens N` of caching
//! the activations of N random tokens to disk.

mod cache;
mod generation;
mod profile;

use std::time::Instant;

use anyhow::{Context, ensure};
use candle_core::{Device, Tensor};
use clap::Args;
use flexmodel::telemetry::Profile;
use flexmodel::{Checkpoint, progress_bar};
use flexmodel_actors::peak_rss_bytes;
use rand::{Rng, SeedableRng};

use crate::hook_args::Hooks;
use crate::layout::{LayoutArgs, Plan};
use crate::pass_args::PassArgs;

/// Options of `flexmodel bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// `smollm2`, `gemma3-270m`, a .gguf file or a Hugging Face model directory.
    #[arg(long)]
    model: String,
    /// Sequences per batch.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Tokens per sequence (with `--generate`, per prompt).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    seq: u32,
    /// Time generations of this many new tokens from the batch (greedy, not stopping at
    /// end-of-sequence tokens) instead of forward passes: with and without the key/value
    /// cache, unhooked and with `--hook`, interleaved.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    generate: Option<u32>,
    /// With `--generate`: which generations to time.
    #[arg(long, value_enum, default_value_t = generation::CacheChoice::Both, requires = "generate")]
    kv_cache: generation::CacheChoice,
    /// Time caching the `--hook` points of this many random tokens to a dataset on disk
    /// (passes of `--batch` × `--seq`, in `$TMPDIR`) against the same passes capturing
    /// without writing, interleaved.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "generate")]
    cache_tokens: Option<u64>,
    /// Hook points to capture in every pass: exact names or globs (repeatable).
    #[arg(long = "hook", num_args = 1..)]
    hooks: Vec<String>,
    /// Edits to run in every hooked pass: `NAME=zero-head:H`, `NAME=scale:F` or
    /// `NAME=add:FILE.safetensors` (repeatable).
    #[arg(long = "edit")]
    edits: Vec<String>,
    /// Print where the time goes: per kind of op (matrix products, attention, norms, …,
    /// hooks, collectives), and with hooks per hook point the time in gather, edit,
    /// scatter and store, and the total overhead against the unhooked passes.
    #[arg(long)]
    pub profile: bool,
    /// Timed forward passes of each variant (after one warm-up pass each).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    iters: u32,
    /// Time forward+backward passes (from the next-token loss) instead of forward passes.
    #[arg(long)]
    backward: bool,
    /// End with a JSON line of the statistics.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pass: PassArgs,
    #[command(flatten)]
    layout: LayoutArgs,
}

/// One way of running the pass.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    /// No hook registered.
    Unhooked,
    /// The `--hook` points captured.
    Capturing,
    /// The same hooks registered but disabled.
    Disabled,
    /// The model without its `--sae`s, unhooked.
    WithoutSaes,
}

/// Times forward passes: unhooked, and with `--hook` also capturing and with the hooks
/// registered but disabled, interleaved so that the machine's noise hits all alike.
pub fn run(args: BenchArgs, profile: Option<Profile>) -> anyhow::Result<()> {
    let hooks = Hooks::parse(&args.hooks, &args.edits)?;
    let start = Instant::now();
    let checkpoint = Checkpoint::open(&args.model)?;
    let config = checkpoint.config.clone();
    let (batch, seq) = (args.batch as usize, args.seq as usize);
    ensure!(
        seq <= config.context(),
        "--seq {seq} is longer than the model's context of {} tokens",
        config.context()
    );
    let tokens = random_tokens(batch, seq, config.vocab_size())?;
    let scope = args.pass.scope();
    ensure!(
        args.pass.full() || (!args.backward && args.generate.is_none()),
        "--backward and --generate need every position's logits: they take no --stop-at-layer and only --logits all"
    );
    let plan = Plan {
        batches: std::slice::from_ref(&tokens),
        targets: hooks.targets(),
        scope,
    };
    let mut model = args.layout.build(&checkpoint, &args.model, plan)?;
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    // A timed pass ends when this process's GPUs have done its work (the passes of
    // worker processes end when the workers report them done).
    let layout = model.layout();
    let devices = match args.layout.procs || args.layout.cluster.is_some() {
        true => Vec::new(),
        false => (0..layout.world_size())
            .map(|rank| layout.device().device(rank))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let synchronize = || -> anyhow::Result<()> {
        for device in &devices {
            device.synchronize()?;
        }
        Ok(())
    };
    if let Some(new_tokens) = args.generate {
        ensure!(
            !args.profile && !args.backward,
            "--generate times generations: it takes no --profile or --backward"
        );
        return generation::run(&args, &hooks, &mut model, &tokens, new_tokens as usize);
    }

    if let Some(corpus_tokens) = args.cache_tokens {
        ensure!(
            !args.profile && !args.backward && args.edits.is_empty(),
            "--cache-tokens times caching: it takes no --profile, --backward or --edit"
        );
        return cache::run(&args, &checkpoint, &mut model, corpus_tokens as usize);
    }

    // With SAEs spliced in, the same model without them, timed alongside.
    let mut without_saes = match args.layout.saes.is_empty() {
        true => None,
        false => {
            let layout = LayoutArgs {
                saes: Vec::new(),
                ..args.layout.clone()
            };
            let plan = Plan {
                batches: std::slice::from_ref(&tokens),
                targets: Vec::new(),
                scope,
            };
            Some(layout.build(&checkpoint, &args.model, plan)?)
        }
    };
    let variants: &[Variant] = match (hooks.is_empty(), without_saes.is_some()) {
        (true, false) => &[Variant::Unhooked],
        (true, true) => &[Variant::Unhooked, Variant::WithoutSaes],
        (false, _) => &[Variant::Unhooked, Variant::Capturing, Variant::Disabled],
    };
    let (mut captured_bytes, mut captured_points) = (0, 0);
    let mut profiled = profile::Totals::new(variants.len());
    let mut pass = |variant: Variant| -> anyhow::Result<(f64, profile::Spans)> {
        let model = match (variant, without_saes.as_mut()) {
            (Variant::WithoutSaes, Some(plain)) => plain,
            _ => &mut model,
        };
        model.hooks_mut().clear();
        if variant != Variant::Unhooked && variant != Variant::WithoutSaes {
            hooks.register(model)?;
            model
                .hooks_mut()
                .set_enabled("*", variant == Variant::Capturing)?;
        }
        let start = Instant::now();
        match args.backward {
            true => drop(model.forward_backward(&tokens)?),
            false => drop(model.forward_scoped(&tokens, scope)?),
        }
        synchronize()?;
        let elapsed = start.elapsed().as_secs_f64() * 1e3;
        let spans = profile::Spans::take(profile.as_ref());
        if variant == Variant::Capturing {
            (captured_bytes, captured_points) = (model.store().bytes(), model.store().len());
        }
        model.store_mut().clear();
        Ok((elapsed, spans))
    };
    for &variant in variants {
        pass(variant).context("warm-up pass")?;
    }
    let progress = progress_bar(
        u64::from(args.iters) * variants.len() as u64,
        "forward passes",
    );
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..args.iters {
        for (i, &variant) in variants.iter().enumerate() {
            let (elapsed, spans) = pass(variant)?;
            times[i].push(elapsed);
            profiled.add(i, elapsed, spans);
            progress.inc(1);
        }
    }
    progress.finish_and_clear();

    let stats: Vec<Stats> = times.iter_mut().map(|t| Stats::of(t)).collect();
    let base = &stats[0];
    let tokens_per_s = (batch * seq) as f64 / (base.median_ms / 1e3);
    println!(
        "{}: batch {batch} × {seq} tokens, {} passes each; unhooked: median {:.1} ms, mean {:.1} ms, min {:.1} ms ({tokens_per_s:.0} tokens/s)",
        args.model, args.iters, base.median_ms, base.mean_ms, base.min_ms
    );
    let overhead = |s: &Stats| 100.0 * (s.median_ms / base.median_ms - 1.0);
    let mut json = run_json(&args);
    for (key, value) in [
        ("median_ms", serde_json::json!(base.median_ms)),
        ("mean_ms", serde_json::json!(base.mean_ms)),
        ("min_ms", serde_json::json!(base.min_ms)),
        ("tokens_per_s", serde_json::json!(tokens_per_s)),
        ("backward", serde_json::json!(args.backward)),
        ("load_ms", serde_json::json!(load_ms)),
        ("peak_rss_bytes", serde_json::json!(peak_rss_bytes())),
        (
            "param_bytes_per_rank",
            serde_json::json!(model.shard_weight_bytes()),
        ),
    ] {
        json[key] = value;
    }
    if let Some(peaks) = model.worker_peak_rss_bytes() {
        json["peak_rss_bytes_per_rank"] = serde_json::json!(peaks);
        let mb: Vec<String> = peaks
            .iter()
            .map(|p| p.map_or("?".into(), |b| format!("{:.0}", b as f64 / 1e6)))
            .collect();
        println!("peak resident memory of each worker, MB: {}", mb.join(" "));
    }
    if let ([_, plain], Some(_)) = (stats.as_slice(), &without_saes) {
        let cost = 100.0 * (base.median_ms / plain.median_ms - 1.0);
        println!(
            "without its {} SAEs: median {:.1} ms; the SAEs cost {cost:+.1}%",
            args.layout.saes.len(),
            plain.median_ms,
        );
        json["without_saes_median_ms"] = serde_json::json!(plain.median_ms);
        json["sae_overhead_pct"] = serde_json::json!(cost);
    }
    if let [_, capturing, disabled] = stats.as_slice() {
        println!(
            "capturing {} hook points ({:.1} MB per pass): median {:.1} ms ({:+.1}%); registered but disabled: median {:.1} ms ({:+.1}%)",
            captured_points,
            captured_bytes as f64 / 1e6,
            capturing.median_ms,
            overhead(capturing),
            disabled.median_ms,
            overhead(disabled)
        );
        json["unhooked_median_ms"] = serde_json::json!(base.median_ms);
        json["median_ms"] = serde_json::json!(capturing.median_ms);
        json["mean_ms"] = serde_json::json!(capturing.mean_ms);
        json["min_ms"] = serde_json::json!(capturing.min_ms);
        json["overhead_pct"] = serde_json::json!(overhead(capturing));
        json["disabled_median_ms"] = serde_json::json!(disabled.median_ms);
        json["disabled_overhead_pct"] = serde_json::json!(overhead(disabled));
        json["captured_bytes_per_pass"] = serde_json::json!(captured_bytes);
    }
    if args.profile {
        json["op_ms_per_pass"] = profiled.print_ops(&["unhooked", "capturing", "disabled"]);
    }
    if let (true, [_, capturing, _]) = (args.profile, stats.as_slice()) {
        profiled.print_hooks(1, base.median_ms, capturing.median_ms);
    }
    if args.json {
        println!("{json}");
    }
    Ok(())
}

/// What every `bench --json` line begins with: the model, the work and the layout.
fn run_json(args: &BenchArgs) -> serde_json::Value {
    serde_json::json!({
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "iters": args.iters,
        "tp": args.layout.tp,
        "pp": args.layout.pp,
        "dp": args.layout.dp,
        "fsdp": args.layout.fsdp,
        "model_dtype": args.layout.model_dtype.to_string(),
        "device": args.layout.device.to_string(),
        "pinned_copies": flexmodel_cluster::host_copy::pinned_copies(),
        "stop_at_layer": args.pass.stop_at_layer,
        "logits": format!("{:?}", args.pass.logits).to_lowercase(),
        "procs": args.layout.procs,
        "hooks": args.hooks,
    })
}

/// `batch` sequences of `seq` token ids drawn uniformly from the vocabulary (seed 0).
fn random_tokens(batch: usize, seq: usize, vocab: usize) -> anyhow::Result<Tensor> {
    let ids = random_ids(batch * seq, vocab);
    // Inputs are made on the host; the ranks bring them to their devices.
    Ok(Tensor::from_vec(ids, (batch, seq), &Device::Cpu)?)
}

/// `n` token ids drawn uniformly from the vocabulary (seed 0).
fn random_ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// Hook-phase sums over the timed hooked passes, by hook point and phase.
/// Summary statistics of a set of timings.
pub(crate) struct Stats {
    median_ms: f64,
    mean_ms: f64,
    min_ms: f64,
}

impl Stats {
    /// Sorts `times` and summarizes them (`times` is not empty).
    pub(crate) fn of(times: &mut [f64]) -> Self {
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
