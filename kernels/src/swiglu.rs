//! The SwiGLU activation of a LLaMA MLP.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use crate::exp::exp;
use crate::rows::{for_each_row, slice};

/// `silu(gate) · up`, `silu(g) = g / (1 + e^(−g))`, for `gate` and `up` of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        );
    }
    if !crate::fusable(&[gate, up]) {
        return crate::composed::swiglu(gate, up);
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

struct Swiglu;

/// Elements per task of the elementwise loop (the whole tensor is one long row).
const CHUNK: usize = 16 * 1024;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (slice(gs, gl, self.name())?, slice(us, ul, self.name())?);
        let mut out = vec![0f32; gate.len()];
        let width = CHUNK.min(gate.len());
        for_each_row(&mut out, width, 2 * width, |chunk, row| {
            let start = chunk * CHUNK;
            for ((o, &g), &u) in row.iter_mut().zip(&gate[start..]).zip(&up[start..]) {
                *o = g / (1.0 + exp(-g)) * u;
            }
        });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }

    /// `∂/∂up = silu(g)`, `∂/∂gate = up · σ(g)·(1 + g·(1 − σ(g)))`.
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let sigmoid = (gate.neg()?.exp()? + 1.0)?.recip()?;
        let silu = (gate * &sigmoid)?;
        let d_silu = (&sigmoid * ((gate * sigmoid.affine(-1.0, 1.0)?)? + 1.0)?)?;
        Ok((Some((grad * up)?.mul(&d_silu)?), Some((grad * silu)?)))
    }
}
