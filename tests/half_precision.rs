//! `--model-dtype bf16|f16` (`Layout::with_model_dtype`): the weights are held in half
//! precision and, on the CPU, every product is computed in f32. On SmolLM2 every hook
//! point, the logits and the gradients stay within the error measured against the f32
//! model; hooks see f32; every layout (threads, FSDP, worker processes) equals the
//! half-precision single shard; and each rank holds half the bytes.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use common::cli::{flexmodel, succeeded, tiny_dir};
use common::{assert_matches_single, rel_error, smollm2, smollm2_passes};
use flexmodel::runtime::Placement;
use flexmodel::{FlexModel, ModelDtype};
use flexmodel_cluster::Layout;

/// As in `sharded_smollm2.rs`: a layout against the single shard, both computing in
/// f32 from the same half-precision weights.
const TOLERANCE: f64 = 2e-5;
const GRADIENT_TOLERANCE: f64 = 1e-4;

fn passes(layout: Layout, placement: &Placement) -> [BTreeMap<String, Tensor>; 3] {
    let (checkpoint, _) = smollm2();
    let mut model = FlexModel::build_on(checkpoint, layout, placement).unwrap();
    smollm2_passes(&mut model)
}

/// The worst relative error of `actual` against `expected` over the names that
/// `select` keeps, with its name.
fn worst(
    actual: &BTreeMap<String, Tensor>,
    expected: &BTreeMap<String, Tensor>,
    select: impl Fn(&str) -> bool,
) -> (f64, String) {
    expected
        .iter()
        .filter(|(name, _)| select(name))
        .map(|(name, e)| (rel_error(&actual[name], e), name.clone()))
        .fold((0.0, String::new()), |a, b| if b.0 > a.0 { b } else { a })
}

#[test]
fn smollm2_in_half_precision_stays_near_f32_at_every_point_and_hooks_see_f32() {
    let single = Layout::SINGLE;
    let [plain, edited, grads] = passes(single, &Placement::Threads);
    // Measured (‖a − b‖ / ‖b‖, the worst point; the README's half-precision section):
    // bf16 9.3e-3 at a point, 5.3e-3 on the logits, 0.16 at a gradient (the RMS scale
    // of block 0, a small gradient); f16 1.8e-3, 8.0e-4, 2.8e-2.
    for (dtype, point_bound, logit_bound, grad_bound) in [
        (ModelDtype::Bf16, 0.05, 0.03, 0.5),
        (ModelDtype::F16, 0.01, 0.005, 0.1),
    ] {
        let layout = single.with_model_dtype(dtype);
        let [half_plain, half_edited, half_grads] = passes(layout, &Placement::Threads);
        for all in [&half_plain, &half_edited, &half_grads] {
            assert!(all.values().all(|t| t.dtype() == DType::F32), "{dtype}");
        }
        let points = |n: &str| n != "logits" && n != "loss";
        let (point, at) = worst(&half_plain, &plain, points);
        let (edited_point, edited_at) = worst(&half_edited, &edited, points);
        let (logits, _) = worst(&half_plain, &plain, |n| n == "logits");
        let (grad, grad_at) = worst(&half_grads, &grads, points);
        let (loss, _) = worst(&half_grads, &grads, |n| n == "loss");
        eprintln!(
            "{dtype}: worst point {point:.2e} at {at}, edited {edited_point:.2e} at {edited_at}, logits {logits:.2e}, gradient {grad:.2e} at {grad_at}, loss {loss:.2e}"
        );
        assert!(point < point_bound && edited_point < point_bound, "{dtype}");
        assert!(logits < logit_bound, "{dtype}: logits {logits}");
        assert!(grad < grad_bound, "{dtype}: gradients {grad}");
    }
}

#[test]
fn half_precision_layouts_equal_the_half_precision_single_shard_holding_half_the_bytes() {
    let bf16 = |tp, pp, dp| {
        Layout::new(dp, pp, tp)
            .unwrap()
            .with_model_dtype(ModelDtype::Bf16)
    };
    let [plain, edited, grads] = passes(bf16(1, 1, 1), &Placement::Threads);
    let processes = common::parity::worker_processes();
    for (layout, placement) in [
        (bf16(3, 2, 1), Placement::Threads),
        (bf16(1, 1, 2).with_fsdp(true).unwrap(), Placement::Threads),
        (bf16(3, 1, 1), processes),
    ] {
        let ranks = match placement {
            Placement::Processes(_) => "worker processes",
            _ => "threads",
        };
        let label = format!("{layout} in {ranks}");
        let [p, e, g] = passes(layout, &placement);
        // Without tensor parallelism the values are the single shard's bit for bit; the
        // loss's mean over replicas adds in another order.
        let exact = layout.tp() == 1;
        let exact_grads = exact && layout.dp() == 1;
        assert_matches_single(&format!("{label} plain"), &plain, &p, TOLERANCE, exact);
        assert_matches_single(&format!("{label} edited"), &edited, &e, TOLERANCE, exact);
        assert_matches_single(&label, &grads, &g, GRADIENT_TOLERANCE, exact_grads);
    }
    // Each of three tensor-parallel ranks holds a third of the bf16 model: 2 bytes a
    // weight, SmolLM2's 134.5 M weights (its tied embedding once).
    let (checkpoint, _) = smollm2();
    let model = FlexModel::build(checkpoint, bf16(3, 1, 1)).unwrap();
    let bytes: usize = model.shard_weight_bytes().iter().sum();
    let whole = 2 * checkpoint.config.parameter_count() as usize;
    // The norms are whole on every rank.
    let norms = 2 * (2 * 30 + 1) * 576 * 2;
    assert_eq!(bytes, whole + norms, "{:?}", model.shard_weight_bytes());
}

#[test]
fn capture_in_bf16_under_worker_processes_writes_f32_and_a_bad_dtype_is_named() {
    let model = tiny_dir(3);
    let model = model.path().to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let capture = |name: &str, extra: &[&str]| {
        let path = out.path().join(name);
        let path = path.to_str().unwrap().to_string();
        let mut args = vec!["capture", "--model", model, "--prompt", "Hello there"];
        args.extend(["--hook", "blocks.1.hook_resid_post", "--out", &path]);
        args.extend(extra);
        succeeded(&args);
        candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap()
    };
    let f32 = capture("f32.safetensors", &[]);
    let bf16 = capture(
        "bf16.safetensors",
        &["--model-dtype", "bf16", "--procs", "--tp", "2", "--pp", "2"],
    );
    let name = "blocks.1.hook_resid_post";
    assert_eq!(bf16[name].dtype(), DType::F32);
    let error = rel_error(&bf16[name], &f32[name]);
    eprintln!("bf16 against f32: {error:.2e}");
    // The tiny model's bf16 weights: measured 5.0e-3.
    assert!(error > 0.0 && error < 0.02, "{error}");
    let failed = flexmodel(&["hooks", "--model", model, "--model-dtype", "f8"]);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("unknown model dtype \"f8\" (known: f32, bf16, f16)"),
        "{stderr}"
    );
}
