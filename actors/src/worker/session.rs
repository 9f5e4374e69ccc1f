//! One driver's session with a worker: its assignments, and the passes it runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use flexmodel_cluster::membership::{LoadedSlice, MemberState};
use flexmodel_cluster::transport::{Connection, Frame, FrameKind, Hub};
use flexmodel_cluster::{
    Collective, DeviceSpec, Layout, PassControl, Regroupable, SingleRank, TcpCollective, TpRank,
};
use kameo::actor::{ActorRef, Spawn};
use tokio::runtime::Handle;

use super::{DRIVER_SILENCE, HEARTBEAT, JOIN_TIMEOUT, ShardLoader, host_name, peak_rss_bytes};
use crate::protocol::{
    Assignment, BackwardPass, EditedPiece, RunPass, ShardEvent, SliceHeader, Tap, ToDriver,
    ToWorker,
};
use crate::shard::{Position, ReadParameters, Run, SHUTDOWN_TIMEOUT, ShardArgs};
use crate::threads::PARAMETERS_TIMEOUT;
use crate::trace_context::{RemoteParent, TracePropagation};
use crate::wire::{self, WireError};
use crate::{Error, Result, ShardActor, ShardModel, Window};

/// How long a worker that refused an assignment waits for the driver's answer, so
/// that its refusal is sent before it leaves.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// What a worker keeps from one driver to the next: the shard it loaded.
#[derive(Default)]
pub(super) struct Slot {
    loaded: Option<Loaded>,
}

/// A loaded shard and what it was loaded for.
struct Loaded {
    model_name: String,
    layout: Layout,
    rank: usize,
    model: Arc<dyn ShardModel>,
    /// The model's tensor-parallel group, replaced for each assignment.
    tp: Arc<Regroupable>,
    /// Under FSDP, the group of the shard's replicas, replaced for each assignment.
    replicas: Option<Arc<Regroupable>>,
    fingerprint: String,
    param_bytes: u64,
}

impl Slot {
    /// The slice held, as the job's records describe it.
    pub(super) fn slice(&self) -> Option<LoadedSlice> {
        self.loaded.as_ref().map(|l| LoadedSlice {
            model: l.model_name.clone(),
            layout: l.layout,
            rank: l.rank,
            fingerprint: l.fingerprint.clone(),
        })
    }
}

/// A worker's place in a job, as a session needs it.
pub(super) trait JobMember {
    /// Why `assignment` is not the job's current one for this member, if it is not.
    fn check(&self, assignment: &Assignment) -> std::result::Result<(), String>;
    /// Records what the worker is doing and the slice it holds.
    fn record(&self, state: MemberState, slice: Option<LoadedSlice>);
}

/// How a worker serves one driver.
pub(super) struct Session<'a> {
    pub(super) hub: &'a Hub,
    pub(super) runtime: &'a Handle,
    pub(super) loader: &'a dyn ShardLoader,
    pub(super) trace: Option<&'a Arc<dyn TracePropagation>>,
    /// The address peers reach this worker at.
    pub(super) address: String,
    /// The only rank this worker may serve, for a worker its driver started.
    pub(super) rank: Option<usize>,
    /// The job this worker is a member of, if it joined one.
    pub(super) member: Option<&'a dyn JobMember>,
    /// The device it computes on, for a job's worker; a worker its driver started
    /// computes where the assignment's layout says.
    pub(super) device: Option<DeviceSpec>,
}

/// What ended an assignment.
enum Next {
    /// The driver is done, or gone.
    Done,
    /// The driver assigned the worker again (its group changed).
    Reassigned(Assignment),
}

impl Session<'_> {
    /// Serves the driver at the other end of `driver` until it is done or gone; fails
    /// if an assignment could not be served (the driver was told why).
    pub(super) fn serve(&self, driver: Arc<Connection>, slot: &mut Slot) -> Result<()> {
        let lost = |e: WireError| Error::LostDriver {
            reason: e.to_string(),
        };
        let joined = ToDriver::Joined {
            pid: std::process::id(),
            host: host_name(),
            peer_address: self.address.clone(),
        };
        wire::send(&driver, &joined, &[]).map_err(lost)?;
        let mut assignment =
            match wire::next_control::<ToWorker>(&driver, JOIN_TIMEOUT).map_err(lost)? {
                ToWorker::Assign(assignment) => assignment,
                ToWorker::Shutdown => return Ok(()),
                other => {
                    return Err(Error::Protocol {
                        rank: self.rank.unwrap_or(0),
                        what: format!("the driver sent {other:?} instead of an assignment"),
                    });
                }
            };
        loop {
            match self.serve_assignment(&driver, &assignment, slot)? {
                Next::Done => return Ok(()),
                Next::Reassigned(next) => assignment = next,
            }
        }
    }

    /// Prepares `assignment` (groups, shard), tells the driver and serves its passes.
    fn serve_assignment(
        &self,
        driver: &Arc<Connection>,
        assignment: &Assignment,
        slot: &mut Slot,
    ) -> Result<Next> {
        let rank = assignment.rank;
        let control = Arc::new(PassControl::default());
        let at = Arc::new(Position::default());
        // Beats from now on, so that the driver knows the worker lives while it loads.
        let heartbeat = Heartbeat::start(driver.clone(), control.clone(), at.clone())?;
        let prepared = self.prepare(assignment, &control, slot);
        let (layout, pipeline, reused) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                let refused = ToDriver::Refused {
                    message: e.to_string(),
                };
                // The refusal is queued to the connection's writer: give it until the
                // driver answers (it lets the workers go) to reach the driver, so that
                // the driver's error says why rather than that the worker vanished.
                if wire::send(driver, &refused, &[]).is_ok() {
                    linger(driver);
                }
                self.record(MemberState::Idle, slot);
                return Err(e);
            }
        };
        let loaded = slot
            .loaded
            .as_ref()
            .ok_or(Error::Internal("a prepared worker without a shard"))?;
        let ready = ToDriver::Ready {
            param_bytes: loaded.param_bytes,
            peak_rss_bytes: peak_rss_bytes(),
            fingerprint: loaded.fingerprint.clone(),
            reused,
        };
        wire::send(driver, &ready, &[]).map_err(|e| Error::LostDriver {
            reason: e.to_string(),
        })?;
        self.record(MemberState::Serving, slot);
        let (events, events_rx) = unbounded();
        let (replies, replies_rx) = unbounded();
        let args = ShardArgs {
            rank,
            coords: layout.coords(rank),
            model: loaded.model.clone(),
            pipeline,
            events,
            replies: replies_rx,
            control: control.clone(),
            at,
        };
        let shard = self
            .runtime
            .block_on(async { ShardActor::spawn_in_thread(args) });
        std::thread::Builder::new()
            .name("flexmodel-events".into())
            .spawn({
                let driver = driver.clone();
                move || forward_events(&events_rx, &driver)
            })
            .map_err(Error::RuntimeStart)?;
        let served = serve_passes(rank, driver, &shard, &replies, &control, self.trace);
        // A shard blocked in a pass notices the abort.
        control.abort();
        shard.kill();
        let stopped = self.runtime.block_on(async {
            tokio::time::timeout(SHUTDOWN_TIMEOUT, shard.wait_for_shutdown()).await
        });
        if stopped.is_err() {
            // Its thread is stuck in the model; the session ends without it.
            tracing::error!(
                rank,
                "the shard did not stop within {} s",
                SHUTDOWN_TIMEOUT.as_secs()
            );
        }
        heartbeat.stop();
        if !matches!(served, Ok(Next::Reassigned(_))) {
            driver.close();
        }
        served
    }

    /// Joins the assignment's tensor-parallel and pipeline groups and loads its shard
    /// into `slot`, or keeps the one there when it is the same slice; returns the
    /// layout, the pipeline group and whether the shard was kept.
    fn prepare(
        &self,
        assignment: &Assignment,
        control: &Arc<PassControl>,
        slot: &mut Slot,
    ) -> Result<(Layout, Arc<dyn Collective>, bool)> {
        let layout = assignment.layout;
        let rank = assignment.rank;
        let protocol = |what: String| Error::Protocol { rank, what };
        if rank >= layout.world_size() || assignment.peers.len() != layout.world_size() {
            return Err(protocol(format!(
                "an assignment of rank {rank} with {} peers to a layout of {} ranks",
                assignment.peers.len(),
                layout.world_size()
            )));
        }
        if let Some(only) = self.rank.filter(|&r| r != rank) {
            return Err(protocol(format!(
                "an assignment of rank {rank} to the worker of rank {only}"
            )));
        }
        if let Some(member) = self.member {
            member
                .check(assignment)
                .map_err(|reason| Error::WrongAssignment { rank, reason })?;
        }
        let peers = assignment
            .peers
            .iter()
            .map(|a| {
                wire::resolve(a)
                    .ok_or_else(|| protocol(format!("a peer address {a:?} that does not resolve")))
            })
            .collect::<Result<Vec<SocketAddr>>>()?;
        let me = layout.coords(rank);
        let spec = self.device.unwrap_or(layout.device());
        let device = spec
            .device(rank)
            .map_err(|source| Error::Device { rank, source })?;
        let deadline = Instant::now() + JOIN_TIMEOUT;
        // One TCP group per axis and assignment, named after them; `members` are
        // ranks in group order.
        let join = |axis: String, members: Vec<usize>| -> Result<Arc<dyn Collective>> {
            if members.len() == 1 {
                return Ok(Arc::new(SingleRank));
            }
            let index = members
                .iter()
                .position(|&r| r == rank)
                .ok_or(Error::Internal("a rank outside its own group"))?;
            let addresses: Vec<SocketAddr> = members.iter().map(|&r| peers[r]).collect();
            let member = TpRank::new(index, members.len())?;
            let name = format!("e{}.{axis}", assignment.epoch);
            let group = TcpCollective::connect(
                &name,
                member,
                &addresses,
                self.hub,
                control.clone(),
                deadline,
            )?;
            Ok(Arc::new(group))
        };
        // Tensor-parallel and FSDP groups of workers on distinct GPUs go through NCCL,
        // joined over their TCP group; the pipeline's hand-offs stay on TCP, where an
        // aborted pass ends a wait.
        let fast = |group: Arc<dyn Collective>| -> Result<Arc<dyn Collective>> {
            #[cfg(feature = "nccl")]
            if device.is_cuda() && group.tp_rank().size() > 1 {
                // Members sharing a GPU stay on TCP: NCCL refuses them.
                let nccl = flexmodel_cluster::NcclCollective::over(group.as_ref(), &device)?;
                if let Some(nccl) = nccl {
                    return Ok(Arc::new(nccl));
                }
            }
            Ok(group)
        };
        let tp_group = fast(join(
            format!("tp.dp{}.pp{}", me.dp, me.pp),
            layout.tp_group(rank),
        )?)?;
        let pipeline = join(format!("pp.dp{}.tp{}", me.dp, me.tp), layout.pp_group(rank))?;
        let replicas = match layout.fsdp() {
            true => Some(fast(join(
                format!("dp.pp{}.tp{}", me.pp, me.tp),
                layout.dp_group(rank),
            )?)?),
            false => None,
        };
        let same = slot.loaded.as_ref().is_some_and(|l| {
            l.model_name == assignment.model && l.layout == assignment.layout && l.rank == rank
        });
        if let Some(loaded) = slot.loaded.as_ref().filter(|_| same) {
            loaded.tp.replace(tp_group)?;
            if let (Some(held), Some(group)) = (&loaded.replicas, replicas) {
                held.replace(group)?;
            }
            return Ok((layout, pipeline, true));
        }
        // Another slice: free the old one before reading the new.
        slot.loaded = None;
        self.record(MemberState::Loading, slot);
        let tp = Arc::new(Regroupable::new(tp_group));
        let replicas = replicas.map(|group| Arc::new(Regroupable::new(group)));
        let as_collective = |g: &Arc<Regroupable>| -> Arc<dyn Collective> { g.clone() };
        let shard = self
            .loader
            .load(
                assignment,
                &device,
                tp.clone(),
                replicas.as_ref().map(as_collective),
            )
            .map_err(|source| Error::LoadShard { rank, source })?;
        let param_bytes = shard
            .model
            .parameters()
            .iter()
            .map(|p| (p.value.elem_count() * p.value.dtype().size_in_bytes()) as u64)
            .sum();
        slot.loaded = Some(Loaded {
            model_name: assignment.model.clone(),
            layout: assignment.layout,
            rank,
            model: shard.model,
            tp,
            replicas,
            fingerprint: shard.fingerprint,
            param_bytes,
        });
        Ok((layout, pipeline, false))
    }

    fn record(&self, state: MemberState, slot: &Slot) {
        if let Some(member) = self.member {
            member.record(state, slot.slice());
        }
    }
}

/// Waits up to [`REFUSAL_LINGER`] for the driver's answer to a refusal (anything but a
/// heartbeat), or for the connection to end.
fn linger(driver: &Connection) {
    let until = Instant::now() + REFUSAL_LINGER;
    while let Ok(frame) = driver
        .inbox()
        .recv_timeout(until.saturating_duration_since(Instant::now()))
    {
        if !matches!(wire::parse::<ToWorker>(&frame), Ok(ToWorker::Heartbeat)) {
            return;
        }
    }
}

/// Handles the driver's messages until it is done, gone, silent for
/// [`DRIVER_SILENCE`], or assigns the worker again.
fn serve_passes(
    rank: usize,
    driver: &Connection,
    shard: &ActorRef<ShardActor>,
    replies: &Sender<EditedPiece>,
    control: &PassControl,
    trace: Option<&Arc<dyn TracePropagation>>,
) -> Result<Next> {
    let protocol = |what: String| Error::Protocol { rank, what };
    loop {
        let frame = match driver.inbox().recv_timeout(DRIVER_SILENCE) {
            Ok(frame) => frame,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    rank,
                    "the driver sent nothing for {} s, not even a heartbeat: ending its session",
                    DRIVER_SILENCE.as_secs()
                );
                return Ok(Next::Done);
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Ok(Next::Done),
        };
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
                        mask,
                        offset,
                        cache,
                        scope,
                        end_stage,
                        sends_output,
                        actions,
                        fault,
                        backward,
                    } => {
                        let n = usize::from(input)
                            + usize::from(mask)
                            + usize::from(backward.is_some());
                        let mut tensors = wire::attached(driver, n)
                            .map_err(|e| protocol(e.to_string()))?
                            .into_iter();
                        let input = if input { tensors.next() } else { None };
                        let mask = if mask { tensors.next() } else { None };
                        let window = Window {
                            mask,
                            offset,
                            cache,
                            scope,
                        };
                        let backward = match (backward, tensors.next()) {
                            (Some(plan), Some(tokens)) => Some(BackwardPass { tokens, plan }),
                            _ => None,
                        };
                        control.begin(pass);
                        let run = RunPass {
                            pass,
                            input,
                            window,
                            actions,
                            fault,
                            backward,
                            end_stage,
                            sends_output,
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
                    ToWorker::Abort { .. } | ToWorker::Heartbeat => {}
                    ToWorker::ReadParameters => send_parameters(driver, shard, rank)?,
                    ToWorker::Shutdown => return Ok(Next::Done),
                    ToWorker::Assign(assignment) => return Ok(Next::Reassigned(assignment)),
                }
            }
            kind => return Err(protocol(format!("a {kind:?} frame from the driver"))),
        }
    }
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
            let bounds = |(dim, r): (usize, std::ops::Range<usize>)| (dim, r.start, r.end);
            SliceHeader {
                name: p.name.clone(),
                split: p.split.clone().map(bounds),
                piece: p.piece.clone().map(bounds),
                transposed: p.transposed,
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

/// Sends the shard's events to the driver as they come, until the shard is gone.
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

/// Tells the driver, every [`HEARTBEAT`], that the worker is alive and where its shard
/// is, until stopped.
struct Heartbeat {
    stop: Arc<AtomicBool>,
    at: Arc<Position>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    fn start(
        driver: Arc<Connection>,
        control: Arc<PassControl>,
        at: Arc<Position>,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("flexmodel-heartbeat".into())
            .spawn({
                let (stop, at) = (stop.clone(), at.clone());
                move || {
                    while driver.is_open() && !stop.load(Ordering::SeqCst) {
                        let heartbeat = ToDriver::Heartbeat {
                            pass: control.pass(),
                            at: at.get(),
                            peak_rss_bytes: peak_rss_bytes(),
                        };
                        if wire::send(&driver, &heartbeat, &[]).is_err() {
                            return;
                        }
                        // Beat early when the shard starts waiting, so that the driver
                        // knows where.
                        at.watch(HEARTBEAT);
                    }
                }
            })
            .map_err(Error::RuntimeStart)?;
        Ok(Self {
            stop,
            at,
            thread: Some(thread),
        })
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.at.announce();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
