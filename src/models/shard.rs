//! What the runtime needs of one rank's shard of a model, whatever its family.

use std::ops::Range;
use std::sync::Arc;

use candle_core::Tensor;
use flexmodel_actors::{KvCache, Window};
use flexmodel_cluster::{Collective, ParamSlice};

use crate::models::{ModelConfig, Stage};
use crate::{Error, HookLayer, Result};

/// One pipeline stage of one tensor-parallel rank of a model: what the runtime drives,
/// in this process or in a worker.
pub trait ModelShard: Send + Sync {
    /// Runs this stage: `input` is token ids `[b, t]` on the first stage and the hidden
    /// state `[b, t, d]` otherwise, at the positions `window` says; returns the hidden
    /// state, or on the last stage this rank's logits `[b, t, vocab / tp]`, passing every
    /// hook point through `hooks`. `backward` says whether a backward pass may follow.
    fn forward_stage(
        &self,
        input: &Tensor,
        window: &Window,
        cache: &mut KvCache,
        hooks: &mut dyn HookLayer,
        backward: bool,
    ) -> Result<Tensor>;

    /// Every parameter slice this shard holds, with its gradient's place.
    fn parameters(&self) -> Vec<ParamSlice>;

    /// The rows of the vocabulary this rank's logits hold.
    fn vocab_rows(&self) -> Range<usize>;

    /// The shard's tensor-parallel group.
    fn collective(&self) -> &Arc<dyn Collective>;

    /// The configuration of the model this is a shard of.
    fn model_config(&self) -> ModelConfig;

    /// The part of the model this shard holds.
    fn stage(&self) -> &Stage;

    /// Logits `[b, t, vocab / tp]` (this rank's vocabulary slice) of `tokens` (`[b, t]`,
    /// u32, every one real), passing every hook point through `hooks`; an error unless
    /// the shard holds the whole model ([`Stage::whole`]).
    fn forward(&self, tokens: &Tensor, hooks: &mut dyn HookLayer) -> Result<Tensor> {
        let stage = self.stage();
        if !(stage.first && stage.last) {
            return Err(Error::InvalidArgument {
                argument: "model",
                problem: "forward needs a shard with every stage; use forward_stage".into(),
            });
        }
        let mut cache = KvCache::default();
        self.forward_stage(tokens, &Window::DENSE, &mut cache, hooks, true)
    }

    /// The bytes of weights this shard holds.
    fn weight_bytes(&self) -> usize {
        self.parameters()
            .iter()
            .map(|p| p.value.elem_count() * p.value.dtype().size_in_bytes())
            .sum()
    }
}
