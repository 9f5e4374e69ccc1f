//! Rotary position embeddings, Hugging Face's rotate-half convention.

use candle_core::{D, Device, Tensor};

use crate::Result;

/// The cosines and sines of RoPE for one sequence length, shaped `[1, t, 1, d_head]`.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Angles `p · θ^(−2i/d)` for positions `p < seq_len` and `i < d_head / 2`.
    pub fn new(seq_len: usize, d_head: usize, theta: f64, device: &Device) -> Result<Self> {
        let half = d_head / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / d_head as f64)) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, seq_len as u32, device)?
            .to_dtype(candle_core::DType::F32)?
            .reshape((seq_len, 1))?;
        let angles = positions.broadcast_mul(&inv_freq)?;
        let angles = Tensor::cat(&[&angles, &angles], 1)?.reshape((1, seq_len, 1, d_head))?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// `x·cos + rotate_half(x)·sin` for `x` of shape `[b, t, heads, d_head]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let first = x.narrow(D::Minus1, 0, half)?;
        let second = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
        Ok((x.broadcast_mul(&self.cos)? + rotated.broadcast_mul(&self.sin)?)?)
    }
}
