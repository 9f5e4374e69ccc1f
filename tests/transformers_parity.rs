//! The model families people use, checked against Hugging Face transformers itself (the
//! virtual environment `scripts/test` installs): LLaMA 3.1's RoPE scaling, linear and
//! dynamic-NTK scaling, and Mistral's sliding window — in a plain batch, in a ragged
//! (left-padded) batch, and through the key/value cache — at every hook point
//! transformers exposes (each block's input and output, q, k, v, the rotated q and k,
//! the pattern, z, the attention and MLP outputs and the MLP's three activations, the
//! embedding and the logits), on small random models with those settings.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::child::{OutputWithin, RUN_DEADLINE};
use common::{rel_error, take_last_calls, transformer_lens_python};
use flexmodel::models::{Architecture, LlamaConfig, RopeScaling};
use flexmodel::text::TokenBatch;
use flexmodel::tiny::{random_checkpoint, tiny_config};
use flexmodel::{Checkpoint, FlexModel, GenerateOptions, HookFunction, Layout};

/// The relative error against transformers (both f32; measured at most 7.2e-7 at any
/// point of any case).
const TOLERANCE: f64 = 5e-6;

/// A tiny random model of `config` written as a Hugging Face directory.
fn on_disk(config: LlamaConfig, seed: u64) -> (tempfile::TempDir, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    random_checkpoint(config, seed)
        .unwrap()
        .save_hf_dir(dir.path())
        .unwrap();
    let checkpoint = Checkpoint::open(dir.path().to_str().unwrap()).unwrap();
    (dir, checkpoint)
}

/// Every point transformers' modules show, as `hf_transformers_run.py` computes them.
fn transformers(dir: &Path, rows: &[Vec<u32>]) -> BTreeMap<String, Tensor> {
    let python = transformer_lens_python();
    assert!(
        python.exists(),
        "{} is missing: scripts/test installs transformers into target/transformer-lens",
        python.display()
    );
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/hf_transformers_run.py");
    let out = tempfile::NamedTempFile::new().unwrap();
    let rows: Vec<String> = rows
        .iter()
        .map(|r| r.iter().map(u32::to_string).collect::<Vec<_>>().join(" "))
        .collect();
    let run = Command::new(&python)
        .arg(&script)
        .arg(dir)
        .arg(rows.join(";"))
        .arg(out.path())
        .output_within(RUN_DEADLINE);
    assert!(
        run.status.success(),
        "transformers failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    candle_core::safetensors::load(out.path(), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// Every default point and the logits of one pass over `rows` (left-padded).
fn ours(checkpoint: &Checkpoint, layout: Layout, rows: &[Vec<u32>]) -> BTreeMap<String, Tensor> {
    let mut model = FlexModel::build(checkpoint, layout).unwrap();
    model.hooks_mut().register(HookFunction::new("*")).unwrap();
    let batch = TokenBatch::left_padded(rows).unwrap();
    let logits = model.forward(batch).unwrap();
    let mut all = take_last_calls(&mut model);
    all.insert("unembed.hook_out".into(), logits);
    all
}

/// Checks every point of transformers' run against ours; returns the worst error.
fn assert_matches_transformers(
    label: &str,
    expected: &BTreeMap<String, Tensor>,
    actual: &BTreeMap<String, Tensor>,
) -> f64 {
    let n_layers = expected
        .keys()
        .filter(|k| k.ends_with("hook_resid_post"))
        .count();
    assert_eq!(expected.len(), 2 + 14 * n_layers, "{label}: every point");
    let mut worst = (0.0f64, String::new());
    for (name, e) in expected {
        let a = actual
            .get(name)
            .unwrap_or_else(|| panic!("{label}: {name} not captured"));
        let a = a.to_dtype(DType::F64).unwrap();
        // Padded logits are not zeroed by the model; transformers' run zeroes them.
        let a = match name.as_str() {
            "unembed.hook_out" => a.broadcast_mul(&real(e).unwrap()).unwrap(),
            _ => a,
        };
        let err = rel_error(&a, e);
        assert!(err < TOLERANCE, "{label} {name}: relative error {err:.3e}");
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    eprintln!(
        "{label}: worst relative error {:.2e} at {}",
        worst.0, worst.1
    );
    worst.0
}

/// `[b, t, 1]`: 1 where the logits `e` are not zeroed (a real position).
fn real(e: &Tensor) -> candle_core::Result<Tensor> {
    e.abs()?.sum_keepdim(2)?.gt(0.0)?.to_dtype(DType::F64)
}

fn rows() -> Vec<Vec<u32>> {
    vec![
        (0..14).map(|i| (i * 37 + 5) % 256).collect(),
        (0..14).map(|i| (i * 91 + 11) % 256).collect(),
    ]
}

fn ragged() -> Vec<Vec<u32>> {
    vec![
        (0..14).map(|i| (i * 37 + 5) % 256).collect(),
        (0..9).map(|i| (i * 53 + 7) % 256).collect(),
        (0..12).map(|i| (i * 29 + 3) % 256).collect(),
    ]
}

fn scaled(rope_scaling: RopeScaling, max_position_embeddings: usize) -> LlamaConfig {
    LlamaConfig {
        rope_scaling: Some(rope_scaling),
        max_position_embeddings,
        ..tiny_config()
    }
}

#[test]
fn rope_scalings_match_transformers_at_every_point() {
    // tiny_config's heads have 8 dimensions: wavelengths 6.3, 63, 628 and 6283. With an
    // original context of 200 and LLaMA 3.1's factors, the first stays, the second is
    // blended, the last two are divided by 8.
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 200,
    };
    for (label, config) in [
        ("llama3", scaled(llama3, 512)),
        ("linear", scaled(RopeScaling::Linear { factor: 2.5 }, 512)),
        // 14 positions in a context of 8: the base grows by (2·14/8 − 1)^(8/6) (in a
        // ragged batch, as in transformers, by the longest row's).
        ("dynamic", scaled(RopeScaling::Dynamic { factor: 2.0 }, 8)),
    ] {
        let (dir, checkpoint) = on_disk(config, 61);
        for (batch, rows) in [("plain", rows()), ("ragged", ragged())] {
            let label = format!("{label} {batch}");
            let expected = transformers(dir.path(), &rows);
            let actual = ours(&checkpoint, Layout::SINGLE, &rows);
            assert_matches_transformers(&label, &expected, &actual);
        }
    }
}

fn mistral(window: usize) -> LlamaConfig {
    LlamaConfig {
        architecture: Architecture::Mistral,
        sliding_window: Some(window),
        ..tiny_config()
    }
}

#[test]
fn a_sliding_window_matches_transformers_in_plain_and_ragged_batches_and_under_tp() {
    let (dir, checkpoint) = on_disk(mistral(5), 62);
    assert_eq!(
        checkpoint.config.as_llama().unwrap().sliding_window,
        Some(5)
    );
    for (batch, rows) in [("plain", rows()), ("ragged", ragged())] {
        let expected = transformers(dir.path(), &rows);
        let single = ours(&checkpoint, Layout::SINGLE, &rows);
        assert_matches_transformers(&format!("mistral {batch}"), &expected, &single);
        let sharded = ours(&checkpoint, Layout::new(1, 2, 2).unwrap(), &rows);
        assert_matches_transformers(&format!("mistral {batch} tp=2 pp=2"), &expected, &sharded);
    }
    // The window changes the model: without it, the last positions differ.
    let (full_dir, _) = on_disk(mistral(512), 62);
    let full = transformers(full_dir.path(), &rows());
    let windowed = transformers(dir.path(), &rows());
    let name = "blocks.3.hook_resid_post";
    assert!(rel_error(&full[name], &windowed[name]) > 1e-2);
}

#[test]
fn generating_through_the_cache_with_a_sliding_window_equals_recomputing() {
    let (_dir, checkpoint) = on_disk(mistral(4), 63);
    let prompts = vec![vec![5u32, 9, 200, 17, 3], vec![44, 12, 7]];
    let mut model = FlexModel::build(&checkpoint, Layout::SINGLE).unwrap();
    let point = "blocks.2.attn.hook_pattern";
    let mut generate = |kv_cache| {
        model.hooks_mut().clear();
        model
            .hooks_mut()
            .register(HookFunction::new(point))
            .unwrap();
        let options = GenerateOptions {
            max_new_tokens: 9,
            kv_cache,
            stop_at_eos: false,
            ..GenerateOptions::default()
        };
        let generation = model.generate(&prompts, &options).unwrap();
        let calls = model.store_mut().take_all().remove(point).unwrap();
        (generation.sequences, calls)
    };
    let (cached, cached_calls) = generate(true);
    let (recomputed, recomputed_calls) = generate(false);
    assert_eq!(cached, recomputed);
    // The steps' patterns through the cache, joined along positions, are those of the
    // recomputed last pass; each query attends to 4 keys at most, the window.
    let step = cached_calls.last().unwrap();
    let whole = recomputed_calls.last().unwrap();
    assert_eq!(step.dims(), [2, 8, 13, 13]);
    assert!(rel_error(step, whole) < TOLERANCE);
    let nonzero = step.ne(0.0).unwrap().to_dtype(DType::F32).unwrap();
    let per_row = nonzero
        .sum(3)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>();
    assert!(per_row.unwrap().iter().all(|&n| n <= 4.0));
}
