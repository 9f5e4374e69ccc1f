//! The divisor of RMSNorm.

use candle_core::{CpuStorage, CustomOp1, D, Layout, Result, Shape, Tensor};

use crate::rows::{for_each_row, lane_sum, slice};

/// `√(mean(x²) + ε)` over the last dimension of `x`, kept (of size 1).
pub fn rms(x: &Tensor, eps: f64) -> Result<Tensor> {
    if !crate::fusable(&[x]) {
        return crate::composed::rms(x, eps);
    }
    x.contiguous()?.apply_op1(Rms { eps: eps as f32 })
}

struct Rms {
    eps: f32,
}

impl CustomOp1 for Rms {
    fn name(&self) -> &'static str {
        "fused-rms"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, self.name())?;
        let mut dims = layout.dims().to_vec();
        let Some(last) = dims.last_mut() else {
            candle_core::bail!("rms: x has no dimension to reduce");
        };
        let width = std::mem::replace(last, 1);
        let mut out = vec![0f32; x.len() / width.max(1)];
        let n = width as f32;
        for_each_row(&mut out, 1, width, |i, scale| {
            let sum = lane_sum(&x[i * width..(i + 1) * width], |v| v * v);
            scale[0] = (sum / n + self.eps).sqrt();
        });
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    /// `∂scale/∂x = x / (d · scale)`.
    fn bwd(&self, x: &Tensor, scale: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let d = x.dim(D::Minus1)? as f64;
        Ok(Some(x.broadcast_mul(&(g / (scale * d)?)?)?))
    }
}
