//! SmolLM2 side by side with TransformerLens 2.x (its own weight conversion and
//! `run_with_cache`, no weight processing): every tensor both compute agrees.
//!
//! TransformerLens runs from the virtual environment `scripts/test` installs
//! (`target/transformer-lens`, or the Python named by `FLEXMODEL_TRANSFORMER_LENS_PYTHON`).

mod common;

use std::path::PathBuf;
use std::process::Command;

use candle_core::Device;
use common::child::{OutputWithin, RUN_DEADLINE};
use common::{batch, capture_with_opt_in, rel_error, smollm2};

#[test]
fn every_tensor_agrees_with_transformer_lens_on_smollm2() {
    let python = common::transformer_lens_python();
    assert!(
        python.exists(),
        "{} is missing: scripts/test installs TransformerLens into target/transformer-lens",
        python.display()
    );
    let (checkpoint, model) = smollm2();
    let dir = tempfile::tempdir().unwrap();
    let hf_dir = dir.path().join("smollm2");
    checkpoint.save_hf_dir(&hf_dir).unwrap();
    let rows: &[&[u32]] = &[
        &[504, 3575, 282, 4649, 314, 7042],
        &[1, 9690, 198, 2683, 359, 30],
    ];
    let tokens: Vec<String> = rows
        .iter()
        .map(|r| r.iter().map(u32::to_string).collect::<Vec<_>>().join(" "))
        .collect();
    let out = dir.path().join("transformer_lens.safetensors");
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/transformer_lens_run.py");
    let run = Command::new(&python)
        .arg(&script)
        .arg(&hf_dir)
        .arg(tokens.join(";"))
        .arg(&out)
        .output_within(RUN_DEADLINE);
    assert!(
        run.status.success(),
        "TransformerLens failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let theirs = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let (_, ours) = capture_with_opt_in(model, &batch(rows));
    let mut worst = (0.0f64, String::new());
    let mut shared = 0;
    for (name, mine) in &ours {
        let Some(expected) = theirs.get(name) else {
            continue;
        };
        shared += 1;
        let err = rel_error(mine, expected);
        // Measured worst: 3.9e-6 (float32 in both, different summation orders).
        assert!(err < 3e-5, "{name}: relative error {err:.3e}");
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    let only_ours: Vec<&String> = ours.keys().filter(|n| !theirs.contains_key(*n)).collect();
    eprintln!(
        "{shared} tensors shared with TransformerLens, worst relative error {:.2e} at {}; ours only: {only_ours:?}",
        worst.0, worst.1
    );
    assert_eq!(
        shared,
        ours.len(),
        "TransformerLens computes every point we do"
    );
}
