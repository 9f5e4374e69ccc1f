//! Attention scores, scaled and masked.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use crate::rows::{for_each_row, slice};

/// `scores · scale + mask` for `scores` of shape `[b, heads, t, keys]` and an additive
/// `mask` of shape `[t, keys]` (every sequence alike) or `[b, 1, t, keys]`.
pub fn scaled_masked(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, _, t, keys) = scores.dims4()?;
    let per_sequence = match mask.dims() {
        [mt, mk] if (*mt, *mk) == (t, keys) => false,
        [mb, 1, mt, mk] if (*mb, *mt, *mk) == (b, t, keys) => true,
        other => candle_core::bail!(
            "scaled_masked: scores {:?} need a mask of [{t}, {keys}] or [{b}, 1, {t}, {keys}], not {other:?}",
            scores.dims()
        ),
    };
    if !crate::fusable(&[scores, mask]) {
        return crate::composed::scaled_masked(scores, mask, scale);
    }
    let op = ScaledMasked {
        scale: scale as f32,
        per_sequence,
    };
    scores.contiguous()?.apply_op2(&mask.contiguous()?, op)
}

struct ScaledMasked {
    scale: f32,
    per_sequence: bool,
}

impl CustomOp2 for ScaledMasked {
    fn name(&self) -> &'static str {
        "fused-scaled-masked"
    }

    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (scores, mask) = (slice(ss, sl, self.name())?, slice(ms, ml, self.name())?);
        let &[_, heads, t, keys] = sl.dims() else {
            candle_core::bail!("scaled_masked: scores must have four dimensions");
        };
        let mut out = vec![0f32; scores.len()];
        for_each_row(&mut out, keys, 2 * keys, |r, row| {
            let (seq, query) = (r / (heads * t), r % t);
            let m = match self.per_sequence {
                true => (seq * t + query) * keys,
                false => query * keys,
            };
            let input = &scores[r * keys..(r + 1) * keys];
            for ((o, &s), &m) in row.iter_mut().zip(input).zip(&mask[m..m + keys]) {
                *o = s * self.scale + m;
            }
        });
        Ok((CpuStorage::F32(out), sl.shape().clone()))
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((grad * f64::from(self.scale))?), None))
    }
}
