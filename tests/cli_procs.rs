//! `--procs` on the command line: every command writes what it writes with threads, and
//! no worker outlives its driver — killed, terminated or interrupted — or a failed run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::child::Guarded;
use common::child::{OutputWithin, RUN_DEADLINE};
use common::cli::{flexmodel, succeeded, tensors, tiny_dir};
use common::processes::{children_of, ended, signal, wait_until};

fn last_json_line(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn every_command_under_procs_writes_what_threads_write() {
    let dir = tiny_dir(41);
    let model = dir.path().to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let layout = ["--tp", "2", "--pp", "2", "--dp", "2"];
    let with = |layout: &[&str], args: &[&str], procs: bool| -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(layout.iter().map(|s| s.to_string()));
        if procs {
            all.push("--procs".into());
        }
        all
    };
    let run = |args: Vec<String>| succeeded(&args.iter().map(String::as_str).collect::<Vec<_>>());

    // capture: every point, gradients, an edit, two sequences of unequal length for the
    // two replicas.
    let tokens = out.path().join("tokens.txt");
    std::fs::write(&tokens, "5 17 200 3 99 1\n250 0 7 7\n").unwrap();
    for procs in [false, true] {
        let file = out.path().join(format!("capture-{procs}.safetensors"));
        run(with(
            &layout,
            &[
                "capture",
                "--model",
                model,
                "--tokens-file",
                tokens.to_str().unwrap(),
                "--hook",
                "*",
                "--grad",
                "--edit",
                "blocks.1.attn.hook_z=zero-head:3",
                "--out",
                file.to_str().unwrap(),
            ],
            procs,
        ));
    }
    let threads = tensors(&out.path().join("capture-false.safetensors"));
    let procs = tensors(&out.path().join("capture-true.safetensors"));
    assert!(threads.len() > 100, "{} tensors", threads.len());
    assert_eq!(threads, procs, "capture: bit for bit");

    // generate: the same completions of two prompts of unequal length, through the
    // workers' key/value caches, and the same captures over the generation.
    let generated: Vec<serde_json::Value> = [false, true]
        .into_iter()
        .map(|procs| {
            let file = out.path().join(format!("generate-{procs}.safetensors"));
            let stdout = run(with(
                &layout,
                &[
                    "generate",
                    "--model",
                    model,
                    "--prompt",
                    "abc",
                    "--prompt",
                    "a longer prompt",
                    "--max-new-tokens",
                    "6",
                    "--hook",
                    "blocks.*.hook_resid_post",
                    "--hook",
                    "blocks.3.attn.hook_pattern",
                    "--edit",
                    "blocks.1.hook_mlp_out=scale:2",
                    "--out",
                    file.to_str().unwrap(),
                    "--json",
                ],
                procs,
            ));
            last_json_line(&stdout)["completions"].clone()
        })
        .collect();
    assert_eq!(generated[0], generated[1]);
    assert_eq!(
        tensors(&out.path().join("generate-false.safetensors")),
        tensors(&out.path().join("generate-true.safetensors")),
        "generate: bit for bit"
    );

    // induction: the same scores.
    for procs in [false, true] {
        let dir = out.path().join(format!("induction-{procs}"));
        run(with(
            &layout,
            &[
                "induction",
                "--model",
                model,
                "--seq-len",
                "8",
                "--batch",
                "2",
                "--seed",
                "3",
                "--out",
                dir.to_str().unwrap(),
            ],
            procs,
        ));
    }
    assert_eq!(
        tensors(
            &out.path()
                .join("induction-false/induction_scores.safetensors")
        ),
        tensors(
            &out.path()
                .join("induction-true/induction_scores.safetensors")
        )
    );

    // lens: the same report from the same training (one sequence, no replicas).
    let one = ["--tp", "2", "--pp", "2"];
    let text = out.path().join("text.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(20),
    )
    .unwrap();
    let reports: Vec<String> = [false, true]
        .into_iter()
        .map(|procs| {
            let dir = out.path().join(format!("lens-{procs}"));
            run(with(
                &one,
                &[
                    "lens",
                    "--model",
                    model,
                    "--train-text",
                    text.to_str().unwrap(),
                    "--eval-text",
                    text.to_str().unwrap(),
                    "--train-tokens",
                    "256",
                    "--eval-tokens",
                    "128",
                    "--seq-len",
                    "32",
                    "--out",
                    dir.to_str().unwrap(),
                ],
                procs,
            ));
            std::fs::read_to_string(dir.join("lens_report.json")).unwrap()
        })
        .collect();
    assert_eq!(reports[0], reports[1]);

    // bench: the parameters each rank holds, and each worker's peak memory.
    let bench = |procs: bool| {
        last_json_line(&run(with(
            &layout,
            &[
                "bench",
                "--model",
                model,
                "--batch",
                "2",
                "--seq",
                "8",
                "--iters",
                "2",
                "--hook",
                "blocks.*.hook_resid_post",
                "--profile",
                "--json",
            ],
            procs,
        )))
    };
    let (threads, procs) = (bench(false), bench(true));
    assert_eq!(procs["procs"], true);
    let bytes = procs["param_bytes_per_rank"].as_array().unwrap();
    assert_eq!(bytes.len(), 8);
    assert_eq!(
        procs["param_bytes_per_rank"],
        threads["param_bytes_per_rank"]
    );
    let peaks = procs["peak_rss_bytes_per_rank"].as_array().unwrap();
    assert_eq!(peaks.len(), 8);
    for (peak, held) in peaks.iter().zip(bytes) {
        let (peak, held) = (peak.as_u64().unwrap(), held.as_u64().unwrap());
        assert!(
            peak > held,
            "a worker's peak memory {peak} holds its {held} bytes of weights"
        );
    }
    assert!(threads.get("peak_rss_bytes_per_rank").is_none());
}

/// A driver benchmarking for a long time under `--procs --tp 2 --pp 2`, once its four
/// workers are up; kills the driver if the test fails.
struct LongRun {
    driver: Guarded,
    workers: Vec<u32>,
}

impl LongRun {
    fn start(model: &str) -> Self {
        let driver = Guarded::spawn(
            Command::new(common::flexmodel_binary())
                .args([
                    "bench", "--model", model, "--batch", "2", "--seq", "16", "--iters", "1000000",
                ])
                .args(["--tp", "2", "--pp", "2", "--procs"])
                .env("FLEXMODEL_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
            "the driver",
        );
        let pid = driver.id();
        wait_until("four workers", Duration::from_secs(30), || {
            children_of(pid).len() == 4
        });
        let workers = children_of(pid);
        // Let the passes begin.
        std::thread::sleep(Duration::from_millis(500));
        Self { driver, workers }
    }
}

impl Drop for LongRun {
    fn drop(&mut self) {
        self.driver.kill();
        for &pid in &self.workers {
            if !ended(pid) {
                signal(pid, "KILL");
            }
        }
    }
}

#[test]
fn no_worker_outlives_its_driver_killed_terminated_or_interrupted() {
    let dir = tiny_dir(42);
    for (how, number) in [("KILL", 9), ("TERM", 15), ("INT", 2)] {
        let mut run = LongRun::start(dir.path().to_str().unwrap());
        signal(run.driver.id(), how);
        let status = run.driver.wait_within(Duration::from_secs(30));
        let workers = run.workers.clone();
        let took = wait_until("the workers to exit", Duration::from_secs(5), || {
            workers.iter().all(|&p| ended(p))
        });
        eprintln!("SIG{how}: every worker ended {took:?} after the driver");
        if how == "KILL" {
            // The workers saw their driver's connection close; reaping them is init's.
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(number)
            );
            continue;
        }
        // Interrupted or terminated, the driver stops and reaps its workers, then exits
        // with 128 + the signal: not even a zombie is left.
        assert_eq!(status.code(), Some(128 + number), "SIG{how}");
        for pid in &workers {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "SIG{how}: worker {pid} left"
            );
        }
    }
}

#[test]
fn a_stopped_driver_loses_its_workers_once_it_is_silent_for_the_stated_time() {
    let dir = tiny_dir(44);
    let run = LongRun::start(dir.path().to_str().unwrap());
    // Stopped, not dead: its connections stay open, and it says nothing more.
    signal(run.driver.id(), "STOP");
    let workers = run.workers.clone();
    let took = wait_until("the workers to exit", Duration::from_secs(15), || {
        workers.iter().all(|&p| ended(p))
    });
    eprintln!("every worker ended {took:?} after its driver stopped");
    let silence = flexmodel_actors::DRIVER_SILENCE;
    assert!(
        took >= silence - Duration::from_millis(500),
        "took {took:?}"
    );
    assert!(took < silence + Duration::from_secs(2), "took {took:?}");
}

#[test]
fn a_killed_worker_fails_the_command_naming_its_rank_and_stops_the_others() {
    let dir = tiny_dir(43);
    let mut run = LongRun::start(dir.path().to_str().unwrap());
    let victim = run.workers[2];
    // The rank of the victim, from its command line.
    let cmdline = std::fs::read_to_string(format!("/proc/{victim}/cmdline")).unwrap();
    let args: Vec<&str> = cmdline.split('\0').collect();
    let rank = args[args.iter().position(|a| *a == "--rank").unwrap() + 1].to_string();
    signal(victim, "KILL");
    let start = Instant::now();
    let status = run.driver.wait_within(Duration::from_secs(30));
    let took = start.elapsed();
    assert!(!status.success());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let (_, stderr) = run.driver.printed();
    assert!(
        stderr.contains(&format!("error: rank {rank} (")) && stderr.contains("is gone"),
        "{stderr}"
    );
    assert!(stderr.contains("signal: 9 (SIGKILL)"), "{stderr}");
    let workers = run.workers.clone();
    wait_until("the other workers to exit", Duration::from_secs(5), || {
        workers.iter().all(|&p| ended(p))
    });
    eprintln!(
        "the driver failed {took:?} after rank {rank} was killed: {}",
        stderr.trim()
    );
}

#[test]
fn a_token_file_of_ones_own_is_used_and_an_empty_or_open_one_refused() {
    let dir = tiny_dir(44);
    let model = dir.path().to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let token = out.path().join("token");
    let file = out.path().join("out.safetensors");
    let capture = |token: &Path| {
        flexmodel(&[
            "capture",
            "--model",
            model,
            "--prompt",
            "abc",
            "--hook",
            "blocks.0.hook_resid_post",
            "--out",
            file.to_str().unwrap(),
            "--tp",
            "2",
            "--procs",
            "--token-file",
            token.to_str().unwrap(),
        ])
    };
    std::fs::write(&token, "\n").unwrap();
    let refused = capture(&token);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&format!(
            "the token file {}: the file is empty",
            token.display()
        )),
        "{stderr}"
    );
    std::fs::write(&token, "a secret of our own\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = capture(&token);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Open to group or others: refused, saying how to mend it.
    for mode in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .unwrap();
        let out = capture(&token);
        assert!(!out.status.success(), "mode {mode:o}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "the token file {0}: it is open to group or others (mode {mode:o}): `chmod 600 {0}` it",
                token.display()
            )),
            "{stderr}"
        );
    }
}

#[test]
fn memory_is_checked_by_the_process_that_holds_the_weights() {
    let dir = tiny_dir(44);
    let model = dir.path().to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("c.safetensors");
    let run = |extra: &[&str]| {
        let mut args = vec!["capture", "--model", model, "--prompt", "Hi", "--hook"];
        args.extend(["hook_embed", "--out", path.to_str().unwrap(), "--tp", "2"]);
        args.extend(extra);
        Command::new(common::flexmodel_binary())
            .args(&args)
            .env("FLEXMODEL_LOG", "warn")
            // 100 kB for every process: less than any rank's share of the tiny model.
            .env("FLEXMODEL_MEMORY_BYTES", "100000")
            .output_within(RUN_DEADLINE)
    };
    // In threads, this process holds both ranks and refuses the layout itself.
    let threads = run(&[]);
    let stderr = String::from_utf8_lossy(&threads.stderr);
    assert!(!threads.status.success());
    assert!(
        stderr.contains("tp=2 pp=1 dp=1 holds about 1.0 MB of weights in this process, but only 0.1 MB of memory is available"),
        "{stderr}"
    );
    // Under --procs the driver holds no weights; each worker checks its own share, and
    // the driver's error (its last line) says why the worker refused.
    let procs = run(&["--procs"]);
    let stderr = String::from_utf8_lossy(&procs.stderr);
    assert!(!procs.status.success());
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("needs about 0.5 MB for its share of the weights, but only 0.1 MB of memory is available on its machine"),
        "{stderr}"
    );
    assert!(
        last.contains("rank 0") || last.contains("rank 1"),
        "{stderr}"
    );
}
