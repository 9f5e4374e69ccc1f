//! Worker processes this driver starts on its own machine (`--procs`), one per rank:
//! they dial the driver, and end with it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flexmodel_cluster::Layout;
use flexmodel_cluster::transport::{Hello, Hub, Token};

use super::{Introduction, JOIN_TIMEOUT, Links, Process, STOP_TIMEOUT, WorkerSet};
use crate::trace_context::TracePropagation;
use crate::wire::DRIVER_GROUP;
use crate::{Error, Result};

/// How to start the worker processes.
#[derive(Clone)]
pub struct WorkerLaunch {
    /// The program to run (the `flexmodel` binary).
    pub program: PathBuf,
    /// Its arguments before `--driver ADDR --rank N` (e.g. `["worker"]`).
    pub args: Vec<String>,
    /// What each worker loads: the model, as its loader understands it.
    pub model: String,
    /// The fingerprint every worker's weights must have (the driver's own), if known.
    pub fingerprint: Option<String>,
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
pub(super) struct WorkerChild(Arc<Mutex<Child>>);

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
    pub(super) fn exited(&self) -> Option<std::process::ExitStatus> {
        self.lock().try_wait().ok().flatten()
    }

    /// Waits for the process to end until `deadline`, kills it then, and reaps it.
    pub(super) fn stop(&self, deadline: Instant) {
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

impl WorkerSet {
    /// Starts one worker process per rank of `layout` with `launch`, and waits until
    /// every one has loaded its shard.
    pub(super) fn start_local(
        layout: Layout,
        launch: &WorkerLaunch,
        events: crossbeam_channel::Sender<crate::protocol::ShardEvent>,
    ) -> Result<Self> {
        let runtime = super::io_runtime()?;
        let secret = JobToken::of(launch)?;
        let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
        let hub = Hub::bind(loopback, secret.token.clone(), runtime.handle())?;
        let mut children = Vec::with_capacity(layout.world_size());
        for rank in 0..layout.world_size() {
            match spawn(launch, hub.local_addr(), &secret.path, rank) {
                Ok(child) => children.push(child),
                Err(e) => {
                    stop_children(&children);
                    return Err(e);
                }
            }
        }
        let deadline = Instant::now() + JOIN_TIMEOUT;
        let mut connections = Vec::with_capacity(layout.world_size());
        for (rank, child) in children.iter().enumerate() {
            let hello = Hello {
                group: DRIVER_GROUP.into(),
                member: rank,
            };
            match hub.accept_while(&hello, deadline, || child.exited().is_none()) {
                Ok(connection) => connections.push(Arc::new(connection)),
                Err(_) => {
                    let exited = child.exited().map(|status| status.to_string());
                    stop_children(&children);
                    return Err(Error::WorkerNotConnected { rank, exited });
                }
            }
        }
        let processes: Vec<Process> = children.into_iter().map(Process::Child).collect();
        let introduction = Introduction {
            layout,
            model: &launch.model,
            fingerprint: launch.fingerprint.as_deref(),
            epoch: 0,
            members: None,
        };
        let set = WorkerSet::introduce(
            introduction,
            connections,
            processes,
            Links {
                trace: launch.trace.clone(),
                hub,
                runtime,
                events,
            },
        );
        // Every worker has read the token by now (or failed).
        drop(secret);
        set
    }
}

/// Kills the processes of `children` that do not end within [`STOP_TIMEOUT`].
fn stop_children(children: &[WorkerChild]) {
    let deadline = Instant::now() + STOP_TIMEOUT;
    for child in children {
        child.stop(deadline);
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
    WorkerChild::spawn(&mut command).map_err(|source| Error::SpawnWorker {
        rank,
        program: launch.program.clone(),
        source,
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
        let name = format!(
            "flexmodel-token-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let path = std::env::temp_dir().join(name);
        token.write(&path).map_err(|source| Error::WriteToken {
            path: path.clone(),
            source,
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
