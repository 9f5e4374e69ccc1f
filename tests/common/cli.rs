//! Running the `flexmodel` binary and reading what it writes.

use crate::common::child::{OutputWithin, RUN_DEADLINE};
use std::path::Path;
use std::process::{Command, Output};

/// `flexmodel ARGS`, with warnings only in its log.
pub fn flexmodel(args: &[&str]) -> Output {
    Command::new(crate::common::flexmodel_binary())
        .args(args)
        .env("FLEXMODEL_LOG", "warn")
        .output_within(RUN_DEADLINE)
}

/// The standard output of `flexmodel ARGS`, which must succeed.
pub fn succeeded(args: &[&str]) -> String {
    succeeded_output(flexmodel(args), &format!("{args:?}"))
}

/// The standard output of a run that must have succeeded.
pub fn succeeded_output(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every tensor of a safetensors file, by name, flattened to f32.
pub fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let mut all: Vec<(String, Vec<f32>)> =
        candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| {
                let t = t.to_dtype(candle_core::DType::F32).unwrap();
                (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            })
            .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// The tiny model with weights drawn from `seed`, as a Hugging Face directory.
pub fn tiny_dir(seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    flexmodel::tiny::tiny_checkpoint(seed)
        .unwrap()
        .save_hf_dir(dir.path())
        .unwrap();
    dir
}
