//! Rotary position embeddings, rotate-half convention.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::rows::{for_each_row, slice};

/// `x·cos + rotate_half(x)·sin` for `x` of shape `[b, t, heads, d]` and `cos`, `sin` of
/// shape `[n, t, 1, d]` (`n` is 1, every sequence at the same positions, or `b`), each
/// made of two equal halves, as RoPE's angles are.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, t, _, d) = x.dims4()?;
    let (n, ct, one, cd) = cos.dims4()?;
    if (ct, one, cd) != (t, 1, d) || !(n == 1 || n == b) || sin.dims() != cos.dims() || d % 2 != 0 {
        candle_core::bail!(
            "rope: x {:?} needs cos and sin of [1 or {b}, {t}, 1, {d}] (d even), not {:?} and {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    if !crate::fusable(&[x, cos, sin]) {
        return crate::composed::rope(x, cos, sin);
    }
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope)
}

struct Rope;

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, cos, sin) = (
            slice(xs, xl, self.name())?,
            slice(cs, cl, self.name())?,
            slice(ss, sl, self.name())?,
        );
        let &[_, t, heads, d] = xl.dims() else {
            candle_core::bail!("rope: x must have four dimensions");
        };
        let n = cl.dims()[0];
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        // One row per (sequence, position, head); the angles depend on the position
        // (and, with n = b, on the sequence).
        for_each_row(&mut out, d, d, |row_index, row| {
            let (seq, pos) = (row_index / (t * heads), row_index / heads % t);
            let angles = ((seq % n) * t + pos) * d;
            let (c, s) = (&cos[angles..angles + d], &sin[angles..angles + d]);
            let input = &x[row_index * d..(row_index + 1) * d];
            for i in 0..half {
                row[i] = input[i] * c[i] + -input[i + half] * s[i];
                row[i + half] = input[i + half] * c[i + half] + input[i] * s[i + half];
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    /// RoPE is a rotation by `θ` of each pair of halves: its transpose rotates by `−θ`,
    /// `g·cos − rotate_half(g·sin)`, which with equal halves is RoPE with `−sin`.
    fn bwd(
        &self,
        _: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(rope(g, cos, &sin.neg()?)?), None, None))
    }
}
