//! The workers of a job in etcd (`--cluster`): the driver claims the job, waits for
//! enough free members, places the ranks on them, and dials and assigns them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use flexmodel_cluster::Layout;
use flexmodel_cluster::membership::{
    Claim, ClusterUrl, DriverRecord, EtcdJob, MemberRecord, MemberState, place_ranks,
};
use flexmodel_cluster::transport::{Hello, Hub, Token};

use super::{
    Expected, HANG_TIMEOUT, Introduction, LOAD_TIMEOUT, Links, Process, Worker, WorkerSet,
    read_joined, wait_ready,
};
use crate::protocol::{ShardEvent, ToDriver, ToWorker};
use crate::trace_context::TracePropagation;
use crate::wire::{self, DRIVER_GROUP};
use crate::worker::HEARTBEAT;
use crate::worker::host_name;
use crate::{Error, Result};

/// How long a driver waits for enough free workers.
pub const WAIT_FOR_WORKERS: Duration = Duration::from_secs(60);
/// How long dialing one worker may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Which job's workers to take, and what they are to load.
#[derive(Clone)]
pub struct JobLaunch {
    /// The job.
    pub url: ClusterUrl,
    /// The model, as each worker resolves it on its own disk.
    pub model: String,
    /// The fingerprint every worker's weights must have (the driver's own), if known.
    pub fingerprint: Option<String>,
    /// The job's secret (never kept in etcd).
    pub token: Token,
    /// How each pass's trace context is sent along.
    pub trace: Option<Arc<dyn TracePropagation>>,
}

impl WorkerSet {
    /// Claims the job of `launch`, waits for enough free workers, assigns them the
    /// ranks of `layout` and waits until each has its shard.
    pub(super) fn take_job(
        layout: Layout,
        launch: &JobLaunch,
        events: Sender<ShardEvent>,
    ) -> Result<Self> {
        let job = EtcdJob::connect(&launch.url)?;
        let driver = DriverRecord {
            host: host_name(),
            pid: std::process::id(),
            claim: format!("{:016x}", rand::random::<u64>()),
        };
        let token = launch.token.clone();
        let claim = job.claim(driver)?;
        let members = wait_for_workers(&job, &layout, &launch.model)?;
        let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
        let assignment = claim.assign(layout, &launch.model, ids.clone())?;
        tracing::info!(job = %launch.url.job, epoch = assignment.epoch, workers = ?ids, "assigned the job's workers");
        let runtime = super::io_runtime()?;
        let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
        let hub = Hub::bind(loopback, token, runtime.handle())?;
        let mut connections = Vec::with_capacity(members.len());
        for (rank, member) in members.iter().enumerate() {
            match dial(&hub, member, rank) {
                Ok(connection) => connections.push(Arc::new(connection)),
                Err(e) => {
                    super::release(&connections, &[]);
                    return Err(e);
                }
            }
        }
        let processes = ids.iter().cloned().map(Process::Member).collect();
        let introduction = Introduction {
            layout,
            model: &launch.model,
            fingerprint: launch.fingerprint.as_deref(),
            epoch: assignment.epoch,
            members: Some(&ids),
        };
        let mut set = WorkerSet::introduce(
            introduction,
            connections,
            processes,
            Links {
                trace: launch.trace.clone(),
                hub,
                runtime,
                events,
            },
        )?;
        let expected = Expected {
            against: "the driver".into(),
            fingerprint: match &launch.fingerprint {
                Some(fingerprint) => fingerprint.clone(),
                None => set.workers[0].fingerprint.clone(),
            },
        };
        set.job = Some(Hold {
            job,
            claim,
            model: launch.model.clone(),
            expected,
        });
        Ok(set)
    }

    /// Fails if this driver's hold on the job lapsed; else replaces every lost worker
    /// with a free member of the job, waiting up to [`WAIT_FOR_WORKERS`] for one to
    /// register; the workers left keep their ranks and their shards, and only the
    /// replacements load.
    pub(super) fn replace_lost(&mut self) -> Result<()> {
        let Some(hold) = &self.job else {
            return Ok(());
        };
        // Before every pass: a driver whose lease lapsed may no longer hold the job.
        if hold.claim.lost() {
            return Err(flexmodel_cluster::Error::LostClaim {
                job: hold.job.url().job.clone(),
            }
            .into());
        }
        let lost: Vec<usize> = (0..self.workers.len())
            .filter(|&rank| self.workers[rank].lost().is_some())
            .collect();
        if lost.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = self.workers.iter().map(Worker::member_id).collect();
        let members = wait_for_replacements(hold, &self.layout, &ids, &lost)?;
        let new_ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
        let assignment = hold
            .claim
            .assign(self.layout, &hold.model, new_ids.clone())?;
        tracing::info!(epoch = assignment.epoch, ranks = ?lost, "replacing lost workers");
        // The replacements join; then every worker gets the new assignment.
        let mut joining = Vec::new();
        for &rank in &lost {
            let member = &members[rank];
            let connection = Arc::new(dial(&self.hub, member, rank)?);
            let process = Process::Member(member.id.clone());
            let joined = read_joined(&connection, &process, rank)?;
            joining.push((rank, connection, process, joined));
        }
        let mut peers: Vec<String> = self
            .workers
            .iter()
            .map(|w| w.peer_address.clone())
            .collect();
        for (rank, _, _, joined) in &joining {
            peers[*rank] = joined.peer_address.clone();
        }
        let introduction = Introduction {
            layout: self.layout,
            model: &hold.model,
            fingerprint: Some(&hold.expected.fingerprint),
            epoch: assignment.epoch,
            members: Some(&new_ids),
        };
        for rank in 0..self.workers.len() {
            let assign = ToWorker::Assign(introduction.assignment(rank, &peers));
            let connection = match joining.iter().find(|(r, ..)| *r == rank) {
                Some((_, connection, ..)) => connection.clone(),
                None => self.workers[rank].connection.clone(),
            };
            wire::send(&connection, &assign, &[]).map_err(|e| Error::WorkerGoneWhileStarting {
                rank,
                reason: e.to_string(),
            })?;
        }
        for (rank, connection, process, joined) in joining {
            let ready = wait_ready(&connection, &process, rank)?;
            hold.expected.check(rank, &ready, &joined, &process)?;
            let worker = Worker::start(rank, connection, process, joined, &ready, &self.events)?;
            let old = std::mem::replace(&mut self.workers[rank], worker);
            old.connection.close();
        }
        for rank in 0..self.workers.len() {
            if !lost.contains(&rank) {
                self.workers[rank].regrouped(rank)?;
            }
        }
        Ok(())
    }
}

/// The job a driver's workers are members of, while the driver holds it.
pub(super) struct Hold {
    job: EtcdJob,
    claim: Claim,
    model: String,
    expected: Expected,
}

impl Worker {
    /// The worker's id in its job.
    fn member_id(&self) -> String {
        match &self.process {
            Process::Member(id) => id.clone(),
            Process::Child(_) => String::new(),
        }
    }

    /// Waits until the worker, given a new assignment, has joined its new groups (and
    /// kept its shard, or loaded it).
    fn regrouped(&mut self, rank: usize) -> Result<()> {
        let deadline = Instant::now() + LOAD_TIMEOUT;
        loop {
            match self.readiness.recv_timeout(HEARTBEAT) {
                Ok(ToDriver::Ready { reused, .. }) => {
                    self.reused = reused;
                    return Ok(());
                }
                Ok(ToDriver::Refused { message }) => {
                    return Err(Error::WorkerRefused { rank, message });
                }
                Ok(_) | Err(_) => {}
            }
            if let Some(reason) = self.lost() {
                return Err(Error::WorkerGoneWhileStarting { rank, reason });
            }
            if Instant::now() > deadline || self.state().last_heartbeat.elapsed() > HANG_TIMEOUT {
                let during = "joining its new groups";
                return Err(Error::WorkerSilent { rank, during });
            }
        }
    }
}

/// Dials the member serving `rank`.
fn dial(
    hub: &Hub,
    member: &MemberRecord,
    rank: usize,
) -> Result<flexmodel_cluster::transport::Connection> {
    let hello = Hello {
        group: DRIVER_GROUP.into(),
        member: rank,
    };
    wire::resolve(&member.address)
        .ok_or_else(|| format!("its address {} does not resolve", member.address))
        .and_then(|address| {
            hub.dial(address, &hello, DIAL_TIMEOUT)
                .map_err(|e| e.to_string())
        })
        .map_err(|reason| Error::WorkerUnreachable {
            rank,
            worker: format!("{} on {} ({})", member.id, member.host, member.address),
            reason,
        })
}

/// The members to serve each rank once the lost ranks have replacements: the workers
/// left keep theirs.
fn wait_for_replacements(
    hold: &Hold,
    layout: &Layout,
    ids: &[String],
    lost: &[usize],
) -> Result<Vec<MemberRecord>> {
    let deadline = Instant::now() + WAIT_FOR_WORKERS;
    let lost_ids: Vec<&String> = lost.iter().map(|&r| &ids[r]).collect();
    let mut said = false;
    loop {
        let members = hold.job.members()?;
        // The workers left first, so that each keeps its rank.
        let mut candidates: Vec<MemberRecord> = ids
            .iter()
            .filter(|id| !lost_ids.contains(id))
            .filter_map(|id| members.iter().find(|m| &m.id == id).cloned())
            .collect();
        let kept = candidates.len();
        candidates.extend(members.into_iter().filter(|m| {
            !ids.contains(&m.id) && matches!(m.state, MemberState::Idle | MemberState::Ready)
        }));
        if let Some(placed) = place_ranks(layout, &hold.model, &candidates) {
            let members: Vec<MemberRecord> =
                placed.into_iter().map(|i| candidates[i].clone()).collect();
            let keeps = (0..ids.len())
                .filter(|r| !lost.contains(r))
                .all(|r| members[r].id == ids[r]);
            if keeps && kept + lost.len() == ids.len() {
                return Ok(members);
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::NotEnoughWorkers {
                job: hold.job.url().job.clone(),
                needed: lost.len(),
                have: candidates.len() - kept,
                busy: 0,
                seconds: WAIT_FOR_WORKERS.as_secs(),
            });
        }
        if !said {
            tracing::warn!(ranks = ?lost, "waiting for workers to replace the lost ones");
            said = true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The members to serve each rank of `layout`, in rank order, once enough of the
/// job's workers are free; fails after [`WAIT_FOR_WORKERS`], saying how many it had.
fn wait_for_workers(job: &EtcdJob, layout: &Layout, model: &str) -> Result<Vec<MemberRecord>> {
    let deadline = Instant::now() + WAIT_FOR_WORKERS;
    let needed = layout.world_size();
    let mut said = None;
    loop {
        let members = job.members()?;
        let (free, busy): (Vec<MemberRecord>, Vec<MemberRecord>) = members
            .into_iter()
            .partition(|m| matches!(m.state, MemberState::Idle | MemberState::Ready));
        if let Some(placed) = place_ranks(layout, model, &free) {
            return Ok(placed.into_iter().map(|i| free[i].clone()).collect());
        }
        if Instant::now() >= deadline {
            return Err(Error::NotEnoughWorkers {
                job: job.url().job.clone(),
                needed,
                have: free.len(),
                busy: busy.len(),
                seconds: WAIT_FOR_WORKERS.as_secs(),
            });
        }
        if said != Some((free.len(), busy.len())) {
            tracing::info!(
                job = %job.url().job,
                "waiting for workers: {} of {needed} free ({} busy)",
                free.len(),
                busy.len()
            );
            said = Some((free.len(), busy.len()));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
