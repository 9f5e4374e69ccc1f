//! `--cluster` and the job commands on the command line: a capture of SmolLM2 at tp=3 ×
//! pp=2 over a job writes what threads write; `flexmodel workers` lists the members;
//! a worker leaves its job at once on SIGTERM; a driver or a worker that cannot reach
//! etcd fails within seconds saying so.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::child::Guarded;
use common::child::OutputWithin;
use common::cli::{flexmodel, succeeded, tensors, tiny_dir};
use common::etcd::{TestJob, all_members_are, free_port, members, wait_for_members};
use common::processes::{signal, wait_until};
use common::smollm2_path;
use flexmodel_cluster::membership::MemberState;

#[test]
fn a_smollm2_capture_generation_and_dataset_over_a_job_at_tp3_pp2_are_what_threads_write_and_workers_lists_it()
 {
    let job = TestJob::start("capture", 1, 6);
    // Fetched into the cache once; each worker resolves the name on its own.
    smollm2_path();
    let model = "smollm2";
    let out = tempfile::tempdir().unwrap();
    let url = job.url.to_string();
    let token = job.token.path.to_str().unwrap();
    let capture = |to: &str, extra: &[&str]| {
        let to = out.path().join(to);
        let mut args = vec![
            "capture",
            "--model",
            model,
            "--prompt",
            "The quick brown fox",
            "--hook",
            "blocks.*.hook_resid_post",
            "--hook",
            "blocks.4.attn.hook_z",
            "--edit",
            "blocks.4.attn.hook_z=zero-head:7",
            "--grad",
            "--tp",
            "3",
            "--pp",
            "2",
            "--out",
            to.to_str().unwrap(),
        ];
        args.extend(extra);
        succeeded(&args);
        tensors(&to)
    };
    let threads = capture("threads.safetensors", &[]);
    let cluster = capture(
        "cluster.safetensors",
        &["--cluster", &url, "--token-file", token],
    );
    assert!(
        threads
            .iter()
            .any(|(k, _)| k == "blocks.4.attn.hook_z_grad")
    );
    assert_eq!(threads, cluster);

    // A generation of two prompts of unequal length through the workers' caches (the
    // same workers, for a new driver): the same completions and captures.
    let generate = |to: &str, extra: &[&str]| {
        let to = out.path().join(to);
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--prompt",
            "The quick brown fox",
            "--prompt",
            "Once upon a time, in a land far away,",
            "--max-new-tokens",
            "6",
            "--hook",
            "blocks.*.hook_resid_post",
            "--edit",
            "blocks.4.attn.hook_z=zero-head:7",
            "--tp",
            "3",
            "--pp",
            "2",
            "--json",
            "--out",
            to.to_str().unwrap(),
        ];
        args.extend(extra);
        let stdout = succeeded(&args);
        let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        (json["completions"].clone(), tensors(&to))
    };
    let threads = generate("threads-generate.safetensors", &[]);
    let cluster = generate(
        "cluster-generate.safetensors",
        &["--cluster", &url, "--token-file", token],
    );
    assert_eq!(threads.0, cluster.0, "the same completions");
    assert_eq!(threads.1, cluster.1, "the same captures");

    // An activation dataset cached through the workers is the threads' dataset, byte
    // for byte.
    let text = common::shakespeare_path();
    let cache = |to: &str, extra: &[&str]| {
        let to = out.path().join(to);
        let mut args = vec![
            "cache",
            "--model",
            model,
            "--text",
            text.to_str().unwrap(),
            "--hook",
            "blocks.*.hook_resid_post",
            "--seq-len",
            "32",
            "--batch",
            "2",
            "--max-tokens",
            "128",
            "--shard-mb",
            "5",
            "--tp",
            "3",
            "--pp",
            "2",
            "--out",
            to.to_str().unwrap(),
        ];
        args.extend(extra);
        succeeded(&args);
        to
    };
    let threads = cache("threads-dataset", &[]);
    let cluster = cache(
        "cluster-dataset",
        &["--cluster", &url, "--token-file", token],
    );
    common::dataset::assert_same_files(&threads, &cluster);

    // Six members, each holding its rank of SmolLM2 under tp=3 pp=2, ready once their
    // sessions have ended.
    wait_until("every worker to be ready", Duration::from_secs(5), || {
        all_members_are(&job.url, MemberState::Ready)
    });
    let listed = succeeded(&["workers", "--cluster", &url]);
    let lines: Vec<Vec<&str>> = listed
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 6, "{listed}");
    let records = members(&job.url);
    let mut ranks: Vec<&str> = Vec::new();
    for (line, record) in lines.iter().zip(&records) {
        // id host address device rank model state
        assert_eq!(line.len(), 7, "{listed}");
        assert_eq!(line[0], record.id);
        assert_eq!(line[1], record.host);
        assert_eq!(line[2], record.address);
        assert_eq!(line[3], "cpu");
        assert_eq!(line[5], "smollm2");
        assert_eq!(line[6], "ready");
        ranks.push(line[4]);
    }
    ranks.sort();
    assert_eq!(ranks, ["0", "1", "2", "3", "4", "5"]);
}

#[test]
fn a_worker_leaves_its_job_at_once_on_sigterm() {
    let job = TestJob::start("leave", 1, 2);
    let pid = job.workers[0].pid();
    signal(pid, "TERM");
    // Well within the 5 s its lease would take to expire.
    let took = wait_until("the worker's record to go", Duration::from_secs(2), || {
        members(&job.url).iter().all(|m| m.pid != pid)
    });
    eprintln!("the record went {took:?} after SIGTERM");
    wait_until("the worker to exit", Duration::from_secs(5), || {
        common::processes::ended(pid)
    });
    let rest = members(&job.url);
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].state, MemberState::Idle);
}

#[test]
fn a_worker_or_a_driver_that_cannot_reach_etcd_fails_within_seconds_saying_so() {
    let nobody = format!("127.0.0.1:{}", free_port());
    let token = common::etcd::TokenFile::new("unreachable-secret");
    let token = token.path.to_str().unwrap();
    let start = Instant::now();
    let out = flexmodel(&[
        "worker",
        "--etcd",
        &nobody,
        "--job",
        "j",
        "--token-file",
        token,
    ]);
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("cannot reach etcd at {nobody} within 10 s")),
        "{err}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");

    let dir = tiny_dir(1);
    let url = format!("etcd://{nobody}/j");
    let start = Instant::now();
    let out = flexmodel(&[
        "bench",
        "--model",
        dir.path().to_str().unwrap(),
        "--batch",
        "1",
        "--seq",
        "4",
        "--iters",
        "1",
        "--cluster",
        &url,
        "--token-file",
        token,
    ]);
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot reach etcd at"), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

#[test]
fn a_malformed_cluster_url_is_a_clear_error() {
    let out = flexmodel(&["workers", "--cluster", "http://127.0.0.1:2379/j"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("it does not start with etcd://"), "{err}");
}

#[test]
fn a_job_worker_keeps_serving_after_its_driver_is_killed() {
    let job = TestJob::start("killed-driver", 1, 2);
    let dir = tiny_dir(2);
    let model = dir.path().to_str().unwrap();
    let url = job.url.to_string();
    let token = job.token.path.to_str().unwrap();
    let bench = |iters: &'static str| {
        let args = [
            "bench",
            "--model",
            model,
            "--batch",
            "1",
            "--seq",
            "8",
            "--iters",
            iters,
            "--tp",
            "2",
            "--cluster",
            &url,
            "--token-file",
            token,
        ];
        args.map(str::to_string)
    };
    let mut driver = Guarded::spawn(
        Command::new(common::flexmodel_binary())
            .args(bench("100000"))
            .env("FLEXMODEL_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
        "the driver",
    );
    wait_until("the workers to serve", Duration::from_secs(30), || {
        all_members_are(&job.url, MemberState::Serving)
    });
    driver.kill();
    // The workers notice at once; the job is free again once the killed driver's lease
    // expires (5 s), and they serve the next driver with the slices they kept.
    wait_until("the workers to be ready", Duration::from_secs(5), || {
        all_members_are(&job.url, MemberState::Ready)
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let args = bench("1");
        let out = flexmodel(&args.iter().map(String::as_str).collect::<Vec<_>>());
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            err.contains("is busy") && Instant::now() < deadline,
            "{err}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    wait_for_members(&job.url, 2);
    assert!(job.workers.len() == 2);
}

#[test]
fn a_driver_without_enough_workers_fails_after_60_s_saying_how_many_it_has() {
    let job = TestJob::start("short", 1, 1);
    let dir = tiny_dir(3);
    let url = job.url.to_string();
    let start = Instant::now();
    let out = flexmodel(&[
        "bench",
        "--model",
        dir.path().to_str().unwrap(),
        "--batch",
        "1",
        "--seq",
        "4",
        "--tp",
        "2",
        "--cluster",
        &url,
        "--token-file",
        job.token.path.to_str().unwrap(),
    ]);
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("job short has 1 of the 2 workers it needs after 60 s"),
        "{err}"
    );
    assert!(took < Duration::from_secs(75), "took {took:?}");
}

#[test]
fn a_job_needs_token_files_and_etcd_never_holds_its_token() {
    let job = TestJob::start("tokens", 1, 1);
    // A worker without a token file is refused before it touches etcd.
    let worker = Command::new(common::flexmodel_binary())
        .args([
            "worker",
            "--etcd",
            &job.url.endpoints.join(","),
            "--job",
            "tokens",
        ])
        .output_within(Duration::from_secs(120));
    let err = String::from_utf8_lossy(&worker.stderr);
    assert!(
        !worker.status.success() && err.contains("--token-file"),
        "{err}"
    );
    assert_eq!(members(&job.url).len(), 1);
    // So is a driver.
    let dir = tiny_dir(4);
    let url = job.url.to_string();
    let out = tempfile::tempdir().unwrap();
    let to = out.path().join("c.safetensors");
    let mut args = vec![
        "capture",
        "--model",
        dir.path().to_str().unwrap(),
        "--prompt",
        "hi",
        "--hook",
        "blocks.0.hook_resid_post",
        "--out",
        to.to_str().unwrap(),
        "--cluster",
        &url,
    ];
    let refused = flexmodel(&args);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("--token-file"),
        "{err}"
    );
    args.extend(["--token-file", job.token.path.to_str().unwrap()]);
    succeeded(&args);
    assert!(to.exists());
    // Every key and value of the job in etcd, after a pass: no token, nothing of it.
    let dump = Command::new("etcdctl")
        .args([
            "--endpoints",
            &job.url.endpoints.join(","),
            "get",
            "--prefix",
            "/flexmodel/",
        ])
        .output_within(Duration::from_secs(120));
    assert!(dump.status.success());
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("/flexmodel/v1/jobs/tokens/assignment"),
        "{dump}"
    );
    assert!(!dump.contains("tokens-secret"), "{dump}");
    assert!(!dump.lines().any(|l| l.ends_with("/token")), "{dump}");
}
