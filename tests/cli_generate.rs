//! `flexmodel generate` as a user runs it.

use std::process::{Command, Output};

fn flexmodel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flexmodel"))
        .args(args)
        .output()
        .unwrap()
}

/// The continuation of "The capital of France is" by SmolLM2, with `extra` options.
fn france(extra: &[&str]) -> String {
    let mut args = vec![
        "generate",
        "--model",
        "smollm2",
        "--prompt",
        "The capital of France is",
    ];
    args.extend_from_slice(extra);
    let out = flexmodel(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn smollm2_says_paris_is_the_capital_of_france() {
    let continuation = france(&["--max-new-tokens", "4"]);
    assert!(
        continuation.contains("Paris"),
        "continuation: {continuation:?}"
    );
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
fn smollm2_under_tp3_pp2_says_paris_too() {
    let continuation = france(&["--max-new-tokens", "2", "--tp", "3", "--pp", "2"]);
    assert!(
        continuation.contains("Paris"),
        "continuation: {continuation:?}"
    );
}

#[test]
fn a_layout_that_cannot_split_the_model_is_refused_with_the_reason() {
    let out = flexmodel(&[
        "generate", "--model", "smollm2", "--prompt", "hi", "--tp", "2",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("tp=2 does not divide num_attention_heads = 9"),
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
