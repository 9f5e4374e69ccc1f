//! One tensor-parallel rank's share of a sparse autoencoder: the latents `lo..hi` (their
//! columns of `W_enc`, rows of `W_dec`), the biases and norms it needs, and its pass:
//!
//! ```text
//! input   = x                                         hook_sae_input   [.., d_in]
//! pre     = (norm(input) − b_dec·apply) W_enc + b_enc  hook_sae_acts_pre  [.., d_sae] (split)
//! post    = act(pre)                                   hook_sae_acts_post [.., d_sae] (split)
//! recons  = Σ_ranks post W_dec + b_dec                 hook_sae_recons  [.., d_in]
//! error   = x − denorm(recons of x, unhooked)          hook_sae_error   (detached)
//! output  = denorm(recons) (+ error)                   hook_sae_output
//! ```
//!
//! as SAELens computes them (`SAE.forward`, `encode`, `decode`): its top-k is the global
//! top-k over every rank's latents, chosen by each position's k-th largest
//! pre-activation across the group.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{D, DType, Tensor};
use flexmodel_cluster::{Collective, conjugate};

use super::config::{Activation, Normalization, SaeConfig};
use crate::Result;
use crate::hooks::SaeSite;

/// The parameters of an SAE, whole or one rank's latents of them, by SAELens's names:
/// `W_enc` `[d_in, d_sae]`, `b_enc` `[d_sae]`, `W_dec` `[d_sae, d_in]`, `b_dec`
/// `[d_in]`, and JumpReLU's `threshold` `[d_sae]`.
#[derive(Debug, Clone)]
pub struct SaeWeights {
    /// `W_enc`'s columns of the latents held.
    pub w_enc: Tensor,
    /// `b_enc`'s entries of the latents held.
    pub b_enc: Tensor,
    /// `W_dec`'s rows of the latents held.
    pub w_dec: Tensor,
    /// The decoder bias, whole.
    pub b_dec: Tensor,
    /// JumpReLU's thresholds of the latents held.
    pub threshold: Option<Tensor>,
}

/// One rank's share of an SAE.
#[derive(Debug, Clone)]
pub struct SparseAutoencoder {
    config: SaeConfig,
    latents: Range<usize>,
    pub(super) weights: SaeWeights,
    /// `‖W_dec[i]‖` of the latents held, for a top-k chosen on rescaled activations.
    decoder_norms: Option<Tensor>,
}

/// What a normalization took off the input, to put back on the reconstruction.
#[derive(Clone)]
enum Undo {
    None,
    Divide(Tensor),
    Affine { std: Tensor, mean: Tensor },
}

impl SparseAutoencoder {
    /// The share of `latents` of an SAE of `config` with `weights` (of those latents).
    pub fn new(config: SaeConfig, latents: Range<usize>, weights: SaeWeights) -> Result<Self> {
        let decoder_norms = match config.activation {
            Activation::TopK {
                rescale_acts_by_decoder_norm: true,
                ..
            } => Some(weights.w_dec.sqr()?.sum(1)?.sqrt()?),
            _ => None,
        };
        Ok(Self {
            config,
            latents,
            weights,
            decoder_norms,
        })
    }

    /// This share on `device`.
    pub fn to_device(self, device: &candle_core::Device) -> Result<Self> {
        let w = &self.weights;
        let weights = SaeWeights {
            w_enc: w.w_enc.to_device(device)?,
            b_enc: w.b_enc.to_device(device)?,
            w_dec: w.w_dec.to_device(device)?,
            b_dec: w.b_dec.to_device(device)?,
            threshold: w
                .threshold
                .as_ref()
                .map(|t| t.to_device(device))
                .transpose()?,
        };
        Self::new(self.config, self.latents, weights)
    }

    /// The bytes of this share's weights.
    pub fn weight_bytes(&self) -> usize {
        let w = &self.weights;
        [
            Some(&w.w_enc),
            Some(&w.b_enc),
            Some(&w.w_dec),
            Some(&w.b_dec),
            w.threshold.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum()
    }

    /// Its configuration.
    pub fn config(&self) -> &SaeConfig {
        &self.config
    }

    /// The latents this share holds.
    pub fn latents(&self) -> Range<usize> {
        self.latents.clone()
    }

    /// The SAE's pass over `x` (`[.., d_in]`), each site's value going through `hook`,
    /// the reconstruction summed over `collective`'s ranks (each holding its latents).
    /// With `error_term`, the output is the reconstruction plus what the unhooked
    /// reconstruction of `x` misses (detached, as SAELens computes it), so that the
    /// output is `x` unless a hook changes something; without, the reconstruction.
    pub fn forward(
        &self,
        x: &Tensor,
        error_term: bool,
        hook: &mut dyn FnMut(SaeSite, Tensor) -> Result<Tensor>,
        collective: &Arc<dyn Collective>,
    ) -> Result<Tensor> {
        // A hook that gives back the tensor it was handed changed nothing.
        let mut untouched = true;
        let mut run = |site, value: Tensor| {
            let id = value.id();
            let out = hook(site, value)?;
            untouched &= out.id() == id;
            Ok::<_, crate::Error>(out)
        };
        let input = run(SaeSite::Input, x.clone())?;
        let (normed, undo) = self.normalize(&input)?;
        let pre = run(SaeSite::ActsPre, self.pre_activations(&normed, collective)?)?;
        let post = run(SaeSite::ActsPost, self.activate(&pre, collective)?)?;
        let decoded = self.decode(&post, collective)?;
        // The reconstruction of `x` that no hook changed, for the error term.
        let clean = match (error_term, untouched) {
            (false, _) => None,
            (true, true) => Some(self.denormalize(decoded.clone(), undo.clone())?),
            (true, false) => Some(self.reconstruct(&x.detach(), collective)?),
        };
        let recons = hook(SaeSite::Recons, decoded)?;
        let out = self.denormalize(recons, undo)?;
        let out = match clean {
            None => out,
            Some(clean) => {
                let error = hook(SaeSite::Error, (x.detach() - clean.detach())?)?;
                (out + error)?
            }
        };
        hook(SaeSite::Output, out)
    }

    /// The reconstruction of `x`, without hooks.
    pub fn reconstruct(&self, x: &Tensor, collective: &Arc<dyn Collective>) -> Result<Tensor> {
        let (normed, undo) = self.normalize(x)?;
        let pre = self.pre_activations(&normed, collective)?;
        let post = self.activate(&pre, collective)?;
        self.denormalize(self.decode(&post, collective)?, undo)
    }

    /// The input normalized as the configuration says, and how to undo it.
    fn normalize(&self, x: &Tensor) -> Result<(Tensor, Undo)> {
        Ok(match self.config.normalization {
            Normalization::None => (x.clone(), Undo::None),
            Normalization::ConstantNormRescale => {
                let d_in = self.config.d_in as f64;
                let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
                let coefficient = (norm.recip()? * d_in.sqrt())?;
                (x.broadcast_mul(&coefficient)?, Undo::Divide(coefficient))
            }
            Normalization::LayerNorm => {
                let n = self.config.d_in as f64;
                let mean = x.mean_keepdim(D::Minus1)?;
                let centred = x.broadcast_sub(&mean)?;
                // torch's `std`: unbiased.
                let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / (n - 1.0).max(1.0))?;
                let std = var.sqrt()?;
                let normed = centred.broadcast_div(&(&std + 1e-5)?)?;
                (normed, Undo::Affine { std, mean })
            }
        })
    }

    /// The reconstruction with the normalization undone.
    fn denormalize(&self, recons: Tensor, undo: Undo) -> Result<Tensor> {
        Ok(match undo {
            Undo::None => recons,
            Undo::Divide(coefficient) => recons.broadcast_div(&coefficient)?,
            Undo::Affine { std, mean } => recons.broadcast_mul(&std)?.broadcast_add(&mean)?,
        })
    }

    /// `(normed − b_dec·apply) W_enc + b_enc` for the latents held.
    fn pre_activations(&self, normed: &Tensor, collective: &Arc<dyn Collective>) -> Result<Tensor> {
        let w = &self.weights;
        let centred = match self.config.apply_b_dec_to_input {
            true => normed.broadcast_sub(&w.b_dec)?,
            false => normed.clone(),
        };
        // Every rank reads the whole input: its gradient is the ranks' sum.
        let centred = conjugate::copy_to_group(&centred, collective)?;
        Ok(by_rows(&centred, &w.w_enc)?.broadcast_add(&w.b_enc)?)
    }

    /// The activations of the latents held.
    fn activate(&self, pre: &Tensor, collective: &Arc<dyn Collective>) -> Result<Tensor> {
        Ok(match self.config.activation {
            Activation::Relu => pre.relu()?,
            Activation::JumpRelu => {
                let threshold = self
                    .weights
                    .threshold
                    .as_ref()
                    .ok_or(crate::Error::Internal(
                        "a JumpReLU SAE is built with its thresholds",
                    ))?;
                let open = pre.broadcast_gt(threshold)?.to_dtype(pre.dtype())?;
                (pre.relu()? * open)?
            }
            Activation::TopK { k, .. } => {
                let scaled = match &self.decoder_norms {
                    Some(norms) => pre.broadcast_mul(norms)?,
                    None => pre.clone(),
                };
                let kth = global_kth_largest(&scaled, k, collective)?;
                let kept = scaled.broadcast_ge(&kth)?.to_dtype(scaled.dtype())?;
                (scaled.relu()? * kept)?
            }
        })
    }

    /// `Σ_ranks post W_dec + b_dec`: every rank's latents' part of the reconstruction.
    fn decode(&self, post: &Tensor, collective: &Arc<dyn Collective>) -> Result<Tensor> {
        let post = match &self.decoder_norms {
            Some(norms) => post.broadcast_div(norms)?,
            None => post.clone(),
        };
        let part = by_rows(&post, &self.weights.w_dec)?;
        let whole = conjugate::all_reduce_sum(&part, collective.as_ref())?;
        Ok(whole.broadcast_add(&self.weights.b_dec)?)
    }
}

/// `x W` for `x` of any leading dimensions (`[.., n]`) and `w` `[n, m]`: one product of
/// every position's row at once.
fn by_rows(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let n = dims.pop().unwrap_or(1);
    let product = x.reshape(((), n))?.matmul(w)?;
    dims.push(w.dim(1)?);
    product.reshape(dims)
}

/// Each position's `k`-th largest value of `x` (`[.., n]`, this rank's latents) among
/// every rank's, `[.., 1]`: from each rank's `k` largest, gathered.
fn global_kth_largest(x: &Tensor, k: usize, collective: &Arc<dyn Collective>) -> Result<Tensor> {
    let local = largest(&x.detach(), k)?;
    let candidates = match collective.tp_rank().size() {
        1 => local,
        _ => collective.all_gather(&local, local.rank() - 1)?,
    };
    Ok(largest(&candidates, k)?.min_keepdim(D::Minus1)?)
}

/// The `k` largest values of each row of `x` (`[.., n]`), in no particular order,
/// `[.., k]`; a row of fewer than `k` is padded with −∞. On the CPU by selection (linear
/// in `n`, where a sort of thousands of latents a position cost more than the SAE's
/// products), elsewhere by sorting.
fn largest(x: &Tensor, k: usize) -> Result<Tensor> {
    let n = x.dim(D::Minus1)?;
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = k;
    }
    let pad = |t: Tensor| -> Result<Tensor> {
        if n >= k {
            return Ok(t);
        }
        let mut pad_shape = shape.clone();
        if let Some(last) = pad_shape.last_mut() {
            *last = k - n;
        }
        let none = Tensor::full(f32::NEG_INFINITY, pad_shape, x.device())?.to_dtype(x.dtype())?;
        Ok(Tensor::cat(&[&t, &none], D::Minus1)?)
    };
    if !x.device().is_cpu() || n == 0 {
        let sorted = x.contiguous()?.sort_last_dim(false)?.0;
        return pad(sorted.narrow(D::Minus1, 0, k.min(n))?);
    }
    let mut values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut kept = Vec::with_capacity(values.len() / n * k);
    for row in values.chunks_mut(n) {
        if n > k {
            // Descending: the first k are the k largest.
            row.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        }
        kept.extend_from_slice(&row[..k.min(n)]);
        kept.extend(std::iter::repeat_n(f32::NEG_INFINITY, k.saturating_sub(n)));
    }
    Ok(Tensor::from_vec(kept, shape, x.device())?.to_dtype(x.dtype())?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use flexmodel_cluster::{InProcessCollective, PassControl, SingleRank, split_evenly};

    use super::*;

    const D_IN: usize = 6;
    const D_SAE: usize = 10;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.731).sin()).collect()
    }

    fn whole() -> [Vec<f32>; 4] {
        [
            values(D_IN * D_SAE, 1.0),
            values(D_SAE, 2.0),
            values(D_SAE * D_IN, 3.0),
            values(D_IN, 4.0),
        ]
    }

    /// The latents `r` of the SAE of `config` made of [`whole`].
    fn share(config: &SaeConfig, r: Range<usize>) -> SparseAutoencoder {
        let [w_enc, b_enc, w_dec, b_dec] = whole();
        let cpu = &Device::Cpu;
        let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, cpu).unwrap();
        let w_enc = t(w_enc, &[D_IN, D_SAE])
            .narrow(1, r.start, r.len())
            .unwrap();
        let w_dec = t(w_dec, &[D_SAE, D_IN])
            .narrow(0, r.start, r.len())
            .unwrap();
        let weights = SaeWeights {
            w_enc: w_enc.contiguous().unwrap(),
            b_enc: t(b_enc, &[D_SAE]).narrow(0, r.start, r.len()).unwrap(),
            w_dec: w_dec.contiguous().unwrap(),
            b_dec: t(b_dec, &[D_IN]),
            threshold: Some((Tensor::ones(r.len(), DType::F32, cpu).unwrap() * 0.3).unwrap()),
        };
        SparseAutoencoder::new(config.clone(), r, weights).unwrap()
    }

    fn config(activation: Activation, normalization: Normalization) -> SaeConfig {
        SaeConfig {
            d_in: D_IN,
            d_sae: D_SAE,
            activation,
            apply_b_dec_to_input: true,
            normalization,
            hook_name: None,
        }
    }

    /// SAELens's definitions, written out per position in f64.
    fn by_hand(config: &SaeConfig, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let [w_enc, b_enc, w_dec, b_dec] =
            whole().map(|v| v.into_iter().map(f64::from).collect::<Vec<_>>());
        let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let n = D_IN as f64;
        let mean = x.iter().sum::<f64>() / n;
        let std = (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let normed: Vec<f64> = match config.normalization {
            Normalization::None => x.clone(),
            Normalization::LayerNorm => x.iter().map(|v| (v - mean) / (std + 1e-5)).collect(),
            Normalization::ConstantNormRescale => x.iter().map(|v| v * n.sqrt() / norm).collect(),
        };
        let pre: Vec<f64> = (0..D_SAE)
            .map(|j| {
                (0..D_IN)
                    .map(|i| (normed[i] - b_dec[i]) * w_enc[i * D_SAE + j])
                    .sum::<f64>()
                    + b_enc[j]
            })
            .collect();
        let post: Vec<f64> = match config.activation {
            Activation::Relu => pre.iter().map(|v| v.max(0.0)).collect(),
            Activation::JumpRelu => pre.iter().map(|&v| if v > 0.3 { v } else { 0.0 }).collect(),
            Activation::TopK { k, .. } => {
                let mut sorted = pre.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                pre.iter()
                    .map(|&v| if v >= sorted[k - 1] { v.max(0.0) } else { 0.0 })
                    .collect()
            }
        };
        let recons: Vec<f64> = (0..D_IN)
            .map(|i| {
                (0..D_SAE)
                    .map(|j| post[j] * w_dec[j * D_IN + i])
                    .sum::<f64>()
                    + b_dec[i]
            })
            .collect();
        let out = match config.normalization {
            Normalization::None => recons,
            Normalization::LayerNorm => recons.iter().map(|v| v * std + mean).collect(),
            Normalization::ConstantNormRescale => {
                recons.iter().map(|v| v * norm / n.sqrt()).collect()
            }
        };
        (post, out)
    }

    /// Every site's value of a pass over `x` through `sae` on `collective`.
    fn run(
        sae: &SparseAutoencoder,
        x: &Tensor,
        error_term: bool,
        collective: &Arc<dyn Collective>,
    ) -> std::collections::BTreeMap<SaeSite, Tensor> {
        let mut seen = std::collections::BTreeMap::new();
        let mut hook = |site, value: Tensor| {
            seen.insert(site, value.clone());
            Ok(value)
        };
        sae.forward(x, error_term, &mut hook, collective).unwrap();
        seen
    }

    fn cases() -> Vec<SaeConfig> {
        let topk = Activation::TopK {
            k: 3,
            rescale_acts_by_decoder_norm: false,
        };
        vec![
            config(Activation::Relu, Normalization::None),
            config(Activation::JumpRelu, Normalization::ConstantNormRescale),
            config(topk, Normalization::LayerNorm),
        ]
    }

    #[test]
    fn the_k_largest_of_each_row_are_selected_and_short_rows_padded() {
        let x = Tensor::new(
            &[[3f32, -1.0, 7.0, 2.0], [0.0, 5.0, 5.5, -2.0]],
            &Device::Cpu,
        )
        .unwrap();
        let mut top = largest(&x, 2).unwrap().to_vec2::<f32>().unwrap();
        for row in &mut top {
            row.sort_by(|a, b| b.total_cmp(a));
        }
        assert_eq!(top, [[7.0, 3.0], [5.5, 5.0]]);
        let padded = largest(&x, 6).unwrap().to_vec2::<f32>().unwrap();
        assert!(padded[0][4..].iter().all(|&v| v == f32::NEG_INFINITY));
        let kth = global_kth_largest(&x, 3, &(Arc::new(SingleRank) as Arc<dyn Collective>));
        assert_eq!(kth.unwrap().to_vec2::<f32>().unwrap(), [[2.0], [0.0]]);
    }

    #[test]
    fn each_architecture_computes_saelens_definitions() {
        let x_values = values(2 * D_IN, 9.0);
        let x = Tensor::from_vec(x_values.clone(), (1, 2, D_IN), &Device::Cpu).unwrap();
        let one: Arc<dyn Collective> = Arc::new(SingleRank);
        for config in cases() {
            let sae = share(&config, 0..D_SAE);
            let seen = run(&sae, &x, false, &one);
            for position in 0..2 {
                let (post, out) = by_hand(&config, &x_values[position * D_IN..][..D_IN]);
                let at = |site: SaeSite| -> Vec<f32> {
                    seen[&site]
                        .get(0)
                        .unwrap()
                        .get(position)
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                };
                for (a, e) in at(SaeSite::ActsPost)
                    .iter()
                    .zip(&post)
                    .chain(at(SaeSite::Output).iter().zip(&out))
                {
                    assert!((*a as f64 - e).abs() < 1e-5, "{config:?}: {a} vs {e}");
                }
            }
            // With the error term the output is the input.
            let with_error = run(&sae, &x, true, &one);
            let diff = (&with_error[&SaeSite::Output] - &x)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        }
    }

    #[test]
    fn latents_split_over_three_ranks_give_the_whole_saes_values() {
        let x = Tensor::from_vec(values(4 * D_IN, 5.0), (2, 2, D_IN), &Device::Cpu).unwrap();
        let one: Arc<dyn Collective> = Arc::new(SingleRank);
        for config in cases() {
            let expected = run(&share(&config, 0..D_SAE), &x, true, &one);
            let group = InProcessCollective::group(3, Arc::new(PassControl::default())).unwrap();
            let ranges = split_evenly(D_SAE, 3);
            let pieces: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = group
                    .into_iter()
                    .zip(ranges.clone())
                    .map(|(member, r)| {
                        let (sae, x) = (share(&config, r), x.clone());
                        s.spawn(move || {
                            let member: Arc<dyn Collective> = Arc::new(member);
                            run(&sae, &x, true, &member)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for site in SaeSite::ALL {
                let actual = match site.shape().contains(&crate::hooks::Size::Latents) {
                    true => {
                        let parts: Vec<&Tensor> = pieces.iter().map(|p| &p[&site]).collect();
                        Tensor::cat(&parts, 2).unwrap()
                    }
                    false => pieces[1][&site].clone(),
                };
                let diff = (&actual - &expected[&site])
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap();
                assert!(
                    diff.to_scalar::<f32>().unwrap() < 1e-6,
                    "{config:?} {site:?}"
                );
            }
        }
    }
}
