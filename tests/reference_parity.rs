//! The model against the independent numpy reference (`tests/reference/`).

mod common;

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use std::collections::BTreeMap;

use candle_core::Tensor;
use common::{
    batch, capture_all, capture_with_opt_in, default_points, numpy_reference, rel_error, smollm2,
    smollm2_path, write_gguf,
};
use flexmodel::Checkpoint;
use flexmodel::tiny::{random_checkpoint, tiny_checkpoint, tiny_config};

/// Relative error allowed against the float64 reference: SmolLM2's worst measured is
/// 5.9e-6 (30 layers of f32), the small random models' 8.8e-7.
const SMOLLM2_TOLERANCE: f64 = 3e-5;
const TOLERANCE: f64 = 5e-6;

/// Asserts that every tensor of `captured` matches the reference's within `tolerance`;
/// returns the worst relative error.
fn compare(
    reference: &BTreeMap<String, Tensor>,
    captured: &BTreeMap<String, Tensor>,
    tolerance: f64,
) -> f64 {
    let mut worst = (0.0, String::new());
    for (name, actual) in captured {
        let expected = reference
            .get(name)
            .unwrap_or_else(|| panic!("the reference has no {name}"));
        let err = rel_error(actual, expected);
        assert!(
            err <= tolerance,
            "{name}: relative error {err:.3e} > {tolerance:e}"
        );
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    eprintln!(
        "worst relative error {:.3e} at {} over {} tensors",
        worst.0,
        worst.1,
        captured.len()
    );
    worst.0
}

/// Compares both ways of running `model` on `rows` with the reference: the default
/// points (shared q/k/v inputs, one output projection) and every point with the opt-in
/// ones (per-head inputs and results), which must be all of the reference's.
fn compare_both_paths(
    model: &std::sync::Arc<dyn flexmodel::models::ModelShard>,
    rows: &[&[u32]],
    reference: &BTreeMap<String, Tensor>,
    tolerance: f64,
) {
    let n_layers = model.model_config().n_layers();
    let (_, default) = capture_all(model, &batch(rows));
    assert_eq!(default.len(), default_points(n_layers));
    compare(reference, &default, tolerance);
    let (_, every) = capture_with_opt_in(model, &batch(rows));
    assert_eq!(
        every.len(),
        reference.len(),
        "the reference has every hook point"
    );
    compare(reference, &every, tolerance);
}

#[test]
fn smollm2_logits_and_residual_stream_match_committed_numpy_fixture() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/smollm2_reference.safetensors"
    );
    let mut fixture = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let tokens = fixture
        .remove("tokens")
        .unwrap()
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let (_, model) = smollm2();
    let (_, captured) = capture_all(model, &tokens);
    assert_eq!(
        fixture.len(),
        model.model_config().n_layers() + 2,
        "resid_pre of every layer, the last resid_post, logits"
    );
    let fixture: BTreeMap<String, Tensor> = fixture.into_iter().collect();
    let captured = captured
        .into_iter()
        .filter(|(name, _)| fixture.contains_key(name))
        .collect();
    compare(&fixture, &captured, SMOLLM2_TOLERANCE);
}

#[test]
fn smollm2_every_hook_point_matches_numpy_reference() {
    let rows: &[&[u32]] = &[
        &[504, 3575, 282, 4649, 314, 7042],
        &[1, 9690, 198, 2683, 359, 30],
    ];
    let reference = numpy_reference(&smollm2_path(), rows);
    let (_, model) = smollm2();
    compare_both_paths(model, rows, &reference, SMOLLM2_TOLERANCE);
}

#[test]
fn tiny_model_every_hook_point_matches_numpy_reference() {
    let checkpoint = tiny_checkpoint(11).unwrap();
    let dir = tempfile::tempdir().unwrap();
    checkpoint.save_hf_dir(dir.path()).unwrap();
    let rows: &[&[u32]] = &[&[3, 200, 17, 99, 255, 0, 42], &[7, 7, 7, 128, 64, 32, 16]];
    let reference = numpy_reference(dir.path(), rows);
    compare_both_paths(
        &checkpoint.load_model().unwrap(),
        rows,
        &reference,
        TOLERANCE,
    );
}

#[test]
fn qwen2_style_biases_and_tied_embeddings_match_numpy_reference() {
    let mut config = tiny_config();
    config.architecture = flexmodel::models::Architecture::Qwen2;
    config.attention_bias = true;
    config.tie_word_embeddings = true;
    let checkpoint = random_checkpoint(config, 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    checkpoint.save_hf_dir(dir.path()).unwrap();
    let rows: &[&[u32]] = &[&[1, 2, 3, 4, 5]];
    let reference = numpy_reference(dir.path(), rows);
    let model = Checkpoint::open_hf_dir(dir.path())
        .unwrap()
        .load_model()
        .unwrap();
    compare_both_paths(&model, rows, &reference, TOLERANCE);
}

/// A model wide enough (rows of 256) for every GGUF block format, K-quants included.
fn wide_checkpoint() -> Checkpoint {
    let mut config = tiny_config();
    (
        config.d_model,
        config.n_heads,
        config.n_kv_heads,
        config.d_head,
        config.d_mlp,
        config.n_layers,
    ) = (256, 4, 2, 64, 512, 2);
    random_checkpoint(config, 3).unwrap()
}

#[test]
fn gguf_quantizations_dequantize_like_the_numpy_reference() {
    // The numpy reader implements these formats itself; each weight matrix gets one.
    let formats = [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ];
    let checkpoint = wide_checkpoint();
    let names = checkpoint.weights.names();
    let dtype_of =
        |name: &str| formats[names.iter().position(|n| n == name).unwrap() % formats.len()];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wide.gguf");
    write_gguf(&checkpoint, &path, dtype_of);
    let rows: &[&[u32]] = &[&[10, 20, 30, 40, 50, 60]];
    let reference = numpy_reference(&path, rows);
    let gguf = Checkpoint::open_gguf(&path).unwrap();
    let (_, captured) = capture_all(&gguf.load_model().unwrap(), &batch(rows));
    compare(&reference, &captured, TOLERANCE);
}

#[test]
fn gguf_of_every_block_format_loads_close_to_the_f32_weights() {
    let checkpoint = wide_checkpoint();
    let rows: &[&[u32]] = &[&[10, 20, 30, 40, 50, 60]];
    let (exact, _) = capture_all(&checkpoint.load_model().unwrap(), &batch(rows));
    // Bound on the logits' relative error for each format (4-bit formats are coarse).
    let formats = [
        (GgmlDType::F32, 1e-6),
        (GgmlDType::F16, 1e-3),
        (GgmlDType::BF16, 1e-2),
        (GgmlDType::Q8_0, 2e-2),
        (GgmlDType::Q5_0, 0.1),
        (GgmlDType::Q5_1, 0.1),
        (GgmlDType::Q4_0, 0.2),
        (GgmlDType::Q4_1, 0.2),
        (GgmlDType::Q2K, 0.8),
        (GgmlDType::Q3K, 0.4),
        (GgmlDType::Q4K, 0.2),
        (GgmlDType::Q5K, 0.1),
        (GgmlDType::Q6K, 5e-2),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (dtype, bound) in formats {
        let path = dir.path().join(format!("{dtype:?}.gguf"));
        write_gguf(&checkpoint, &path, |_| dtype);
        let model = Checkpoint::open_gguf(&path).unwrap().load_model().unwrap();
        let (logits, _) = capture_all(&model, &batch(rows));
        let err = rel_error(&logits, &exact);
        eprintln!("{dtype:?}: logits relative error {err:.2e}");
        assert!(
            err <= bound,
            "{dtype:?}: logits relative error {err:.3e} > {bound}"
        );
    }
}
