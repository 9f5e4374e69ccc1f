//! One Gemma 3 block: attention and MLP each normed before *and* after.
//!
//! ```text
//! x = x + ln1_post(attn(ln1(x)))
//! x = x + ln2_post(mlp(ln2(x)))
//! ```

use std::sync::Arc;

use candle_core::Tensor;
use flexmodel_actors::KvCache;
use flexmodel_cluster::{Collective, ParamSlice, TpRank};

use super::Gemma3Config;
use super::hook_points::{
    LN1_POST_NORMALIZED, LN1_POST_SCALE, LN2_POST_NORMALIZED, LN2_POST_SCALE,
};
use crate::hooks::{BlockSite, HookPoint};
use crate::models::attention::{Attention, AttentionInput};
use crate::models::decoder::residual;
use crate::models::parallel::ParamMap;
use crate::models::positions::Positions;
use crate::models::{Activation, DecoderBlock, Mlp, RmsNorm};
use crate::weights::HeldWeights;
use crate::{HookLayer, Result};

/// Block `layer` of the model, holding one tensor-parallel rank's slices.
#[derive(Debug, Clone)]
pub struct Block {
    layer: usize,
    /// `input_layernorm`.
    ln1: RmsNorm,
    attn: Attention,
    /// `post_attention_layernorm`.
    ln1_post: RmsNorm,
    /// `pre_feedforward_layernorm`.
    ln2: RmsNorm,
    mlp: Mlp,
    /// `post_feedforward_layernorm`.
    ln2_post: RmsNorm,
}

impl Block {
    /// Loads `model.layers.{layer}.*` for rank `tp`.
    pub fn load(
        weights: &HeldWeights<'_>,
        layer: usize,
        config: &Gemma3Config,
        tp: TpRank,
    ) -> Result<Self> {
        let p = format!("model.layers.{layer}");
        let (d, eps) = (config.d_model, config.rms_norm_eps);
        let norm = |name: &str| -> Result<RmsNorm> {
            let norm = RmsNorm::load(weights, &format!("{p}.{name}.weight"), d, eps)?;
            Ok(norm.with_offset(1.0))
        };
        Ok(Self {
            layer,
            ln1: norm("input_layernorm")?,
            attn: Attention::load(weights, &p, &config.attention(), tp)?,
            ln1_post: norm("post_attention_layernorm")?,
            ln2: norm("pre_feedforward_layernorm")?,
            mlp: Mlp::load(weights, &p, [d, config.d_mlp], tp, Activation::GeluTanh)?,
            ln2_post: norm("post_feedforward_layernorm")?,
        })
    }
}

impl DecoderBlock for Block {
    fn layer(&self) -> usize {
        self.layer
    }

    fn parameters(&self) -> Vec<ParamSlice> {
        let mut all = self.ln1.parameters();
        all.extend(self.attn.parameters());
        all.extend(self.ln1_post.parameters());
        all.extend(self.ln2.parameters());
        all.extend(self.mlp.parameters());
        all.extend(self.ln2_post.parameters());
        all
    }

    fn map_parameters(&self, f: &mut ParamMap<'_>) -> Result<Self> {
        Ok(Self {
            layer: self.layer,
            ln1: self.ln1.map_parameters(f)?,
            attn: self.attn.map_parameters(f)?,
            ln1_post: self.ln1_post.map_parameters(f)?,
            ln2: self.ln2.map_parameters(f)?,
            mlp: self.mlp.map_parameters(f)?,
            ln2_post: self.ln2_post.map_parameters(f)?,
        })
    }

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
        let ln1_post = [LN1_POST_SCALE, LN1_POST_NORMALIZED].map(point);
        let attn = self.ln1_post.forward_hooked(&attn, hooks, ln1_post)?;
        let attn = hooks.hook(point(BlockSite::ATTN_OUT), attn)?;
        let x = hooks.hook(point(BlockSite::RESID_MID), residual(&x, &attn)?)?;
        let mlp_in = hooks.hook(point(BlockSite::MLP_IN), x.clone())?;
        let ln2 = [BlockSite::LN2_SCALE, BlockSite::LN2_NORMALIZED].map(point);
        let normed = self.ln2.forward_hooked(&mlp_in, hooks, ln2)?;
        let mlp = self.mlp.forward(&normed, layer, hooks, collective)?;
        let ln2_post = [LN2_POST_SCALE, LN2_POST_NORMALIZED].map(point);
        let mlp = self.ln2_post.forward_hooked(&mlp, hooks, ln2_post)?;
        let mlp = hooks.hook(point(BlockSite::MLP_OUT), mlp)?;
        hooks.hook(point(BlockSite::RESID_POST), residual(&x, &mlp)?)
    }
}
