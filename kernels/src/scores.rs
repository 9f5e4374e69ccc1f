//! Attention scores, scaled and masked.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::rows::{for_each_row, slice};
use crate::with_fma;

/// Keys a row's inner loop takes at once (a multiple of 8 lanes).
const KEYS_AT_ONCE: usize = 64;

/// `q · kᵀ · scale + mask` for queries `q` of shape `[b, h, m, d]` and keys `k` of
/// `[b, h, keys, d]`, the `m` rows of each head being `m / t` groups of the `t` queries
/// (grouped-query attention), and an additive `mask` of `[t, keys]` (every sequence
/// alike) or `[b, 1, t, keys]`. Each score is summed over `d` in order and a masked
/// one (−∞) is not computed: a score depends on its query and key alone, whatever
/// else the batch holds, which a blocked matrix product does not promise.
pub fn scores(q: &Tensor, k: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, m, d) = q.dims4()?;
    let (kb, kh, keys, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) {
        candle_core::bail!(
            "scores: queries of {:?} need keys of [{b}, {h}, keys, {d}], not {:?}",
            q.dims(),
            k.dims()
        );
    }
    let t = match mask.dims() {
        [mt, mk] if *mk == keys && *mt > 0 && m % mt == 0 => *mt,
        [mb, 1, mt, mk] if *mb == b && *mk == keys && *mt > 0 && m % mt == 0 => *mt,
        other => candle_core::bail!(
            "scores: queries {:?} and keys {:?} need a mask of [t, {keys}] or [{b}, 1, t, {keys}] with t dividing {m}, not {other:?}",
            q.dims(),
            k.dims()
        ),
    };
    if !crate::fusable(&[q, k, mask]) {
        return crate::composed::scores(q, k, mask, scale);
    }
    let op = Scores {
        scale: scale as f32,
        t,
        per_sequence: mask.rank() == 4,
    };
    // Keys transposed, so that a query's scores against consecutive keys are lanes.
    let keys_by_dim = k.t()?.contiguous()?;
    q.contiguous()?
        .apply_op3(&keys_by_dim, &mask.contiguous()?, op)
}

struct Scores {
    scale: f32,
    t: usize,
    per_sequence: bool,
}

impl CustomOp3 for Scores {
    fn name(&self) -> &'static str {
        "fused-scores"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (q, k, mask) = (
            slice(qs, ql, name)?,
            slice(ks, kl, name)?,
            slice(ms, ml, name)?,
        );
        let (&[b, h, m, d], &[.., keys]) = (ql.dims(), kl.dims()) else {
            candle_core::bail!("scores: the queries and keys must have four dimensions");
        };
        let t = self.t;
        let mut out = vec![0f32; b * h * m * keys];
        for_each_row(&mut out, keys, d * keys, |r, row| {
            let block = r / m;
            let (seq, query) = (r / (h * m), r % t);
            let mask_at = match self.per_sequence {
                true => (seq * t + query) * keys,
                false => query * keys,
            };
            let mask = &mask[mask_at..mask_at + keys];
            let query = &q[r * d..(r + 1) * d];
            let keys_by_dim = &k[block * d * keys..(block + 1) * d * keys];
            let scale = self.scale;
            with_fma!(score_row(row, query, keys_by_dim, mask, scale))
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, m, keys))))
    }

    /// The gradients of the queries and keys; the mask has none.
    fn bwd(
        &self,
        q: &Tensor,
        keys_by_dim: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = (grad * f64::from(self.scale))?;
        let grad_q = grad.matmul(&keys_by_dim.t()?)?;
        // The gradient of the transposed keys, `qᵀ · grad`, is [b, h, d, keys].
        let grad_keys_by_dim = q.t()?.matmul(&grad)?;
        Ok((Some(grad_q), Some(grad_keys_by_dim), None))
    }
}

/// One query's scores against `keys` keys (`keys_by_dim` is `[d, keys]`), blocks of
/// [`KEYS_AT_ONCE`] at a time, each score summed over `d` by fused multiply-adds.
#[inline(always)]
fn score_row(row: &mut [f32], query: &[f32], keys_by_dim: &[f32], mask: &[f32], scale: f32) {
    let keys = row.len();
    for first in (0..keys).step_by(KEYS_AT_ONCE) {
        let n = KEYS_AT_ONCE.min(keys - first);
        let (mask, row) = (&mask[first..first + n], &mut row[first..first + n]);
        if mask.iter().all(|&m| m == f32::NEG_INFINITY) {
            row.fill(f32::NEG_INFINITY);
            continue;
        }
        let mut sums = [0f32; KEYS_AT_ONCE];
        for (i, &x) in query.iter().enumerate() {
            let at = i * keys + first;
            for (s, &y) in sums.iter_mut().zip(&keys_by_dim[at..at + n]) {
                *s = x.mul_add(y, *s);
            }
        }
        for ((o, &s), &m) in row.iter_mut().zip(&sums).zip(mask) {
            *o = match m == f32::NEG_INFINITY {
                true => m,
                false => s * scale + m,
            };
        }
    }
}
