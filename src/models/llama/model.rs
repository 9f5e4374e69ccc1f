//! The whole LLaMA-family model as held by one tensor-parallel shard.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use flexmodel_cluster::Collective;

use super::LlamaConfig;
use super::attention::causal_mask;
use super::block::Block;
use super::rms_norm::RmsNorm;
use super::rope::Rope;
use crate::models::{ColumnParallelLinear, VocabParallelEmbedding};
use crate::weights::WeightSource;
use crate::{Error, HookLayer, HookPoint, Result};

/// A LLaMA-family transformer: the slices of one tensor-parallel rank.
///
/// With [`SingleRank`](flexmodel_cluster::SingleRank) it is the whole model. Clones
/// share the weights.
#[derive(Clone)]
pub struct Llama {
    config: LlamaConfig,
    embed: VocabParallelEmbedding,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    lm_head: ColumnParallelLinear,
    collective: Arc<dyn Collective>,
}

impl Llama {
    /// Builds the shard of `collective`'s rank from Hugging Face-named weights.
    pub fn load(
        config: &LlamaConfig,
        weights: &dyn WeightSource,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        let tp = collective.tp_rank();
        let (v, d) = (config.vocab_size, config.d_model);
        let vocab = tp.slice_of("vocab_size", v)?;
        let embed = VocabParallelEmbedding::load(
            weights,
            "model.embed_tokens.weight",
            [v, d],
            vocab.clone(),
        )?;
        let lm_head = if config.tie_word_embeddings {
            ColumnParallelLinear::from_weight(embed.weight(), 0..vocab.len())?
        } else {
            ColumnParallelLinear::load(weights, "lm_head", [v, d], vocab, false)?
        };
        let blocks = (0..config.n_layers)
            .map(|layer| Block::load(weights, layer, config, tp))
            .collect::<Result<_>>()?;
        let final_norm = RmsNorm::load(weights, "model.norm.weight", d, config.rms_norm_eps)?;
        Ok(Self {
            config: config.clone(),
            embed,
            blocks,
            final_norm,
            lm_head,
            collective,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Logits `[b, t, vocab / tp]` (this rank's vocabulary slice) of `tokens` (`[b, t]`,
    /// u32), passing every hook point through `hooks`.
    pub fn forward(&self, tokens: &Tensor, hooks: &mut dyn HookLayer) -> Result<Tensor> {
        let (_, t) = self.check_tokens(tokens)?;
        let device = tokens.device();
        let rope = Rope::new(t, self.config.d_head, self.config.rope_theta, device)?;
        let mask = causal_mask(t, device)?;
        let collective = self.collective.as_ref();

        let mut x = hooks.hook(HookPoint::Embed, self.embed.forward(tokens, collective)?)?;
        for block in &self.blocks {
            x = block.forward(x, &rope, &mask, hooks, collective)?;
        }
        let normalized = self.final_norm.normalize(&x)?;
        let normalized = hooks.hook(HookPoint::LnFinalNormalized, normalized)?;
        let logits = self.lm_head.forward(&self.final_norm.scale(&normalized)?)?;
        hooks.hook(HookPoint::UnembedOut, logits)
    }

    /// Checks that `tokens` is a non-empty `[b, t]` u32 batch of in-vocabulary ids.
    fn check_tokens(&self, tokens: &Tensor) -> Result<(usize, usize)> {
        let (b, t) = tokens.dims2().map_err(|_| {
            Error::BadInput(format!(
                "tokens must be [batch, seq], got {:?}",
                tokens.dims()
            ))
        })?;
        if b == 0 || t == 0 {
            return Err(Error::BadInput(format!("empty batch of shape [{b}, {t}]")));
        }
        if tokens.dtype() != DType::U32 {
            return Err(Error::BadInput(format!(
                "tokens must be u32, got {:?}",
                tokens.dtype()
            )));
        }
        let vocab_size = self.config.vocab_size;
        let max = tokens.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= vocab_size {
            return Err(Error::TokenOutOfVocabulary {
                id: max,
                vocab_size,
            });
        }
        Ok((b, t))
    }
}
