//! The attention's weighted sum of values.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use crate::rows::{for_each_row, slice};
use crate::with_fma;

/// Output columns a row's inner loop sums at once (a multiple of 8 lanes).
const WIDTH: usize = 64;

/// `pattern · v` for `pattern` of shape `[b, h, m, keys]` and `v` of `[b, h, keys, d]`:
/// each output element is summed over the keys in their order, skipping keys of weight
/// 0. So a query's result depends only on the keys it attends to: keys masked after
/// them (padding on the right, a longer batch) change no bit of it, which a blocked
/// matrix product does not promise.
pub fn attend(pattern: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, _, keys) = pattern.dims4()?;
    let (vb, vh, vkeys, _) = v.dims4()?;
    if (vb, vh, vkeys) != (b, h, keys) {
        candle_core::bail!(
            "attend: a pattern of {:?} needs values of [{b}, {h}, {keys}, d], not {:?}",
            pattern.dims(),
            v.dims()
        );
    }
    if !crate::fusable(&[pattern, v]) {
        return crate::composed::attend(pattern, v);
    }
    pattern.contiguous()?.apply_op2(&v.contiguous()?, Attend)
}

struct Attend;

impl CustomOp2 for Attend {
    fn name(&self) -> &'static str {
        "fused-attend"
    }

    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (pattern, values) = (slice(ps, pl, self.name())?, slice(vs, vl, self.name())?);
        let (&[b, h, m, keys], &[.., d]) = (pl.dims(), vl.dims()) else {
            candle_core::bail!("attend: the pattern and values must have four dimensions");
        };
        let mut out = vec![0f32; b * h * m * d];
        for_each_row(&mut out, d, keys * d, |r, row| {
            let block = r / m;
            let weights = &pattern[r * keys..(r + 1) * keys];
            let values = &values[block * keys * d..(block + 1) * keys * d];
            with_fma!(attend_row(row, weights, values))
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, m, d))))
    }

    fn bwd(
        &self,
        pattern: &Tensor,
        v: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_pattern = grad.matmul(&v.t()?)?;
        let grad_v = pattern.t()?.matmul(grad)?;
        Ok((Some(grad_pattern), Some(grad_v)))
    }
}

/// One query's output: the `weights`' sum of the rows of `values` (`[keys, d]`), by
/// fused multiply-adds, [`WIDTH`] columns at a time.
#[inline(always)]
fn attend_row(row: &mut [f32], weights: &[f32], values: &[f32]) {
    let d = row.len();
    let mut columns = row.chunks_exact_mut(WIDTH);
    for (c, out) in (&mut columns).enumerate() {
        let mut sums = [0f32; WIDTH];
        for (k, &w) in weights.iter().enumerate() {
            if w == 0.0 {
                continue;
            }
            let at = k * d + c * WIDTH;
            for (s, &x) in sums.iter_mut().zip(&values[at..at + WIDTH]) {
                *s = w.mul_add(x, *s);
            }
        }
        out.copy_from_slice(&sums);
    }
    let rest = columns.into_remainder();
    let (first, n) = (d - rest.len(), rest.len());
    for (k, &w) in weights.iter().enumerate() {
        if w == 0.0 {
            continue;
        }
        let at = k * d + first;
        for (o, &x) in rest.iter_mut().zip(&values[at..at + n]) {
            *o = w.mul_add(x, *o);
        }
    }
}
