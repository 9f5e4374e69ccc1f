//! Where a pass's queries and keys sit: each sequence's RoPE positions and which keys
//! each query may attend to.

use candle_core::{DType, Device, Tensor};
use flexmodel_actors::Window;

use crate::Result;
use crate::models::RopeScaling;
use crate::models::parallel::compute_dtype;
use crate::models::rope::{Rope, inverse_frequencies};

/// How a layer places its queries and keys: its RoPE and which keys a query sees.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionSpec {
    /// The width of one head, all of which RoPE rotates.
    pub d_head: usize,
    /// RoPE's base frequency.
    pub rope_theta: f64,
    /// How RoPE's frequencies are scaled for long contexts, if at all.
    pub rope_scaling: Option<RopeScaling>,
    /// The context the model was trained for (what the scalings scale from).
    pub max_position_embeddings: usize,
    /// A query at index `i` attends only to keys at indices above `i − w`; `None` for
    /// full causal attention.
    pub sliding_window: Option<usize>,
    /// The dtype the weights are held in (the pass computes in it, or in f32 on the CPU).
    pub dtype: DType,
}

/// The positions of one pass over `[b, t]` tokens, of which the `offset` before come from
/// the key/value cache.
#[derive(Debug, Clone)]
pub struct Positions {
    /// The rotations of each query and key of the pass.
    pub rope: Rope,
    /// Added to the attention scores: 0 where a query may attend to a key, −∞ where not;
    /// `[t, offset + t]` (the same for every sequence) or `[b, 1, t, offset + t]`.
    pub mask: Tensor,
    /// The sliding window a query attends within, if any: the key/value cache may drop
    /// what falls out of it.
    pub window: Option<usize>,
}

impl Positions {
    /// The positions of a pass of `window` over `b` sequences of `t` tokens, in the dtype
    /// the pass computes in on `device`.
    ///
    /// Without padding, position `p` of the pass attends to keys `0..=p` and has RoPE
    /// position `p`. With padding (a mask), a query attends to the real keys before it
    /// and to itself (a padded query only to itself, so that every row of the scores has
    /// a finite entry), and its RoPE position counts the real tokens before it. With a
    /// sliding window of `w` (Mistral), a query at index `i` of the sequence (cached
    /// keys included) attends only to keys at indices above `i − w`, as `transformers`
    /// masks it. RoPE's frequencies follow `spec`'s scaling.
    pub fn new(
        window: &Window,
        shape: (usize, usize),
        spec: &PositionSpec,
        device: &Device,
    ) -> Result<Self> {
        let positions = Self::in_f32(window, shape, spec, device)?;
        let dtype = compute_dtype(spec.dtype, device);
        if dtype == DType::F32 {
            return Ok(positions);
        }
        Ok(Self {
            rope: positions.rope.to_dtype(dtype)?,
            mask: positions.mask.to_dtype(dtype)?,
            ..positions
        })
    }

    fn in_f32(
        window: &Window,
        (b, t): (usize, usize),
        spec: &PositionSpec,
        device: &Device,
    ) -> Result<Self> {
        let (offset, keys) = (window.offset, window.offset + t);
        let in_window = |q: usize, k: usize| spec.sliding_window.is_none_or(|w| q - k < w);
        let rope = |positions: Vec<u32>, n: usize| -> Result<Rope> {
            let reach = positions.iter().max().map_or(0, |&p| p as usize + 1);
            let frequencies = inverse_frequencies(
                spec.d_head,
                spec.rope_theta,
                spec.rope_scaling.as_ref(),
                reach,
                spec.max_position_embeddings,
            );
            Rope::at(&Tensor::from_vec(positions, (n, t), device)?, &frequencies)
        };
        let Some(mask) = &window.mask else {
            let positions: Vec<u32> = (offset..keys).map(|p| p as u32).collect();
            let allowed = |q: usize, k: usize| k <= offset + q && in_window(offset + q, k);
            let mask = additive_mask(t, keys, allowed);
            return Ok(Self {
                rope: rope(positions, 1)?,
                mask: Tensor::from_vec(mask, (t, keys), device)?,
                window: spec.sliding_window,
            });
        };
        let real = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut positions = Vec::with_capacity(b * t);
        let mut masks = Vec::with_capacity(b * t * keys);
        for row in &real {
            // A real token's position is the number of real tokens before it.
            let mut seen = 0u32;
            let row_positions: Vec<u32> = row
                .iter()
                .map(|&m| {
                    seen += u32::from(m != 0.0);
                    seen.saturating_sub(1)
                })
                .collect();
            positions.extend_from_slice(&row_positions[offset..]);
            let allowed = |q: usize, k: usize| {
                let q = offset + q;
                k == q || (k < q && row[k] != 0.0 && in_window(q, k))
            };
            masks.extend(additive_mask(t, keys, allowed));
        }
        Ok(Self {
            rope: rope(positions, b)?,
            mask: Tensor::from_vec(masks, (b, 1, t, keys), device)?,
            window: spec.sliding_window,
        })
    }
}

/// `[t, keys]`: 0 where `allowed(query, key)`, −∞ elsewhere.
fn additive_mask(t: usize, keys: usize, allowed: impl Fn(usize, usize) -> bool) -> Vec<f32> {
    (0..t)
        .flat_map(|q| (0..keys).map(move |k| (q, k)))
        .map(|(q, k)| {
            if allowed(q, k) {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect()
}
