//! `flexmodel induction` and `flexmodel lens` as a user runs them.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use common::child::{OutputWithin, RUN_DEADLINE};
use common::{rel_error, smollm2};
use flexmodel::analysis::induction::{measure, repeated_random_tokens};
use flexmodel::tiny::tiny_checkpoint;
use flexmodel::{FlexModel, Layout};

fn flexmodel(args: &[&str]) -> Output {
    Command::new(common::flexmodel_binary())
        .args(args)
        .output_within(RUN_DEADLINE)
}

fn run_ok(args: &[&str]) -> String {
    let out = flexmodel(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_failing(args: &[&str]) -> String {
    let out = flexmodel(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Checks that `path` is a PNG image of the figure size with more than white in it.
fn assert_figure(path: &Path) {
    let image = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    assert_eq!(image.dimensions(), (1100, 800), "{}", path.display());
    let inked = image.pixels().filter(|p| p.0 != [255, 255, 255]).count();
    assert!(inked > 10_000, "{} is nearly blank", path.display());
}

#[test]
fn induction_under_tp3_writes_the_single_shard_scores_figures_and_top_heads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("induction");
    let stdout = run_ok(&[
        "induction",
        "--model",
        "smollm2",
        "--seq-len",
        "20",
        "--batch",
        "2",
        "--seed",
        "3",
        "--out",
        out.to_str().unwrap(),
        "--tp",
        "3",
    ]);
    let written =
        candle_core::safetensors::load(out.join("induction_scores.safetensors"), &Device::Cpu)
            .unwrap();
    let score = &written["score"];
    assert_eq!(score.dims(), [30, 9]);

    let (checkpoint, _) = smollm2();
    let tokens = repeated_random_tokens(2, 20, checkpoint.config.vocab_size(), 3).unwrap();
    let mut single = FlexModel::build(checkpoint, Layout::SINGLE).unwrap();
    let expected = measure(&mut single, &tokens).unwrap();
    assert!(rel_error(score, &expected.scores) < 1e-4);

    assert!(stdout.contains("top induction heads"), "{stdout}");
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.trim_start().starts_with('L'))
            .count(),
        10
    );
    assert_figure(&out.join("induction_scores.png"));
    assert_figure(&out.join("loss_by_position.png"));
}

#[test]
fn induction_reads_a_tokens_file_and_refuses_sequences_that_do_not_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("tiny");
    tiny_checkpoint(5).unwrap().save_hf_dir(&model_dir).unwrap();
    let model = model_dir.to_str().unwrap();
    let tokens = dir.path().join("tokens.txt");
    let out = dir.path().join("out");
    // Induction over a tokens file of `lines`.
    let (tokens_arg, out_arg) = (tokens.to_str().unwrap(), out.to_str().unwrap());
    let args = [
        "induction",
        "--model",
        model,
        "--tokens-file",
        tokens_arg,
        "--out",
        out_arg,
    ];
    let write = |lines: &str| std::fs::write(&tokens, lines).unwrap();
    write("1 2 3 4 1 2 3 4\n9 8 7 6 9 8 7 6\n");
    run_ok(&args);
    let written =
        candle_core::safetensors::load(out.join("induction_scores.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(written["score"].dims(), [4, 8]);

    let refused = |lines: &str| {
        write(lines);
        run_failing(&args)
    };
    let error = refused("1 2 3 4 1 2 3 4\n9 8 7 6 9 8 7 5\n");
    assert!(error.contains("sequence 2 is not a sequence"), "{error}");
    let error = refused("1 2 3 4 1 2 3 4\n9 8 9 8\n");
    assert!(
        error.contains("induction needs lines of equal length"),
        "{error}"
    );
    let error = run_failing(&[
        "induction",
        "--model",
        model,
        "--seq-len",
        "8",
        "--out",
        "x",
    ]);
    assert!(error.contains("--batch"), "{error}");
    let error = run_failing(&[
        "induction",
        "--model",
        model,
        "--seq-len",
        "100000",
        "--batch",
        "1",
        "--seed",
        "0",
        "--out",
        "x",
    ]);
    assert!(error.contains("longer than the model's context"), "{error}");
}

#[test]
fn lens_report_has_every_layer_and_the_tuned_lens_beats_the_logit_lens() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(common::shakespeare_path()).unwrap();
    let (train, held_out) = text.split_at(text.len() - 8_000);
    let train_path = dir.path().join("train.txt");
    let eval_path = dir.path().join("eval.txt");
    std::fs::write(&train_path, train).unwrap();
    std::fs::write(&eval_path, held_out).unwrap();
    let out = dir.path().join("lens");
    let stdout = run_ok(&[
        "lens",
        "--model",
        "smollm2",
        "--train-text",
        train_path.to_str().unwrap(),
        "--eval-text",
        eval_path.to_str().unwrap(),
        "--train-tokens",
        "512",
        "--eval-tokens",
        "128",
        "--out",
        out.to_str().unwrap(),
        "--pp",
        "2",
    ]);
    assert!(stdout.contains("logit lens"), "{stdout}");
    let report = read_report(&out.join("lens_report.json"));
    assert_eq!(report.len(), 30);
    for (i, (layer, logit, tuned)) in report.iter().enumerate() {
        assert_eq!(*layer, i);
        assert!(logit.is_finite() && *logit >= 0.0 && tuned.is_finite() && *tuned >= 0.0);
    }
    let better = report
        .iter()
        .filter(|(_, logit, tuned)| tuned < logit)
        .count();
    assert!(
        better >= 25,
        "the tuned lens is better on {better} of 30 layers"
    );
    assert_figure(&out.join("lens_kl.png"));

    // The saved translators load again; evaluated under TP=3 they give the same report.
    let again = dir.path().join("again");
    run_ok(&[
        "lens",
        "--model",
        "smollm2",
        "--translators",
        out.join("tuned_lens.safetensors").to_str().unwrap(),
        "--eval-text",
        eval_path.to_str().unwrap(),
        "--eval-tokens",
        "128",
        "--out",
        again.to_str().unwrap(),
        "--tp",
        "3",
    ]);
    let reloaded = read_report(&again.join("lens_report.json"));
    for ((_, logit_a, tuned_a), (_, logit_b, tuned_b)) in report.iter().zip(&reloaded) {
        assert!(
            (logit_a - logit_b).abs() < 1e-3 * logit_a.max(1.0),
            "{logit_a} vs {logit_b}"
        );
        assert!(
            (tuned_a - tuned_b).abs() < 1e-3 * tuned_a.max(1.0),
            "{tuned_a} vs {tuned_b}"
        );
    }
}

/// `(layer, logit_kl_bits, tuned_kl_bits)` of every entry of a `lens_report.json`.
fn read_report(path: &Path) -> Vec<(usize, f64, f64)> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["layer"].as_u64().unwrap() as usize,
                l["logit_kl_bits"].as_f64().unwrap(),
                l["tuned_kl_bits"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn lens_refuses_translators_of_another_model_and_a_missing_text() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("tiny");
    tiny_checkpoint(5).unwrap().save_hf_dir(&model_dir).unwrap();
    let text = dir.path().join("eval.txt");
    std::fs::write(&text, "To be, or not to be, that is the question.").unwrap();
    let wrong = dir.path().join("wrong.safetensors");
    let tensors = std::collections::HashMap::from([(
        "translators.0.weight".to_string(),
        Tensor::zeros((3, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
    )]);
    candle_core::safetensors::save(&tensors, &wrong).unwrap();
    let model = model_dir.to_str().unwrap();
    let out = dir.path().join("out");
    let error = run_failing(&[
        "lens",
        "--model",
        model,
        "--translators",
        wrong.to_str().unwrap(),
        "--eval-text",
        text.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        error.contains("translators.0.weight has shape [3, 3]"),
        "{error}"
    );
    let error = run_failing(&[
        "lens",
        "--model",
        model,
        "--train-text",
        text.to_str().unwrap(),
        "--eval-text",
        dir.path().join("missing.txt").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(error.contains("missing.txt"), "{error}");

    // A short text trains and evaluates on the tiny model too.
    run_ok(&[
        "lens",
        "--model",
        model,
        "--train-text",
        text.to_str().unwrap(),
        "--eval-text",
        text.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(read_report(&out.join("lens_report.json")).len(), 4);
}

/// The README's per-layer table: (logit lens, tuned lens) KL in bits, from the
/// gallery's `lens` command (2048 training tokens).
const README_LENS: [(f64, f64); 30] = [
    (148.77, 47.89),
    (19.64, 9.87),
    (21.31, 9.35),
    (20.90, 9.33),
    (20.94, 9.48),
    (20.97, 9.44),
    (21.80, 9.29),
    (21.45, 8.94),
    (22.03, 8.94),
    (23.87, 8.68),
    (25.18, 8.50),
    (26.40, 8.58),
    (25.18, 8.68),
    (24.14, 8.66),
    (24.10, 8.62),
    (23.97, 8.72),
    (25.71, 8.35),
    (25.66, 8.21),
    (25.19, 8.19),
    (24.18, 7.66),
    (22.37, 7.31),
    (21.48, 7.47),
    (21.60, 6.95),
    (20.05, 6.51),
    (16.93, 5.66),
    (12.27, 4.87),
    (10.69, 4.48),
    (9.18, 3.92),
    (6.90, 3.28),
    (5.02, 2.56),
];

#[test]
fn the_readme_lens_run_beats_the_logit_lens_at_every_layer_with_the_tables_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lens");
    let eval = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/data/shakespeare_heldout.txt"
    );
    // The README's command: 2048 training tokens, 2048 evaluation tokens.
    run_ok(&[
        "lens",
        "--model",
        "smollm2",
        "--eval-text",
        eval,
        "--train-tokens",
        "2048",
        "--out",
        out.to_str().unwrap(),
    ]);
    let report = read_report(&out.join("lens_report.json"));
    assert_eq!(report.len(), 30);
    for ((layer, logit, tuned), (readme_logit, readme_tuned)) in report.iter().zip(README_LENS) {
        eprintln!(
            "layer {layer:>2}: logit {logit:.2} (README {readme_logit}), tuned {tuned:.2} (README {readme_tuned})"
        );
        assert!(
            tuned < logit,
            "layer {layer}: tuned {tuned} vs logit {logit}"
        );
        // The table is rounded to 0.01 bits.
        assert!(
            (logit - readme_logit).abs() < 0.01,
            "layer {layer}: logit {logit}"
        );
        assert!(
            (tuned - readme_tuned).abs() < 0.01,
            "layer {layer}: tuned {tuned}"
        );
    }
}
