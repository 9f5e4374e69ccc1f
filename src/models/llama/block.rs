//! One transformer block: pre-norm attention and MLP on the residual stream.

use candle_core::Tensor;
use std::sync::Arc;

use flexmodel_actors::KvCache;
use flexmodel_cluster::{Collective, TpRank};

use super::LlamaConfig;
use crate::hooks::{BlockSite, HookPoint};
use crate::models::attention::{Attention, AttentionInput};
use crate::models::decoder::residual;
use crate::models::positions::Positions;
use crate::models::{Activation, DecoderBlock, Mlp, RmsNorm};
use crate::weights::HeldWeights;
use crate::{HookLayer, Result};

/// Block `layer` of the model, holding one tensor-parallel rank's slices.
#[derive(Debug, Clone)]
pub struct Block {
    layer: usize,
    ln1: RmsNorm,
    attn: Attention,
    ln2: RmsNorm,
    mlp: Mlp,
}

impl Block {
    /// Loads `model.layers.{layer}.*` for rank `tp`.
    pub fn load(
        weights: &HeldWeights<'_>,
        layer: usize,
        config: &LlamaConfig,
        tp: TpRank,
    ) -> Result<Self> {
        let p = format!("model.layers.{layer}");
        let (d, eps) = (config.d_model, config.rms_norm_eps);
        Ok(Self {
            layer,
            ln1: RmsNorm::load(weights, &format!("{p}.input_layernorm.weight"), d, eps)?,
            attn: Attention::load(weights, &p, &config.attention(), tp)?,
            ln2: RmsNorm::load(
                weights,
                &format!("{p}.post_attention_layernorm.weight"),
                d,
                eps,
            )?,
            mlp: Mlp::load(
                weights,
                &p,
                [config.d_model, config.d_mlp],
                tp,
                Activation::SiLU,
            )?,
        })
    }
}

impl DecoderBlock for Block {
    /// The block's layer in the whole model.
    fn layer(&self) -> usize {
        self.layer
    }

    /// Every parameter slice this block holds.
    fn parameters(&self) -> Vec<flexmodel_cluster::ParamSlice> {
        let mut all = self.ln1.parameters();
        all.extend(self.attn.parameters());
        all.extend(self.ln2.parameters());
        all.extend(self.mlp.parameters());
        all
    }

    /// The same block with `f` of each of its parameter tensors, in the order of
    /// [`parameters`](Self::parameters).
    fn map_parameters(&self, f: &mut crate::models::parallel::ParamMap<'_>) -> Result<Self> {
        Ok(Self {
            layer: self.layer,
            ln1: self.ln1.map_parameters(f)?,
            attn: self.attn.map_parameters(f)?,
            ln2: self.ln2.map_parameters(f)?,
            mlp: self.mlp.map_parameters(f)?,
        })
    }

    /// The residual stream after this block; with a cache, attention reads the cached
    /// keys and values of this block's layer and appends its own.
    fn forward(
        &self,
        x: Tensor,
        positions: &Positions,
        cache: Option<&mut KvCache>,
        hooks: &mut dyn HookLayer,
        collective: &Arc<dyn Collective>,
    ) -> Result<Tensor> {
        let layer = self.layer;
        let point = |site| HookPoint::Block { layer, site };
        let x = hooks.hook(point(BlockSite::RESID_PRE), x)?;
        let ln1 = [BlockSite::LN1_SCALE, BlockSite::LN1_NORMALIZED].map(point);
        let inputs = AttentionInput {
            resid: &x,
            normed: &self.ln1.forward_hooked(&x, hooks, ln1)?,
            ln1: &self.ln1,
        };
        let attn = self
            .attn
            .forward(inputs, layer, positions, cache, hooks, collective)?;
        let attn = hooks.hook(point(BlockSite::ATTN_OUT), attn)?;
        let x = hooks.hook(point(BlockSite::RESID_MID), residual(&x, &attn)?)?;
        let mlp_in = hooks.hook(point(BlockSite::MLP_IN), x.clone())?;
        let ln2 = [BlockSite::LN2_SCALE, BlockSite::LN2_NORMALIZED].map(point);
        let normed = self.ln2.forward_hooked(&mlp_in, hooks, ln2)?;
        let mlp = self.mlp.forward(&normed, layer, hooks, collective)?;
        let mlp = hooks.hook(point(BlockSite::MLP_OUT), mlp)?;
        hooks.hook(point(BlockSite::RESID_POST), residual(&x, &mlp)?)
    }
}
