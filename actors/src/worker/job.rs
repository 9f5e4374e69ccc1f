//! A worker of a job: registered in etcd on a lease it keeps alive, serving the job's
//! drivers one after another and keeping its shard from one to the next.
//!
//! Only one driver is served at a time: another that connects meanwhile is refused
//! ("busy"). An assignment is served only if it is the job's current one in etcd for
//! this member (its epoch fences off a driver that lost its hold on the job).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, bounded};
use flexmodel_cluster::DeviceSpec;
use flexmodel_cluster::membership::{
    ClusterUrl, EtcdJob, LoadedSlice, MemberRecord, MemberState, Registration,
};
use flexmodel_cluster::transport::{Connection, Hub};

use super::session::{JobMember, Session, Slot};
use super::{ShardLoader, WorkerOptions, host_name};
use crate::protocol::{Assignment, ToDriver};
use crate::wire::{self, DRIVER_GROUP};
use crate::{Error, Result};

/// The jobs this process joined, so that [`leave_every_job`] can reach them from a
/// signal handler's thread.
static JOINED: Mutex<Vec<Arc<Registration>>> = Mutex::new(Vec::new());

/// Leaves every job this process joined: their records are removed from etcd at once,
/// rather than when their leases expire. For a worker about to exit on a signal.
pub fn leave_every_job() {
    let joined = std::mem::take(&mut *JOINED.lock().unwrap_or_else(|p| p.into_inner()));
    for registration in joined {
        registration.leave();
    }
}

/// Registers in the job at `url` and serves its drivers until the process is stopped.
pub(super) fn serve_job(
    url: &ClusterUrl,
    device: DeviceSpec,
    runtime: &tokio::runtime::Handle,
    loader: &dyn ShardLoader,
    options: &WorkerOptions,
) -> Result<()> {
    let job = EtcdJob::connect(url)?;
    let hub = Arc::new(Hub::bind(options.listen, options.token.clone(), runtime)?);
    let hub = &hub;
    let address = advertised(hub.local_addr());
    let host = host_name();
    let pid = std::process::id();
    let id = format!("{host}-{pid}-{:04x}", rand::random::<u16>());
    let record = MemberRecord {
        id: id.clone(),
        host,
        address: address.clone(),
        device: device.to_string(),
        pid,
        state: MemberState::Idle,
        slice: None,
    };
    let registration = Arc::new(job.register(record)?);
    JOINED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(registration.clone());
    tracing::info!(job = %url.job, %id, %address, "joined the job; waiting for drivers");
    let member = Member {
        job: &job,
        registration: &registration,
        id,
        serving: Mutex::new(None),
    };
    let busy = Arc::new(AtomicBool::new(false));
    let drivers = accept_drivers(hub, busy.clone())?;
    let mut slot = Slot::default();
    while let Ok(driver) = drivers.recv() {
        let session = Session {
            hub,
            runtime,
            loader,
            trace: options.trace.as_ref(),
            address: address.clone(),
            rank: None,
            member: Some(&member),
            device: Some(device),
        };
        let done = AtomicBool::new(false);
        let watched = driver.clone();
        let served = std::thread::scope(|scope| {
            scope.spawn(|| member.watch_driver(&watched, &done));
            let served = session.serve(driver, &mut slot);
            done.store(true, Ordering::SeqCst);
            served
        });
        if let Err(e) = served {
            tracing::warn!(error = %e, "a driver could not be served");
        }
        *member.serving.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // Free before it says so: a driver that sees it ready is not refused.
        busy.store(false, Ordering::SeqCst);
        let state = match slot.slice() {
            Some(_) => MemberState::Ready,
            None => MemberState::Idle,
        };
        member.record(state, slot.slice());
    }
    Ok(())
}

/// The address to give out for a hub listening on `listen`: the host's name in place
/// of an unspecified address (`0.0.0.0`).
fn advertised(listen: SocketAddr) -> String {
    match listen.ip().is_unspecified() {
        true => format!("{}:{}", host_name(), listen.port()),
        false => listen.to_string(),
    }
}

/// Hands over the drivers that connect, one at a time: while `busy`, a driver that
/// connects is told so and closed.
fn accept_drivers(hub: &Arc<Hub>, busy: Arc<AtomicBool>) -> Result<Receiver<Arc<Connection>>> {
    let (drivers, next) = bounded(0);
    let hub = hub.clone();
    std::thread::Builder::new()
        .name("flexmodel-drivers".into())
        .spawn(move || {
            loop {
                let deadline = Instant::now() + Duration::from_secs(3600);
                let Ok((_, connection)) = hub.accept_any(DRIVER_GROUP, deadline) else {
                    continue;
                };
                if busy.swap(true, Ordering::SeqCst) {
                    tracing::warn!(peer = %connection.peer(), "refused a second driver while serving one");
                    let refused = ToDriver::Refused {
                        message: "busy: it is serving another driver".into(),
                    };
                    let _ = wire::send(&connection, &refused, &[]);
                    connection.close();
                    continue;
                }
                if drivers.send(Arc::new(connection)).is_err() {
                    return;
                }
            }
        })
        .map_err(Error::RuntimeStart)?;
    Ok(next)
}

/// How often a serving worker checks that its driver still holds the job.
const DRIVER_CHECK: Duration = Duration::from_secs(1);

/// This worker's place in its job.
struct Member<'a> {
    job: &'a EtcdJob,
    registration: &'a Registration,
    id: String,
    /// The claim of the driver whose assignment it serves.
    serving: Mutex<Option<String>>,
}

impl Member<'_> {
    /// Closes `driver` once the job's driver is no longer the one served (its lease
    /// expired: it died, or was cut off without its connection closing), until `done`.
    fn watch_driver(&self, driver: &Connection, done: &AtomicBool) {
        let mut next = Instant::now() + DRIVER_CHECK;
        while !done.load(Ordering::SeqCst) && driver.is_open() {
            std::thread::sleep(Duration::from_millis(50));
            if Instant::now() < next {
                continue;
            }
            next = Instant::now() + DRIVER_CHECK;
            let serving = self
                .serving
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let Some(claim) = serving else { continue };
            // etcd out of reach says nothing about the driver: keep serving.
            if let Ok(holder) = self.job.driver()
                && holder.is_none_or(|d| d.claim != claim)
            {
                tracing::warn!("the driver no longer holds the job; ending its session");
                driver.close();
            }
        }
    }
}

impl JobMember for Member<'_> {
    fn check(&self, assignment: &Assignment) -> std::result::Result<(), String> {
        if assignment.member.as_deref() != Some(self.id.as_str()) {
            return Err(format!(
                "the assignment is for member {:?}, not for this one ({})",
                assignment.member, self.id
            ));
        }
        let current = self.job.assignment().map_err(|e| e.to_string())?;
        let current = current.ok_or("the job has no assignment in etcd")?;
        if current.epoch != assignment.epoch {
            return Err(format!(
                "the assignment of epoch {} is stale: the job is at epoch {}",
                assignment.epoch, current.epoch
            ));
        }
        if current.members.get(assignment.rank) != Some(&self.id)
            || current.layout != assignment.layout
        {
            return Err(format!(
                "the job's assignment of epoch {} does not give rank {} to this member",
                current.epoch, assignment.rank
            ));
        }
        let driver = self.job.driver().map_err(|e| e.to_string())?;
        if driver.is_none_or(|d| d.claim != current.claim) {
            return Err("the driver that wrote the assignment no longer holds the job".into());
        }
        *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = Some(current.claim);
        Ok(())
    }

    fn record(&self, state: MemberState, slice: Option<LoadedSlice>) {
        let written = self.registration.update(|r| {
            r.state = state;
            r.slice = slice;
        });
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not record this worker's state in etcd");
        }
    }
}
