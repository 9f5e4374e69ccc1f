//! A job's membership in etcd: workers register on leases they keep alive, a driver
//! holds the job on a lease of its own and writes each assignment in one transaction
//! fenced by an epoch.
//!
//! # Failover
//!
//! The etcd client balances requests over every endpoint it is given but does not stop
//! sending them to a member that died. A prober asks each endpoint for its status every
//! [`PROBE_EVERY`] and takes the ones that do not answer out of the client's balance
//! (keeping at least one), then puts them back once they answer again. Every request is
//! retried for up to [`RETRY_FOR`], so that an election after a leader's death is only
//! a pause; a lease's keep-alive stream is reopened on the members left.
//!
//! # Failure
//!
//! Each attempt of a request has 2 s, and a request gives up after [`RETRY_FOR`] (10 s);
//! connecting gives up after [`CONNECT_TIMEOUT`] (10 s). A lease is renewed every third
//! of its life ([`LEASE_TTL_SECONDS`], 5 s); renewal gives up once no renewal went
//! through for the whole life, since etcd has let the lease go by then. A driver's
//! [`Claim`] is then [lost](Claim::lost) (the driver fails its next pass saying so), and
//! a worker's [`Registration`] registers again on a new lease as soon as etcd answers.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use super::records::{AssignmentRecord, DriverRecord, MemberRecord};
use super::url::ClusterUrl;
use crate::{Error, Layout, Result};

/// How long a process waits for etcd to answer at first, before it says it cannot.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request is retried (across endpoints and elections) before it fails.
pub const RETRY_FOR: Duration = Duration::from_secs(10);
/// How long one attempt at a request may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the endpoints are probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The time to live of a worker's and a driver's lease, in seconds: how long etcd keeps
/// the records of a process that stopped renewing them.
pub const LEASE_TTL_SECONDS: i64 = 5;

/// The etcd keys of one job.
#[derive(Debug, Clone)]
struct Keys {
    root: String,
}

impl Keys {
    fn new(job: &str) -> Self {
        Self {
            root: format!("/flexmodel/v1/jobs/{job}/"),
        }
    }
    fn members(&self) -> String {
        format!("{}members/", self.root)
    }
    fn member(&self, id: &str) -> String {
        format!("{}members/{id}", self.root)
    }
    fn driver(&self) -> String {
        format!("{}driver", self.root)
    }
    fn epoch(&self) -> String {
        format!("{}epoch", self.root)
    }
    fn assignment(&self) -> String {
        format!("{}assignment", self.root)
    }
}

/// A connection to the etcd cluster of one job; clones share it.
#[derive(Clone)]
pub struct EtcdJob(Arc<Connected>);

/// What the clones of an [`EtcdJob`] share.
struct Connected {
    url: ClusterUrl,
    keys: Keys,
    client: Client,
    prober: JoinHandle<()>,
    /// Runs the client and its background tasks; dropped last.
    runtime: Runtime,
}

impl EtcdJob {
    /// Connects to the etcd cluster of `url`, failing within [`CONNECT_TIMEOUT`] when
    /// none of its endpoints answers.
    pub fn connect(url: &ClusterUrl) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("flexmodel-etcd")
            .enable_all()
            .build()
            .map_err(|e| Error::Etcd {
                what: "starting its client",
                reason: e.to_string(),
            })?;
        let endpoints = url.endpoint_urls();
        let unreachable = |reason: String| Error::EtcdUnreachable {
            endpoints: url.endpoints.join(","),
            seconds: CONNECT_TIMEOUT.as_secs(),
            reason,
        };
        let client = runtime
            .block_on(Client::connect(&endpoints, Some(options())))
            .map_err(|e| unreachable(e.to_string()))?;
        let reached = runtime.block_on(async {
            let deadline = Instant::now() + CONNECT_TIMEOUT;
            let mut last = String::from("no answer");
            while Instant::now() < deadline {
                // Ask each endpoint on its own: the balanced client may pick a dead one.
                for endpoint in &endpoints {
                    match status(endpoint).await {
                        Ok(()) => return Ok(()),
                        Err(e) => last = e,
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(last)
        });
        reached.map_err(unreachable)?;
        let prober = runtime.spawn(probe(client.clone(), endpoints));
        Ok(Self(Arc::new(Connected {
            url: url.clone(),
            keys: Keys::new(&url.job),
            client,
            prober,
            runtime,
        })))
    }

    /// The job's URL.
    pub fn url(&self) -> &ClusterUrl {
        &self.0.url
    }

    /// Every member registered in the job, in id order.
    pub fn members(&self) -> Result<Vec<MemberRecord>> {
        let prefix = self.0.keys.members();
        let response = self.call("listing the job's members", |mut c| {
            let prefix = prefix.clone();
            async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })?;
        let mut members = response
            .kvs()
            .iter()
            .map(|kv| parse(kv.key(), kv.value()))
            .collect::<Result<Vec<MemberRecord>>>()?;
        members.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(members)
    }

    /// The latest assignment, if a driver ever wrote one.
    pub fn assignment(&self) -> Result<Option<AssignmentRecord>> {
        self.get_record(self.0.keys.assignment(), "reading the job's assignment")
    }

    /// The driver holding the job, if one does.
    pub fn driver(&self) -> Result<Option<DriverRecord>> {
        self.get_record(self.0.keys.driver(), "reading the job's driver")
    }

    /// Registers `member` on a lease kept alive until the registration is dropped.
    pub fn register(&self, member: MemberRecord) -> Result<Registration> {
        let lease = self.grant("registering a member")?;
        let key = self.0.keys.member(&member.id);
        let record = Arc::new(Mutex::new(member));
        let registration = Registration {
            job: self.clone(),
            key,
            record,
            lease: Arc::new(AtomicI64::new(lease)),
            keeper: Mutex::new(None),
        };
        registration.put()?;
        let keeper = self.0.runtime.spawn(keep_member_alive(
            self.0.client.clone(),
            registration.key.clone(),
            registration.record.clone(),
            registration.lease.clone(),
        ));
        *lock(&registration.keeper) = Some(keeper);
        Ok(registration)
    }

    /// Holds the job for the driver `driver`, or says who holds it. A holder's hold
    /// ends when it lets go or its lease expires, so a driver that was killed holds
    /// the job for up to [`LEASE_TTL_SECONDS`]: the claim waits that long (and a
    /// second more) before it says the job is busy.
    pub fn claim(&self, driver: DriverRecord) -> Result<Claim> {
        let deadline = Instant::now() + Duration::from_secs(LEASE_TTL_SECONDS as u64 + 1);
        let mut said = false;
        let lease = loop {
            // A fresh lease each time: one kept while waiting would expire unrenewed.
            let lease = self.grant("claiming the job")?;
            let claimed = self.try_claim(&driver, lease);
            if let Ok(None) = claimed {
                break lease;
            }
            self.revoke(lease);
            let holder = claimed?.ok_or(Error::Internal("a claim neither held nor refused"))?;
            if Instant::now() >= deadline {
                return Err(Error::JobBusy {
                    job: self.0.url.job.clone(),
                    holder: holder.to_string(),
                });
            }
            if !said {
                tracing::info!(job = %self.0.url.job, %holder, "the job is held; waiting for its lease to end");
                said = true;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let lost = Arc::new(AtomicBool::new(false));
        let keeper =
            self.0
                .runtime
                .spawn(keep_claim_alive(self.0.client.clone(), lease, lost.clone()));
        Ok(Claim {
            job: self.clone(),
            driver,
            lease,
            lost,
            keeper,
        })
    }

    /// Puts `driver` as the job's holder on `lease` unless another holds it; returns
    /// the other holder, if one does.
    fn try_claim(&self, driver: &DriverRecord, lease: i64) -> Result<Option<DriverRecord>> {
        let key = self.0.keys.driver();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                to_json(driver)?,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let response = self.call("claiming the job", |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })?;
        if response.succeeded() {
            return Ok(None);
        }
        let holder = response.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .map(|kv| parse::<DriverRecord>(kv.key(), kv.value())),
            _ => None,
        });
        match holder {
            // A retried claim that had gone through: the hold is ours.
            Some(Ok(holder)) if holder.claim == driver.claim => Ok(None),
            Some(Ok(holder)) => Ok(Some(holder)),
            Some(Err(e)) => Err(e),
            // Let go in between: try again.
            None => self.try_claim(driver, lease),
        }
    }

    /// A new lease of [`LEASE_TTL_SECONDS`].
    fn grant(&self, what: &'static str) -> Result<i64> {
        let granted = self.call(what, |mut c| async move {
            c.lease_grant(LEASE_TTL_SECONDS, None).await
        })?;
        Ok(granted.id())
    }

    /// Ends `lease` and the keys on it, as far as etcd can be reached.
    fn revoke(&self, lease: i64) {
        let revoked = self.call("revoking a lease", |mut c| async move {
            c.lease_revoke(lease).await
        });
        if let Err(e) = revoked {
            tracing::warn!(error = %e, "the lease will expire on its own");
        }
    }

    fn get_record<T: DeserializeOwned>(
        &self,
        key: String,
        what: &'static str,
    ) -> Result<Option<T>> {
        let response = self.call(what, |mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        response
            .kvs()
            .first()
            .map(|kv| parse(kv.key(), kv.value()))
            .transpose()
    }

    /// Runs `request` until it succeeds, retrying for up to [`RETRY_FOR`].
    fn call<T, F, Fut>(&self, what: &'static str, request: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.0
            .runtime
            .block_on(retry(&self.0.client, what, request))
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.prober.abort();
    }
}

/// The client's options: requests that time out instead of waiting for a dead member,
/// and that are refused by a member without a leader (it may be cut off).
fn options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(ATTEMPT_TIMEOUT)
        .with_timeout(ATTEMPT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), ATTEMPT_TIMEOUT)
        .with_require_leader(true)
}

/// Runs `request` on `client` until it succeeds, for up to [`RETRY_FOR`].
async fn retry<T, F, Fut>(client: &Client, what: &'static str, mut request: F) -> Result<T>
where
    F: FnMut(Client) -> Fut,
    Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
{
    let deadline = Instant::now() + RETRY_FOR;
    loop {
        let reason = match tokio::time::timeout(ATTEMPT_TIMEOUT, request(client.clone())).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs()),
        };
        if Instant::now() >= deadline {
            return Err(Error::Etcd { what, reason });
        }
        tracing::debug!(what, %reason, "retrying an etcd request");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the etcd member at `endpoint` (a URL) answers, and has a leader.
async fn status(endpoint: &str) -> std::result::Result<(), String> {
    let attempt = async {
        let mut client = Client::connect([endpoint], Some(options())).await?;
        client.status().await.map(|_| ())
    };
    match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{endpoint}: {e}")),
        Err(_) => Err(format!("{endpoint}: no answer")),
    }
}

/// Keeps `client`'s balance to the endpoints that answer (at least one).
async fn probe(client: Client, endpoints: Vec<String>) {
    let mut active: HashSet<String> = endpoints.iter().cloned().collect();
    let mut probes: HashMap<String, Client> = HashMap::new();
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        for endpoint in &endpoints {
            let healthy = match probes.get(endpoint) {
                Some(probe) => {
                    let mut probe = probe.clone();
                    matches!(
                        tokio::time::timeout(ATTEMPT_TIMEOUT, probe.status()).await,
                        Ok(Ok(_))
                    )
                }
                None => match Client::connect([endpoint], Some(options())).await {
                    Ok(probe) => {
                        probes.insert(endpoint.clone(), probe);
                        false
                    }
                    Err(_) => false,
                },
            };
            let member = active.contains(endpoint);
            if healthy && !member && client.add_endpoint(endpoint).await.is_ok() {
                tracing::info!(%endpoint, "an etcd member answers again");
                active.insert(endpoint.clone());
            } else if !healthy
                && member
                && active.len() > 1
                && client.remove_endpoint(endpoint).await.is_ok()
            {
                tracing::warn!(%endpoint, "an etcd member does not answer; requests go to the others");
                active.remove(endpoint);
            }
        }
    }
}

/// Renews `lease` every third of its life over a keep-alive stream, reopening the
/// stream when it breaks; returns once the lease expired: etcd said so, or no renewal
/// went through for the lease's whole life ([`LEASE_TTL_SECONDS`]), after which etcd
/// has let it go (or will, before anyone could be told otherwise).
async fn renew(client: &Client, lease: i64) {
    let every = Duration::from_millis((LEASE_TTL_SECONDS as u64 * 1000) / 3);
    let life = Duration::from_secs(LEASE_TTL_SECONDS as u64);
    let mut renewed = Instant::now();
    while renewed.elapsed() < life {
        let left = life.saturating_sub(renewed.elapsed());
        let opened = tokio::time::timeout(
            ATTEMPT_TIMEOUT.min(left),
            client.clone().lease_keep_alive(lease),
        )
        .await;
        let Ok(Ok((mut keeper, mut stream))) = opened else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            if keeper.keep_alive().await.is_err() {
                break;
            }
            let left = life.saturating_sub(renewed.elapsed());
            match tokio::time::timeout(ATTEMPT_TIMEOUT.min(left), stream.message()).await {
                Ok(Ok(Some(answer))) if answer.ttl() > 0 => renewed = Instant::now(),
                Ok(Ok(Some(_))) => return,
                _ => break,
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// Keeps a member's lease alive; when it expired anyway (etcd was out of reach for
/// longer than its life), registers the member again on a new lease.
async fn keep_member_alive(
    client: Client,
    key: String,
    record: Arc<Mutex<MemberRecord>>,
    lease: Arc<AtomicI64>,
) {
    loop {
        renew(&client, lease.load(Ordering::SeqCst)).await;
        tracing::warn!(%key, "this worker's lease expired; registering again once etcd answers");
        // However long etcd takes to answer: unlisted, the worker is of no use.
        loop {
            match register_again(&client, &key, &record).await {
                Ok(granted) => {
                    lease.store(granted, Ordering::SeqCst);
                    tracing::info!(%key, "registered again");
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not register again yet");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// Writes the member's `record` at `key` on a new lease; the lease.
async fn register_again(client: &Client, key: &str, record: &Mutex<MemberRecord>) -> Result<i64> {
    let granted = retry(client, "registering again", |mut c| async move {
        c.lease_grant(LEASE_TTL_SECONDS, None).await
    })
    .await?
    .id();
    let value = to_json(&*lock(record))?;
    retry(client, "registering again", |mut c| {
        let (key, value) = (key.to_string(), value.clone());
        async move {
            c.put(key, value, Some(PutOptions::new().with_lease(granted)))
                .await
        }
    })
    .await?;
    Ok(granted)
}

/// Keeps a driver's lease alive; sets `lost` when it expired.
async fn keep_claim_alive(client: Client, lease: i64, lost: Arc<AtomicBool>) {
    renew(&client, lease).await;
    tracing::error!("this driver's hold on the job expired: etcd was out of reach too long");
    lost.store(true, Ordering::SeqCst);
}

/// A worker's record in the job, kept alive while this lives; dropping it leaves the job.
pub struct Registration {
    job: EtcdJob,
    key: String,
    record: Arc<Mutex<MemberRecord>>,
    lease: Arc<AtomicI64>,
    /// Renews the lease; `None` once the member left.
    keeper: Mutex<Option<JoinHandle<()>>>,
}

impl Registration {
    /// The member's record as last written.
    pub fn record(&self) -> MemberRecord {
        lock(&self.record).clone()
    }

    /// Changes the member's record with `change` and writes it.
    pub fn update(&self, change: impl FnOnce(&mut MemberRecord)) -> Result<()> {
        change(&mut lock(&self.record));
        self.put()
    }

    /// Leaves the job: the member's record is removed at once. Later calls do nothing.
    pub fn leave(&self) {
        if let Some(keeper) = lock(&self.keeper).take() {
            keeper.abort();
            self.job.revoke(self.lease.load(Ordering::SeqCst));
        }
    }

    fn put(&self) -> Result<()> {
        let value = to_json(&*lock(&self.record))?;
        self.job.call("writing this worker's record", |mut c| {
            let (key, value) = (self.key.clone(), value.clone());
            // Read at each attempt: the member may have registered again meanwhile.
            let lease = self.lease.load(Ordering::SeqCst);
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })?;
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.leave();
    }
}

/// A driver's hold on a job: no other driver can claim it while this lives.
pub struct Claim {
    job: EtcdJob,
    driver: DriverRecord,
    lease: i64,
    lost: Arc<AtomicBool>,
    keeper: JoinHandle<()>,
}

impl Claim {
    /// Whether the hold expired (etcd was out of reach for longer than its lease).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Writes an assignment of `members` (ids, in rank order) to `layout`'s ranks for
    /// `model`, with the next epoch, in one transaction that holds only while this
    /// driver holds the job and no other assignment came in between; returns it.
    pub fn assign(
        &self,
        layout: Layout,
        model: &str,
        members: Vec<String>,
    ) -> Result<AssignmentRecord> {
        let keys = &self.job.0.keys;
        let epoch_key = keys.epoch();
        let current = self.job.call("reading the job's epoch", |mut c| {
            let key = epoch_key.clone();
            async move { c.get(key, None).await }
        })?;
        let (epoch, revision) = match current.kvs().first() {
            Some(kv) => {
                let epoch = std::str::from_utf8(kv.value())
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| Error::BadRecord {
                        key: epoch_key.clone(),
                        reason: "not a number".into(),
                    })?;
                (epoch, kv.mod_revision())
            }
            None => (0, 0),
        };
        let assignment = AssignmentRecord {
            epoch: epoch + 1,
            layout,
            model: model.to_string(),
            members,
            claim: self.driver.claim.clone(),
        };
        let txn = Txn::new()
            .when([
                Compare::lease(keys.driver(), CompareOp::Equal, self.lease),
                Compare::mod_revision(epoch_key.clone(), CompareOp::Equal, revision),
            ])
            .and_then([
                TxnOp::put(epoch_key.clone(), assignment.epoch.to_string(), None),
                TxnOp::put(keys.assignment(), to_json(&assignment)?, None),
            ]);
        let response = self.job.call("writing the assignment", |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })?;
        if response.succeeded() {
            return Ok(assignment);
        }
        // A retried transaction that had gone through, or a lost hold.
        match self.job.assignment()? {
            Some(written) if written == assignment => Ok(assignment),
            _ if self
                .job
                .driver()?
                .is_some_and(|d| d.claim == self.driver.claim) =>
            {
                Err(Error::Etcd {
                    what: "writing the assignment",
                    reason: "another assignment came in between".into(),
                })
            }
            _ => Err(Error::LostClaim {
                job: self.job.0.url.job.clone(),
            }),
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.keeper.abort();
        self.job.revoke(self.lease);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn to_json<T: Serialize>(record: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(record).map_err(|e| Error::Etcd {
        what: "encoding a record",
        reason: e.to_string(),
    })
}

fn parse<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| Error::BadRecord {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}
