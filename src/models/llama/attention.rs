//! Grouped-query causal self-attention over this rank's heads.

use candle_core::Tensor;
use std::sync::Arc;

use flexmodel_actors::KvCache;
use flexmodel_cluster::{Collective, TpRank, conjugate};

use super::LlamaConfig;
use crate::hooks::{BlockSite, HookPoint};
use crate::models::RmsNorm;
use crate::models::positions::Positions;
use crate::models::{ColumnParallelLinear, RowParallelLinear, kv_heads_of};
use crate::weights::HeldWeights;
use crate::{HookLayer, Result};

/// What attention reads: the normed residual stream that every head's projections
/// share, and, for the opt-in per-head inputs (`hook_q_input` …), the residual stream
/// itself and the norm to apply to each head's copy.
pub struct AttentionInput<'a> {
    /// `hook_resid_pre`, `[b, t, d_model]`.
    pub resid: &'a Tensor,
    /// `ln1(resid)`, `[b, t, d_model]`.
    pub normed: &'a Tensor,
    /// The block's attention norm.
    pub ln1: &'a RmsNorm,
}

/// The attention of one block, holding the heads of one tensor-parallel rank.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: ColumnParallelLinear,
    k_proj: ColumnParallelLinear,
    v_proj: ColumnParallelLinear,
    o_proj: RowParallelLinear,
    n_heads: usize,
    n_kv_heads: usize,
    d_head: usize,
}

impl Attention {
    /// Loads the heads of `tp` from `{prefix}.self_attn.*`.
    pub fn load(
        weights: &HeldWeights<'_>,
        prefix: &str,
        config: &LlamaConfig,
        tp: TpRank,
    ) -> Result<Self> {
        let (d, dh) = (config.d_model, config.d_head);
        let heads = tp.slice_of("num_attention_heads", config.n_heads)?;
        let kv_heads = kv_heads_of(tp, config.n_kv_heads)?;
        let q_rows = heads.start * dh..heads.end * dh;
        let kv_rows = kv_heads.start * dh..kv_heads.end * dh;
        let p = format!("{prefix}.self_attn");
        let bias = config.attention_bias;
        let (q_out, kv_out) = (config.n_heads * dh, config.n_kv_heads * dh);
        Ok(Self {
            q_proj: ColumnParallelLinear::load(
                weights,
                &format!("{p}.q_proj"),
                [q_out, d],
                q_rows.clone(),
                bias,
            )?,
            k_proj: ColumnParallelLinear::load(
                weights,
                &format!("{p}.k_proj"),
                [kv_out, d],
                kv_rows.clone(),
                bias,
            )?,
            v_proj: ColumnParallelLinear::load(
                weights,
                &format!("{p}.v_proj"),
                [kv_out, d],
                kv_rows,
                bias,
            )?,
            o_proj: RowParallelLinear::load(weights, &format!("{p}.o_proj"), [d, q_out], q_rows)?,
            n_heads: heads.len(),
            n_kv_heads: kv_heads.len(),
            d_head: dh,
        })
    }

    /// Every parameter slice this rank holds (biases included).
    pub fn parameters(&self) -> Vec<flexmodel_cluster::ParamSlice> {
        let mut all = Vec::new();
        for proj in [&self.q_proj, &self.k_proj, &self.v_proj] {
            all.extend(proj.parameters());
        }
        all.extend(self.o_proj.parameters());
        all
    }

    /// The same attention with `f` of each of its tensors.
    pub fn map_parameters(&self, f: &mut crate::models::parallel::ParamMap<'_>) -> Result<Self> {
        Ok(Self {
            q_proj: self.q_proj.map_parameters(f)?,
            k_proj: self.k_proj.map_parameters(f)?,
            v_proj: self.v_proj.map_parameters(f)?,
            o_proj: self.o_proj.map_parameters(f)?,
            ..*self
        })
    }

    /// Attention of `input` (`[b, t, d_model]`) at `positions`, summed over all ranks;
    /// with a cache, over the cached keys and values of `layer` too (this pass's are
    /// appended).
    pub fn forward(
        &self,
        input: AttentionInput<'_>,
        layer: usize,
        positions: &Positions,
        cache: Option<&mut KvCache>,
        hooks: &mut dyn HookLayer,
        collective: &Arc<dyn Collective>,
    ) -> Result<Tensor> {
        let (b, t, _) = input.normed.dims3()?;
        let x = &conjugate::copy_to_group(input.normed, collective)?;
        let point = |site| HookPoint::Block { layer, site };
        let projections = [
            (&self.q_proj, self.n_heads, BlockSite::Q_INPUT, BlockSite::Q),
            (
                &self.k_proj,
                self.n_kv_heads,
                BlockSite::K_INPUT,
                BlockSite::K,
            ),
            (
                &self.v_proj,
                self.n_kv_heads,
                BlockSite::V_INPUT,
                BlockSite::V,
            ),
        ];
        let mut qkv = Vec::with_capacity(3);
        for (proj, heads, input_site, site) in projections {
            let y = match hooks.wants(point(input_site)) {
                false => proj.forward(x)?.reshape((b, t, heads, self.d_head))?,
                true => {
                    // Each head reads its own copy of the residual stream, normed apart.
                    let resid = conjugate::copy_to_group(input.resid, collective)?;
                    let d = resid.dim(2)?;
                    let copies = resid.unsqueeze(2)?.expand((b, t, heads, d))?.contiguous()?;
                    let copies = hooks.hook(point(input_site), copies)?;
                    proj.forward_per_head(&input.ln1.forward(&copies)?)?
                }
            };
            qkv.push(hooks.hook(point(site), y)?);
        }
        let [q, k, v] = <[Tensor; 3]>::try_from(qkv)
            .map_err(|_| crate::Error::Internal("attention has three projections"))?;
        let mut hook = |site, value| hooks.hook(point(site), value);
        let q = hook(BlockSite::ROT_Q, positions.rope.apply(&q)?)?;
        let k = hook(BlockSite::ROT_K, positions.rope.apply(&k)?)?;

        // Heads first: q [b, heads, t, d_head], k and v [b, kv_heads, keys, d_head].
        let layout = crate::op_span!("layout");
        let q = q.transpose(1, 2)?.contiguous()?;
        let (k, v) = (
            k.transpose(1, 2)?.contiguous()?,
            v.transpose(1, 2)?.contiguous()?,
        );
        let (k, v) = match cache {
            Some(cache) => cache.append(layer, &k, &v)?,
            None => (k, v),
        };
        drop(layout);

        // Query heads j·group … (j+1)·group − 1 read key/value head j: stacked as
        // [b, kv_heads, group·t, d_head], their queries are one matrix per key head.
        let (h, kv, dh, keys) = (self.n_heads, self.n_kv_heads, self.d_head, k.dim(2)?);
        let group = h / kv;
        let scale = 1.0 / (dh as f64).sqrt();
        let scores = {
            let _op = crate::op_span!("attention");
            let q = q.reshape((b, kv, group * t, dh))?;
            let raw = q.matmul(&k.t()?)?.reshape((b, h, t, keys))?;
            flexmodel_kernels::scaled_masked(&raw, &positions.mask, scale)?
        };
        let scores = hook(BlockSite::ATTN_SCORES, scores)?;
        let pattern = {
            let _op = crate::op_span!("attention");
            flexmodel_kernels::softmax_last_dim(&scores)?
        };
        let pattern = hook(BlockSite::PATTERN, pattern)?;
        let z = {
            let _op = crate::op_span!("attention");
            let pattern = pattern.reshape((b, kv, group * t, keys))?;
            pattern.matmul(&v)?.reshape((b, h, t, dh))?
        };
        let z = {
            let _op = crate::op_span!("layout");
            z.transpose(1, 2)?.contiguous()?
        };
        let z = hook(BlockSite::Z, z)?;
        let out = match hooks.wants(point(BlockSite::RESULT)) {
            false => self.o_proj.forward(
                &z.reshape((b, t, self.n_heads * self.d_head))?,
                collective.as_ref(),
            )?,
            true => {
                let result = hooks.hook(point(BlockSite::RESULT), self.o_proj.per_head(&z)?)?;
                conjugate::all_reduce_sum(&result.sum(2)?, collective.as_ref())?
            }
        };
        hooks.hook(point(BlockSite::ATTN_OUT), out)
    }
}
