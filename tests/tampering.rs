//! A man in the middle between a real driver and a real job worker: someone who can
//! write the worker's member record in etcd points the driver at a relay, which forwards
//! the handshake untouched (it cannot forge it: it has no token) and then flips a byte
//! of a frame, injects a frame of its own, or replays an earlier one. Every time, the
//! pass fails saying the connection was tampered with, naming the rank; the worker acts
//! on nothing it did not authenticate and serves the next driver.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::etcd::{Etcd, JobWorker, TokenFile, members, wait_for_members};
use common::parity::tiny_on_disk;
use common::processes::wait_until;
use common::relay::{Direction, Relay, Tamper};
use common::{batch, max_abs_diff};
use flexmodel::runtime::{Cluster, Placement};
use flexmodel::{FlexModel, HookFunction};
use flexmodel_cluster::Layout;
use flexmodel_cluster::membership::{EtcdJob, MemberState};

/// Wire codes of the frame kinds tampered with.
const CONTROL: u8 = 0;
const PIECE: u8 = 2;

#[test]
fn a_relay_that_flips_injects_or_replays_a_frame_fails_the_pass_as_tampered_naming_the_rank() {
    let etcd = Etcd::start();
    let url = etcd.url("mitm");
    let token = TokenFile::new("mitm-secret");
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("worker.log");
    let mut command = JobWorker::command(&url, Some(&token.path), "127.0.0.1:0");
    command
        .env("FLEXMODEL_LOG", "info")
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
    let _worker = JobWorker::spawn(&mut command);
    wait_for_members(&url, 1);
    let real = members(&url).remove(0);
    let relay = Relay::start(real.address.parse().unwrap());
    let placement = Placement::Cluster(Cluster {
        url: url.clone(),
        model: None,
        token_file: token.path.clone(),
    });

    let (_dir, checkpoint) = tiny_on_disk(61);
    let tokens = batch(&[&[1, 2, 3, 4], &[5, 6, 7, 8]]);
    let expected = FlexModel::build(&checkpoint, Layout::SINGLE)
        .unwrap()
        .forward(&tokens)
        .unwrap();
    let job = EtcdJob::connect(&url).unwrap();
    // Records that point at the relay; kept until the end, so that none of their leases
    // takes the worker's own record with it when it is revoked.
    let mut forged = Vec::new();
    let tampers = [
        Tamper::Flip {
            direction: Direction::Up,
            kind: PIECE,
        },
        Tamper::Flip {
            direction: Direction::Down,
            kind: CONTROL,
        },
        Tamper::Inject {
            direction: Direction::Down,
            kind: CONTROL,
        },
        Tamper::Replay {
            direction: Direction::Down,
            kind: CONTROL,
        },
        Tamper::Replay {
            direction: Direction::Up,
            kind: PIECE,
        },
    ];
    for tamper in tampers {
        wait_until("the worker to be ready", Duration::from_secs(10), || {
            let now = members(&url);
            now.len() == 1 && matches!(now[0].state, MemberState::Ready | MemberState::Idle)
        });
        let record = members(&url).remove(0);
        assert_eq!(
            record.address, real.address,
            "the worker wrote its own address back"
        );
        let lure = flexmodel_cluster::membership::MemberRecord {
            address: relay.addr().to_string(),
            ..record
        };
        forged.push(job.register(lure).unwrap());

        let mut model = FlexModel::build_on(&checkpoint, Layout::SINGLE, &placement).unwrap();
        model
            .hooks_mut()
            .register(HookFunction::new("blocks.0.hook_resid_post"))
            .unwrap();
        // Through the relay, untouched: the right answer.
        let logits = model.forward(&tokens).unwrap();
        assert_eq!(max_abs_diff(&logits, &expected), 0.0, "{tamper:?}");

        relay.arm(tamper);
        let err = model
            .forward(&tokens)
            .err()
            .unwrap_or_else(|| panic!("{tamper:?}: a tampered pass succeeded"))
            .to_string();
        eprintln!("{tamper:?}: {err}");
        assert!(relay.done(tamper), "{tamper:?} was not done");
        assert!(
            err.starts_with("rank 0 (") && err.contains("its connection was tampered with"),
            "{tamper:?}: {err}"
        );
        let side = match tamper {
            Tamper::Flip {
                direction: Direction::Up,
                ..
            }
            | Tamper::Replay {
                direction: Direction::Up,
                ..
            } => {
                "it sent failed its authentication check (altered, injected, replayed or out of order)"
            }
            _ => "a frame sent to it failed its authentication check there",
        };
        assert!(err.contains(side), "{tamper:?}: {err}");
        drop(model);
    }

    // The worker said why it closed each connection the driver's frames reached it on,
    // and obeyed none of them: it serves a driver that reaches it directly.
    let said = std::fs::read_to_string(&log).unwrap();
    let tampered_here = said
        .lines()
        .filter(|l| l.contains("the connection was tampered with: frame"))
        .count();
    assert_eq!(tampered_here, 3, "{said}");
    wait_until("the worker to be ready", Duration::from_secs(10), || {
        members(&url)
            .first()
            .is_some_and(|m| m.state == MemberState::Ready && m.address == real.address)
    });
    let mut direct = FlexModel::build_on(&checkpoint, Layout::SINGLE, &placement).unwrap();
    let logits = direct.forward(&tokens).unwrap();
    assert_eq!(max_abs_diff(&logits, &expected), 0.0);
}
