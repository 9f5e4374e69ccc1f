//! `--sae DIR@HOOK` on the command line: a capture with latent edits and gradients is the
//! same on threads, worker processes and a job's workers, latents split over four
//! tensor-parallel ranks; `generate` and `cache` splice the SAEs too (the latents a
//! dataset column that Hugging Face `datasets` reads); an SAE too big for one rank's
//! memory runs split over worker processes; bad `--sae` and latent edits are refused
//! saying what is wrong.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::child::{OutputWithin, RUN_DEADLINE};
use common::cli::{flexmodel, succeeded, succeeded_output, tensors, tiny_dir};
use common::dataset::read_with_datasets;
use common::etcd::TestJob;
use flexmodel::tiny::write_random_sae;

/// Latents per SAE: 90 over four ranks is 23, 23, 22, 22.
const D_SAE: usize = 90;
const TOPK_HOST: &str = "blocks.1.hook_resid_post";
const JUMPRELU_HOST: &str = "blocks.2.hook_attn_out";

/// `--sae` values of a top-k SAE and a JumpReLU SAE on the tiny model, written in `dir`.
fn saes(dir: &Path) -> [String; 2] {
    let sae = |name: &str, architecture: &str, host: &str, seed: u64| {
        let path: PathBuf = dir.join(name);
        write_random_sae(&path, architecture, (64, D_SAE), 5, host, seed).unwrap();
        format!("{}@{host}", path.display())
    };
    [
        sae("topk", "topk", TOPK_HOST, 1),
        sae("jumprelu", "jumprelu", JUMPRELU_HOST, 2),
    ]
}

fn latents(host: &str) -> String {
    format!("{host}.hook_sae_acts_post")
}

#[test]
fn a_capture_with_saes_is_the_same_on_threads_processes_and_a_jobs_workers() {
    let model = tiny_dir(3);
    let dir = tempfile::tempdir().unwrap();
    let [topk, jumprelu] = saes(dir.path());
    let clamp = format!("{}=clamp-latent:5:3", latents(TOPK_HOST));
    let zero = format!("{}=zero-latent:10", latents(JUMPRELU_HOST));
    let all_topk = format!("{TOPK_HOST}.hook_sae_*");
    let jumprelu_latents = latents(JUMPRELU_HOST);
    let capture = |to: &str, extra: &[&str]| {
        let to = dir.path().join(to);
        let mut args = vec![
            "capture",
            "--model",
            model.path().to_str().unwrap(),
            "--prompt",
            "SAEs on every rank",
            "--prompt",
            "and latents split",
            "--sae",
            &topk,
            "--sae",
            &jumprelu,
            "--hook",
            &all_topk,
            "--hook",
            &jumprelu_latents,
            "--hook",
            "unembed.hook_out",
            "--edit",
            &clamp,
            "--edit",
            &zero,
            "--grad",
            "--out",
            to.to_str().unwrap(),
        ];
        args.extend(extra);
        succeeded(&args);
        tensors(&to)
    };
    let single = capture("single.safetensors", &[]);
    let names: Vec<&str> = single.iter().map(|(k, _)| k.as_str()).collect();
    for name in [
        "blocks.1.hook_resid_post.hook_sae_acts_post",
        "blocks.1.hook_resid_post.hook_sae_acts_post_grad",
        "blocks.1.hook_resid_post.hook_sae_error",
        "blocks.2.hook_attn_out.hook_sae_acts_post_grad",
        "loss",
    ] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    let threads = capture("threads.safetensors", &["--tp", "4"]);
    for ((name, a), (_, b)) in single.iter().zip(&threads) {
        let scale = a.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst / scale < 1e-5,
            "{name}: tp=4 differs by {worst} (of {scale})"
        );
    }
    let procs = capture("procs.safetensors", &["--tp", "4", "--procs"]);
    assert_eq!(threads, procs, "worker processes write what threads write");
    let job = TestJob::start("sae", 1, 4);
    let url = job.url.to_string();
    let token = job.token.path.to_str().unwrap();
    let job_args = [
        "--tp",
        "2",
        "--pp",
        "2",
        "--cluster",
        &url,
        "--token-file",
        token,
    ];
    let cluster = capture("cluster.safetensors", &job_args);
    let threads = capture("threads-2x2.safetensors", &job_args[..4]);
    assert_eq!(threads, cluster, "a job's workers write what threads write");
}

#[test]
fn generate_and_cache_splice_the_saes_and_the_latents_are_a_dataset_column() {
    let model = tiny_dir(4);
    let dir = tempfile::tempdir().unwrap();
    let [topk, _] = saes(dir.path());
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.path().to_str().unwrap(),
            "--prompt",
            "steer me",
            "--max-new-tokens",
            "8",
            "--json",
            "--tp",
            "2",
        ];
        args.extend(extra);
        let stdout = succeeded(&args);
        let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        json["completions"][0]["tokens"].clone()
    };
    let plain = generate(&[]);
    assert_eq!(generate(&["--sae", &topk]), plain, "the error term is on");
    let steer = format!("{}=clamp-latent:5:40", latents(TOPK_HOST));
    let steered = generate(&["--sae", &topk, "--edit", &steer]);
    assert_ne!(steered, plain, "a clamped latent changes the generation");

    let text = dir.path().join("corpus.txt");
    std::fs::write(&text, "a corpus of bytes for the tiny model, ".repeat(20)).unwrap();
    let out = dir.path().join("dataset");
    let column = latents(TOPK_HOST);
    succeeded(&[
        "cache",
        "--model",
        model.path().to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--sae",
        &topk,
        "--hook",
        &column,
        "--hook",
        TOPK_HOST,
        "--seq-len",
        "32",
        "--tp",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let read = read_with_datasets(&out);
    // 760 bytes, a token each, in rows of 32.
    let rows = 760 / 32;
    assert_eq!(read.info["rows"], rows);
    let values = &read.columns[&column];
    assert_eq!(values.dims(), [rows, 32, D_SAE]);
    assert_eq!(read.columns[TOPK_HOST].dims(), [rows, 32, 64]);
    // Five latents of the top-k a position are active.
    assert!(
        common::active_per_position(values)
            .iter()
            .all(|&n| n == 5.0)
    );
}

#[test]
fn a_bad_sae_or_latent_edit_is_refused_saying_what_is_wrong() {
    let model = tiny_dir(5);
    let dir = tempfile::tempdir().unwrap();
    let [topk, _] = saes(dir.path());
    let refused = |extra: &[&str]| {
        let mut args = vec![
            "capture",
            "--model",
            model.path().to_str().unwrap(),
            "--prompt",
            "x y",
            "--hook",
            "hook_embed",
            "--out",
            "/dev/null",
        ];
        args.extend(extra);
        let out = flexmodel(&args);
        assert!(!out.status.success(), "{extra:?} succeeded");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let error = refused(&["--sae", "no-hook-here"]);
    assert!(
        error.contains("no-hook-here") && error.contains("DIR@HOOK"),
        "{error}"
    );
    let missing = format!("{}@{TOPK_HOST}", dir.path().join("nowhere").display());
    let error = refused(&["--sae", &missing]);
    assert!(error.contains("nowhere/cfg.json"), "{error}");
    let at_z = topk.replace(TOPK_HOST, "blocks.1.attn.hook_z");
    let error = refused(&["--sae", &at_z]);
    assert!(
        error.contains("cannot splice an SAE at blocks.1.attn.hook_z"),
        "{error}"
    );
    let unknown = format!("{}=zero-latent:1", latents(JUMPRELU_HOST));
    let error = refused(&["--sae", &topk, "--edit", &unknown]);
    assert!(error.contains(&latents(JUMPRELU_HOST)), "{error}");
    let beyond = format!("{}=zero-latent:{D_SAE}", latents(TOPK_HOST));
    let error = refused(&["--sae", &topk, "--edit", &beyond]);
    assert!(error.contains("latent 90 does not exist"), "{error}");
    let error = refused(&[
        "--sae",
        &topk,
        "--edit",
        "blocks.0.hook_resid_post=clamp-latent:1:2",
    ]);
    assert!(error.contains("is not an SAE's latents"), "{error}");
}

#[test]
fn an_sae_too_big_for_one_rank_runs_with_its_latents_split_over_worker_processes() {
    let model = tiny_dir(6);
    let dir = tempfile::tempdir().unwrap();
    // 800 000 latents: W_enc and W_dec of 64 × 800 000 f32 each, 410 MB.
    let big = dir.path().join("big");
    write_random_sae(&big, "standard", (64, 800_000), 0, TOPK_HOST, 9).unwrap();
    let sae_bytes = std::fs::metadata(big.join("sae_weights.safetensors"))
        .unwrap()
        .len();
    // Memory for the tiny model and half the SAE: not for all of it in one process.
    let limit = (sae_bytes / 2 + 16_000_000).to_string();
    let sae = format!("{}@{TOPK_HOST}", big.display());
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--model",
            model.path().to_str().unwrap(),
            "--batch",
            "1",
            "--seq",
            "8",
            "--iters",
            "1",
            "--sae",
            &sae,
            "--json",
        ];
        args.extend(extra);
        Command::new(common::flexmodel_binary())
            .args(&args)
            .env("FLEXMODEL_LOG", "warn")
            .env("FLEXMODEL_MEMORY_BYTES", &limit)
            .output_within(RUN_DEADLINE)
    };
    for threads in [&["--tp", "1"][..], &["--tp", "4"][..]] {
        let out = bench(threads);
        let error = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && error.contains("of memory is available"),
            "{error}"
        );
    }
    let out = bench(&["--tp", "4", "--procs"]);
    let stdout = succeeded_output(out, "bench --tp 4 --procs");
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let peaks: Vec<u64> = serde_json::from_value(json["peak_rss_bytes_per_rank"].clone()).unwrap();
    eprintln!("SAE {sae_bytes} bytes; each worker's peak resident memory: {peaks:?}");
    for peak in peaks {
        assert!(peak < sae_bytes / 2, "a worker peaked at {peak} bytes");
    }
}
