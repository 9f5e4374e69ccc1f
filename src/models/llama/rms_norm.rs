//! RMSNorm, split so that its divisor (`hook_scale`) and `x / rms(x)`
//! (`hook_normalized`) are visible:
//!
//! ```text
//! scale = √(mean(x²) + ε)        over the last dimension, [.., 1]
//! y     = (x / scale) · weight
//! ```

use candle_core::Tensor;
use flexmodel_cluster::ParamSlice;

use crate::Result;
use crate::models::parallel::{like, param};
use crate::weights::HeldWeights;

/// RMSNorm with a learned per-channel weight.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    name: String,
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// The norm named `name` (its weight's name) with `weight` (`[d_model]`) and `eps`.
    pub fn new(name: impl Into<String>, weight: Tensor, eps: f64) -> Self {
        Self {
            name: name.into(),
            weight,
            eps,
        }
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
        Ok(Self::new(self.name.clone(), f(&self.weight)?, self.eps))
    }

    /// `√(mean(x²) + ε)` over the last dimension (kept, of size 1).
    pub fn scale(&self, x: &Tensor) -> Result<Tensor> {
        let _op = crate::op_span!("norm");
        Ok(flexmodel_kernels::rms(x, self.eps)?)
    }

    /// The normalized value times the weight.
    pub fn times_weight(&self, normalized: &Tensor) -> Result<Tensor> {
        let _op = crate::op_span!("norm");
        Ok(normalized.broadcast_mul(&like(&self.weight, normalized)?)?)
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
}
