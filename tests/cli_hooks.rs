//! `flexmodel capture`, `hooks` and `bench` as a user runs them.

mod common;

use std::process::{Command, Output};

use candle_core::Device;
use common::child::{OutputWithin, RUN_DEADLINE};
use common::{assert_matches_single, numpy_reference_with_edits, rel_error, smollm2_path};

fn flexmodel(args: &[&str]) -> Output {
    Command::new(common::flexmodel_binary())
        .args(args)
        .output_within(RUN_DEADLINE)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `capture` on the France prompt with `args` into `dir/name`; returns the tensors.
fn capture_prompt(
    dir: &std::path::Path,
    name: &str,
    args: &[&str],
) -> std::collections::HashMap<String, candle_core::Tensor> {
    let out_file = dir.join(name);
    let mut all = vec![
        "capture",
        "--model",
        "smollm2",
        "--prompt",
        "The capital of France is",
    ];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--out", out_file.to_str().unwrap()]);
    let out = flexmodel(&all);
    assert!(out.status.success(), "{}", stderr(&out));
    candle_core::safetensors::load(&out_file, &Device::Cpu).unwrap()
}

/// Runs a command that must fail; returns its stderr, checked to hold no panic.
fn failure(args: &[&str]) -> String {
    let out = flexmodel(args);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?} should fail cleanly: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn capture_writes_each_point_and_the_loss_matching_the_edited_reference() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.txt");
    std::fs::write(&tokens, "504 3575 282 4649 314\n1 9690 198 2683 359\n").unwrap();
    let out_file = dir.path().join("out.safetensors");
    let edit = "blocks.4.attn.hook_z=zero-head:1";
    let out = flexmodel(&[
        "capture",
        "--model",
        "smollm2",
        "--tokens-file",
        tokens.to_str().unwrap(),
        "--hook",
        "blocks.*.hook_resid_post",
        "unembed.hook_out",
        "--hook",
        "model.layers.2.mlp",
        "--edit",
        edit,
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let captured = candle_core::safetensors::load(&out_file, &Device::Cpu).unwrap();
    assert_eq!(
        captured.len(),
        30 + 1 + 1 + 1,
        "resid_post × 30, logits, mlp_out, loss"
    );
    assert_eq!(captured["blocks.2.hook_mlp_out"].dims(), [2, 5, 576]);
    assert_eq!(captured["loss"].dims(), [1]);

    let rows: &[&[u32]] = &[&[504, 3575, 282, 4649, 314], &[1, 9690, 198, 2683, 359]];
    let reference = numpy_reference_with_edits(&smollm2_path(), rows, &[edit.to_string()]);
    for name in [
        "blocks.29.hook_resid_post",
        "unembed.hook_out",
        "blocks.2.hook_mlp_out",
    ] {
        let err = rel_error(&captured[name], &reference[name]);
        eprintln!("{name}: relative error {err:.2e} against the numpy reference");
        assert!(err < 3e-5, "{name}: {err:.3e}");
    }
    // The loss from the reference's logits, computed here in f64.
    let logits = reference["unembed.hook_out"]
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec3::<f64>()
        .unwrap();
    let mut total = 0.0;
    for (b, row) in rows.iter().enumerate() {
        for t in 0..row.len() - 1 {
            let l = &logits[b][t];
            let max = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let log_z = max + l.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            total += log_z - l[row[t + 1] as usize];
        }
    }
    let expected = total / 8.0;
    let loss = captured["loss"].to_vec1::<f32>().unwrap()[0] as f64;
    eprintln!("loss {loss} vs {expected} from the reference's logits");
    assert!(
        (loss - expected).abs() < 1e-5 * expected,
        "loss {loss} vs {expected}"
    );
}

#[test]
fn capture_of_a_single_token_has_no_loss() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("one.safetensors");
    let out = flexmodel(&[
        "capture",
        "--model",
        "smollm2",
        "--prompt",
        "Hello",
        "--hook",
        "hook_embed",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let captured = candle_core::safetensors::load(&out_file, &Device::Cpu).unwrap();
    assert_eq!(captured.keys().collect::<Vec<_>>(), ["hook_embed"]);
}

#[test]
fn capture_rejects_bad_input_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let out = out.to_str().unwrap();
    let tokens = |text: &str, name: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let base = |extra: &[&str]| {
        let mut args = vec!["capture", "--model", "smollm2", "--out", out];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| failure(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let err = run(base(&[
        "--prompt",
        "x",
        "--hook",
        "blocks.1.hook_resid_pots",
    ]));
    assert!(err.contains("nearest: blocks.1.hook_resid_post"), "{err}");
    let err = run(base(&[
        "--prompt",
        "x",
        "--hook",
        "hook_embed",
        "--edit",
        "blocks.1.attn.hook_z=zero-head",
    ]));
    assert!(err.contains("malformed edit"), "{err}");
    let empty = tokens("\n\n", "empty.txt");
    let err = run(base(&["--tokens-file", &empty, "--hook", "hook_embed"]));
    assert!(err.contains("empty.txt: no sequences"), "{err}");
    let err = run(base(&[
        "--prompt",
        "x",
        "--prompt",
        "",
        "--hook",
        "hook_embed",
    ]));
    assert!(err.contains("the prompt \"\" has no tokens"), "{err}");
    let outside = tokens("1 2 49152\n", "outside.txt");
    let err = run(base(&["--tokens-file", &outside, "--hook", "hook_embed"]));
    assert!(
        err.contains("token id 49152 is outside the vocabulary"),
        "{err}"
    );
    let err = run(base(&[
        "--prompt",
        "x y",
        "--hook",
        "hook_embed",
        "--edit",
        "blocks.1.attn.hook_z=zero-head:9",
    ]));
    assert!(err.contains("head 9 does not exist"), "{err}");
    assert!(
        !std::path::Path::new(out).exists(),
        "nothing is written on failure"
    );
}

#[test]
fn hooks_lists_every_point_with_shape_shard_spec_and_aliases() {
    let out = flexmodel(&["hooks", "--model", "smollm2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1 + 30 * 25 + 5);
    let line = |name: &str| {
        *lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap()
    };
    let pattern: Vec<&str> = line("blocks.7.attn.hook_pattern")
        .split("  ")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(
        pattern,
        ["blocks.7.attn.hook_pattern", "[b, 9, t, t]", "split dim 1"]
    );
    assert!(line("blocks.7.hook_mlp_out").contains("model.layers.7.mlp"));
    let result = line("blocks.7.attn.hook_result");
    assert!(
        result.contains("[b, t, 9, 576]")
            && result.contains("split dim 2")
            && result.contains("opt-in"),
        "{result}"
    );
    assert!(line("blocks.7.ln2.hook_scale").contains("[b, t, 1]"));
    assert!(line("hook_tokens").contains("[b, t]"));
    assert!(
        line("unembed.hook_out").contains("[b, t, 49152]")
            && line("unembed.hook_out").contains("split dim 2")
    );
}

#[test]
fn bench_json_reports_medians_and_hook_overhead() {
    let out = flexmodel(&[
        "bench",
        "--model",
        "smollm2",
        "--batch",
        "1",
        "--seq",
        "8",
        "--iters",
        "2",
        "--hook",
        "blocks.*.hook_resid_post",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let json: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    for key in [
        "median_ms",
        "unhooked_median_ms",
        "disabled_median_ms",
        "overhead_pct",
    ] {
        assert!(
            json[key].as_f64().is_some_and(f64::is_finite),
            "{key} in {json}"
        );
    }
    assert_eq!(json["captured_bytes_per_pass"], 30 * 8 * 576 * 4);
}

#[test]
fn capture_under_a_sharded_layout_writes_what_one_shard_writes() {
    let dir = tempfile::tempdir().unwrap();
    let capture = |name: &str, layout: &[&str]| {
        let mut args = vec![
            "--hook",
            "blocks.4.attn.hook_pattern",
            "blocks.*.hook_mlp_out",
            "--edit",
            "blocks.2.attn.hook_z=zero-head:3",
        ];
        args.extend_from_slice(layout);
        capture_prompt(dir.path(), name, &args)
    };
    let single = capture("single.safetensors", &[]);
    let sharded = capture("sharded.safetensors", &["--tp", "3", "--pp", "2"]);
    let (single, sharded) = (single.into_iter().collect(), sharded.into_iter().collect());
    assert_matches_single("capture tp=3 pp=2", &single, &sharded, 2e-5, false);
}

#[test]
fn capture_grad_writes_gradients_that_agree_across_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let capture = |name: &str, layout: &[&str]| {
        let mut args = vec![
            "--hook",
            "blocks.*.hook_resid_pre",
            "blocks.7.attn.hook_z",
            "--grad",
        ];
        args.extend_from_slice(layout);
        capture_prompt(dir.path(), name, &args)
    };
    let single = capture("single.safetensors", &[]);
    assert_eq!(single.len(), 2 * 31 + 1, "values, NAME_grad and loss");
    assert_eq!(single["blocks.7.attn.hook_z_grad"].dims(), [1, 5, 9, 64]);
    let sharded = capture("sharded.safetensors", &["--tp", "3", "--pp", "2"]);
    let (single, sharded) = (single.into_iter().collect(), sharded.into_iter().collect());
    assert_matches_single("capture --grad tp=3 pp=2", &single, &sharded, 1e-4, false);
    let err = failure(&[
        "capture",
        "--model",
        "smollm2",
        "--prompt",
        "Hi",
        "--hook",
        "hook_embed",
        "--grad",
        "--out",
        "/tmp/x.safetensors",
    ]);
    assert!(err.contains("at least two tokens"), "{err}");
}

#[test]
fn bad_input_is_refused_before_any_weight_is_read() {
    // A GGUF whose header is whole but whose tensors are cut off: reading any weight
    // fails, so each error below shows that the command checked before reading.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("cut.gguf");
    common::write_gguf(
        &flexmodel::tiny::tiny_checkpoint(0).unwrap(),
        &model,
        |_| candle_core::quantized::GgmlDType::F32,
    );
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let model = model.to_str().unwrap();
    let tokens = dir.path().join("tokens.txt");
    std::fs::write(&tokens, format!("{}\n", vec!["7"; 513].join(" "))).unwrap();
    let out = dir.path().join("out.safetensors");
    let out = out.to_str().unwrap();
    let capture = |extra: &[&str]| {
        let mut args = vec!["capture", "--model", model, "--out", out];
        args.extend_from_slice(extra);
        failure(&args)
    };
    for (extra, expected) in [
        (
            &["--prompt", "hi", "--hook", "blocks.*.hook_nothing"][..],
            "unknown forward hook target \"blocks.*.hook_nothing\"",
        ),
        (
            &[
                "--prompt",
                "hi",
                "--hook",
                "*",
                "--edit",
                "blocks.9.attn.hook_z=scale:2",
            ][..],
            "unknown forward hook target \"blocks.9.attn.hook_z\"",
        ),
        (
            &["--prompt", "hi", "--hook", "*", "--tp", "3"][..],
            "bad layout: tp=3 does not divide num_attention_heads = 8",
        ),
        (
            &["--prompt", "hi", "--hook", "*", "--dp", "2"][..],
            "a batch of 1 sequences cannot be split over 2 data-parallel replicas",
        ),
        (
            &["--tokens-file", tokens.to_str().unwrap(), "--hook", "*"][..],
            "sequences of 513 tokens are longer than the model's context of 512 tokens",
        ),
        (
            &["--prompt", "hi", "--hook", "*", "--dp", "1000000"][..],
            "more than 4096 ranks",
        ),
    ] {
        let err = capture(extra);
        assert!(err.contains(expected), "{extra:?}: {err}");
        assert!(
            !err.contains("tensor blk."),
            "{extra:?} read weights: {err}"
        );
    }
    // The same command with good input reaches the weights and names the cut tensor.
    let err = capture(&["--prompt", "hi", "--hook", "*"]);
    assert!(err.contains("cut.gguf: tensor "), "{err}");
}
