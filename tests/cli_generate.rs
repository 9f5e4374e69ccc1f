//! `flexmodel generate` as a user runs it.

use std::process::{Command, Output};

fn flexmodel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flexmodel"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn smollm2_says_paris_is_the_capital_of_france() {
    let out = flexmodel(&[
        "generate",
        "--model",
        "smollm2",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "4",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Paris"), "continuation: {stdout:?}");
}

#[test]
fn missing_model_file_fails_cleanly() {
    let out = flexmodel(&[
        "generate",
        "--model",
        "/no/such/model.gguf",
        "--prompt",
        "hi",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("error: /no/such/model.gguf"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn sharded_layouts_are_refused_until_supported() {
    let out = flexmodel(&[
        "generate", "--model", "smollm2", "--prompt", "hi", "--tp", "3",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("tp=3 pp=1 dp=1 is not supported yet"),
        "{stderr}"
    );
}

#[test]
fn zero_ranks_is_a_usage_error() {
    let out = flexmodel(&[
        "generate", "--model", "smollm2", "--prompt", "hi", "--dp", "0",
    ]);
    assert_eq!(out.status.code(), Some(2), "clap's usage-error exit code");
}
