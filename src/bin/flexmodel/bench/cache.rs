//! `flexmodel bench --cache-tokens N`: the wall time of caching the `--hook` points of N
//! random tokens to a dataset on disk, against the same passes capturing the same
//! points without writing, interleaved.

use std::time::Instant;

use anyhow::{Context, ensure};
use candle_core::{Device, Tensor};
use flexmodel::dataset::{Corpus, DatasetPlan, DatasetSpec};
use flexmodel::{Checkpoint, FlexModel, HookFunction};

use super::{BenchArgs, Stats, random_ids, run_json};

/// Times `args.iters` rounds of caching and of the same passes without writing.
pub fn run(
    args: &BenchArgs,
    checkpoint: &Checkpoint,
    model: &mut FlexModel,
    corpus_tokens: usize,
) -> anyhow::Result<()> {
    ensure!(
        !args.hooks.is_empty(),
        "--cache-tokens needs --hook points to cache"
    );
    let ids = random_ids(corpus_tokens, checkpoint.config.vocab_size());
    let mut spec = DatasetSpec::new("bench", args.hooks.clone());
    spec.seq_len = args.seq as usize;
    spec.batch = args.batch as usize;
    let plan = DatasetPlan::new(&checkpoint.config, Corpus::from_ids(ids.clone()), spec)?;
    let passes: Vec<Tensor> = plan
        .passes()
        .map(|rows| {
            let seq = plan.spec().seq_len;
            let ids = ids[rows.start * seq..rows.end * seq].to_vec();
            // Inputs are made on the host; the ranks bring them to their devices.
            Tensor::from_vec(ids, (rows.len(), seq), &Device::Cpu)
        })
        .collect::<candle_core::Result<_>>()?;
    let root = tempfile::tempdir().context("a directory for the datasets ($TMPDIR)")?;
    model.hooks_mut().clear();

    let capture_passes = |model: &mut FlexModel| -> anyhow::Result<f64> {
        for column in plan.columns() {
            model
                .hooks_mut()
                .register(HookFunction::new(column.name()))?;
        }
        let start = Instant::now();
        for batch in &passes {
            drop(model.forward(batch)?);
            model.store_mut().clear();
        }
        let elapsed = start.elapsed().as_secs_f64();
        model.hooks_mut().clear();
        Ok(elapsed)
    };
    drop(model.forward(&passes[0])?);
    let (mut caching, mut forward, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut bytes, mut writer_mb_per_s) = (0, Vec::new());
    for round in 0..args.iters {
        let dir = root.path().join(format!("round-{round}"));
        let start = Instant::now();
        let summary = model.cache_activations(&plan, &dir)?;
        let cached = start.elapsed().as_secs_f64();
        bytes = summary.bytes_written;
        writer_mb_per_s.push(bytes as f64 / 1e6 / summary.write_time.as_secs_f64().max(1e-9));
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        let passed = capture_passes(model)?;
        eprintln!(
            "round {round}: caching {cached:.2} s, the same passes without writing {passed:.2} s"
        );
        caching.push(cached * 1e3);
        forward.push(passed * 1e3);
        ratios.push(cached / passed);
    }
    let (caching, forward) = (Stats::of(&mut caching), Stats::of(&mut forward));
    // The ratio of each round: the two runs of a round share the machine's state.
    ratios.sort_by(f64::total_cmp);
    let (ratio, ratio_min) = (ratios[ratios.len() / 2], ratios[0]);
    let write_mb_per_s = bytes as f64 / 1e6 / (caching.median_ms / 1e3);
    let writer_mb_per_s = Stats::of(&mut writer_mb_per_s).median_ms;
    println!(
        "{}: caching {} hook points of {} tokens ({} passes of {} × {}, {} shards, {:.1} MB): median {:.2} s; the same passes without writing: median {:.2} s; caching / passes: median {:.3}×; {write_mb_per_s:.1} MB/s written over the run, {writer_mb_per_s:.0} MB/s while the writer was busy",
        args.model,
        plan.columns().len(),
        plan.tokens(),
        passes.len(),
        args.batch,
        args.seq,
        plan.shards(),
        bytes as f64 / 1e6,
        caching.median_ms / 1e3,
        forward.median_ms / 1e3,
        ratio,
    );
    if args.json {
        let mut json = run_json(args);
        for (key, value) in [
            ("cache_tokens", serde_json::json!(plan.tokens())),
            ("shards", serde_json::json!(plan.shards())),
            ("bytes_written", serde_json::json!(bytes)),
            (
                "median_ms",
                serde_json::json!(caching.median_ms / passes.len() as f64),
            ),
            ("cache_median_s", serde_json::json!(caching.median_ms / 1e3)),
            (
                "passes_median_s",
                serde_json::json!(forward.median_ms / 1e3),
            ),
            ("cache_over_passes", serde_json::json!(ratio)),
            ("cache_over_passes_min", serde_json::json!(ratio_min)),
            ("write_mb_per_s", serde_json::json!(write_mb_per_s)),
            ("writer_busy_mb_per_s", serde_json::json!(writer_mb_per_s)),
        ] {
            json[key] = value;
        }
        println!("{json}");
    }
    Ok(())
}
