//! Ranks as worker processes (`Placement::Processes`): the same results as threads, bit
//! for bit, and the same as the single shard within the layouts' tolerance; failures —
//! an injected fault, a killed or a stopped worker — named by rank and hook, and no
//! process left behind.

mod common;

use std::time::{Duration, Instant};

use common::parity::{everything, tiny_on_disk};
use common::processes::{assert_gone, signal_at_hook};
use common::{assert_matches_single, batch};
use flexmodel::runtime::{Placement, Processes};
use flexmodel::{BlockSite, FlexModel, HookFunction, HookPoint, edits};
use flexmodel_actors::Fault;
use flexmodel_cluster::Layout;

/// As in `sharded_parity.rs`: the layouts' worst relative error against the single shard
/// is 7.8e-7.
const TOLERANCE: f64 = 5e-6;

fn processes() -> Placement {
    common::parity::worker_processes()
}

#[test]
fn worker_processes_give_the_threads_results_bit_for_bit_in_every_layout() {
    let (_dir, checkpoint) = tiny_on_disk(31);
    let single = everything(&checkpoint, Layout::SINGLE, &Placement::Threads);
    for (tp, pp, dp) in [
        (1, 1, 1),
        (2, 1, 1),
        (1, 2, 1),
        (1, 1, 2),
        (2, 2, 2),
        (4, 1, 1),
    ] {
        let layout = Layout::new(dp, pp, tp).unwrap();
        let threads = everything(&checkpoint, layout, &Placement::Threads);
        let procs = everything(&checkpoint, layout, &processes());
        assert_matches_single(&format!("procs {layout}"), &threads, &procs, 0.0, true);
        assert_matches_single(
            &format!("procs {layout} vs single"),
            &single,
            &procs,
            TOLERANCE,
            false,
        );
    }
}

#[test]
fn each_worker_holds_only_its_share_of_the_weights() {
    let (_dir, checkpoint) = tiny_on_disk(32);
    let layout = Layout::new(1, 2, 2).unwrap();
    let threads = FlexModel::build(&checkpoint, layout)
        .unwrap()
        .shard_weight_bytes();
    let procs = FlexModel::build_on(&checkpoint, layout, &processes()).unwrap();
    assert_eq!(procs.shard_weight_bytes(), threads);
    let pids = procs.worker_pids().unwrap();
    assert_eq!(pids.len(), 4);
    drop(procs);
    assert_gone(&pids);
}

#[test]
fn an_injected_fault_in_a_worker_is_named_and_the_model_stays_usable() {
    let (_dir, checkpoint) = tiny_on_disk(33);
    // tp=2 pp=2 dp=2: rank 5 is dp 0, pp 1, tp 1.
    let layout = Layout::new(2, 2, 2).unwrap();
    let mut model = FlexModel::build_on(&checkpoint, layout, &processes()).unwrap();
    let edit = HookFunction::new("blocks.3.attn.hook_z").with_edit(edits::scale(1.0));
    model.hooks_mut().register(edit.without_capture()).unwrap();
    let tokens = batch(&[&[1, 2, 3, 4], &[5, 6, 7, 8], &[9, 10, 11, 12]]);
    let expected = model.forward(&tokens).unwrap();
    let point = HookPoint::Block {
        layer: 2,
        site: BlockSite::RESID_MID,
    };
    for fault in [Fault::Error, Fault::Panic, Fault::ErrorInBackward] {
        model.inject_fault(5, point, fault).unwrap();
        let start = Instant::now();
        let err = match fault.in_backward() {
            true => model.forward_backward(&tokens).map(|_| ()),
            false => model.forward(&tokens).map(|_| ()),
        }
        .unwrap_err()
        .to_string();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "took {:?}",
            start.elapsed()
        );
        let at = match fault.in_backward() {
            true => "in backward at hook blocks.2.hook_resid_mid",
            false => "at hook blocks.2.hook_resid_mid",
        };
        assert!(
            err.starts_with("rank 5 (dp 0 pp 1 tp 1 on "),
            "{fault:?}: {err}"
        );
        assert!(
            err.contains(&format!(") failed {at}: ")),
            "{fault:?}: {err}"
        );
        assert!(err.contains("injected fault"), "{err}");
        let logits = model.forward(&tokens).unwrap();
        assert_eq!(
            logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            expected.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

/// A hook on the driver kills (or stops) one worker while every shard of its stage waits
/// for the edited tensor: the pass fails within seconds naming the rank and the hook,
/// and dropping the model leaves no worker behind.
fn lose_a_worker_mid_pass(how: &'static str, reason: &str) {
    let (_dir, checkpoint) = tiny_on_disk(34);
    // tp=2 pp=2 dp=1: rank 3 is dp 0, pp 1, tp 1.
    let layout = Layout::new(1, 2, 2).unwrap();
    let mut model = FlexModel::build_on(&checkpoint, layout, &processes()).unwrap();
    let pids = model.worker_pids().unwrap();
    let victim = pids[3];
    // The victim (tp 1) sends no piece of this replicated point: it waits there.
    let edit = signal_at_hook("blocks.2.hook_resid_pre", victim, how);
    model.hooks_mut().register(edit).unwrap();
    let tokens = batch(&[&[1, 2, 3, 4]]);
    let start = Instant::now();
    let err = model.forward(&tokens).unwrap_err().to_string();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        err.starts_with("rank 3 (dp 0 pp 1 tp 1 on ")
            && err.contains(") is gone at hook blocks.2.hook_resid_pre: "),
        "{how}: {err}"
    );
    assert!(err.contains(reason), "{how}: {err}");
    eprintln!("{how}: failed after {took:?}: {err}");
    // The next pass fails at once, naming the rank.
    let err = model.forward(&tokens).unwrap_err().to_string();
    assert!(err.starts_with("rank 3 "), "{err}");
    drop(model);
    assert_gone(&pids);
}

#[test]
fn a_killed_worker_fails_the_pass_naming_rank_and_hook_and_leaves_no_process() {
    lose_a_worker_mid_pass("KILL", "its process exited (signal: 9 (SIGKILL))");
}

#[test]
fn a_stopped_worker_fails_the_pass_once_its_heartbeats_stop() {
    lose_a_worker_mid_pass("STOP", "stopped answering");
}

#[test]
fn a_worker_that_cannot_start_is_a_clear_error() {
    let (_dir, checkpoint) = tiny_on_disk(35);
    let missing = Placement::Processes(Processes {
        program: Some("/nonexistent/flexmodel".into()),
        threads: Some(1),
        token_file: None,
    });
    let err = FlexModel::build_on(&checkpoint, Layout::new(1, 1, 2).unwrap(), &missing)
        .err()
        .unwrap();
    assert!(
        matches!(&err, flexmodel::Error::Sharded(e) if matches!(**e, flexmodel_actors::Error::SpawnWorker { rank: 0, .. })),
        "{err:?}"
    );
    let err = err.to_string();
    assert!(
        err.contains("starting the worker of rank 0: running /nonexistent/flexmodel"),
        "{err}"
    );
    // A program that exits at once instead of serving.
    let wrong = Placement::Processes(Processes {
        program: Some("/bin/true".into()),
        threads: Some(1),
        token_file: None,
    });
    let start = Instant::now();
    let err = FlexModel::build_on(&checkpoint, Layout::new(1, 1, 2).unwrap(), &wrong)
        .err()
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        matches!(&err, flexmodel::Error::Sharded(e) if matches!(**e, flexmodel_actors::Error::WorkerNotConnected { exited: Some(_), .. })),
        "{err:?}"
    );
    let err = err.to_string();
    assert!(
        err.contains("did not connect") && err.contains("exited"),
        "{err}"
    );
}
