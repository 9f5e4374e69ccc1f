//! Row-parallel loops over contiguous float32 storage.

use candle_core::{CpuStorage, Layout, Result};
use rayon::prelude::*;

/// Elements below which a kernel runs on the calling thread alone.
const PARALLEL_MIN: usize = 32 * 1024;

/// The float32 elements `layout` covers in `storage`, which must be contiguous.
pub(crate) fn slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: the fused kernel takes float32");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the fused kernel takes contiguous tensors");
    };
    Ok(&data[start..end])
}

/// `out` filled by `f(row_index, out_row)` for every row of `width` elements, each row
/// reading `reads` input elements; the rows are split over rayon's pool when there is
/// enough work.
pub(crate) fn for_each_row(
    out: &mut [f32],
    width: usize,
    reads: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) {
    if width == 0 {
        return;
    }
    let rows = out.len() / width;
    if rows * reads.max(width) < PARALLEL_MIN {
        out.chunks_mut(width)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
        return;
    }
    // Enough rows per task that each reads at least PARALLEL_MIN / 4 elements.
    let rows_per_task = (PARALLEL_MIN / 4).div_ceil(reads.max(width)).max(1);
    out.par_chunks_mut(rows_per_task * width)
        .enumerate()
        .for_each(|(task, rows)| {
            for (i, row) in rows.chunks_mut(width).enumerate() {
                f(task * rows_per_task + i, row);
            }
        });
}

/// Σ `f(v)` over `values`, in 16 lanes so that the compiler vectorizes the loop (a
/// single running sum must add in order, one element at a time). Element `i` always
/// adds into lane `i mod 16`, so zeros after the values change no bit of the sum.
#[inline(always)]
pub(crate) fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = values.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    for (lane, &v) in lanes.iter_mut().zip(rest) {
        *lane += f(v);
    }
    lanes.iter().sum::<f32>()
}

/// The largest of `values` (−∞ for none), in 16 lanes as [`lane_sum`].
#[inline(always)]
pub(crate) fn lane_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = values.chunks_exact(16);
    let rest = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    lanes.iter().copied().fold(rest, f32::max)
}

/// `f()`, compiled for AVX2 and FMA where the CPU has them (the row loops then run
/// 8 lanes wide), else for the baseline x86-64 or the target's own features.
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        /// `f()` with AVX2 and FMA enabled for everything inlined into it.
        ///
        /// # Safety
        /// The CPU must have AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: both features were just detected.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `$f($args...)` for an `#[inline(always)]` function `$f`, compiled with AVX2 and FMA
/// where the CPU has them (so that `mul_add` is one instruction, not a call), else as
/// it is. Unlike [`simd`], which takes a closure that the compiler may leave out of
/// line, a function marked `#[inline(always)]` is always compiled into the AVX2 copy.
#[macro_export]
#[doc(hidden)]
macro_rules! with_fma {
    ($f:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            /// `$f` with AVX2 and FMA.
            ///
            /// # Safety
            /// The CPU must have AVX2 and FMA.
            #[target_feature(enable = "avx2,fma")]
            unsafe fn fast(f: impl FnOnce()) {
                f()
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: both features were just detected.
                unsafe { fast(|| $f($($arg),*)) }
            } else {
                $f($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        $f($($arg),*)
    }};
}
