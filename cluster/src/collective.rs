//! Collective operations among the ranks of a tensor-parallel group.

use candle_core::Tensor;

use crate::{Result, TpRank};

/// The collectives a tensor-parallel model needs inside its forward pass.
///
/// Each call is made by every rank of the group with its local piece; the result is
/// the same on every rank.
pub trait Collective: Send + Sync {
    /// This rank's place in the group.
    fn tp_rank(&self) -> TpRank;

    /// The element-wise sum of every rank's `x` (after a row-parallel linear).
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;

    /// Every rank's `x` concatenated along `dim` in rank order (vocab-parallel logits).
    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor>;
}

/// The collective of a group of one rank: every operation is the identity.
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
}
