//! Gemma 3 270M on the command line, as SmolLM2 runs there: a capture with an edit and
//! gradients, a ragged generation through the key/value caches and an activation
//! dataset are the same whether the ranks (tp=2 × pp=2, more tensor-parallel ranks
//! than key/value heads) are threads, worker processes or the workers of a job in etcd;
//! induction scores and both lenses run on it.

mod common;

use common::cli::{succeeded, tensors};
use common::etcd::TestJob;
use common::gemma3_path;

const MODEL: &str = "gemma3-270m";

/// The layout of every run: two tensor-parallel ranks (Gemma 3 270M has one key/value
/// head) by two pipeline stages.
const LAYOUT: [&str; 4] = ["--tp", "2", "--pp", "2"];

#[test]
fn a_gemma3_capture_generation_and_dataset_are_the_same_in_threads_processes_and_a_job() {
    // Fetched into the cache once; each worker resolves the name on its own.
    gemma3_path();
    let job = TestJob::start("gemma3", 1, 4);
    let cluster = [
        "--cluster",
        &job.url.to_string(),
        "--token-file",
        job.token.path.to_str().unwrap(),
    ]
    .map(String::from);
    let placements: [(&str, Vec<&str>); 3] = [
        ("threads", vec![]),
        ("procs", vec!["--procs"]),
        ("cluster", cluster.iter().map(String::as_str).collect()),
    ];
    let out = tempfile::tempdir().unwrap();

    let capture = |name: &str, placement: &[&str]| {
        let to = out.path().join(format!("{name}.safetensors"));
        let mut args = vec![
            "capture",
            "--model",
            MODEL,
            "--prompt",
            "Paris is the capital of",
            "--hook",
            "blocks.*.hook_resid_post",
            "--hook",
            "blocks.3.attn.*",
            "--hook",
            "blocks.4.ln1_post.hook_normalized",
            "--edit",
            "blocks.3.attn.hook_z=zero-head:2",
            "--grad",
            "--out",
            to.to_str().unwrap(),
        ];
        args.extend(LAYOUT);
        args.extend(placement);
        succeeded(&args);
        tensors(&to)
    };
    let captures: Vec<_> = placements.iter().map(|(n, p)| capture(n, p)).collect();
    let names: Vec<&str> = captures[0].iter().map(|(k, _)| k.as_str()).collect();
    for expected in [
        "blocks.17.hook_resid_post",
        "blocks.3.attn.k_norm.hook_normalized",
        "blocks.4.ln1_post.hook_normalized_grad",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    assert_eq!(
        captures[0], captures[1],
        "processes capture what threads do"
    );
    assert_eq!(captures[0], captures[2], "a job captures what threads do");

    let generate = |name: &str, placement: &[&str]| {
        let to = out.path().join(format!("{name}-generate.safetensors"));
        let mut args = vec![
            "generate",
            "--model",
            MODEL,
            "--prompt",
            "Paris is the capital of",
            "--prompt",
            "The quick brown fox jumps over the lazy dog, and then it",
            "--max-new-tokens",
            "5",
            "--hook",
            "blocks.5.attn.hook_pattern",
            "--json",
            "--out",
            to.to_str().unwrap(),
        ];
        args.extend(LAYOUT);
        args.extend(placement);
        let stdout = succeeded(&args);
        let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        (json["completions"].clone(), tensors(&to))
    };
    let generations: Vec<_> = placements.iter().map(|(n, p)| generate(n, p)).collect();
    let first = generations[0].0[0]["text"].as_str().unwrap();
    assert!(first.starts_with(" France"), "{first:?}");
    assert_eq!(generations[0], generations[1]);
    assert_eq!(generations[0], generations[2]);

    let text = common::shakespeare_path();
    let cache = |name: &str, placement: &[&str]| {
        let to = out.path().join(format!("{name}-dataset"));
        let mut args = vec![
            "cache",
            "--model",
            MODEL,
            "--text",
            text.to_str().unwrap(),
            "--hook",
            "blocks.6.hook_resid_post",
            "--hook",
            "blocks.6.ln2_post.hook_normalized",
            "--seq-len",
            "32",
            "--batch",
            "2",
            "--max-tokens",
            "128",
            "--out",
            to.to_str().unwrap(),
        ];
        args.extend(LAYOUT);
        args.extend(placement);
        succeeded(&args);
        to
    };
    let datasets: Vec<_> = placements.iter().map(|(n, p)| cache(n, p)).collect();
    common::dataset::assert_same_files(&datasets[0], &datasets[1]);
    common::dataset::assert_same_files(&datasets[0], &datasets[2]);
}

#[test]
fn induction_and_both_lenses_run_on_gemma3() {
    gemma3_path();
    let out = tempfile::tempdir().unwrap();
    let induction = out.path().join("induction");
    // The README's command, and its numbers.
    let stdout = succeeded(&[
        "induction",
        "--model",
        MODEL,
        "--seq-len",
        "48",
        "--batch",
        "4",
        "--seed",
        "0",
        "--out",
        induction.to_str().unwrap(),
    ]);
    let scores = tensors(&induction.join("induction_scores.safetensors"));
    assert_eq!(scores[0].0, "score");
    let score = &scores[0].1;
    assert_eq!(score.len(), 18 * 4, "a score per layer and head");
    let at = |layer: usize, head: usize| score[layer * 4 + head];
    assert!(
        at(5, 1) > 0.95 && at(5, 2) > 0.85 && at(11, 2) > 0.45,
        "{stdout}"
    );
    let best = score.iter().copied().fold(0f32, f32::max);
    assert_eq!(best, at(5, 1), "{stdout}");

    let text = common::shakespeare_path();
    let heldout = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/data/shakespeare_heldout.txt"
    );
    let lens = out.path().join("lens");
    succeeded(&[
        "lens",
        "--model",
        MODEL,
        "--train-text",
        text.to_str().unwrap(),
        "--eval-text",
        heldout,
        "--train-tokens",
        "64",
        "--eval-tokens",
        "64",
        "--seq-len",
        "32",
        "--out",
        lens.to_str().unwrap(),
    ]);
    let report = std::fs::read_to_string(lens.join("lens_report.json")).unwrap();
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 18);
    // Even 64 tokens of training put the tuned lens nearer the model than the logit
    // lens on held-out text, summed over the layers (not at each: a translator from so
    // few tokens can be worse at a late layer).
    let total = |key: &str| -> f64 { layers.iter().map(|l| l[key].as_f64().unwrap()).sum() };
    let (tuned, logit) = (total("tuned_kl_bits"), total("logit_kl_bits"));
    assert!(tuned < logit, "tuned {tuned} vs logit {logit} bits");
}
