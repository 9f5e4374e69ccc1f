//! The worker: one rank's process. It serves drivers: for each, it learns its rank and
//! its peers, connects to them for the in-model collectives, loads its shard (or keeps
//! the one it holds, when the model, the layout and the rank are the same) and serves
//! passes until the driver is done.
//!
//! A worker started by a driver (`--procs`) dials that driver and serves it alone. A
//! worker of a job ([`Join::Job`]) registers in etcd and serves the job's drivers one
//! after another, for as long as it runs.
//!
//! # Failure
//!
//! A pass that fails on the shard is reported to the driver, and the worker serves the
//! next one. A peer that goes away fails the collective waiting on it
//! ([`flexmodel_cluster::Error::PeerGone`]); the driver's abort unblocks every other
//! wait. A worker that cannot join its groups or load its shard tells the driver why
//! (`Refused`); one a driver started then exits, one of a job waits for the next driver.
//!
//! No wait is without a deadline:
//!
//! - the driver's assignment, and the peers' connections: [`JOIN_TIMEOUT`] (60 s);
//! - the driver itself: it beats every [`HEARTBEAT`] (250 ms), and a driver silent for
//!   [`DRIVER_SILENCE`] (5 s) — stopped, hung or cut off — ends the session (a job's
//!   worker then serves the next driver; one a driver started exits). A job's worker
//!   also ends the session once its driver no longer holds the job in etcd;
//! - a frame that fails its authentication check ends the session at once (see
//!   [`flexmodel_cluster::transport`]);
//! - the tensors attached to a message: 60 s; a peer's host name: 10 s to resolve;
//! - the shard stopping when the session ends: 10 s, after which it is left behind;
//! - etcd: a job's worker whose lease lapsed (etcd out of reach for longer than the
//!   lease) registers again, on a new lease, as soon as etcd answers.
//!
//! # Shutdown
//!
//! A worker a driver started ends with that driver (its `Shutdown`, or the end of its
//! connection), so that it never outlives it. A worker of a job leaves the job when it
//! is stopped ([`leave_every_job`]).

mod job;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use flexmodel_cluster::membership::ClusterUrl;
use flexmodel_cluster::transport::{Hello, Hub, Token};
use flexmodel_cluster::{Collective, DeviceSpec};

pub use job::leave_every_job;
use session::{Session, Slot};

use crate::protocol::Assignment;
use crate::trace_context::TracePropagation;
use crate::wire::DRIVER_GROUP;
use crate::{BoxError, Error, Result, ShardModel};

/// How often a worker tells its driver it is alive, and a driver its workers.
pub(crate) const HEARTBEAT: Duration = Duration::from_millis(250);
/// How long a worker serves a driver that sends nothing, not even a heartbeat: a driver
/// that was stopped (SIGSTOP), hangs or was cut off loses its workers after it.
pub const DRIVER_SILENCE: Duration = Duration::from_secs(5);
/// How long a worker waits for its driver's assignment, and for its peers to connect.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A shard as a loader made it.
pub struct LoadedShard {
    /// The shard.
    pub model: Arc<dyn ShardModel>,
    /// A fingerprint of the weights it was read from: equal for equal weights, so that
    /// a driver can tell that every worker read the same model.
    pub fingerprint: String,
}

/// Builds a worker's shard once the driver assigned it a rank.
pub trait ShardLoader {
    /// The shard of `assignment` (its rank of its layout) on `device`, computing with
    /// `tp`, its tensor-parallel group, and under FSDP with `replicas`, the group of the
    /// replicas holding the other pieces of its parameters.
    fn load(
        &self,
        assignment: &Assignment,
        device: &Device,
        tp: Arc<dyn Collective>,
        replicas: Option<Arc<dyn Collective>>,
    ) -> std::result::Result<LoadedShard, BoxError>;
}

/// How a worker finds its drivers.
#[derive(Clone, Debug)]
pub enum Join {
    /// Dial the driver that started this worker and serve it `rank`.
    Driver {
        /// The driver's hub.
        driver: SocketAddr,
        /// The rank to serve.
        rank: usize,
    },
    /// Register in a job in etcd and serve its drivers, one after another.
    Job {
        /// The job.
        url: ClusterUrl,
        /// The device this worker computes on, whatever the layout of its drivers says
        /// (`Cuda(None)`: GPU `rank mod count` for each rank it serves).
        device: DeviceSpec,
    },
}

/// How a worker joins, where it listens, and what it proves.
#[derive(Clone)]
pub struct WorkerOptions {
    /// How it finds its drivers.
    pub join: Join,
    /// The address the worker's peers (and a job's drivers) reach it at (port 0: any
    /// free port).
    pub listen: SocketAddr,
    /// How the shard's spans join the driver's trace, if they are exported.
    pub trace: Option<Arc<dyn TracePropagation>>,
    /// The job's secret, which every connection proves it holds.
    pub token: Token,
}

/// Serves drivers as `options` says: the one that started this worker until it is done
/// or gone, or a job's drivers until the worker is stopped.
pub fn serve(options: &WorkerOptions, loader: &dyn ShardLoader) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("flexmodel-worker-io")
        .enable_all()
        .build()
        .map_err(Error::RuntimeStart)?;
    match &options.join {
        Join::Driver { driver, rank } => {
            let hub = Hub::bind(options.listen, options.token.clone(), runtime.handle())?;
            let hello = Hello {
                group: DRIVER_GROUP.into(),
                member: *rank,
            };
            let connection = hub.dial(*driver, &hello, JOIN_TIMEOUT)?;
            let session = Session {
                hub: &hub,
                runtime: runtime.handle(),
                loader,
                trace: options.trace.as_ref(),
                address: hub.local_addr().to_string(),
                rank: Some(*rank),
                member: None,
                device: None,
            };
            let mut slot = Slot::default();
            session.serve(Arc::new(connection), &mut slot)
        }
        Join::Job { url, device } => {
            job::serve_job(url, *device, runtime.handle(), loader, options)
        }
    }
}

/// The process's peak resident memory (`VmHWM` of `/proc/self/status`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// This machine's name, for errors that name where a rank runs.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
