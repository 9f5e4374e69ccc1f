//! Layouts, shard specs, collectives and transports for FlexModel-rs.
//!
//! This crate knows how ranks split work and how they exchange tensors, and nothing
//! about transformers. Models describe how each hook point is sharded with a
//! [`ShardSpec`], hold the slice of their weights that their [`TpRank`] owns, and
//! combine partial results through a [`Collective`].

mod collective;
pub mod conjugate;
mod device;
mod error;
pub mod host_copy;
mod layout;
pub mod membership;
mod param_slice;
mod shard_spec;
mod tp_rank;
pub mod transport;

#[cfg(feature = "nccl")]
pub use collective::NcclCollective;
pub use collective::{
    Collective, InProcessCollective, PassControl, PointToPoint, Regroupable, SingleRank,
    TcpCollective,
};
pub use device::{CUDA_BUILT, DeviceSpec, gpu_count};
pub use error::{Error, Result};
pub use layout::{Layout, ModelDtype, RankCoords, split_evenly};
pub use param_slice::ParamSlice;
pub use shard_spec::ShardSpec;
pub use tp_rank::TpRank;
