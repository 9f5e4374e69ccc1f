//! Rotary position embeddings, Hugging Face's rotate-half convention, with the RoPE
//! scalings of Hugging Face's `rope_scaling` that LLaMA-family checkpoints use.

use candle_core::{DType, Tensor};

use crate::Result;

/// How RoPE's frequencies are scaled (Hugging Face's `rope_scaling`), each as
/// `transformers` computes it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: linear`: every frequency divided by `factor` (positions slowed down).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// `rope_type: dynamic` (dynamic NTK): for a pass whose positions reach `n` beyond
    /// `max_position_embeddings` (`m`), the base becomes
    /// `θ · (factor · n / m − (factor − 1))^(d / (d − 2))`; shorter passes use plain RoPE.
    Dynamic {
        /// The scaling factor.
        factor: f64,
    },
    /// `rope_type: llama3` (LLaMA 3.1, 3.2, 3.3): frequencies whose wavelength exceeds
    /// `original / low_freq_factor` are divided by `factor`, those below
    /// `original / high_freq_factor` kept, and those between interpolated smoothly.
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// Where the low frequencies begin, as a divisor of the original context.
        low_freq_factor: f64,
        /// Where the high frequencies begin, as a divisor of the original context.
        high_freq_factor: f64,
        /// The context the model was first trained for.
        original_max_position_embeddings: usize,
    },
}

/// RoPE's inverse frequencies `θ^(−2i/d)`, `i < d_head / 2`, as `scaling` changes them
/// for a pass whose positions reach `seq_len` (the largest position plus one) in a
/// model trained for `max_positions`.
pub fn inverse_frequencies(
    d_head: usize,
    theta: f64,
    scaling: Option<&RopeScaling>,
    seq_len: usize,
    max_positions: usize,
) -> Vec<f64> {
    let d = d_head as f64;
    let base = match scaling {
        Some(&RopeScaling::Dynamic { factor }) if seq_len > max_positions => {
            let growth = factor * seq_len as f64 / max_positions as f64 - (factor - 1.0);
            theta * growth.powf(d / (d - 2.0))
        }
        _ => theta,
    };
    let plain = (0..d_head / 2).map(move |i| 1.0 / base.powf(2.0 * i as f64 / d));
    match scaling {
        None | Some(RopeScaling::Dynamic { .. }) => plain.collect(),
        Some(&RopeScaling::Linear { factor }) => plain.map(|f| f / factor).collect(),
        Some(&RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: original,
        }) => {
            let original = original as f64;
            let (low_wavelength, high_wavelength) = (original / low, original / high);
            plain
                .map(|f| {
                    let wavelength = 2.0 * std::f64::consts::PI / f;
                    if wavelength < high_wavelength {
                        f
                    } else if wavelength > low_wavelength {
                        f / factor
                    } else {
                        let smooth = (original / wavelength - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// The cosines and sines of RoPE at given positions, shaped `[n, t, 1, d_head]` (`n` is 1
/// when every sequence has the same positions, else the batch).
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Angles `p · f_i` for the positions `p` of `positions` (`[n, t]`, u32) and the
    /// inverse frequencies `f_i` of [`inverse_frequencies`].
    pub fn at(positions: &Tensor, inverse_frequencies: &[f64]) -> Result<Self> {
        let (n, t) = positions.dims2()?;
        let half = inverse_frequencies.len();
        let inv_freq: Vec<f32> = inverse_frequencies.iter().map(|&f| f as f32).collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, 1, half), positions.device())?;
        let positions = positions.to_dtype(DType::F32)?.reshape((n, t, 1))?;
        let angles = positions.broadcast_mul(&inv_freq)?;
        let angles = Tensor::cat(&[&angles, &angles], 2)?.reshape((n, t, 1, 2 * half))?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// The same rotations in `dtype` (the dtype a pass computes in), still computed in
    /// f32.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            cos: self.cos.to_dtype(dtype)?,
            sin: self.sin.to_dtype(dtype)?,
        })
    }

    /// `x·cos + rotate_half(x)·sin` for `x` of shape `[b, t, heads, d_head]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let _op = crate::op_span!("rope");
        Ok(flexmodel_kernels::rope(x, &self.cos, &self.sin)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_divides_low_frequencies_keeps_high_ones_and_blends_between() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        let plain = inverse_frequencies(32, 10_000.0, None, 1, 128);
        let scaled = inverse_frequencies(32, 10_000.0, Some(&scaling), 1, 128);
        let wavelength = |f: f64| 2.0 * std::f64::consts::PI / f;
        for (p, s) in plain.iter().zip(&scaled) {
            match wavelength(*p) {
                w if w < 16.0 => assert_eq!(s, p),
                w if w > 64.0 => assert!((s * 8.0 - p).abs() < 1e-15),
                _ => assert!(s < p && *s > p / 8.0),
            }
        }
        assert!(plain.iter().any(|&p| wavelength(p) > 64.0));
    }

    #[test]
    fn dynamic_scaling_changes_nothing_within_the_context_and_raises_the_base_beyond() {
        let scaling = RopeScaling::Dynamic { factor: 2.0 };
        let at = |n| inverse_frequencies(8, 10_000.0, Some(&scaling), n, 16);
        assert_eq!(at(16), inverse_frequencies(8, 10_000.0, None, 16, 16));
        // n = 32: the base grows by (2·2 − 1)^(8/6).
        let base = 10_000.0 * 3f64.powf(8.0 / 6.0);
        assert!((at(32)[1] - 1.0 / base.powf(0.25)).abs() < 1e-12);
        assert_eq!(at(32)[0], 1.0);
        let linear = RopeScaling::Linear { factor: 4.0 };
        assert_eq!(inverse_frequencies(8, 100.0, Some(&linear), 1, 16)[0], 0.25);
    }
}
