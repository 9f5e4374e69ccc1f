//! Collective operations among the ranks of a group, and their transports.

mod algorithms;
#[cfg(test)]
mod conformance;
mod in_process;
#[cfg(feature = "nccl")]
mod nccl;
mod pass_control;
mod regroupable;
mod tcp;

pub use algorithms::PointToPoint;
pub use in_process::InProcessCollective;
#[cfg(feature = "nccl")]
pub use nccl::NcclCollective;
pub use pass_control::PassControl;
pub use regroupable::Regroupable;
pub use tcp::TcpCollective;

use candle_core::Tensor;

use crate::{Result, TpRank};

/// The collectives a sharded model needs: among the tensor-parallel ranks of a stage
/// (all-reduce after a row-parallel linear) and along a pipeline (send/recv between
/// stages).
///
/// Every member calls a collective operation with its local piece; the result is the
/// same on every member. Ranks are positions in the group (`0..size`).
pub trait Collective: Send + Sync {
    /// This member's place in the group.
    fn tp_rank(&self) -> TpRank;

    /// The element-wise sum of every member's `x`, added in rank order.
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;

    /// Every member's `x` concatenated along `dim` in rank order.
    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor>;

    /// This member's part along `dim` (as [`split_evenly`](crate::split_evenly) cuts
    /// it) of the element-wise sum of every member's `x`, added in rank order: a
    /// reduce-scatter, each member sending every other only that member's part.
    fn reduce_scatter_sum(&self, x: &Tensor, dim: usize) -> Result<Tensor>;

    /// `root`'s `x` on every member (the others pass any tensor, or their own).
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor>;

    /// Sends `x` to member `to`.
    fn send(&self, x: &Tensor, to: usize) -> Result<()>;

    /// Receives the tensor member `from` sent.
    fn recv(&self, from: usize) -> Result<Tensor>;
}

/// The collective of a group of one: every operation is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn tp_rank(&self) -> TpRank {
        TpRank::SOLE
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }

    fn all_gather(&self, x: &Tensor, _dim: usize) -> Result<Tensor> {
        Ok(x.clone())
    }

    fn reduce_scatter_sum(&self, x: &Tensor, _dim: usize) -> Result<Tensor> {
        Ok(x.clone())
    }

    fn broadcast(&self, x: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(x.clone())
    }

    fn send(&self, _x: &Tensor, to: usize) -> Result<()> {
        Err(crate::Error::RankOutOfRange { rank: to, size: 1 })
    }

    fn recv(&self, from: usize) -> Result<Tensor> {
        Err(crate::Error::RankOutOfRange {
            rank: from,
            size: 1,
        })
    }
}
