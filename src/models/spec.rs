//! What a model family declares about a model: everything `hooks/`, `weights/` and
//! `runtime/` need to know of it, so that none of them knows a family.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use flexmodel_cluster::Collective;

use crate::Result;
use crate::hooks::{ModelPoints, Sizes};
use crate::models::{ModelShard, RmsNorm, Stage};
use crate::weights::WeightSource;

/// A model's configuration, as its family reads it: its sizes and hook points, how
/// many weights each part of it holds, and how to build one rank's shard of it.
pub trait ModelSpec: Send + Sync {
    /// The family's name, as Hugging Face's `model_type` spells it (`llama`, `gemma3_text`).
    fn model_type(&self) -> &'static str;

    /// The number of blocks.
    fn n_layers(&self) -> usize;

    /// The sizes its hook points' shapes and its tensor-parallel splits are made of.
    fn sizes(&self) -> Sizes;

    /// Its hook points.
    fn points(&self) -> ModelPoints;

    /// The number of tokens in the vocabulary.
    fn vocab_size(&self) -> usize {
        self.sizes().vocab_size
    }

    /// The width of the residual stream.
    fn d_model(&self) -> usize {
        self.sizes().d_model
    }

    /// The longest sequence the model runs.
    fn context(&self) -> usize;

    /// The beginning-of-sequence token, if any.
    fn bos_token_id(&self) -> Option<u32>;

    /// Tokens that end generation.
    fn eos_token_ids(&self) -> &[u32];

    /// The dtype the weights are held in.
    fn dtype(&self) -> DType;

    /// The RMSNorm ε.
    fn rms_norm_eps(&self) -> f64;

    /// Whether the LM head is the token embedding.
    fn tied_embeddings(&self) -> bool;

    /// The offset of every RMSNorm's weight: 0, or Gemma's 1 (`1 + w`).
    fn norm_offset(&self) -> f64 {
        0.0
    }

    /// The number of weights of the whole model: a tied LM head once.
    fn parameter_count(&self) -> u64 {
        self.stage_parameter_count(&Stage::whole(self.n_layers()), 1)
    }

    /// The number of weights one of `tp` tensor-parallel ranks holds of `stage`
    /// (replicated parts whole, split parts its slice).
    fn stage_parameter_count(&self, stage: &Stage, tp: usize) -> u64;

    /// Builds `stage` of the model for `collective`'s tensor-parallel rank on `device`,
    /// reading only that rank's slices from `weights`; under FSDP (`replicas`) keeping
    /// only its replica's piece of each.
    fn load(
        &self,
        weights: &dyn WeightSource,
        collective: Arc<dyn Collective>,
        stage: Stage,
        device: &Device,
        replicas: Option<Arc<dyn Collective>>,
    ) -> Result<Arc<dyn ModelShard>>;

    /// The final norm, made from its weight (`model.norm.weight`).
    fn final_norm(&self, weight: Tensor) -> RmsNorm {
        RmsNorm::new("model.norm.weight", weight, self.rms_norm_eps())
            .with_offset(self.norm_offset())
    }

    /// The weight the LM head multiplies by: `lm_head.weight`, or the embedding's when
    /// they are tied.
    fn lm_head(&self) -> &'static str {
        match self.tied_embeddings() {
            true => "model.embed_tokens.weight",
            false => "lm_head.weight",
        }
    }

    /// The Hugging Face `config.json` text of this configuration.
    fn to_hf_json(&self) -> String;
}
