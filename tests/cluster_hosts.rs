//! Two hosts on one machine (network namespaces joined by a bridge; needs root, as CI
//! runs): etcd on one, three workers on each. A capture at tp=3 × pp=2 across them, with
//! an edit and gradients, writes what threads write, each tensor-parallel group kept on
//! one host, and equals the single shard within the layout's tolerance; taking one
//! host's link down fails the running pass within 20 s naming a rank on it.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::assert_matches_single;
use common::child::Guarded;
use common::child::{OutputWithin, RUN_DEADLINE};
use common::cli::{succeeded_output, tensors};
use common::etcd::{JobWorker, TokenFile};
use common::netns::{EtcdOnHost, Hosts};
use common::parity::tiny_for_tp3_on_disk;

const FLEXMODEL: &str = env!("CARGO_BIN_EXE_flexmodel");

/// Two hosts, etcd on the first, three workers of job `job` on each; the workers list
/// as `flexmodel workers` prints it (asked from the first host) once all six are there.
struct TwoHosts {
    workers: Vec<JobWorker>,
    token: TokenFile,
    url: String,
    _etcd: EtcdOnHost,
    hosts: Hosts,
}

impl TwoHosts {
    fn start(job: &str) -> TwoHosts {
        let hosts = Hosts::new(2);
        let etcd = EtcdOnHost::start(&hosts, 0);
        let token = TokenFile::new("hosts-secret");
        let mut workers = Vec::new();
        for host in [0, 1] {
            for _ in 0..3 {
                let listen = format!("{}:0", hosts.address(host));
                let args = [
                    "worker",
                    "--etcd",
                    &etcd.endpoint,
                    "--job",
                    job,
                    "--listen",
                    &listen,
                    "--token-file",
                    token.path.to_str().unwrap(),
                ];
                let mut command = hosts.command(host, FLEXMODEL, &args);
                command
                    .env("RAYON_NUM_THREADS", "1")
                    .env("FLEXMODEL_LOG", "warn")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null());
                workers.push(JobWorker::spawn(&mut command));
            }
        }
        let url = format!("etcd://{}/{job}", etcd.endpoint);
        let two = TwoHosts {
            workers,
            token,
            url,
            _etcd: etcd,
            hosts,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while two.list().lines().count() < 6 {
            assert!(Instant::now() < deadline, "six workers did not register");
            std::thread::sleep(Duration::from_millis(200));
        }
        two
    }

    /// `flexmodel workers`, asked from the first host.
    fn list(&self) -> String {
        let out = self
            .hosts
            .command(0, FLEXMODEL, &["workers", "--cluster", &self.url])
            .output_within(RUN_DEADLINE);
        succeeded_output(out, "workers")
    }

    /// A driver on the first host running `args` over the job.
    fn driver(&self, args: &[&str]) -> Command {
        let mut all = args.to_vec();
        all.extend([
            "--cluster",
            &self.url,
            "--token-file",
            self.token.path.to_str().unwrap(),
        ]);
        let mut command = self.hosts.command(0, FLEXMODEL, &all);
        command.env("FLEXMODEL_LOG", "warn");
        command
    }
}

#[test]
fn a_capture_at_tp3_pp2_across_two_hosts_writes_what_threads_write() {
    let two = TwoHosts::start("across");
    let (dir, _) = tiny_for_tp3_on_disk(51);
    let out = tempfile::tempdir().unwrap();
    let tokens = out.path().join("tokens.txt");
    std::fs::write(&tokens, "5 17 200 3 99 1\n250 0 7 7 7 9\n").unwrap();
    let capture = |to: &Path| {
        vec![
            "capture".to_string(),
            "--model".into(),
            dir.path().to_str().unwrap().into(),
            "--tokens-file".into(),
            tokens.to_str().unwrap().into(),
            "--hook".into(),
            "*".into(),
            "--edit".into(),
            "blocks.1.attn.hook_z=zero-head:5".into(),
            "--grad".into(),
            "--tp".into(),
            "3".into(),
            "--pp".into(),
            "2".into(),
            "--out".into(),
            to.to_str().unwrap().into(),
        ]
    };
    let threads = out.path().join("threads.safetensors");
    let args = capture(&threads);
    let ran = Command::new(FLEXMODEL)
        .args(&args)
        .env("FLEXMODEL_LOG", "warn")
        .output_within(RUN_DEADLINE);
    succeeded_output(ran, "capture with threads");
    let across = out.path().join("across.safetensors");
    let args = capture(&across);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    succeeded_output(
        two.driver(&args).output_within(RUN_DEADLINE),
        "capture across hosts",
    );
    // And the single shard: the worst relative error measured is 1.15e-6.
    let single = out.path().join("single.safetensors");
    let mut args = capture(&single);
    args.truncate(args.len() - 6);
    args.extend(["--out".into(), single.to_str().unwrap().into()]);
    let ran = Command::new(FLEXMODEL)
        .args(&args)
        .env("FLEXMODEL_LOG", "warn")
        .output_within(RUN_DEADLINE);
    succeeded_output(ran, "capture on one shard");
    let load = |path: &Path| -> std::collections::BTreeMap<String, candle_core::Tensor> {
        candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .collect()
    };
    let single = load(&single);
    assert_matches_single(
        "across hosts vs single",
        &single,
        &load(&across),
        1e-5,
        false,
    );
    let (threads, across) = (tensors(&threads), tensors(&across));
    assert!(
        threads
            .iter()
            .any(|(k, _)| k == "blocks.3.hook_resid_post_grad")
    );
    assert_eq!(threads, across);

    // Ranks 0-2 (one tensor-parallel group) on one host, 3-5 on the other.
    let listed = two.list();
    let mut by_rank: Vec<(String, String)> = listed
        .lines()
        .map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            (cells[4].to_string(), cells[1].to_string())
        })
        .collect();
    by_rank.sort();
    let hosts: Vec<&str> = by_rank.iter().map(|(_, h)| h.as_str()).collect();
    assert!(
        hosts[0..3].iter().all(|h| *h == hosts[0])
            && hosts[3..6].iter().all(|h| *h == hosts[3])
            && hosts[0] != hosts[3],
        "{listed}"
    );
    assert_eq!(two.workers.len(), 6);
}

#[test]
fn a_hosts_link_cut_fails_the_running_pass_within_20_s_naming_a_rank_on_it() {
    let two = TwoHosts::start("cut");
    let (dir, _) = tiny_for_tp3_on_disk(52);
    let model = dir.path().to_str().unwrap();
    let args = [
        "bench", "--model", model, "--batch", "1", "--seq", "16", "--iters", "100000", "--tp", "3",
        "--pp", "2",
    ];
    let driver = Guarded::spawn(
        two.driver(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
        "the driver",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !two.list().contains("serving") {
        assert!(Instant::now() < deadline, "the job's workers never served");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let cut = Instant::now();
    two.hosts.cut(1);
    let out = driver.output_within(Duration::from_secs(60));
    let took = cut.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("the pass failed {took:?} after the cut: {err}");
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let on_b = err.contains(&format!("on {})", two.hosts.name(1)));
    assert!(err.contains("rank ") && on_b, "{err}");
}
