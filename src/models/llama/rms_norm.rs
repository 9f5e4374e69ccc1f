//! RMSNorm, split so that `x / rms(x)` (the `hook_normalized` point) is visible.

use candle_core::{D, Tensor};

use crate::Result;
use crate::models::parallel::param;
use crate::weights::WeightSource;

/// RMSNorm with a learned per-channel weight.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    name: String,
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads the `[d_model]` weight `name`.
    pub fn load(weights: &dyn WeightSource, name: &str, d_model: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            weight: param(weights.tensor_with_shape(name, &[d_model])?)?,
            eps,
        })
    }

    /// The weight, whole on every rank.
    pub fn parameters(&self) -> Vec<flexmodel_cluster::ParamSlice> {
        vec![flexmodel_cluster::ParamSlice {
            name: self.name.clone(),
            value: self.weight.clone(),
            split: None,
        }]
    }

    /// `x / sqrt(mean(x²) + ε)` over the last dimension.
    pub fn normalize(&self, x: &Tensor) -> Result<Tensor> {
        let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
        Ok(x.broadcast_div(&(mean_square + self.eps)?.sqrt()?)?)
    }

    /// The normalized value times the weight.
    pub fn scale(&self, normalized: &Tensor) -> Result<Tensor> {
        Ok(normalized.broadcast_mul(&self.weight)?)
    }
}
