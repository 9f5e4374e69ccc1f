//! `flexmodel generate` as a user runs it: prompts alone and in padded batches, the
//! `--json` completions, captures over a generation, and bad input.

mod common;

use common::cli::{flexmodel, succeeded, tensors, tiny_dir};

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

/// The last line of `stdout`, as JSON.
fn last_json_line(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("a line")).expect("JSON")
}

/// The `--json` completions of `prompts` with `extra` options.
fn completions(model: &str, prompts: &[&str], extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["generate", "--model", model, "--json"];
    for prompt in prompts {
        args.extend(["--prompt", prompt]);
    }
    args.extend_from_slice(extra);
    let json = last_json_line(&succeeded(&args));
    assert!(json["prefill_ms"].as_f64().unwrap() > 0.0, "{json}");
    assert!(json["decode_ms"].as_f64().unwrap() >= 0.0, "{json}");
    json["completions"].as_array().unwrap().clone()
}

#[test]
fn smollm2_prompts_of_unequal_length_in_one_batch_generate_what_each_does_alone() {
    let prompts = [
        "The capital of France is",
        "Hello",
        "In 1969, the first person to walk on the moon was",
    ];
    let batch = completions("smollm2", &prompts, &["--max-new-tokens", "8"]);
    assert_eq!(batch.len(), 3);
    let checkpoint = flexmodel::Checkpoint::open("smollm2").unwrap();
    for (prompt, together) in prompts.iter().zip(&batch) {
        let alone = completions("smollm2", &[prompt], &["--max-new-tokens", "8"]);
        assert_eq!(together["prompt"], *prompt);
        assert_eq!(together["tokens"], alone[0]["tokens"], "{prompt}");
        assert_eq!(together["text"], alone[0]["text"], "{prompt}");
        // The tokens are the prompt's, then the generated ones; the text is theirs.
        let ids: Vec<u32> = serde_json::from_value(together["tokens"].clone()).unwrap();
        let prompt_ids = checkpoint.tokenizer.encode(prompt).unwrap();
        assert_eq!(ids[..prompt_ids.len()], prompt_ids[..]);
        let generated = checkpoint
            .tokenizer
            .decode(&ids[prompt_ids.len()..])
            .unwrap();
        assert_eq!(together["text"], generated.as_str());
    }
    assert!(
        batch[0]["text"].as_str().unwrap().contains("Paris"),
        "{batch:?}"
    );
}

#[test]
fn a_generations_captures_equal_one_capture_of_its_final_sequence_and_the_cache_changes_nothing() {
    let dir = tiny_dir(8);
    let model = dir.path().to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let steer = "blocks.1.hook_resid_post=scale:1.5";
    let ablate = "blocks.2.attn.hook_pattern=zero-head:3";
    // Every point captured, with the edits, into `file`.
    let hooked = |file: &std::path::Path| -> Vec<String> {
        let file = file.to_str().unwrap();
        [
            "--hook", "*", "--edit", steer, "--edit", ablate, "--out", file,
        ]
        .map(String::from)
        .to_vec()
    };
    let generate = |name: &str, extra: &[&str]| {
        let file = out.path().join(name);
        let mut args = hooked(&file);
        args.extend(
            ["--max-new-tokens", "5"]
                .iter()
                .chain(extra)
                .map(|s| s.to_string()),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let completions = completions(model, &["abcdef", "xy", "hello"], &args);
        (completions, tensors(&file))
    };
    let (cached, captured) = generate("cached.safetensors", &[]);
    let (recomputed, recaptured) = generate("recomputed.safetensors", &["--no-kv-cache"]);
    assert_eq!(cached, recomputed, "the same tokens without the cache");
    close("--no-kv-cache", &captured, &recaptured, 1e-5);

    // One capture over the final sequences without their last token (left-padded).
    let lines: Vec<String> = cached
        .iter()
        .map(|c| {
            let ids: Vec<u64> = serde_json::from_value(c["tokens"].clone()).unwrap();
            let ids: Vec<String> = ids[..ids.len() - 1].iter().map(u64::to_string).collect();
            ids.join(" ")
        })
        .collect();
    let tokens = out.path().join("final.txt");
    std::fs::write(&tokens, lines.join("\n")).unwrap();
    let file = out.path().join("one-pass.safetensors");
    let mut args = vec![
        "capture",
        "--model",
        model,
        "--tokens-file",
        tokens.to_str().unwrap(),
    ];
    let hooks = hooked(&file);
    args.extend(hooks.iter().map(String::as_str));
    succeeded(&args);
    let mut one_pass = tensors(&file);
    one_pass.retain(|(name, _)| name != "loss");
    let mask = &one_pass
        .iter()
        .find(|(n, _)| n == "attention_mask")
        .unwrap()
        .1;
    assert!(mask.contains(&0.0), "the prompts were padded");
    close("one pass", &captured, &one_pass, 1e-5);
}

/// Asserts that two files of tensors hold the same names and values within `tolerance`
/// (absolute; −∞ equals −∞).
fn close(label: &str, a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)], tolerance: f32) {
    let names = |t: &[(String, Vec<f32>)]| t.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(a), names(b), "{label}");
    for ((name, x), (_, y)) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len(), "{label} {name}");
        for (p, q) in x.iter().zip(y) {
            assert!(
                p == q || (p - q).abs() <= tolerance,
                "{label} {name}: {p} vs {q}"
            );
        }
    }
}

#[test]
fn bad_generation_input_is_a_clear_error() {
    let dir = tiny_dir(9);
    let model = dir.path().to_str().unwrap();
    let failed = |args: &[&str], why: &str| {
        let out = flexmodel(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    };
    let run = |extra: &[&str], why: &str| {
        let mut args = vec!["generate", "--model", model];
        args.extend_from_slice(extra);
        failed(&args, why);
    };
    run(
        &["--prompt", "abc", "--prompt", ""],
        "the prompt \"\" has no tokens",
    );
    run(
        &["--prompt", "abc", "--max-new-tokens", "0"],
        "--max-new-tokens must be at least 1",
    );
    run(
        &["--prompt", "abc", "--temperature", "0"],
        "temperature: must be a number above 0",
    );
    run(
        &["--prompt", "abc", "--temperature", "1", "--top-p", "1.5"],
        "top_p: must be in (0, 1]",
    );
    // Sampling with a seed repeats itself, and another seed draws other tokens.
    let sampled = |seed: &str| {
        let args = [
            "--max-new-tokens",
            "12",
            "--temperature",
            "1.5",
            "--seed",
            seed,
        ];
        completions(model, &["abc", "hello"], &args)
    };
    assert_eq!(sampled("1"), sampled("1"));
    assert_ne!(sampled("1"), sampled("2"));
    // The tiny model's context is 512 tokens; its tokenizer reads one token per byte.
    let long = "a".repeat(600);
    run(
        &["--prompt", &long],
        "longer than the model's context of 512 tokens",
    );
    // A prompt near the context stops there, saying so.
    let near = "a".repeat(509);
    let out = flexmodel(&[
        "generate",
        "--model",
        model,
        "--prompt",
        &near,
        "--max-new-tokens",
        "10",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("stopped at the model's context of 512 tokens"),
        "{stderr}"
    );
    let json = last_json_line(&String::from_utf8_lossy(&out.stdout));
    let ids = json["completions"][0]["tokens"].as_array().unwrap().len();
    assert_eq!(ids, 512);
}
