//! Shard actors and the hook coordinator: one pass of a sharded model over messages.
//!
//! Each rank of a [`Layout`](flexmodel_cluster::Layout) is a [`ShardActor`] on its own
//! OS thread, holding only its slice of the model (a [`ShardModel`]). In a pass, a shard
//! sends its piece of every hooked point to the [`HookCoordinator`], which assembles
//! the full tensor, hands it to the driver's [`HookSink`] (capture, edit) and scatters
//! an edited tensor back. Nothing here knows about transformers: hook points are dense
//! indices with a [`PointGeometry`].

mod coordinator;
mod error;
mod geometry;
mod protocol;
mod ranks;
mod runtime;
mod shard;
mod shard_model;
mod threads;
mod trace_context;
mod window;
mod wire;
mod worker;
mod workers;

pub use coordinator::{HookCoordinator, HookSink, PassOutput};
pub use error::{BoxError, Error, FailedAt, FailureKind, InjectedFault, Result, ShardFailure};
pub use geometry::{PointGeometry, PointMode, ShardAction};
pub use protocol::{Assignment, Fault, Tap};
pub use runtime::{PassEnd, ShardRuntime, ShardSetup};
pub use shard::ShardActor;
pub use shard_model::{PointId, ShardHooks, ShardModel, ShardParameters};
pub use trace_context::TracePropagation;
pub use window::{CacheUse, CachedKeys, KvCache, Logits, PassScope, Window};
pub use worker::{
    DRIVER_SILENCE, Join, LoadedShard, ShardLoader, WorkerOptions, leave_every_job, peak_rss_bytes,
    serve,
};
pub use workers::{HANG_TIMEOUT, JobLaunch, WorkerLaunch, stop_every_worker};
