//! The worker: one rank's process. It joins its driver, connects to its peers for the
//! in-model collectives, loads its shard and serves passes until the driver is done.
//!
//! # Failure
//!
//! A pass that fails on the shard is reported to the driver, and the worker serves the
//! next one. A peer that goes away fails the collective waiting on it
//! ([`flexmodel_cluster::Error::PeerGone`]); the driver's abort unblocks every other
//! wait. A worker that cannot join its groups or load its shard tells the driver why
//! (`Refused`) and exits.
//!
//! # Shutdown
//!
//! The driver's `Shutdown` ends the worker; so does the end of its connection to the
//! driver (the driver exited, or was killed), so that a worker never outlives its driver.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use flexmodel_cluster::transport::{Connection, Frame, FrameKind, Hello, Hub, Token};
use flexmodel_cluster::{Collective, Layout, PassControl, SingleRank, TcpCollective, TpRank};
use kameo::actor::{ActorRef, Spawn};

use crate::protocol::{
    Assignment, BackwardPass, EditedPiece, RunPass, ShardEvent, SliceHeader, Tap, ToDriver,
    ToWorker,
};
use crate::shard::{Position, ReadParameters, Run, ShardArgs};
use crate::threads::PARAMETERS_TIMEOUT;
use crate::trace_context::{RemoteParent, TracePropagation};
use crate::wire::{self, DRIVER_GROUP, WireError};
use crate::{BoxError, Error, Result, ShardActor, ShardModel};

/// How often a worker tells its driver it is alive.
pub(crate) const HEARTBEAT: Duration = Duration::from_millis(250);
/// How long a worker waits for its driver's assignment, and for its peers to connect.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Builds a worker's shard once the driver assigned it a rank.
pub trait ShardLoader {
    /// The shard of `assignment` (its rank of its layout), computing with `tp`, its
    /// tensor-parallel group.
    fn load(
        &self,
        assignment: &Assignment,
        tp: Arc<dyn Collective>,
    ) -> std::result::Result<Arc<dyn ShardModel>, BoxError>;
}

/// Where a worker finds its driver.
#[derive(Clone)]
pub struct WorkerOptions {
    /// The driver's hub.
    pub driver: SocketAddr,
    /// The rank to serve.
    pub rank: usize,
    /// The address the worker's peers reach it at (port 0: any free port).
    pub listen: SocketAddr,
    /// How the shard's spans join the driver's trace, if they are exported.
    pub trace: Option<Arc<dyn TracePropagation>>,
    /// The job's secret, which every connection proves it holds.
    pub token: Token,
}

/// Serves one rank until the driver shuts it down or goes away.
pub fn serve(options: &WorkerOptions, loader: &dyn ShardLoader) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("flexmodel-worker-io")
        .enable_all()
        .build()
        .map_err(Error::RuntimeStart)?;
    let handle = runtime.handle();
    let rank = options.rank;
    let hub = Hub::bind(options.listen, options.token.clone(), handle)?;
    let hello = Hello {
        group: DRIVER_GROUP.into(),
        member: rank,
    };
    let driver = Arc::new(hub.dial(options.driver, &hello, JOIN_TIMEOUT)?);
    let joined = ToDriver::Joined {
        pid: std::process::id(),
        host: host_name(),
        peer_address: hub.local_addr().to_string(),
    };
    let lost = |e: WireError| Error::WorkerStart {
        rank,
        reason: format!("the driver: {e}"),
    };
    wire::send(&driver, &joined, &[]).map_err(lost)?;
    let assignment = match wire::next_control::<ToWorker>(&driver, JOIN_TIMEOUT).map_err(lost)? {
        ToWorker::Assign(assignment) if assignment.rank == rank => assignment,
        other => {
            return Err(Error::Protocol {
                rank,
                what: format!("the driver sent {other:?} instead of this rank's assignment"),
            });
        }
    };
    let control = Arc::new(PassControl::default());
    let at = Arc::new(Position::default());
    let heartbeat = std::thread::Builder::new()
        .name("flexmodel-heartbeat".into())
        .spawn({
            let (driver, control, at) = (driver.clone(), control.clone(), at.clone());
            move || beat(&driver, &control, &at)
        })
        .map_err(Error::RuntimeStart)?;
    let prepared = prepare(&assignment, &hub, &control, loader);
    let Prepared {
        layout,
        pipeline,
        model,
    } = match prepared {
        Ok(prepared) => prepared,
        Err(e) => {
            let refused = ToDriver::Refused {
                message: e.to_string(),
            };
            let _ = wire::send(&driver, &refused, &[]);
            return Err(e);
        }
    };
    let param_bytes = model
        .parameters()
        .iter()
        .map(|p| (p.value.elem_count() * p.value.dtype().size_in_bytes()) as u64)
        .sum();
    let ready = ToDriver::Ready {
        param_bytes,
        peak_rss_bytes: peak_rss_bytes(),
    };
    wire::send(&driver, &ready, &[]).map_err(lost)?;
    let (events, events_rx) = unbounded();
    let (replies, replies_rx) = unbounded();
    let args = ShardArgs {
        rank,
        coords: layout.coords(rank),
        stages: layout.pp(),
        model,
        pipeline,
        events,
        replies: replies_rx,
        control: control.clone(),
        at,
    };
    let shard = runtime.block_on(async { ShardActor::spawn_in_thread(args) });
    let forwarder = std::thread::Builder::new()
        .name("flexmodel-events".into())
        .spawn({
            let driver = driver.clone();
            move || forward_events(&events_rx, &driver)
        })
        .map_err(Error::RuntimeStart)?;
    let served = serve_passes(
        rank,
        &driver,
        &shard,
        &replies,
        &control,
        options.trace.as_ref(),
    );
    // A shard blocked in a pass notices the abort; the process ends either way.
    control.abort();
    driver.close();
    drop(heartbeat);
    drop(forwarder);
    served
}

/// A worker ready to serve: its layout, its pipeline group and its shard.
struct Prepared {
    layout: Layout,
    pipeline: Arc<dyn Collective>,
    model: Arc<dyn ShardModel>,
}

/// Joins the worker's tensor-parallel and pipeline groups and loads its shard.
fn prepare(
    assignment: &Assignment,
    hub: &Hub,
    control: &Arc<PassControl>,
    loader: &dyn ShardLoader,
) -> Result<Prepared> {
    let (dp, pp, tp) = assignment.layout;
    let layout = Layout::new(dp, pp, tp)?;
    let rank = assignment.rank;
    if rank >= layout.world_size() || assignment.peers.len() != layout.world_size() {
        return Err(Error::Protocol {
            rank,
            what: format!(
                "an assignment of rank {rank} with {} peers to a layout of {} ranks",
                assignment.peers.len(),
                layout.world_size()
            ),
        });
    }
    let peers = assignment
        .peers
        .iter()
        .map(|a| {
            a.parse::<SocketAddr>().map_err(|_| Error::Protocol {
                rank,
                what: format!("a peer address {a:?} that is not HOST:PORT"),
            })
        })
        .collect::<Result<Vec<SocketAddr>>>()?;
    let me = layout.coords(rank);
    let deadline = Instant::now() + JOIN_TIMEOUT;
    // One TCP group per axis, named after it; `members` are ranks in group order.
    let join = |name: String, members: Vec<usize>| -> Result<Arc<dyn Collective>> {
        if members.len() == 1 {
            return Ok(Arc::new(SingleRank));
        }
        let index = members
            .iter()
            .position(|&r| r == rank)
            .ok_or(Error::Internal("a rank outside its own group"))?;
        let addresses: Vec<SocketAddr> = members.iter().map(|&r| peers[r]).collect();
        let member = TpRank::new(index, members.len())?;
        let group =
            TcpCollective::connect(&name, member, &addresses, hub, control.clone(), deadline)?;
        Ok(Arc::new(group))
    };
    let tp_group = join(format!("tp.dp{}.pp{}", me.dp, me.pp), layout.tp_group(rank))?;
    let pipeline = join(format!("pp.dp{}.tp{}", me.dp, me.tp), layout.pp_group(rank))?;
    let model = loader
        .load(assignment, tp_group)
        .map_err(|e| Error::WorkerStart {
            rank,
            reason: e.to_string(),
        })?;
    Ok(Prepared {
        layout,
        pipeline,
        model,
    })
}

/// Handles the driver's messages until it shuts the worker down or goes away.
fn serve_passes(
    rank: usize,
    driver: &Connection,
    shard: &ActorRef<ShardActor>,
    replies: &Sender<EditedPiece>,
    control: &PassControl,
    trace: Option<&Arc<dyn TracePropagation>>,
) -> Result<()> {
    let protocol = |what: String| Error::Protocol { rank, what };
    while let Ok(frame) = driver.inbox().recv() {
        match frame.kind {
            FrameKind::Edited => {
                let value = frame.to_tensor().map_err(|e| protocol(e.to_string()))?;
                let piece = EditedPiece {
                    pass: frame.pass,
                    tap: Tap::from_wire(frame.point),
                    call: frame.call as usize,
                    value,
                };
                let _ = replies.send(piece);
            }
            FrameKind::Control => {
                let message =
                    wire::parse::<ToWorker>(&frame).map_err(|e| protocol(e.to_string()))?;
                match message {
                    ToWorker::Run {
                        pass,
                        trace: context,
                        input,
                        actions,
                        fault,
                        backward,
                    } => {
                        let n = usize::from(input) + usize::from(backward.is_some());
                        let mut tensors = wire::attached(driver, n)
                            .map_err(|e| protocol(e.to_string()))?
                            .into_iter();
                        let input = if input { tensors.next() } else { None };
                        let backward = match (backward, tensors.next()) {
                            (Some(plan), Some(tokens)) => Some(BackwardPass { tokens, plan }),
                            _ => None,
                        };
                        control.begin(pass);
                        let run = RunPass {
                            pass,
                            input,
                            actions,
                            fault,
                            backward,
                        };
                        let remote = trace.map(|propagation| RemoteParent {
                            propagation: propagation.clone(),
                            context,
                        });
                        let message = Run {
                            run,
                            parent: tracing::Span::none(),
                            remote,
                        };
                        shard
                            .tell(message)
                            .blocking_send()
                            .map_err(|_| Error::Internal("the worker's shard actor stopped"))?;
                    }
                    ToWorker::Abort { pass } if pass == control.pass() => control.abort(),
                    ToWorker::Abort { .. } => {}
                    ToWorker::ReadParameters => send_parameters(driver, shard, rank)?,
                    ToWorker::Shutdown => return Ok(()),
                    ToWorker::Assign(_) => {
                        return Err(protocol("a second assignment".into()));
                    }
                }
            }
            kind => return Err(protocol(format!("a {kind:?} frame from the driver"))),
        }
    }
    Ok(())
}

/// Sends the shard's parameter slices and gradients to the driver.
fn send_parameters(driver: &Connection, shard: &ActorRef<ShardActor>, rank: usize) -> Result<()> {
    let (reply, answer) = crossbeam_channel::bounded(1);
    shard
        .tell(ReadParameters { reply })
        .blocking_send()
        .map_err(|_| Error::Internal("the worker's shard actor stopped"))?;
    let slices = answer
        .recv_timeout(PARAMETERS_TIMEOUT)
        .map_err(|_| Error::Internal("the worker's shard did not hand over its parameters"))?;
    let described = slices
        .iter()
        .map(|(p, g)| {
            let split = p.split.clone().map(|(dim, r)| (dim, r.start, r.end));
            SliceHeader {
                name: p.name.clone(),
                split,
                has_grad: g.is_some(),
            }
        })
        .collect();
    let tensors: Vec<&candle_core::Tensor> = slices
        .iter()
        .flat_map(|(p, g)| std::iter::once(&p.value).chain(g.as_ref()))
        .collect();
    wire::send(
        driver,
        &ToDriver::Parameters { slices: described },
        &tensors,
    )
    .map_err(|e| Error::Protocol {
        rank,
        what: e.to_string(),
    })
}

/// Sends the shard's events to the driver as they come.
fn forward_events(events: &Receiver<ShardEvent>, driver: &Connection) {
    while let Ok(event) = events.recv() {
        let sent = match event {
            ShardEvent::Piece {
                pass,
                tap,
                call,
                value,
                ..
            } => Frame::tensor(FrameKind::Piece, pass, tap.to_wire(), call as u32, &value)
                .map_err(|e| WireError::Unexpected(e.to_string()))
                .and_then(|frame| driver.send(frame).map_err(|_| WireError::Closed)),
            ShardEvent::Done {
                pass, output, loss, ..
            } => {
                let done = ToDriver::Done {
                    pass,
                    output: output.is_some(),
                    loss,
                    peak_rss_bytes: peak_rss_bytes(),
                };
                wire::send(driver, &done, &output.iter().collect::<Vec<_>>())
            }
            ShardEvent::Failed {
                pass,
                at,
                cause,
                after_abort,
                ..
            } => {
                let failed = ToDriver::Failed {
                    pass,
                    at,
                    cause,
                    after_abort,
                };
                wire::send(driver, &failed, &[])
            }
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "the driver is gone");
            return;
        }
    }
}

/// Tells the driver, every [`HEARTBEAT`], that the worker is alive and where its shard is.
fn beat(driver: &Connection, control: &PassControl, at: &Position) {
    while driver.is_open() {
        let heartbeat = ToDriver::Heartbeat {
            pass: control.pass(),
            at: at.get(),
            peak_rss_bytes: peak_rss_bytes(),
        };
        if wire::send(driver, &heartbeat, &[]).is_err() {
            return;
        }
        // Beat early when the shard starts waiting, so that the driver knows where.
        at.watch(HEARTBEAT);
    }
}

/// The process's peak resident memory (`VmHWM` of `/proc/self/status`), in bytes.
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// This machine's name, for errors that name where a rank runs.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
