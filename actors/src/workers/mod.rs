//! The driver's view of a set of worker processes, one per rank: it assigns their
//! ranks, relays the hook protocol over their connections and watches that they live.
//! The workers are either processes this driver starts on its own machine
//! ([`local`], `--procs`) or the members of a job in etcd ([`job`], `--cluster`).
//!
//! # Failure
//!
//! A worker is lost when its process exits, its connection closes or is tampered with,
//! or its heartbeats stop for [`HANG_TIMEOUT`]; the pass it takes part in fails naming
//! its rank, host and the hook it was last seen at. The driver beats too, every
//! [`HEARTBEAT`]: a worker whose driver is silent for
//! [`DRIVER_SILENCE`](crate::worker::DRIVER_SILENCE) ends the session. A job's driver
//! checks before every pass that it still holds the job: one whose claim lapsed (etcd
//! out of reach for longer than its lease) fails the pass with
//! [`LostClaim`](flexmodel_cluster::Error::LostClaim). Workers have [`JOIN_TIMEOUT`]
//! (60 s) to connect, [`LOAD_TIMEOUT`] (30 min, beating all along) to load, and
//! [`STOP_TIMEOUT`] (5 s) to stop before they are killed. A worker this driver started is not replaced: later
//! passes fail at once. A job's lost worker is replaced before the next pass by a free
//! member of the job, which alone loads; the others keep their ranks and shards.
//!
//! # Shutdown
//!
//! Dropping the runtime tells every worker the driver is done. Processes the driver
//! started get 5 s to end before they are killed, and are reaped; a job's workers stay
//! up, with their shards, for the next driver. [`stop_every_worker`] stops the started
//! ones at once, for a program about to exit on a signal.

mod job;
mod local;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use crossbeam_channel::{Receiver, Sender, unbounded};
use flexmodel_cluster::transport::{Connection, Frame, FrameKind, Hub};
use flexmodel_cluster::{Layout, ParamSlice};

pub use job::JobLaunch;
use local::WorkerChild;
pub use local::{WorkerLaunch, stop_every_worker};

use crate::protocol::{
    Assignment, EditedPiece, RunPass, ShardEvent, SliceHeader, Tap, ToDriver, ToWorker,
};
use crate::ranks::{Lost, Ranks};
use crate::runtime::ShardRuntime;
use crate::threads::PARAMETERS_TIMEOUT;
use crate::trace_context::TracePropagation;
use crate::wire::{self, WireError};
use crate::worker::HEARTBEAT;
use crate::{Error, PointGeometry, PointId, Result, ShardParameters};

/// How long a worker may go without a heartbeat before it counts as hung.
pub const HANG_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a worker may take to start and connect.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a worker may take to load its shard (while it keeps sending heartbeats).
const LOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long a worker whose connection closed may take to be seen to exit.
const EXIT_GRACE: Duration = Duration::from_millis(500);
/// How long stopping workers may take before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The process behind a worker.
enum Process {
    /// A process this driver started.
    Child(WorkerChild),
    /// A member of a job, with its id in the job.
    Member(String),
}

impl Process {
    /// How the process ended, if this driver can tell.
    fn exited(&self) -> Option<std::process::ExitStatus> {
        match self {
            Process::Child(child) => child.exited(),
            Process::Member(_) => None,
        }
    }
}

/// What the driver knows of one worker.
#[derive(Debug)]
struct WorkerState {
    last_heartbeat: Instant,
    pass: u64,
    at: Option<(PointId, bool)>,
    peak_rss_bytes: Option<u64>,
    /// Why the driver stopped listening to it (a broken message), if it did.
    broken: Option<String>,
}

/// One worker and its connection.
struct Worker {
    process: Process,
    pid: u32,
    connection: Arc<Connection>,
    state: Arc<Mutex<WorkerState>>,
    parameters: Receiver<std::result::Result<ShardParameters, String>>,
    /// Its answers to an assignment after the first (`Ready`, `Refused`).
    readiness: Receiver<ToDriver>,
    host: String,
    /// The address its peers reach it at.
    peer_address: String,
    param_bytes: u64,
    /// The fingerprint of the weights it read.
    fingerprint: String,
    /// Whether it kept the shard it held rather than loading one.
    reused: bool,
    /// Tells it that this driver lives.
    _beat: DriverBeat,
}

/// Tells a worker every [`HEARTBEAT`] that its driver is alive, from a thread of its
/// own (so that a driver busy in a hook still beats), until dropped; a worker that hears
/// nothing for [`DRIVER_SILENCE`](crate::worker::DRIVER_SILENCE) ends the session.
struct DriverBeat {
    stop: Arc<AtomicBool>,
}

impl DriverBeat {
    fn start(rank: usize, connection: &Arc<Connection>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (connection, stopped) = (Arc::downgrade(connection), stop.clone());
        std::thread::Builder::new()
            .name(format!("flexmodel-beat-{rank}"))
            .spawn(move || {
                while !stopped.load(Ordering::SeqCst) {
                    let Some(connection) = connection.upgrade() else {
                        return;
                    };
                    if wire::send(&connection, &ToWorker::Heartbeat, &[]).is_err() {
                        return;
                    }
                    drop(connection);
                    std::thread::sleep(HEARTBEAT);
                }
            })
            .map_err(Error::RuntimeStart)?;
        Ok(Self { stop })
    }
}

impl Drop for DriverBeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Worker {
    /// The worker of `rank` at the end of `connection`, ready, with its relay started.
    fn start(
        rank: usize,
        connection: Arc<Connection>,
        process: Process,
        joined: Joined,
        ready: &Ready,
        events: &Sender<ShardEvent>,
    ) -> Result<Worker> {
        let state = Arc::new(Mutex::new(WorkerState {
            last_heartbeat: Instant::now(),
            pass: 0,
            at: None,
            peak_rss_bytes: ready.peak_rss_bytes,
            broken: None,
        }));
        let (parameters_tx, parameters) = unbounded();
        let (readiness_tx, readiness) = unbounded();
        let relay = Relay {
            rank,
            connection: connection.clone(),
            state: state.clone(),
            events: events.clone(),
            parameters: parameters_tx,
            readiness: readiness_tx,
        };
        std::thread::Builder::new()
            .name(format!("flexmodel-rank-{rank}"))
            .spawn(move || relay.run())
            .map_err(Error::RuntimeStart)?;
        let beat = DriverBeat::start(rank, &connection)?;
        Ok(Worker {
            process,
            pid: joined.pid,
            connection,
            state,
            parameters,
            readiness,
            host: joined.host,
            peer_address: joined.peer_address,
            param_bytes: ready.param_bytes,
            fingerprint: ready.fingerprint.clone(),
            reused: ready.reused,
            _beat: beat,
        })
    }

    fn state(&self) -> MutexGuard<'_, WorkerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why the worker is gone, if it is: exited, disconnected, hung or broken.
    fn lost(&self) -> Option<String> {
        if let Some(status) = self.process.exited() {
            return Some(format!("its process exited ({status})"));
        }
        if let Some(how) = self.connection.tampering() {
            return Some(format!(
                "its connection was tampered with: {how}; the connection is closed, and nothing of that frame was acted on"
            ));
        }
        let state = self.state();
        if let Some(broken) = &state.broken {
            return Some(broken.clone());
        }
        if !self.connection.is_open() {
            drop(state);
            // A process that dies closes its sockets before it can be reaped: give it a
            // moment, so that the error says how it ended.
            if matches!(self.process, Process::Child(_)) {
                let deadline = Instant::now() + EXIT_GRACE;
                while Instant::now() < deadline {
                    if let Some(status) = self.process.exited() {
                        return Some(format!("its process exited ({status})"));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            return Some("its connection closed".into());
        }
        let silent = state.last_heartbeat.elapsed();
        (silent > HANG_TIMEOUT).then(|| {
            format!(
                "it stopped answering (no heartbeat for {} s)",
                silent.as_secs()
            )
        })
    }
}

/// Worker processes, one per rank of a layout, as the driver's pass loop sees them.
pub(crate) struct WorkerSet {
    layout: Layout,
    trace: Option<Arc<dyn TracePropagation>>,
    /// The pass the driver is in.
    pass: std::sync::atomic::AtomicU64,
    workers: Vec<Worker>,
    /// Where the workers' events go.
    events: Sender<ShardEvent>,
    /// The job the workers are members of, for a job's workers: lost ones are
    /// replaced from it.
    job: Option<job::Hold>,
    hub: Hub,
    /// Runs the connections' tasks; dropped last.
    _runtime: tokio::runtime::Runtime,
}

/// How the driver reaches its workers: the hub it dials from, the runtime of the
/// connections, where their events go and how trace context travels.
struct Links {
    trace: Option<Arc<dyn TracePropagation>>,
    hub: Hub,
    runtime: tokio::runtime::Runtime,
    events: Sender<ShardEvent>,
}

/// What a driver tells the workers it has connected to.
struct Introduction<'a> {
    layout: Layout,
    /// The model to load, as the workers' loader names it.
    model: &'a str,
    /// The fingerprint the workers' weights must have, if the driver knows it.
    fingerprint: Option<&'a str>,
    /// The assignment's epoch in the job (0 for started workers).
    epoch: u64,
    /// Each rank's job member id, for a job's workers.
    members: Option<&'a [String]>,
}

impl Introduction<'_> {
    /// The assignment of `rank`, its peers at `peers`.
    fn assignment(&self, rank: usize, peers: &[String]) -> Assignment {
        Assignment {
            epoch: self.epoch,
            member: self.members.map(|m| m[rank].clone()),
            rank,
            layout: self.layout,
            peers: peers.to_vec(),
            model: self.model.to_string(),
        }
    }
}

/// What the worker of `rank` at the end of `connection` says of itself first.
fn read_joined(connection: &Connection, process: &Process, rank: usize) -> Result<Joined> {
    match wire::next_control::<ToDriver>(connection, JOIN_TIMEOUT) {
        Ok(ToDriver::Joined {
            pid,
            host,
            peer_address,
        }) => Ok(Joined {
            pid,
            host,
            peer_address,
        }),
        Ok(ToDriver::Refused { message }) => Err(Error::WorkerRefused { rank, message }),
        Ok(other) => Err(Error::Protocol {
            rank,
            what: format!("it sent {other:?} first"),
        }),
        Err(e) => Err(failed_start(connection, process, rank, e, "joining")),
    }
}

/// A worker that joined: what it said of itself.
struct Joined {
    pid: u32,
    host: String,
    peer_address: String,
}

/// A worker whose shard is ready.
struct Ready {
    param_bytes: u64,
    peak_rss_bytes: Option<u64>,
    fingerprint: String,
    reused: bool,
}

/// The runtime for the driver's connections.
fn io_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("flexmodel-driver-io")
        .enable_all()
        .build()
        .map_err(Error::RuntimeStart)
}

impl ShardRuntime {
    /// Starts one worker process per rank of `layout` with `launch` and waits until
    /// every one has loaded its shard; `geometry` and `output` as in [`ShardSetup`](crate::ShardSetup).
    pub fn launch(
        layout: Layout,
        launch: &WorkerLaunch,
        geometry: Vec<PointGeometry>,
        output: PointGeometry,
    ) -> Result<Self> {
        Self::over_workers(layout, geometry, output, |events| {
            WorkerSet::start_local(layout, launch, events)
        })
    }

    /// Takes the workers of the job `launch` names, assigns them the ranks of `layout`
    /// and waits until every one has its shard loaded.
    pub fn join(
        layout: Layout,
        launch: &JobLaunch,
        geometry: Vec<PointGeometry>,
        output: PointGeometry,
    ) -> Result<Self> {
        Self::over_workers(layout, geometry, output, |events| {
            WorkerSet::take_job(layout, launch, events)
        })
    }

    /// The runtime over the workers `start` brings, their events sent where it says.
    fn over_workers(
        layout: Layout,
        geometry: Vec<PointGeometry>,
        output: PointGeometry,
        start: impl FnOnce(Sender<ShardEvent>) -> Result<WorkerSet>,
    ) -> Result<Self> {
        let (events, events_rx) = unbounded();
        let workers = start(events)?;
        Ok(Self::over(
            layout,
            Box::new(workers),
            events_rx,
            geometry,
            output,
        ))
    }

    /// The bytes of parameters each rank holds, in rank order, when the ranks are
    /// worker processes.
    pub fn worker_param_bytes(&self) -> Option<Vec<u64>> {
        self.ranks()
            .worker_stats()
            .map(|s| s.into_iter().map(|(b, _)| b).collect())
    }

    /// Each worker process's peak resident memory, in rank order, when the ranks are
    /// worker processes.
    pub fn worker_peak_rss_bytes(&self) -> Option<Vec<Option<u64>>> {
        self.ranks()
            .worker_stats()
            .map(|s| s.into_iter().map(|(_, r)| r).collect())
    }

    /// The process ids of the workers, in rank order, when the ranks are processes.
    pub fn worker_pids(&self) -> Option<Vec<u32>> {
        self.ranks().worker_pids()
    }

    /// Which workers kept the shard they held rather than loading it, in rank order,
    /// when the ranks are processes.
    pub fn workers_reused(&self) -> Option<Vec<bool>> {
        self.ranks().workers_reused()
    }
}

impl WorkerSet {
    /// Tells the workers at the ends of `connections` (one per rank, their processes
    /// `processes`) what to serve, and waits until every one is ready; on failure, the
    /// workers are let go (and started ones stopped).
    fn introduce(
        introduction: Introduction<'_>,
        connections: Vec<Arc<Connection>>,
        processes: Vec<Process>,
        links: Links,
    ) -> Result<Self> {
        let Links {
            trace,
            hub,
            runtime,
            events,
        } = links;
        let ready = match handshake(&introduction, &connections, &processes) {
            Ok(ready) => ready,
            Err(e) => {
                release(&connections, &processes);
                return Err(e);
            }
        };
        let workers = connections
            .into_iter()
            .zip(processes)
            .zip(ready)
            .enumerate()
            .map(|(rank, ((connection, process), (joined, ready)))| {
                Worker::start(rank, connection, process, joined, &ready, &events)
            })
            .collect::<Result<Vec<Worker>>>()?;
        Ok(Self {
            layout: introduction.layout,
            trace,
            pass: std::sync::atomic::AtomicU64::new(0),
            workers,
            events,
            job: None,
            hub,
            _runtime: runtime,
        })
    }

    fn send_control(&self, rank: usize, message: &ToWorker, attached: &[&Tensor]) -> Result<()> {
        wire::send(&self.workers[rank].connection, message, attached)
            .map_err(|e| self.gone(rank, format!("sending to it failed: {e}")))
    }

    fn gone(&self, rank: usize, reason: String) -> Error {
        Error::ShardGone {
            rank,
            coords: self.layout.coords(rank),
            host: Some(self.workers[rank].host.clone()),
            at: None,
            reason,
        }
    }
}

/// Learns who each worker is, sends it its assignment and waits until its shard is
/// loaded; checks that every worker read the same weights.
fn handshake(
    introduction: &Introduction<'_>,
    connections: &[Arc<Connection>],
    processes: &[Process],
) -> Result<Vec<(Joined, Ready)>> {
    let joined = connections
        .iter()
        .zip(processes)
        .enumerate()
        .map(|(rank, (connection, process))| read_joined(connection, process, rank))
        .collect::<Result<Vec<Joined>>>()?;
    let peers: Vec<String> = joined.iter().map(|j| j.peer_address.clone()).collect();
    for (rank, connection) in connections.iter().enumerate() {
        let assignment = introduction.assignment(rank, &peers);
        if let Err(e) = wire::send(connection, &ToWorker::Assign(assignment), &[]) {
            return Err(failed_start(
                connection,
                &processes[rank],
                rank,
                e,
                "joining",
            ));
        }
    }
    let mut ready = Vec::with_capacity(connections.len());
    for (rank, connection) in connections.iter().enumerate() {
        ready.push(wait_ready(connection, &processes[rank], rank)?);
    }
    let expected = match introduction.fingerprint {
        Some(fingerprint) => Expected {
            against: "the driver".into(),
            fingerprint: fingerprint.to_string(),
        },
        None => Expected {
            against: "rank 0".into(),
            fingerprint: ready[0].fingerprint.clone(),
        },
    };
    for (rank, r) in ready.iter().enumerate() {
        expected.check(rank, r, &joined[rank], &processes[rank])?;
    }
    Ok(joined.into_iter().zip(ready).collect())
}

/// The fingerprint every worker's weights must have, and whose it is.
struct Expected {
    against: String,
    fingerprint: String,
}

impl Expected {
    /// Whether the worker of `rank` read the weights expected.
    fn check(&self, rank: usize, ready: &Ready, joined: &Joined, process: &Process) -> Result<()> {
        if ready.fingerprint == self.fingerprint {
            return Ok(());
        }
        let host = &joined.host;
        let worker = match process {
            Process::Member(id) => format!("worker {id} on {host}"),
            Process::Child(_) => format!("the worker with pid {} on {host}", joined.pid),
        };
        Err(Error::WeightsDiffer {
            rank,
            worker,
            against: self.against.clone(),
            found: short(&ready.fingerprint),
            expected: short(&self.fingerprint),
        })
    }
}

/// The first 12 digits of a fingerprint, enough to tell two apart.
fn short(fingerprint: &str) -> String {
    fingerprint.chars().take(12).collect()
}

/// Waits for the shard of `rank` to be loaded, while its process lives and beats.
fn wait_ready(connection: &Connection, process: &Process, rank: usize) -> Result<Ready> {
    let deadline = Instant::now() + LOAD_TIMEOUT;
    let mut last_heartbeat = Instant::now();
    loop {
        let message = wire::next_control::<ToDriver>(connection, HEARTBEAT);
        match message {
            Ok(ToDriver::Ready {
                param_bytes,
                peak_rss_bytes,
                fingerprint,
                reused,
            }) => {
                return Ok(Ready {
                    param_bytes,
                    peak_rss_bytes,
                    fingerprint,
                    reused,
                });
            }
            Ok(ToDriver::Refused { message }) => {
                return Err(Error::WorkerRefused { rank, message });
            }
            Ok(ToDriver::Heartbeat { .. }) => last_heartbeat = Instant::now(),
            Ok(other) => {
                let what = format!("it sent {other:?} before it was ready");
                return Err(Error::Protocol { rank, what });
            }
            Err(WireError::TimedOut) => {}
            Err(e) => return Err(failed_start(connection, process, rank, e, "loading")),
        }
        if let Some(status) = process.exited() {
            let reason = format!("its process exited ({status})");
            return Err(Error::WorkerGoneWhileStarting { rank, reason });
        }
        if last_heartbeat.elapsed() > HANG_TIMEOUT || Instant::now() > deadline {
            let during = "loading";
            return Err(Error::WorkerSilent { rank, during });
        }
    }
}

/// The error for `rank`, whose connection failed with `e` while it was `during`
/// (joining, loading): how its process ended or its connection closed, if either did.
fn failed_start(
    connection: &Connection,
    process: &Process,
    rank: usize,
    e: WireError,
    during: &'static str,
) -> Error {
    match e {
        WireError::TimedOut => Error::WorkerSilent { rank, during },
        WireError::Unexpected(what) => Error::Protocol { rank, what },
        WireError::Closed => {
            let reason = match (process.exited(), connection.tampering()) {
                (Some(status), _) => format!("its process exited ({status})"),
                (None, Some(how)) => format!("its connection was tampered with: {how}"),
                (None, None) => "its connection closed".into(),
            };
            Error::WorkerGoneWhileStarting { rank, reason }
        }
    }
}

/// Tells every worker the driver is done with it; stops the processes this driver
/// started (killing those that do not end within [`STOP_TIMEOUT`]) and reaps them.
fn release(connections: &[Arc<Connection>], processes: &[Process]) {
    for connection in connections {
        let _ = wire::send(connection, &ToWorker::Shutdown, &[]);
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for process in processes {
        if let Process::Child(child) = process {
            child.stop(deadline);
        }
    }
    for connection in connections {
        connection.close();
    }
}

/// Reads one worker's connection: pieces and results become the runtime's events;
/// heartbeats update what the driver knows of the worker.
struct Relay {
    rank: usize,
    connection: Arc<Connection>,
    state: Arc<Mutex<WorkerState>>,
    events: Sender<ShardEvent>,
    parameters: Sender<std::result::Result<ShardParameters, String>>,
    readiness: Sender<ToDriver>,
}

impl Relay {
    fn run(self) {
        while let Ok(frame) = self.connection.inbox().recv() {
            if let Err(e) = self.handle(frame) {
                tracing::warn!(rank = self.rank, error = %e, "closing the connection to a worker that broke the protocol");
                self.state.lock().unwrap_or_else(|p| p.into_inner()).broken =
                    Some(format!("it broke the protocol: {e}"));
                self.connection.close();
                return;
            }
        }
    }

    fn handle(&self, frame: Frame) -> std::result::Result<(), WireError> {
        let rank = self.rank;
        match frame.kind {
            FrameKind::Piece => {
                let value = frame
                    .to_tensor()
                    .map_err(|e| WireError::Unexpected(e.to_string()))?;
                let piece = ShardEvent::Piece {
                    pass: frame.pass,
                    rank,
                    tap: Tap::from_wire(frame.point),
                    call: frame.call as usize,
                    value,
                };
                let _ = self.events.send(piece);
            }
            FrameKind::Control => match wire::parse::<ToDriver>(&frame)? {
                ToDriver::Heartbeat {
                    pass,
                    at,
                    peak_rss_bytes,
                } => {
                    let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    state.last_heartbeat = Instant::now();
                    (state.pass, state.at) = (pass, at);
                    state.peak_rss_bytes = peak_rss_bytes.or(state.peak_rss_bytes);
                }
                ToDriver::Done {
                    pass,
                    output,
                    loss,
                    peak_rss_bytes,
                } => {
                    if peak_rss_bytes.is_some() {
                        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                        state.peak_rss_bytes = peak_rss_bytes;
                    }
                    let output = match output {
                        true => wire::attached(&self.connection, 1)?.pop(),
                        false => None,
                    };
                    let done = ShardEvent::Done {
                        pass,
                        rank,
                        output,
                        loss,
                    };
                    let _ = self.events.send(done);
                }
                ToDriver::Failed {
                    pass,
                    at,
                    cause,
                    after_abort,
                } => {
                    let failed = ShardEvent::Failed {
                        pass,
                        rank,
                        at,
                        cause,
                        after_abort,
                    };
                    let _ = self.events.send(failed);
                }
                ToDriver::Parameters { slices } => {
                    let _ = self.parameters.send(self.read_parameters(slices));
                }
                answer @ (ToDriver::Ready { .. } | ToDriver::Refused { .. }) => {
                    let _ = self.readiness.send(answer);
                }
                other => {
                    return Err(WireError::Unexpected(format!(
                        "{other:?} while serving passes"
                    )));
                }
            },
            kind => return Err(WireError::Unexpected(format!("a {kind:?} frame"))),
        }
        Ok(())
    }

    /// The tensors of the parameter slices `slices` describes, as they follow.
    fn read_parameters(
        &self,
        slices: Vec<SliceHeader>,
    ) -> std::result::Result<ShardParameters, String> {
        slices
            .into_iter()
            .map(
                |SliceHeader {
                     name,
                     split,
                     piece,
                     transposed,
                     has_grad,
                 }| {
                    let mut tensors = wire::attached(&self.connection, 1 + usize::from(has_grad))
                        .map_err(|e| e.to_string())?
                        .into_iter();
                    let value = tensors.next().ok_or("a parameter without its value")?;
                    let slice = ParamSlice {
                        name,
                        value,
                        split: split.map(|(dim, start, end)| (dim, start..end)),
                        piece: piece.map(|(dim, start, end)| (dim, start..end)),
                        transposed,
                    };
                    Ok((slice, tensors.next()))
                },
            )
            .collect()
    }
}

impl Ranks for WorkerSet {
    fn recover(&mut self) -> Result<()> {
        self.replace_lost()
    }

    fn begin(&self, pass: u64) {
        // Each worker begins the pass when its run arrives.
        self.pass.store(pass, std::sync::atomic::Ordering::SeqCst);
    }

    fn run(&self, rank: usize, run: RunPass) -> Result<()> {
        if let Some(reason) = self.workers[rank].lost() {
            return Err(self.gone(rank, reason));
        }
        let trace = match &self.trace {
            Some(propagation) => propagation.inject(&tracing::Span::current()),
            None => Vec::new(),
        };
        let message = ToWorker::Run {
            pass: run.pass,
            trace,
            input: run.input.is_some(),
            mask: run.window.mask.is_some(),
            offset: run.window.offset,
            cache: run.window.cache,
            scope: run.window.scope,
            end_stage: run.end_stage,
            sends_output: run.sends_output,
            actions: run.actions,
            fault: run.fault,
            backward: run.backward.as_ref().map(|b| b.plan.clone()),
        };
        let attached: Vec<&Tensor> = run
            .input
            .iter()
            .chain(&run.window.mask)
            .chain(run.backward.as_ref().map(|b| &b.tokens))
            .collect();
        self.send_control(rank, &message, &attached)
    }

    fn reply(&self, rank: usize, piece: EditedPiece) {
        let frame = Frame::tensor(
            FrameKind::Edited,
            piece.pass,
            piece.tap.to_wire(),
            piece.call as u32,
            &piece.value,
        );
        match frame {
            Ok(frame) => {
                // A worker that is gone is found by `lost`.
                let _ = self.workers[rank].connection.send(frame);
            }
            Err(e) => tracing::warn!(rank, error = %e, "an edited piece could not be framed"),
        }
    }

    fn abort(&self, pass: u64) {
        for worker in &self.workers {
            let _ = wire::send(&worker.connection, &ToWorker::Abort { pass }, &[]);
        }
    }

    fn lost(&self, rank: usize) -> Option<Lost> {
        let worker = &self.workers[rank];
        let reason = worker.lost()?;
        let state = worker.state();
        // Where it was in this pass; an earlier pass's position says nothing.
        let current = self.pass.load(std::sync::atomic::Ordering::SeqCst);
        Some(Lost {
            at: state.at.filter(|_| state.pass == current),
            reason,
        })
    }

    fn host(&self, rank: usize) -> Option<String> {
        Some(self.workers[rank].host.clone())
    }

    fn parameters(&self, rank: usize) -> Result<ShardParameters> {
        let worker = &self.workers[rank];
        // Drop an answer left over from an earlier request that timed out.
        while worker.parameters.try_recv().is_ok() {}
        self.send_control(rank, &ToWorker::ReadParameters, &[])?;
        let deadline = Instant::now() + PARAMETERS_TIMEOUT;
        loop {
            match worker.parameters.recv_timeout(HEARTBEAT) {
                Ok(Ok(slices)) => return Ok(slices),
                Ok(Err(reason)) => return Err(Error::Protocol { rank, what: reason }),
                Err(_) => {
                    if let Some(reason) = worker.lost() {
                        return Err(self.gone(rank, reason));
                    }
                    if Instant::now() > deadline {
                        return Err(Error::ShardTimedOut {
                            rank,
                            coords: self.layout.coords(rank),
                            seconds: PARAMETERS_TIMEOUT.as_secs(),
                        });
                    }
                }
            }
        }
    }

    fn worker_stats(&self) -> Option<Vec<(u64, Option<u64>)>> {
        Some(
            self.workers
                .iter()
                .map(|w| (w.param_bytes, w.state().peak_rss_bytes))
                .collect(),
        )
    }

    fn worker_pids(&self) -> Option<Vec<u32>> {
        Some(self.workers.iter().map(|w| w.pid).collect())
    }

    fn workers_reused(&self) -> Option<Vec<bool>> {
        Some(self.workers.iter().map(|w| w.reused).collect())
    }
}

impl Drop for WorkerSet {
    fn drop(&mut self) {
        let workers = std::mem::take(&mut self.workers);
        let (connections, processes): (Vec<_>, Vec<_>) = workers
            .into_iter()
            .map(|w| (w.connection, w.process))
            .unzip();
        release(&connections, &processes);
    }
}
