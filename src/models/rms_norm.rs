//! RMSNorm, split so that its divisor (`hook_scale`) and `x / rms(x)`
//! (`hook_normalized`) are visible:
//!
//! ```text
//! scale = √(mean(x²) + ε)        over the last dimension, [.., 1]
//! y     = (x / scale) · (offset + weight)
//! ```
//!
//! The offset is 0 for LLaMA and 1 for Gemma, whose norms hold their weight as a
//! difference from one (Hugging Face's `1 + w`).

use candle_core::Tensor;
use flexmodel_cluster::ParamSlice;

use crate::models::parallel::{like, param};
use crate::weights::HeldWeights;
use crate::{HookLayer, HookPoint, Result};

/// RMSNorm with a learned per-channel weight.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    name: String,
    weight: Tensor,
    eps: f64,
    offset: f64,
}

impl RmsNorm {
    /// The norm named `name` (its weight's name) with `weight` (`[d_model]`) and `eps`.
    pub fn new(name: impl Into<String>, weight: Tensor, eps: f64) -> Self {
        Self {
            name: name.into(),
            weight,
            eps,
            offset: 0.0,
        }
    }

    /// This norm scaling by `offset + weight` (Gemma's `1 + w`).
    pub fn with_offset(self, offset: f64) -> Self {
        Self { offset, ..self }
    }

    /// Loads the `[d_model]` weight `name`.
    pub fn load(weights: &HeldWeights<'_>, name: &str, d_model: usize, eps: f64) -> Result<Self> {
        let weight = param(weights.slice(name, &[d_model], None)?)?;
        Ok(Self::new(name, weight, eps))
    }

    /// The weight, whole on every rank.
    pub fn parameters(&self) -> Vec<ParamSlice> {
        vec![ParamSlice {
            name: self.name.clone(),
            value: self.weight.clone(),
            split: None,
            piece: None,
            transposed: false,
        }]
    }

    /// The same norm with `f` of its weight.
    pub fn map_parameters(&self, f: &mut crate::models::parallel::ParamMap<'_>) -> Result<Self> {
        Ok(Self {
            weight: f(&self.weight)?,
            ..self.clone()
        })
    }

    /// `√(mean(x²) + ε)` over the last dimension (kept, of size 1).
    pub fn scale(&self, x: &Tensor) -> Result<Tensor> {
        let _op = crate::op_span!("norm");
        Ok(flexmodel_kernels::rms(x, self.eps)?)
    }

    /// The normalized value times the weight (plus the offset).
    pub fn times_weight(&self, normalized: &Tensor) -> Result<Tensor> {
        let _op = crate::op_span!("norm");
        let weight = like(&self.weight, normalized)?;
        let weight = match self.offset {
            0.0 => weight,
            offset => (weight + offset)?,
        };
        Ok(normalized.broadcast_mul(&weight)?)
    }

    /// `x / scale`, scale being [`scale`](Self::scale) of `x`.
    pub fn normalize(x: &Tensor, scale: &Tensor) -> Result<Tensor> {
        let _op = crate::op_span!("norm");
        Ok(x.broadcast_div(scale)?)
    }

    /// The whole norm: `x / scale(x) · weight`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.times_weight(&Self::normalize(x, &self.scale(x)?)?)
    }

    /// The whole norm, its RMS and its normalized value going through the hooks at
    /// `[scale, normalized]` (TransformerLens's `hook_scale` and `hook_normalized`).
    pub fn forward_hooked(
        &self,
        x: &Tensor,
        hooks: &mut dyn HookLayer,
        [scale, normalized]: [HookPoint; 2],
    ) -> Result<Tensor> {
        let s = hooks.hook(scale, self.scale(x)?)?;
        let n = hooks.hook(normalized, Self::normalize(x, &s)?)?;
        self.times_weight(&n)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn an_offset_norm_scales_by_one_plus_its_weight() {
        let x = [3.0f32, -4.0, 0.5, 2.0];
        let w = [0.5f32, -1.0, 0.0, 2.0];
        let eps = 1e-6;
        let weight = Tensor::new(&w, &Device::Cpu).unwrap();
        let norm = RmsNorm::new("n", weight, eps).with_offset(1.0);
        let y = norm
            .forward(&Tensor::new(&[x], &Device::Cpu).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mean_square = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 4.0;
        let rms = (mean_square + eps).sqrt();
        for ((xi, wi), yi) in x.iter().zip(w).zip(&y[0]) {
            let expected = *xi as f64 / rms * (1.0 + wi as f64);
            assert!((*yi as f64 - expected).abs() < 1e-6, "{yi} vs {expected}");
        }
    }
}
