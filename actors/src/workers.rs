//! The driver's view of a set of worker processes, one per rank: it starts them on this
//! machine, assigns their ranks, relays the hook protocol over their connections and
//! watches that they live.
//!
//! # Failure
//!
//! A worker is lost when its process exits, its connection closes, or its heartbeats
//! stop for [`HANG_TIMEOUT`]; the pass it takes part in fails naming its rank, host and
//! the hook it was last seen at, and later passes fail at once. A lost worker is not
//! replaced.
//!
//! # Shutdown
//!
//! Dropping the runtime asks every worker to leave, waits up to 5 s, kills those still
//! running and reaps them all. [`stop_every_worker`] does the same at once, for a
//! program about to exit on a signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use crossbeam_channel::{Receiver, Sender, unbounded};
use flexmodel_cluster::transport::{Connection, Frame, FrameKind, Hello, Hub, Token};
use flexmodel_cluster::{Layout, ParamSlice};

use crate::protocol::{
    Assignment, EditedPiece, RunPass, ShardEvent, SliceHeader, Tap, ToDriver, ToWorker,
};
use crate::ranks::{Lost, Ranks};
use crate::runtime::ShardRuntime;
use crate::threads::PARAMETERS_TIMEOUT;
use crate::trace_context::TracePropagation;
use crate::wire::{self, DRIVER_GROUP, WireError};
use crate::worker::HEARTBEAT;
use crate::{Error, PointGeometry, PointId, Result, ShardParameters};

/// How long a worker may go without a heartbeat before it counts as hung.
pub const HANG_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a worker process may take to start and connect.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a worker may take to load its shard (while it keeps sending heartbeats).
const LOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long a worker whose connection closed may take to be seen to exit.
const EXIT_GRACE: Duration = Duration::from_millis(500);
/// How long stopping workers may take before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How to start the worker processes.
#[derive(Clone)]
pub struct WorkerLaunch {
    /// The program to run (the `flexmodel` binary).
    pub program: PathBuf,
    /// Its arguments before `--driver ADDR --rank N` (e.g. `["worker"]`).
    pub args: Vec<String>,
    /// What each worker loads: the model, as its loader understands it.
    pub model: String,
    /// The compute threads of each worker (`RAYON_NUM_THREADS`), unless the environment
    /// already sets it.
    pub threads: usize,
    /// How each pass's trace context is sent along, so that the workers' spans join
    /// the driver's trace.
    pub trace: Option<Arc<dyn TracePropagation>>,
    /// The job's token file; without one, a fresh token is written to a file only this
    /// user can read, given to the workers, and removed once they have joined.
    pub token_file: Option<PathBuf>,
}

impl WorkerLaunch {
    /// The compute threads each of `workers` workers gets by default: this machine's
    /// cores split evenly, at least one each.
    pub fn default_threads(workers: usize) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / workers.max(1)).max(1)
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

/// The worker processes this process started and has not reaped yet, so that
/// [`stop_every_worker`] can reach them from a signal handler's thread.
static LIVE: Mutex<Vec<Arc<Mutex<Child>>>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<Arc<Mutex<Child>>>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Kills and reaps every worker process this process started and has not stopped yet:
/// for a program that is about to exit on a signal (SIGINT, SIGTERM), so that no
/// worker is left behind, not even as a zombie waiting for a reaper.
pub fn stop_every_worker() {
    for child in live().drain(..) {
        let mut child = child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A worker's process, registered with [`stop_every_worker`] until it is reaped.
struct WorkerChild(Arc<Mutex<Child>>);

impl WorkerChild {
    fn spawn(command: &mut Command) -> std::io::Result<Self> {
        // Registered before anything else can fail, under the registry's lock.
        let mut live = live();
        let child = Arc::new(Mutex::new(command.spawn()?));
        live.push(child.clone());
        Ok(Self(child))
    }

    fn lock(&self) -> MutexGuard<'_, Child> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How the process ended, if it has.
    fn exited(&self) -> Option<std::process::ExitStatus> {
        self.lock().try_wait().ok().flatten()
    }

    fn id(&self) -> u32 {
        self.lock().id()
    }

    /// Waits for the process to end until `deadline`, kills it then, and reaps it.
    fn stop(&self, deadline: Instant) {
        while self.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut child = self.lock();
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
        drop(child);
        live().retain(|c| !Arc::ptr_eq(c, &self.0));
    }
}

impl Drop for WorkerChild {
    fn drop(&mut self) {
        self.stop(Instant::now());
    }
}

/// One worker process and its connection.
struct Worker {
    child: WorkerChild,
    connection: Arc<Connection>,
    state: Arc<Mutex<WorkerState>>,
    parameters: Receiver<std::result::Result<ShardParameters, String>>,
    host: String,
    param_bytes: u64,
}

impl Worker {
    fn state(&self) -> MutexGuard<'_, WorkerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why the worker is gone, if it is: exited, disconnected, hung or broken.
    fn lost(&self) -> Option<String> {
        if let Some(status) = self.child.exited() {
            return Some(format!("its process exited ({status})"));
        }
        let state = self.state();
        if let Some(broken) = &state.broken {
            return Some(broken.clone());
        }
        if !self.connection.is_open() {
            drop(state);
            // A process that dies closes its sockets before it can be reaped: give it a
            // moment, so that the error says how it ended.
            let deadline = Instant::now() + EXIT_GRACE;
            while Instant::now() < deadline {
                if let Some(status) = self.child.exited() {
                    return Some(format!("its process exited ({status})"));
                }
                std::thread::sleep(Duration::from_millis(10));
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

/// Worker processes on this machine, one per rank of a layout.
pub(crate) struct WorkerProcesses {
    layout: Layout,
    trace: Option<Arc<dyn TracePropagation>>,
    /// The pass the driver is in.
    pass: std::sync::atomic::AtomicU64,
    workers: Vec<Worker>,
    _hub: Hub,
    /// Runs the connections' tasks; dropped last.
    _runtime: tokio::runtime::Runtime,
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
        let (events, events_rx) = unbounded();
        let workers = WorkerProcesses::start(layout, launch, events)?;
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
}

impl WorkerProcesses {
    fn start(layout: Layout, launch: &WorkerLaunch, events: Sender<ShardEvent>) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("flexmodel-driver-io")
            .enable_all()
            .build()
            .map_err(Error::RuntimeStart)?;
        let secret = JobToken::of(launch)?;
        let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
        let hub = Hub::bind(loopback, secret.token.clone(), runtime.handle())?;
        let mut children = Vec::with_capacity(layout.world_size());
        for rank in 0..layout.world_size() {
            match spawn(launch, hub.local_addr(), &secret.path, rank) {
                Ok(child) => children.push(child),
                Err(e) => {
                    stop_all(&children, &[]);
                    return Err(e);
                }
            }
        }
        let mut joining = Joining {
            children,
            connections: Vec::new(),
        };
        let joined = joining.join(layout, launch, &hub);
        // Every worker has read the token by now (or failed).
        drop(secret);
        let joined = match joined {
            Ok(joined) => joined,
            Err(e) => {
                stop_all(&joining.children, &joining.connections);
                return Err(e);
            }
        };
        let workers = joining
            .children
            .into_iter()
            .zip(joining.connections)
            .zip(joined)
            .enumerate()
            .map(
                |(
                    rank,
                    (
                        (child, connection),
                        Joined {
                            host,
                            param_bytes,
                            peak_rss_bytes,
                        },
                    ),
                )| {
                    let state = Arc::new(Mutex::new(WorkerState {
                        last_heartbeat: Instant::now(),
                        pass: 0,
                        at: None,
                        peak_rss_bytes,
                        broken: None,
                    }));
                    let (parameters_tx, parameters) = unbounded();
                    let relay = Relay {
                        rank,
                        connection: connection.clone(),
                        state: state.clone(),
                        events: events.clone(),
                        parameters: parameters_tx,
                    };
                    std::thread::Builder::new()
                        .name(format!("flexmodel-rank-{rank}"))
                        .spawn(move || relay.run())
                        .map_err(Error::RuntimeStart)?;
                    Ok(Worker {
                        child,
                        connection,
                        state,
                        parameters,
                        host,
                        param_bytes,
                    })
                },
            )
            .collect::<Result<Vec<Worker>>>()?;
        Ok(Self {
            layout,
            trace: launch.trace.clone(),
            pass: std::sync::atomic::AtomicU64::new(0),
            workers,
            _hub: hub,
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

/// Starts the worker of `rank`.
fn spawn(
    launch: &WorkerLaunch,
    driver: SocketAddr,
    token_file: &std::path::Path,
    rank: usize,
) -> Result<WorkerChild> {
    let mut command = Command::new(&launch.program);
    command
        .args(&launch.args)
        .arg("--driver")
        .arg(driver.to_string())
        .arg("--rank")
        .arg(rank.to_string())
        .arg("--token-file")
        .arg(token_file)
        .stdin(Stdio::null())
        // Standard output is the driver's (a command's results); workers log to stderr.
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        command.env("RAYON_NUM_THREADS", launch.threads.to_string());
    }
    WorkerChild::spawn(&mut command).map_err(|e| Error::WorkerStart {
        rank,
        reason: format!("running {}: {e}", launch.program.display()),
    })
}

/// The job's token and the file the workers read it from.
struct JobToken {
    token: Token,
    path: PathBuf,
    /// Whether the file is ours to remove.
    written: bool,
}

impl JobToken {
    /// The token of `launch`'s file, or a fresh one in a new private file.
    fn of(launch: &WorkerLaunch) -> Result<Self> {
        if let Some(path) = &launch.token_file {
            return Ok(Self {
                token: Token::read(path)?,
                path: path.clone(),
                written: false,
            });
        }
        let token = Token::random();
        let name = format!("flexmodel-token-{}-{}", std::process::id(), rand_suffix());
        let path = std::env::temp_dir().join(name);
        token.write(&path).map_err(|e| Error::WorkerStart {
            rank: 0,
            reason: format!("writing the job's token to {}: {e}", path.display()),
        })?;
        Ok(Self {
            token,
            path,
            written: true,
        })
    }
}

impl Drop for JobToken {
    fn drop(&mut self) {
        if self.written {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A short random name part, so that two drivers of one process never collide.
fn rand_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(Instant::now().elapsed().as_nanos());
    format!("{:016x}", hasher.finish())
}

/// A worker that joined and loaded its shard.
struct Joined {
    host: String,
    param_bytes: u64,
    /// Its peak memory while it loaded.
    peak_rss_bytes: Option<u64>,
}

/// Workers started but not yet ready.
struct Joining {
    children: Vec<WorkerChild>,
    connections: Vec<Arc<Connection>>,
}

impl Joining {
    /// Accepts every worker, sends it its assignment and waits until it has loaded its
    /// shard; returns each one's host, and its parameter bytes and peak memory then.
    fn join(&mut self, layout: Layout, launch: &WorkerLaunch, hub: &Hub) -> Result<Vec<Joined>> {
        let deadline = Instant::now() + JOIN_TIMEOUT;
        let mut hosts = Vec::new();
        let mut peers = Vec::new();
        for rank in 0..layout.world_size() {
            let hello = Hello {
                group: DRIVER_GROUP.into(),
                member: rank,
            };
            let child = &self.children[rank];
            let connection = hub
                .accept_while(&hello, deadline, || child.exited().is_none())
                .map_err(|_| self.failed_start(rank, "it did not connect".into()))?;
            let connection = Arc::new(connection);
            self.connections.push(connection.clone());
            match wire::next_control::<ToDriver>(&connection, JOIN_TIMEOUT) {
                Ok(ToDriver::Joined {
                    host, peer_address, ..
                }) => {
                    hosts.push(host);
                    peers.push(peer_address);
                }
                Ok(other) => {
                    return Err(self.failed_start(rank, format!("it sent {other:?} first")));
                }
                Err(e) => return Err(self.failed_start(rank, e.to_string())),
            }
        }
        for rank in 0..layout.world_size() {
            let assignment = Assignment {
                rank,
                layout: (layout.dp(), layout.pp(), layout.tp()),
                peers: peers.clone(),
                model: launch.model.clone(),
            };
            if let Err(e) = wire::send(&self.connections[rank], &ToWorker::Assign(assignment), &[])
            {
                return Err(self.failed_start(rank, e.to_string()));
            }
        }
        let mut joined = Vec::new();
        for (rank, host) in hosts.into_iter().enumerate() {
            let (param_bytes, peak_rss_bytes) = self.ready(rank)?;
            joined.push(Joined {
                host,
                param_bytes,
                peak_rss_bytes,
            });
        }
        Ok(joined)
    }

    /// Waits for `rank`'s shard to be loaded, while its process lives and beats.
    fn ready(&mut self, rank: usize) -> Result<(u64, Option<u64>)> {
        let deadline = Instant::now() + LOAD_TIMEOUT;
        let mut last_heartbeat = Instant::now();
        loop {
            let message = wire::next_control::<ToDriver>(&self.connections[rank], HEARTBEAT);
            match message {
                Ok(ToDriver::Ready {
                    param_bytes,
                    peak_rss_bytes,
                }) => return Ok((param_bytes, peak_rss_bytes)),
                Ok(ToDriver::Refused { message }) => return Err(self.failed_start(rank, message)),
                Ok(ToDriver::Heartbeat { .. }) => last_heartbeat = Instant::now(),
                Ok(other) => {
                    return Err(
                        self.failed_start(rank, format!("it sent {other:?} before it was ready"))
                    );
                }
                Err(WireError::TimedOut) => {}
                Err(e) => return Err(self.failed_start(rank, e.to_string())),
            }
            if let Some(status) = self.children[rank].exited() {
                return Err(self.failed_start(rank, format!("it exited ({status})")));
            }
            if last_heartbeat.elapsed() > HANG_TIMEOUT || Instant::now() > deadline {
                return Err(self.failed_start(rank, "it stopped answering while loading".into()));
            }
        }
    }

    /// The error for `rank`, which did not start; says how its process ended, if it did.
    fn failed_start(&mut self, rank: usize, reason: String) -> Error {
        let reason = match self.children.get(rank).and_then(WorkerChild::exited) {
            Some(status) if !reason.contains("exited") => {
                format!("{reason}; its process exited ({status})")
            }
            _ => reason,
        };
        Error::WorkerStart { rank, reason }
    }
}

/// Asks every worker to leave, waits a little, kills those still running and reaps all.
fn stop_all<'a>(
    children: impl IntoIterator<Item = &'a WorkerChild>,
    connections: &[Arc<Connection>],
) {
    for connection in connections {
        let _ = wire::send(connection, &ToWorker::Shutdown, &[]);
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for child in children {
        child.stop(deadline);
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
                    };
                    Ok((slice, tensors.next()))
                },
            )
            .collect()
    }
}

impl Ranks for WorkerProcesses {
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
            actions: run.actions,
            fault: run.fault,
            backward: run.backward.as_ref().map(|b| b.plan.clone()),
        };
        let attached: Vec<&Tensor> = run
            .input
            .iter()
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
        Some(self.workers.iter().map(|w| w.child.id()).collect())
    }
}

impl Drop for WorkerProcesses {
    fn drop(&mut self) {
        let connections: Vec<Arc<Connection>> =
            self.workers.iter().map(|w| w.connection.clone()).collect();
        stop_all(self.workers.iter().map(|w| &w.child), &connections);
    }
}
