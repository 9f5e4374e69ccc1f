//! Jobs across machines, on one machine: workers registered in a real etcd serve
//! driver after driver (`Placement::Cluster`), with the results of threads bit for bit;
//! a second driver while one runs is refused as busy; a driver with another token is
//! refused as unauthenticated; garbage on a worker's port disturbs nothing; a lost
//! worker fails its pass naming rank, host and hook, and a replacement takes its rank;
//! a worker with other weights is refused by name; a 3-member etcd loses its leader
//! under a running job.

mod common;

use std::io::Write as _;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::child::Guarded;
use common::etcd::{
    Etcd, JobWorker, TestJob, TokenFile, all_members_are, members, wait_for_members,
};
use common::parity::{everything, tiny_for_tp3_on_disk, tiny_on_disk};
use common::processes::{signal, signal_at_hook, wait_until};
use common::{assert_matches_single, batch};
use flexmodel::FlexModel;
use flexmodel::runtime::{Cluster, Placement};
use flexmodel_actors::DRIVER_SILENCE;
use flexmodel_cluster::Layout;
use flexmodel_cluster::membership::{LEASE_TTL_SECONDS, MemberState};

/// As in `worker_processes.rs`: the layouts' worst relative error against the single
/// shard is 7.8e-7.
const TOLERANCE: f64 = 5e-6;

#[test]
fn a_job_at_tp3_pp2_gives_the_threads_results_bit_for_bit_and_serves_a_second_driver() {
    let job = TestJob::start("parity", 1, 6);
    let (_dir, checkpoint) = tiny_for_tp3_on_disk(41);
    let layout = Layout::new(1, 2, 3).unwrap();
    let single = everything(&checkpoint, Layout::SINGLE, &Placement::Threads);
    let threads = everything(&checkpoint, layout, &Placement::Threads);
    let first = everything(&checkpoint, layout, &job.placement());
    assert_matches_single("cluster tp=3 pp=2", &threads, &first, 0.0, true);
    assert_matches_single("cluster vs single", &single, &first, TOLERANCE, false);

    // The workers keep their slices for the next driver, which loads nothing; each says
    // so once its session has ended.
    wait_until("every worker to be ready", Duration::from_secs(5), || {
        all_members_are(&job.url, MemberState::Ready)
    });
    let model = FlexModel::build_on(&checkpoint, layout, &job.placement()).unwrap();
    assert_eq!(model.workers_reused(), Some(vec![true; 6]));
    drop(model);
    let second = everything(&checkpoint, layout, &job.placement());
    assert_matches_single("second driver", &threads, &second, 0.0, true);
}

#[test]
fn a_second_driver_while_one_runs_is_told_the_job_is_busy() {
    let job = TestJob::start("busy", 1, 2);
    let (_dir, checkpoint) = tiny_on_disk(42);
    let layout = Layout::new(1, 1, 2).unwrap();
    let mut first = FlexModel::build_on(&checkpoint, layout, &job.placement()).unwrap();
    let err = FlexModel::build_on(&checkpoint, layout, &job.placement())
        .err()
        .expect("a second driver must be refused")
        .to_string();
    eprintln!("{err}");
    assert!(
        err.contains("job busy is busy: the driver with pid"),
        "{err}"
    );
    // The first driver is undisturbed.
    let tokens = batch(&[&[1, 2, 3], &[4, 5, 6]]);
    first.forward(&tokens).unwrap();
}

#[test]
fn a_driver_with_another_token_fails_saying_authentication_failed() {
    let job = TestJob::start("auth", 1, 2);
    let wrong = TokenFile::new("another-secret");
    let (_dir, checkpoint) = tiny_on_disk(43);
    let layout = Layout::new(1, 2, 1).unwrap();
    let err = FlexModel::build_on(&checkpoint, layout, &job.placement_with(&wrong))
        .err()
        .expect("another token must be refused")
        .to_string();
    assert!(err.contains("authentication failed"), "{err}");
    // The workers are still free for a driver with the job's token.
    let mut model = FlexModel::build_on(&checkpoint, layout, &job.placement()).unwrap();
    model.forward(batch(&[&[1, 2, 3]])).unwrap();
}

#[test]
fn garbage_on_a_workers_port_disturbs_neither_it_nor_its_driver() {
    let job = TestJob::start("garbage", 1, 2);
    let (_dir, checkpoint) = tiny_on_disk(44);
    let addresses: Vec<String> = members(&job.url)
        .iter()
        .map(|m| m.address.clone())
        .collect();
    let spray = |addresses: &[String]| {
        for address in addresses {
            let garbage: [&[u8]; 4] = [
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                &[0xff; 4096],
                // A frame header that promises 16 GiB.
                b"FMR1\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\x03",
                b"",
            ];
            for bytes in garbage {
                if let Ok(mut stream) = TcpStream::connect(address) {
                    let _ = stream.write_all(bytes);
                }
            }
        }
    };
    spray(&addresses);
    let layout = Layout::new(1, 1, 2).unwrap();
    let tokens = batch(&[&[1, 2, 3, 4]]);
    let expected = FlexModel::build(&checkpoint, layout)
        .unwrap()
        .forward(&tokens)
        .unwrap();
    let mut model = FlexModel::build_on(&checkpoint, layout, &job.placement()).unwrap();
    // And while a driver holds them.
    spray(&addresses);
    let logits = model.forward(&tokens).unwrap();
    assert_eq!(common::max_abs_diff(&logits, &expected), 0.0);
}

/// A hook on the driver kills (or stops) the worker of rank 3 while its stage waits on
/// the hook; the pass fails within seconds naming rank, host and hook; the other
/// workers stay registered with their shards, and a new worker takes rank 3 for the
/// next pass, the only one to load.
fn lose_a_worker_then_replace_it(how: &'static str, reason: &str) {
    let mut job = TestJob::start(&format!("lose-{}", how.to_lowercase()), 1, 4);
    let (_dir, checkpoint) = tiny_on_disk(45);
    // tp=2 pp=2: rank 3 is dp 0, pp 1, tp 1.
    let layout = Layout::new(1, 2, 2).unwrap();
    let tokens = batch(&[&[1, 2, 3, 4]]);
    let expected = FlexModel::build(&checkpoint, layout)
        .unwrap()
        .forward(&tokens)
        .unwrap();
    let mut model = FlexModel::build_on(&checkpoint, layout, &job.placement()).unwrap();
    let victim = model.worker_pids().unwrap()[3];
    let edit = signal_at_hook("blocks.2.hook_resid_pre", victim, how);
    model.hooks_mut().register(edit).unwrap();
    let start = Instant::now();
    let err = model.forward(&tokens).unwrap_err().to_string();
    let took = start.elapsed();
    eprintln!("{how}: failed after {took:?}: {err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        err.starts_with("rank 3 (dp 0 pp 1 tp 1 on ")
            && err.contains(") is gone at hook blocks.2.hook_resid_pre: "),
        "{how}: {err}"
    );
    assert!(err.contains(reason), "{how}: {err}");
    model.hooks_mut().clear();
    // The others stay registered; a replacement joins, and the next pass uses it.
    let left: Vec<u32> = members(&job.url)
        .iter()
        .map(|m| m.pid)
        .filter(|&p| p != victim)
        .collect();
    assert_eq!(left.len(), 3, "{how}");
    let replacement = JobWorker::start(&job.url, Some(&job.token.path), "127.0.0.1:0");
    job.workers.push(replacement);
    let logits = model.forward(&tokens).unwrap();
    assert_eq!(common::max_abs_diff(&logits, &expected), 0.0);
    assert_eq!(model.workers_reused(), Some(vec![true, true, true, false]));
    let pids = model.worker_pids().unwrap();
    assert!(!pids.contains(&victim) && left.iter().all(|p| pids.contains(p)));
    if how == "STOP" {
        signal(victim, "CONT");
    }
}

#[test]
fn a_killed_worker_fails_its_pass_by_name_and_a_replacement_takes_its_rank() {
    lose_a_worker_then_replace_it("KILL", "its connection closed");
}

#[test]
fn a_stopped_worker_fails_its_pass_once_its_heartbeats_stop_and_is_replaced() {
    lose_a_worker_then_replace_it("STOP", "stopped answering");
}

/// Sends SIGCONT to a stopped process when dropped, on every path of the test.
struct ContinueOnDrop(u32);

impl Drop for ContinueOnDrop {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

#[test]
fn a_stopped_driver_frees_its_workers_for_the_next_driver_within_seconds() {
    let job = TestJob::start("stopped-driver", 1, 2);
    let (dir, checkpoint) = tiny_on_disk(46);
    let layout = Layout::new(1, 1, 2).unwrap();
    let url = job.url.to_string();
    let args = [
        "bench",
        "--model",
        dir.path().to_str().unwrap(),
        "--batch",
        "1",
        "--seq",
        "8",
        "--iters",
        "1000000",
        "--tp",
        "2",
        "--cluster",
        &url,
        "--token-file",
        job.token.path.to_str().unwrap(),
    ];
    let driver = Guarded::spawn(
        Command::new(common::flexmodel_binary())
            .args(args)
            .env("FLEXMODEL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "the driver",
    );
    wait_until("the workers to serve", Duration::from_secs(30), || {
        all_members_are(&job.url, MemberState::Serving)
    });
    std::thread::sleep(Duration::from_millis(500));
    // Stopped, not dead: its connections stay open, and it says nothing more.
    signal(driver.id(), "STOP");
    let took = wait_until("the workers to be free", Duration::from_secs(15), || {
        all_members_are(&job.url, MemberState::Ready)
    });
    eprintln!("the workers were free {took:?} after their driver stopped");
    assert!(
        took < DRIVER_SILENCE + Duration::from_secs(2),
        "took {took:?}"
    );
    // The next driver gets them, with the slices they kept.
    let tokens = batch(&[&[1, 2, 3, 4]]);
    let expected = FlexModel::build(&checkpoint, layout)
        .unwrap()
        .forward(&tokens)
        .unwrap();
    let mut next = FlexModel::build_on(&checkpoint, layout, &job.placement()).unwrap();
    assert_eq!(
        common::max_abs_diff(&next.forward(&tokens).unwrap(), &expected),
        0.0
    );
    assert_eq!(next.workers_reused(), Some(vec![true, true]));
    drop(driver);
}

#[test]
fn etcd_stopped_longer_than_the_lease_fails_the_next_pass_and_the_job_serves_a_new_driver() {
    let job = TestJob::start("outage", 1, 1);
    let (_dir, checkpoint) = tiny_on_disk(47);
    let tokens = batch(&[&[1, 2, 3, 4]]);
    let mut model = FlexModel::build_on(&checkpoint, Layout::SINGLE, &job.placement()).unwrap();
    let expected = model.forward(&tokens).unwrap();
    let etcd = job.etcd.members[0].pid().unwrap();
    signal(etcd, "STOP");
    let stopped = ContinueOnDrop(etcd);
    std::thread::sleep(Duration::from_secs(LEASE_TTL_SECONDS as u64 + 2));
    let start = Instant::now();
    let err = model
        .forward(&tokens)
        .expect_err("a driver whose claim lapsed must not run a pass")
        .to_string();
    eprintln!("{err}");
    assert!(
        err.contains("this driver lost its claim on job outage: etcd was out of reach for longer than its 5 s lease"),
        "{err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    // etcd answers again, and lets the lapsed leases go: the worker registers again.
    drop(stopped);
    let took = wait_until(
        "the worker to register again",
        // A request sent while etcd was stopped is answered once it runs again: each
        // attempt has 2 s, and 0.26 s was measured.
        Duration::from_secs(3),
        || {
            members(&job.url)
                .first()
                .is_some_and(|m| m.state == MemberState::Ready)
        },
    );
    eprintln!("the worker was registered and ready {took:?} after etcd came back");
    drop(model);
    let mut next = FlexModel::build_on(&checkpoint, Layout::SINGLE, &job.placement()).unwrap();
    assert_eq!(
        common::max_abs_diff(&next.forward(&tokens).unwrap(), &expected),
        0.0
    );
}

#[test]
fn a_job_worker_that_cannot_load_refuses_with_its_own_rank_and_why() {
    let job = TestJob::start("unloadable", 1, 2);
    let (_dir, checkpoint) = tiny_on_disk(48);
    // A name no worker resolves on its disk.
    let placement = Placement::Cluster(Cluster {
        url: job.url.clone(),
        model: Some("/nonexistent/model".into()),
        token_file: job.token.path.clone(),
    });
    let err = FlexModel::build_on(&checkpoint, Layout::new(1, 1, 2).unwrap(), &placement)
        .err()
        .expect("a model the workers cannot load must be refused");
    let flexmodel::Error::Sharded(inner) = &err else {
        panic!("{err:?}");
    };
    let flexmodel_actors::Error::WorkerRefused { rank, message } = &**inner else {
        panic!("{inner:?}");
    };
    assert!(
        message.starts_with(&format!("loading the shard of rank {rank}: ")),
        "{message}"
    );
    assert!(message.contains("/nonexistent/model"), "{message}");
    // Both stay free for the next driver.
    wait_until("the workers to be idle", Duration::from_secs(10), || {
        members(&job.url).len() == 2 && all_members_are(&job.url, MemberState::Idle)
    });
}

#[test]
fn a_worker_with_other_weights_under_the_same_name_is_refused_by_name() {
    let etcd = Etcd::start();
    let url = etcd.url("weights");
    let token = TokenFile::new("weights-secret");
    // Each worker resolves the relative name "model" in its own directory.
    let (ours, checkpoint) = tiny_on_disk(46);
    let (theirs, _) = tiny_on_disk(47);
    let cwds = tempfile::tempdir().unwrap();
    let mut workers = Vec::new();
    for (i, dir) in [&ours, &theirs].into_iter().enumerate() {
        let cwd = cwds.path().join(i.to_string());
        std::fs::create_dir(&cwd).unwrap();
        std::os::unix::fs::symlink(dir.path(), cwd.join("model")).unwrap();
        let mut command = JobWorker::command(&url, Some(&token.path), "127.0.0.1:0");
        workers.push(JobWorker::spawn(command.current_dir(&cwd)));
        wait_for_members(&url, workers.len());
    }
    let placement = Placement::Cluster(Cluster {
        url: url.clone(),
        model: Some("model".into()),
        token_file: token.path.clone(),
    });
    let err = FlexModel::build_on(&checkpoint, Layout::new(1, 2, 1).unwrap(), &placement)
        .err()
        .expect("other weights must be refused")
        .to_string();
    eprintln!("{err}");
    assert!(
        err.contains("loaded other weights than the driver: fingerprint")
            && err.contains("on ")
            && err.contains("(worker "),
        "{err}"
    );
}

#[test]
fn a_job_survives_the_death_of_its_etcd_leader() {
    let mut job = TestJob::start("failover", 3, 2);
    let (_dir, checkpoint) = tiny_on_disk(48);
    let layout = Layout::new(1, 1, 2).unwrap();
    let tokens = batch(&[&[1, 2, 3, 4]]);
    let expected = FlexModel::build(&checkpoint, layout)
        .unwrap()
        .forward(&tokens)
        .unwrap();
    let mut model = FlexModel::build_on(&checkpoint, layout, &job.placement()).unwrap();
    let leader = job.etcd.leader();
    job.etcd.members[leader].kill();
    // Longer than a lease lives: the workers' and the driver's leases are renewed
    // through the members left.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let logits = model.forward(&tokens).unwrap();
        assert_eq!(common::max_abs_diff(&logits, &expected), 0.0);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(members(&job.url).len(), 2);
    // The job is let go and taken again through the members left.
    drop(model);
    let mut again = FlexModel::build_on(&checkpoint, layout, &job.placement()).unwrap();
    assert_eq!(again.workers_reused(), Some(vec![true, true]));
    again.forward(&tokens).unwrap();
}
