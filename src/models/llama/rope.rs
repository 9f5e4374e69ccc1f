//! Rotary position embeddings, Hugging Face's rotate-half convention.

use candle_core::{DType, Tensor};

use crate::Result;

/// The cosines and sines of RoPE at given positions, shaped `[n, t, 1, d_head]` (`n` is 1
/// when every sequence has the same positions, else the batch).
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Angles `p · θ^(−2i/d)` for the positions `p` of `positions` (`[n, t]`, u32) and
    /// `i < d_head / 2`.
    pub fn at(positions: &Tensor, d_head: usize, theta: f64) -> Result<Self> {
        let (n, t) = positions.dims2()?;
        let half = d_head / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / d_head as f64)) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, 1, half), positions.device())?;
        let positions = positions.to_dtype(DType::F32)?.reshape((n, t, 1))?;
        let angles = positions.broadcast_mul(&inv_freq)?;
        let angles = Tensor::cat(&[&angles, &angles], 2)?.reshape((n, t, 1, d_head))?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// `x·cos + rotate_half(x)·sin` for `x` of shape `[b, t, heads, d_head]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let _op = crate::op_span!("rope");
        Ok(flexmodel_kernels::rope(x, &self.cos, &self.sin)?)
    }
}
