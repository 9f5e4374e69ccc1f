//! Where the ranks run: the [`FlexModel`] handle, how a model splits over a layout
//! ([`sharding`]), threads, worker processes or a job's workers ([`launch`]), and whole parameters read
//! back from every rank's slices.
//!
//! This is the glue between the hook API (`crate::hooks`), the models
//! (`crate::models`) and the sharded runtime of `flexmodel-actors`.

mod flex_model;
pub mod launch;
pub(crate) mod parameters;
pub mod sharding;

pub use flex_model::FlexModel;
pub use flexmodel_actors::{leave_every_job, stop_every_worker};
pub use launch::{CheckpointLoader, Cluster, Placement, Processes};
