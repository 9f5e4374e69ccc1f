//! Errors of the sharded runtime.

use flexmodel_cluster::RankCoords;

/// Any error a model or a hook sink reports through the runtime.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What can go wrong in a sharded pass.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A shard failed (an error or a panic); `point` is the hook point it was at, if any.
    #[error("rank {rank} ({coords}) failed{}: {message}", at(.point))]
    ShardFailed {
        /// The failing rank.
        rank: usize,
        /// Its coordinates.
        coords: RankCoords,
        /// The last hook point the shard reached in the pass.
        point: Option<String>,
        /// What went wrong.
        message: String,
    },
    /// The driver's sink (a capture or an edit) failed; the pass was aborted.
    #[error(transparent)]
    Sink(BoxError),
    /// A shard's thread is gone and did not come back.
    #[error("rank {0} is not running")]
    ShardGone(usize),
    /// The pass was aborted because another rank failed.
    #[error("aborted: another rank failed")]
    Aborted,
    /// A layout or collective error.
    #[error(transparent)]
    Cluster(#[from] flexmodel_cluster::Error),
    /// A tensor operation failed.
    #[error("{}", flexmodel_cluster::tensor_error_message(.0))]
    Tensor(#[from] candle_core::Error),
    /// The actor system could not start.
    #[error("starting the shard actors: {0}")]
    Startup(String),
}

fn at(point: &Option<String>) -> String {
    point
        .as_ref()
        .map(|p| format!(" at hook {p}"))
        .unwrap_or_default()
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
