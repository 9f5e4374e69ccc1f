//! The chains of candle ops that the fused kernels replace: the path of every dtype and
//! device the kernels do not take, and the reference they are tested against.

use candle_core::{D, Result, Tensor};

/// `exp(x − max) / Σ exp(x − max)` over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `x·cos + rotate_half(x)·sin`, `rotate_half([a, b]) = [−b, a]` over the last dimension.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let first = x.narrow(D::Minus1, 0, half)?;
    let second = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// `silu(gate) · up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// `√(mean(x²) + ε)` over the last dimension, kept (of size 1).
pub fn rms(x: &Tensor, eps: f64) -> Result<Tensor> {
    (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()
}

/// `q · kᵀ · scale + mask`, the heads' rows grouped as [`crate::scores`] takes them.
pub fn scores(q: &Tensor, k: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, m, _) = q.dims4()?;
    let keys = k.dim(2)?;
    let t = mask.dim(mask.rank() - 2)?;
    let raw = q.matmul(&k.t()?)?.reshape((b, h, m / t, t, keys))?;
    let mask = match mask.rank() {
        4 => mask.unsqueeze(1)?,
        _ => mask.clone(),
    };
    (raw * scale)?
        .broadcast_add(&mask)?
        .reshape((b, h, m, keys))
}

/// `pattern · v`, a matrix product per sequence and head.
pub fn attend(pattern: &Tensor, v: &Tensor) -> Result<Tensor> {
    pattern.matmul(v)
}
