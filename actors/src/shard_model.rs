//! What a shard runs: one pipeline stage of one tensor-parallel rank of a model.

use candle_core::Tensor;

use flexmodel_cluster::ParamSlice;

use crate::{BoxError, KvCache, Window};

/// A hook point as the runtime sees it: its index in the model's list of points.
pub type PointId = usize;

/// A shard's parameter slices with their gradients from the last backward pass.
pub type ShardParameters = Vec<(ParamSlice, Option<Tensor>)>;

/// The hook layer a shard model calls at every hook point with its local piece.
pub trait ShardHooks {
    /// The local piece at `point`; returns the piece the model continues with.
    fn hook(&mut self, point: PointId, value: Tensor) -> Result<Tensor, BoxError>;

    /// Whether `point` is hooked in this pass on this shard (its value, its gradient, or
    /// a fault to inject there): the model computes optional points only where it is.
    fn wants(&self, point: PointId) -> bool;
}

/// A model shard: the layers of one pipeline stage, the slices of one tensor-parallel rank.
pub trait ShardModel: Send + Sync + 'static {
    /// Runs the stage on `input` (token ids `[b, t]` on the first stage, the hidden state
    /// `[b, t, d]` from the previous stage otherwise) at the positions `window` says, and
    /// returns the hidden state, or on the last stage this rank's slice of the output.
    /// A pass whose window uses the cache reads and extends `cache`. `backward` says
    /// whether a backward pass follows (without one, nothing need be kept for it).
    fn forward(
        &self,
        input: &Tensor,
        window: &Window,
        cache: &mut KvCache,
        hooks: &mut dyn ShardHooks,
        backward: bool,
    ) -> Result<Tensor, BoxError>;

    /// This rank's loss from its slice of the last stage's `output`: the summed
    /// next-token loss of `tokens` (the replica's `[b, t]` ids) over the pairs of real
    /// tokens (`mask`, `[b, t]`, `None` when all are real) divided by `normalizer`, the
    /// same value on every tensor-parallel rank.
    fn loss(
        &self,
        output: &Tensor,
        tokens: &Tensor,
        mask: Option<&Tensor>,
        normalizer: f64,
    ) -> Result<Tensor, BoxError>;

    /// Every parameter slice this shard holds (autograd variables).
    fn parameters(&self) -> Vec<ParamSlice>;
}
