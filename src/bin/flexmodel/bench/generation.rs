//! `flexmodel bench --generate N`: the wall time of generating N tokens, with and
//! without the key/value cache, unhooked and with the `--hook` points captured.

use std::time::Instant;

use anyhow::Context;
use candle_core::Tensor;
use flexmodel::{FlexModel, GenerateOptions, progress_bar};

use super::{BenchArgs, Stats, run_json};
use crate::hook_args::Hooks;

/// Which generations `bench --generate` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheChoice {
    /// Through the key/value cache and recomputing every position, interleaved.
    Both,
    /// Through the key/value cache only.
    On,
    /// Recomputing every position only.
    Off,
}

/// One way of generating.
#[derive(Debug, Clone, Copy)]
struct Variant {
    kv_cache: bool,
    hooked: bool,
}

/// What the timed generations of one variant took.
#[derive(Default)]
struct Timings {
    total_ms: Vec<f64>,
    prefill_ms: Vec<f64>,
    step_ms: Vec<f64>,
    /// The decoding steps' times, by the quarter of the generation they fell in.
    step_ms_by_quarter: [Vec<f64>; 4],
}

/// Times `args.iters` generations of `new_tokens` tokens from `tokens` for each variant,
/// interleaved so that the machine's noise hits all alike, after a short warm-up.
pub fn run(
    args: &BenchArgs,
    hooks: &Hooks,
    model: &mut FlexModel,
    tokens: &Tensor,
    new_tokens: usize,
) -> anyhow::Result<()> {
    let prompts = tokens.to_vec2::<u32>()?;
    let caches: &[bool] = match args.kv_cache {
        CacheChoice::Both => &[true, false],
        CacheChoice::On => &[true],
        CacheChoice::Off => &[false],
    };
    let hooked: &[bool] = match hooks.is_empty() {
        true => &[false],
        false => &[false, true],
    };
    let variants: Vec<Variant> = caches
        .iter()
        .flat_map(|&kv_cache| {
            hooked
                .iter()
                .map(move |&hooked| Variant { kv_cache, hooked })
        })
        .collect();
    let mut generate = |variant: Variant, max_new_tokens: usize| {
        model.hooks_mut().clear();
        if variant.hooked {
            hooks.register(model)?;
        }
        let options = GenerateOptions {
            max_new_tokens,
            kv_cache: variant.kv_cache,
            stop_at_eos: false,
            ..GenerateOptions::default()
        };
        let start = Instant::now();
        let generation = model.generate(&prompts, &options)?;
        let total = start.elapsed();
        model.store_mut().clear();
        anyhow::Ok((generation, total))
    };
    for &variant in &variants {
        generate(variant, 2).context("warm-up generation")?;
    }
    let progress = progress_bar(u64::from(args.iters) * variants.len() as u64, "generations");
    let mut timings: Vec<Timings> = variants.iter().map(|_| Timings::default()).collect();
    for _ in 0..args.iters {
        for (variant, timing) in variants.iter().zip(&mut timings) {
            let (generation, total) = generate(*variant, new_tokens)?;
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            timing.total_ms.push(ms(total));
            timing.prefill_ms.push(ms(generation.prefill));
            timing
                .step_ms
                .extend(generation.steps.iter().map(|&d| ms(d)));
            let steps = generation.steps.len();
            for (i, &d) in generation.steps.iter().enumerate() {
                timing.step_ms_by_quarter[4 * i / steps.max(1)].push(ms(d));
            }
            progress.inc(1);
        }
    }
    progress.finish_and_clear();

    let batch = prompts.len();
    let seq = prompts[0].len();
    println!(
        "{}: {new_tokens} new tokens from {batch} prompts of {seq} tokens, {} generations each",
        args.model, args.iters
    );
    let mut rows = Vec::new();
    for (variant, timing) in variants.iter().zip(&mut timings) {
        let total = Stats::of(&mut timing.total_ms);
        let prefill = Stats::of(&mut timing.prefill_ms);
        let step = match timing.step_ms.is_empty() {
            true => None,
            false => Some(Stats::of(&mut timing.step_ms)),
        };
        let tokens_per_s = (batch * new_tokens) as f64 / (total.median_ms / 1e3);
        let by_quarter: Vec<Option<f64>> = timing
            .step_ms_by_quarter
            .iter_mut()
            .map(|times| (!times.is_empty()).then(|| Stats::of(times).median_ms))
            .collect();
        println!(
            "  {:<13} {:<8} median {:>9.1} ms ({tokens_per_s:>7.1} tokens/s); prefill {:.1} ms; per step: median {} ms, by quarter of the generation {}",
            match variant.kv_cache {
                true => "kv cache",
                false => "no kv cache",
            },
            match variant.hooked {
                true => "hooked",
                false => "unhooked",
            },
            total.median_ms,
            prefill.median_ms,
            step.as_ref()
                .map_or("-".to_string(), |s| format!("{:.2}", s.median_ms)),
            by_quarter
                .iter()
                .map(|q| q.map_or("-".to_string(), |ms| format!("{ms:.2}")))
                .collect::<Vec<_>>()
                .join(" / "),
        );
        rows.push(serde_json::json!({
            "kv_cache": variant.kv_cache,
            "hooked": variant.hooked,
            "median_ms": total.median_ms,
            "min_ms": total.min_ms,
            "tokens_per_s": tokens_per_s,
            "prefill_median_ms": prefill.median_ms,
            "step_median_ms": step.as_ref().map(|s| s.median_ms),
            "step_mean_ms": step.as_ref().map(|s| s.mean_ms),
            "step_median_ms_by_quarter": by_quarter,
        }));
    }
    let median = |kv_cache: bool, hooked: bool| {
        variants
            .iter()
            .zip(&rows)
            .find(|(v, _)| v.kv_cache == kv_cache && v.hooked == hooked)
            .and_then(|(_, row)| row["median_ms"].as_f64())
    };
    let mut json = run_json(args);
    json["generate"] = serde_json::json!(new_tokens);
    json["edits"] = serde_json::json!(args.edits);
    json["median_ms"] = rows[0]["median_ms"].clone();
    json["variants"] = serde_json::json!(rows);
    for hooked in [false, true] {
        if let (Some(cached), Some(recomputed)) = (median(true, hooked), median(false, hooked)) {
            let key = match hooked {
                true => "kv_cache_speedup_hooked",
                false => "kv_cache_speedup",
            };
            println!(
                "  the cache is {:.1}× faster {}",
                recomputed / cached,
                match hooked {
                    true => "hooked",
                    false => "unhooked",
                }
            );
            json[key] = serde_json::json!(recomputed / cached);
        }
    }
    if args.json {
        println!("{json}");
    }
    Ok(())
}
