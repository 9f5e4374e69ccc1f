//! Grouped-query causal self-attention over this rank's heads, with the query and key
//! norms of the families that have them (Gemma 3).

use candle_core::Tensor;
use std::sync::Arc;

use flexmodel_actors::KvCache;
use flexmodel_cluster::{Collective, TpRank, conjugate};

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

/// The shape of a family's attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    /// The width of the residual stream.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// The width of one head.
    pub d_head: usize,
    /// Whether the q/k/v projections have biases.
    pub bias: bool,
    /// What `q·k` is multiplied by: `1/√d_head`, or Gemma's `query_pre_attn_scalar^−½`.
    pub scale: f64,
    /// RMSNorm over each head's queries and keys before RoPE (`q_norm`, `k_norm`), if the
    /// family has it: its ε and its weight's offset.
    pub qk_norm: Option<(f64, f64)>,
}

impl AttentionSpec {
    /// The weights one of `tp` tensor-parallel ranks holds: its query heads' slices of
    /// the projections, its key/value heads (one whole beyond their number), their
    /// biases and the query and key norms.
    pub fn parameter_count(&self, tp: usize) -> u64 {
        let tp = tp as u64;
        let [d, q, d_head] =
            [self.d_model, self.n_heads * self.d_head, self.d_head].map(|n| n as u64);
        let kv = (self.n_kv_heads as u64 / tp).max(1) * d_head;
        let biases = if self.bias { q / tp + 2 * kv } else { 0 };
        let norms = if self.qk_norm.is_some() {
            2 * d_head
        } else {
            0
        };
        2 * d * q / tp + 2 * d * kv + biases + norms
    }
}

/// The attention of one block, holding the heads of one tensor-parallel rank.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: ColumnParallelLinear,
    k_proj: ColumnParallelLinear,
    v_proj: ColumnParallelLinear,
    o_proj: RowParallelLinear,
    /// The query and key norms, if the family has them.
    qk_norm: Option<[RmsNorm; 2]>,
    n_heads: usize,
    n_kv_heads: usize,
    d_head: usize,
    scale: f64,
}

impl Attention {
    /// Loads the heads of `tp` from `{prefix}.self_attn.*`.
    pub fn load(
        weights: &HeldWeights<'_>,
        prefix: &str,
        spec: &AttentionSpec,
        tp: TpRank,
    ) -> Result<Self> {
        let (d, dh) = (spec.d_model, spec.d_head);
        let heads = tp.slice_of("num_attention_heads", spec.n_heads)?;
        let kv_heads = kv_heads_of(tp, spec.n_kv_heads)?;
        let q_rows = heads.start * dh..heads.end * dh;
        let kv_rows = kv_heads.start * dh..kv_heads.end * dh;
        let p = format!("{prefix}.self_attn");
        let bias = spec.bias;
        let (q_out, kv_out) = (spec.n_heads * dh, spec.n_kv_heads * dh);
        let norm = |name: &str, (eps, offset): (f64, f64)| -> Result<RmsNorm> {
            let norm = RmsNorm::load(weights, &format!("{p}.{name}.weight"), dh, eps)?;
            Ok(norm.with_offset(offset))
        };
        let qk_norm = match spec.qk_norm {
            Some(qk) => Some([norm("q_norm", qk)?, norm("k_norm", qk)?]),
            None => None,
        };
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
            qk_norm,
            n_heads: heads.len(),
            n_kv_heads: kv_heads.len(),
            d_head: dh,
            scale: spec.scale,
        })
    }

    /// Every parameter slice this rank holds (biases included).
    pub fn parameters(&self) -> Vec<flexmodel_cluster::ParamSlice> {
        let mut all = Vec::new();
        for proj in [&self.q_proj, &self.k_proj, &self.v_proj] {
            all.extend(proj.parameters());
        }
        all.extend(self.o_proj.parameters());
        all.extend(self.qk_norm.iter().flatten().flat_map(|n| n.parameters()));
        all
    }

    /// The same attention with `f` of each of its tensors.
    pub fn map_parameters(&self, f: &mut crate::models::parallel::ParamMap<'_>) -> Result<Self> {
        Ok(Self {
            q_proj: self.q_proj.map_parameters(f)?,
            k_proj: self.k_proj.map_parameters(f)?,
            v_proj: self.v_proj.map_parameters(f)?,
            o_proj: self.o_proj.map_parameters(f)?,
            qk_norm: match &self.qk_norm {
                Some([q, k]) => Some([q.map_parameters(f)?, k.map_parameters(f)?]),
                None => None,
            },
            ..*self
        })
    }

    /// Attention of `input` (`[b, t, d_model]`) at `positions`, summed over all ranks
    /// (before `hook_attn_out`, which the block hooks: Gemma norms it first); with a
    /// cache, over the cached keys and values of `layer` too (this pass's are appended).
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
        let (q, k) = match &self.qk_norm {
            None => (q, k),
            Some([q_norm, k_norm]) => {
                let q_sites = [BlockSite::Q_NORM_SCALE, BlockSite::Q_NORM_NORMALIZED];
                let k_sites = [BlockSite::K_NORM_SCALE, BlockSite::K_NORM_NORMALIZED];
                (
                    q_norm.forward_hooked(&q, hooks, q_sites.map(point))?,
                    k_norm.forward_hooked(&k, hooks, k_sites.map(point))?,
                )
            }
        };
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
        // A sliding window's cache may have dropped the keys before `first`.
        let (k, v, first) = match cache {
            Some(cache) => {
                let cached = cache.append(layer, &k, &v, positions.window)?;
                (cached.keys, cached.values, cached.first)
            }
            None => (k, v, 0),
        };
        let mask = match first {
            0 => positions.mask.clone(),
            first => {
                let keys_dim = positions.mask.rank() - 1;
                let held = positions.mask.dim(keys_dim)? - first;
                positions.mask.narrow(keys_dim, first, held)?.contiguous()?
            }
        };
        drop(layout);

        // Query heads j·group … (j+1)·group − 1 read key/value head j: stacked as
        // [b, kv_heads, group·t, d_head], their queries are one matrix per key head.
        let (h, kv, dh, keys) = (self.n_heads, self.n_kv_heads, self.d_head, k.dim(2)?);
        let (group, scale) = (h / kv, self.scale);
        let scores = {
            let _op = crate::op_span!("attention");
            let q = q.reshape((b, kv, group * t, dh))?;
            flexmodel_kernels::scores(&q, &k, &mask, scale)?.reshape((b, h, t, keys))?
        };
        // Hooks see every key of the sequence: those the cache dropped as masked.
        let scores = hooked_over_all_keys(
            &mut hook,
            BlockSite::ATTN_SCORES,
            scores,
            first,
            f32::NEG_INFINITY,
        )?;
        let pattern = {
            let _op = crate::op_span!("attention");
            flexmodel_kernels::softmax_last_dim(&scores)?
        };
        let pattern = hooked_over_all_keys(&mut hook, BlockSite::PATTERN, pattern, first, 0.0)?;
        let z = {
            let _op = crate::op_span!("attention");
            let pattern = pattern.reshape((b, kv, group * t, keys))?;
            flexmodel_kernels::attend(&pattern, &v)?.reshape((b, h, t, dh))?
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
        Ok(out)
    }
}

/// `value` (`[b, h, t, keys from first]`) through the hook at `site`, widened for it to
/// every key from position 0 with `fill` (what the dropped keys would hold: they lie
/// outside the window).
fn hooked_over_all_keys(
    hook: &mut impl FnMut(BlockSite, Tensor) -> Result<Tensor>,
    site: BlockSite,
    value: Tensor,
    first: usize,
    fill: f32,
) -> Result<Tensor> {
    if first == 0 {
        return hook(site, value);
    }
    let (b, h, t, held) = value.dims4()?;
    let dropped = Tensor::full(fill, (b, h, t, first), value.device())?.to_dtype(value.dtype())?;
    let whole = hook(site, Tensor::cat(&[&dropped, &value], 3)?)?;
    Ok(whole.narrow(3, first, held)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::{DType, Device};
    use flexmodel_actors::Window;
    use flexmodel_cluster::SingleRank;

    use super::*;
    use crate::models::PositionSpec;
    use crate::weights::TensorMap;

    /// Records every default hook point's value.
    struct Recorder(BTreeMap<String, Tensor>);

    impl HookLayer for Recorder {
        fn hook(&mut self, point: HookPoint, value: Tensor) -> Result<Tensor> {
            self.0.insert(point.to_string(), value.clone());
            Ok(value)
        }

        fn wants(&self, point: HookPoint) -> bool {
            !point.is_opt_in()
        }
    }

    #[test]
    fn query_and_key_norms_scale_each_head_by_one_plus_their_weight_before_rope() {
        let (d, h, kv, dh, t) = (8, 2, 1, 4, 3);
        let spec = AttentionSpec {
            d_model: d,
            n_heads: h,
            n_kv_heads: kv,
            d_head: dh,
            bias: false,
            scale: 0.25,
            qk_norm: Some((1e-6, 1.0)),
        };
        let cpu = &Device::Cpu;
        let random = |shape: &[usize], seed: f32| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect();
            Tensor::from_vec(values, shape, cpu).unwrap()
        };
        let p = "model.layers.0.self_attn";
        let tensors = BTreeMap::from([
            (format!("{p}.q_proj.weight"), random(&[h * dh, d], 1.0)),
            (format!("{p}.k_proj.weight"), random(&[kv * dh, d], 2.0)),
            (format!("{p}.v_proj.weight"), random(&[kv * dh, d], 3.0)),
            (format!("{p}.o_proj.weight"), random(&[d, h * dh], 4.0)),
            (format!("{p}.q_norm.weight"), random(&[dh], 5.0)),
            (format!("{p}.k_norm.weight"), random(&[dh], 6.0)),
        ]);
        let source = TensorMap::new("memory", tensors.clone());
        let weights = HeldWeights::f32(&source);
        let attention = Attention::load(&weights, "model.layers.0", &spec, TpRank::SOLE).unwrap();
        let positions = PositionSpec {
            d_head: dh,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 16,
            sliding_window: None,
            dtype: DType::F32,
        };
        let positions = Positions::new(&Window::DENSE, (1, t), &positions, cpu).unwrap();
        let x = random(&[1, t, d], 7.0);
        let input = AttentionInput {
            resid: &x,
            normed: &x,
            ln1: &RmsNorm::new("ln1", Tensor::ones(d, DType::F32, cpu).unwrap(), 1e-6),
        };
        let mut recorder = Recorder(BTreeMap::new());
        let tp: Arc<dyn Collective> = Arc::new(SingleRank);
        attention
            .forward(input, 0, &positions, None, &mut recorder, &tp)
            .unwrap();
        let seen = &recorder.0;
        // By hand: each head's projection over its RMS, times 1 + w, then RoPE.
        for (name, heads, rows, norm) in
            [("q", h, "q_proj", "q_norm"), ("k", kv, "k_proj", "k_norm")]
        {
            let w = &tensors[&format!("{p}.{rows}.weight")];
            let projected = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            let projected = projected.reshape((1, t, heads, dh)).unwrap();
            let rms = (projected.sqr().unwrap().mean_keepdim(3).unwrap() + 1e-6)
                .unwrap()
                .sqrt()
                .unwrap();
            let gain = (&tensors[&format!("{p}.{norm}.weight")] + 1.0).unwrap();
            let normed = projected
                .broadcast_div(&rms)
                .unwrap()
                .broadcast_mul(&gain)
                .unwrap();
            let expected = positions.rope.apply(&normed).unwrap();
            let scale = &seen[&format!("blocks.0.attn.{name}_norm.hook_scale")];
            assert_eq!(scale.dims(), [1, t, heads, 1]);
            let rotated = &seen[&format!("blocks.0.attn.hook_rot_{name}")];
            let diff = (rotated - &expected)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{name}: {diff}");
        }
    }
}
