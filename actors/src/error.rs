//! Errors of the sharded runtime.

use std::fmt;

use flexmodel_cluster::RankCoords;

/// Any error a model or a hook sink reports through the runtime.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What kind of failure stopped a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FailureKind {
    /// The shard's code panicked.
    Panicked,
    /// A fault injected for testing ([`Fault`](crate::Fault)).
    InjectedFault,
    /// A collective or a message of the hook protocol failed: a peer is gone, or the pass
    /// was aborted after another failure.
    Collective,
    /// A tensor operation failed.
    Tensor,
    /// The model failed (its own error, e.g. a shape its weights cannot take).
    Model,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureKind::Panicked => "panic",
            FailureKind::InjectedFault => "injected fault",
            FailureKind::Collective => "collective",
            FailureKind::Tensor => "tensor",
            FailureKind::Model => "model",
        })
    }
}

/// Why a shard failed: the kind of failure and its message, as plain data (a failure
/// can cross a process boundary).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardFailure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// What went wrong, for people.
    pub message: String,
}

impl ShardFailure {
    /// The failure that `error` describes, its kind read from its type.
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Self {
        if let Some(failure) = error.downcast_ref::<ShardFailure>() {
            return failure.clone();
        }
        let kind = if error.is::<InjectedFault>() {
            FailureKind::InjectedFault
        } else if error.is::<flexmodel_cluster::Error>() {
            match error.downcast_ref::<flexmodel_cluster::Error>() {
                Some(flexmodel_cluster::Error::Tensor(_)) => FailureKind::Tensor,
                _ => FailureKind::Collective,
            }
        } else if let Some(candle) = error.downcast_ref::<candle_core::Error>() {
            match candle {
                candle_core::Error::WithBacktrace { inner, .. } => return Self::of(inner.as_ref()),
                _ => FailureKind::Tensor,
            }
        } else {
            FailureKind::Model
        };
        Self {
            kind,
            message: error.to_string(),
        }
    }
}

impl std::error::Error for ShardFailure {}

impl fmt::Display for ShardFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FailureKind::Panicked => write!(f, "panicked: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

/// The error of a fault injected with [`Fault`](crate::Fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("injected fault")]
pub struct InjectedFault;

/// Where a shard was when it failed: a hook point, in the forward or the backward pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedAt {
    /// The hook point's name.
    pub hook: String,
    /// Whether the shard was back-propagating through it.
    pub backward: bool,
}

impl fmt::Display for FailedAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.backward {
            false => write!(f, " at hook {}", self.hook),
            true => write!(f, " in backward at hook {}", self.hook),
        }
    }
}

/// What can go wrong in a sharded pass.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A shard failed (an error or a panic) at a hook point, or before the first one.
    #[error("rank {rank} ({coords}{}) failed{}: {cause}", on_host(.host), failed_at(.at))]
    ShardFailed {
        /// The failing rank.
        rank: usize,
        /// Its coordinates.
        coords: RankCoords,
        /// The machine it runs on, when it runs in another process.
        host: Option<String>,
        /// The last hook point the shard reached in the pass.
        at: Option<FailedAt>,
        /// What went wrong.
        cause: ShardFailure,
    },
    /// The driver's sink (a capture or an edit) failed; the pass was aborted.
    #[error(transparent)]
    Sink(BoxError),
    /// The sink did not return the edited tensor of a point hooked with an edit.
    #[error("no edited tensor came back for {hook}")]
    NoEditedTensor {
        /// The hook point (or gradient) that needed one.
        hook: String,
    },
    /// A rank is gone: its thread stopped, or its process exited, hung or closed its
    /// connection.
    #[error("rank {rank} ({coords}{}) is gone{}: {reason}", on_host(.host), failed_at(.at))]
    ShardGone {
        /// The rank.
        rank: usize,
        /// Its coordinates.
        coords: RankCoords,
        /// The machine it ran on, when it ran in another process.
        host: Option<String>,
        /// The last hook point it was known to be at in the pass.
        at: Option<FailedAt>,
        /// What happened to it.
        reason: String,
    },
    /// The driver could not start the worker process of a rank.
    #[error("starting the worker of rank {rank}: running {}: {source}", .program.display())]
    SpawnWorker {
        /// The rank.
        rank: usize,
        /// The program it ran.
        program: std::path::PathBuf,
        /// Why it could not.
        source: std::io::Error,
    },
    /// The driver could not write the token file for the workers it starts.
    #[error("writing the job's token to {}: {source}", .path.display())]
    WriteToken {
        /// The file.
        path: std::path::PathBuf,
        /// Why it could not.
        source: std::io::Error,
    },
    /// A worker the driver started never connected to it.
    #[error("the worker of rank {rank} did not connect{}", exit_note(.exited))]
    WorkerNotConnected {
        /// The rank.
        rank: usize,
        /// How its process ended, if it did.
        exited: Option<String>,
    },
    /// The driver could not reach the job's worker chosen for a rank.
    #[error("cannot reach worker {worker} for rank {rank}: {reason}")]
    WorkerUnreachable {
        /// The rank.
        rank: usize,
        /// The worker: its member id, host and address.
        worker: String,
        /// Why (it does not resolve, refuses the connection, holds another token, …).
        reason: String,
    },
    /// A worker refused its assignment, saying why (its shard did not load, it could
    /// not join its groups, it is busy, …).
    #[error("the worker of rank {rank} refused its assignment: {message}")]
    WorkerRefused {
        /// The rank.
        rank: usize,
        /// What the worker said.
        message: String,
    },
    /// A worker stopped sending heartbeats while it started (joined, loaded, or joined
    /// new groups).
    #[error("the worker of rank {rank} stopped answering while {during}")]
    WorkerSilent {
        /// The rank.
        rank: usize,
        /// What it was doing.
        during: &'static str,
    },
    /// A worker was lost before it was ready: its process exited or its connection
    /// closed (or was tampered with).
    #[error("the worker of rank {rank} was lost while it started: {reason}")]
    WorkerGoneWhileStarting {
        /// The rank.
        rank: usize,
        /// What happened.
        reason: String,
    },
    /// A worker lost its driver (the driver's connection closed or failed).
    #[error("the driver went away: {reason}")]
    LostDriver {
        /// What happened.
        reason: String,
    },
    /// A job's worker was sent an assignment that is not its own (another member's, or
    /// an epoch that is not the job's latest).
    #[error("refused the assignment of rank {rank}: {reason}")]
    WrongAssignment {
        /// The rank assigned.
        rank: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A worker cannot compute on the device its rank was given.
    #[error("rank {rank} cannot compute on its device: {source}")]
    Device {
        /// The rank.
        rank: usize,
        /// Why.
        source: flexmodel_cluster::Error,
    },
    /// A worker could not load its rank's shard.
    #[error("loading the shard of rank {rank}: {source}")]
    LoadShard {
        /// The rank.
        rank: usize,
        /// Why.
        source: BoxError,
    },
    /// A job had too few workers free for a layout.
    #[error(
        "job {job} has {have} of the {needed} workers it needs after {seconds} s{}; start more with `flexmodel worker --etcd ... --job {job}`", busy_note(*.busy)
    )]
    NotEnoughWorkers {
        /// The job.
        job: String,
        /// The ranks of the layout.
        needed: usize,
        /// The workers free to serve.
        have: usize,
        /// Workers busy with another driver or still loading.
        busy: usize,
        /// How long the driver waited.
        seconds: u64,
    },
    /// A worker read other weights than the driver (or than the first worker).
    #[error(
        "rank {rank} ({worker}) loaded other weights than {against}: fingerprint {found} instead of {expected}; give every machine the same model"
    )]
    WeightsDiffer {
        /// The rank.
        rank: usize,
        /// The worker: its job member id (or its process id) and its machine.
        worker: String,
        /// Whose weights it was compared with.
        against: String,
        /// Its weights' fingerprint (shortened).
        found: String,
        /// The fingerprint expected (shortened).
        expected: String,
    },
    /// A worker sent something the protocol does not allow at that point.
    #[error("rank {rank} broke the protocol: {what}")]
    Protocol {
        /// The rank.
        rank: usize,
        /// What it sent.
        what: String,
    },
    /// A rank did not answer a request in time.
    #[error("rank {rank} ({coords}) did not answer within {seconds} s")]
    ShardTimedOut {
        /// The rank.
        rank: usize,
        /// Its coordinates.
        coords: RankCoords,
        /// How long it was waited for.
        seconds: u64,
    },
    /// The first pipeline stage of a rank was started without token ids.
    #[error("rank {rank}: the first pipeline stage got no token ids")]
    NoInput {
        /// The rank.
        rank: usize,
    },
    /// A batch with fewer sequences than there are data-parallel replicas.
    #[error("a batch of {batch} sequences cannot be split over {replicas} data-parallel replicas")]
    BatchTooSmall {
        /// The sequences in the batch.
        batch: usize,
        /// The replicas.
        replicas: usize,
    },
    /// A pass's attention mask or key/value cache does not fit the pass.
    #[error("{problem}")]
    BadWindow {
        /// What does not fit.
        problem: String,
    },
    /// The runtime was given another number of model shards than the layout has ranks.
    #[error("{shards} model shards for {ranks} ranks")]
    ShardCount {
        /// Shards given.
        shards: usize,
        /// Ranks in the layout.
        ranks: usize,
    },
    /// A fault was to be injected at a rank or point that does not exist.
    #[error("no rank {rank} or hook point {point} to inject a fault at")]
    NoFaultTarget {
        /// The rank asked for.
        rank: usize,
        /// The point index asked for.
        point: usize,
    },
    /// The actor system's runtime could not start.
    #[error("starting the shard actors' runtime: {0}")]
    RuntimeStart(#[source] std::io::Error),
    /// A broken invariant of the runtime.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// A layout or collective error.
    #[error(transparent)]
    Cluster(#[from] flexmodel_cluster::Error),
}

impl From<candle_core::Error> for Error {
    /// A tensor operation of the runtime failed (assembling or splitting pieces).
    fn from(e: candle_core::Error) -> Self {
        Error::Cluster(e.into())
    }
}

fn failed_at(at: &Option<FailedAt>) -> String {
    at.as_ref().map(FailedAt::to_string).unwrap_or_default()
}

fn on_host(host: &Option<String>) -> String {
    host.as_ref()
        .map(|h| format!(" on {h}"))
        .unwrap_or_default()
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// "(N more busy)" when some of a job's workers are busy.
/// `; its process exited (STATUS)` when a process's end is known.
fn exit_note(exited: &Option<String>) -> String {
    exited
        .as_ref()
        .map(|status| format!("; its process exited ({status})"))
        .unwrap_or_default()
}

fn busy_note(busy: usize) -> String {
    match busy {
        0 => String::new(),
        n => format!(" ({n} more busy with another driver or loading)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_of_a_failure_comes_from_its_type() {
        assert_eq!(
            ShardFailure::of(&InjectedFault).kind,
            FailureKind::InjectedFault
        );
        let gone = flexmodel_cluster::Error::PeerGone(3);
        assert_eq!(ShardFailure::of(&gone).kind, FailureKind::Collective);
        let tensor = candle_core::Error::Msg("shape".into());
        assert_eq!(ShardFailure::of(&tensor).kind, FailureKind::Tensor);
        let model = std::io::Error::other("weights");
        assert_eq!(ShardFailure::of(&model).kind, FailureKind::Model);
    }

    #[test]
    fn a_shard_failure_names_rank_coordinates_host_and_hook() {
        let coords = RankCoords {
            dp: 0,
            pp: 1,
            tp: 1,
        };
        let error = |host: Option<&str>, backward| Error::ShardFailed {
            rank: 5,
            coords,
            host: host.map(str::to_string),
            at: Some(FailedAt {
                hook: "blocks.2.hook_resid_mid".into(),
                backward,
            }),
            cause: ShardFailure {
                kind: FailureKind::Panicked,
                message: "boom".into(),
            },
        };
        assert_eq!(
            error(None, false).to_string(),
            "rank 5 (dp 0 pp 1 tp 1) failed at hook blocks.2.hook_resid_mid: panicked: boom"
        );
        assert_eq!(
            error(Some("node-2"), true).to_string(),
            "rank 5 (dp 0 pp 1 tp 1 on node-2) failed in backward at hook blocks.2.hook_resid_mid: panicked: boom"
        );
    }
}
