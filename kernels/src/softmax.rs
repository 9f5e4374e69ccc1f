//! Softmax over the last dimension.

use candle_core::{CpuStorage, CustomOp1, D, Layout, Result, Shape, Tensor};

use crate::exp::exp;
use crate::rows::{for_each_row, lane_max, lane_sum, simd, slice};

/// `exp(x − max) / Σ exp(x − max)` over the last dimension of `x`. Rows of −∞ but one
/// finite entry are fine; a row of only −∞ gives NaN, as the composed chain does.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !crate::fusable(&[x]) {
        return crate::composed::softmax_last_dim(x);
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, self.name())?;
        let width = layout.dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; x.len()];
        for_each_row(&mut out, width, width, |i, row| {
            simd(|| {
                let input = &x[i * width..(i + 1) * width];
                let max = lane_max(input);
                for (o, &v) in row.iter_mut().zip(input) {
                    *o = exp(v - max);
                }
                let sum = lane_sum(row, |e| e);
                for o in row.iter_mut() {
                    *o /= sum;
                }
            })
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// `p · (g − Σ g·p)` over the last dimension, `p` being the softmax.
    fn bwd(&self, _: &Tensor, p: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dot = (g * p)?.sum_keepdim(D::Minus1)?;
        Ok(Some((g.broadcast_sub(&dot)? * p)?))
    }
}
