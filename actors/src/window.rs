//! Where one pass's tokens sit in their sequences: which are padding, how many
//! positions came before, and the key/value cache that holds those.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How a pass uses the shards' key/value cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheUse {
    /// No cache: the pass attends to its own positions only (and a cache left from a
    /// generation is dropped).
    #[default]
    Off,
    /// Start a new cache with this pass's keys and values (a generation's prefill).
    Start,
    /// Attend to the cached positions as well, then append this pass's (a decoding step).
    Extend,
}

/// Which positions of a batch are real tokens, and where a pass's own positions start.
///
/// A pass computes positions `offset .. offset + t` of every sequence; the `offset`
/// before them are in the key/value cache. Positions count real tokens only: a
/// sequence's `i`-th real token has position `i` (its RoPE angle), whatever padding
/// comes before it.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// `[b, offset + t]` f32: 1 for a real token, 0 for padding, over every position up
    /// to the pass's last; `None` when every token is real.
    pub mask: Option<Tensor>,
    /// The positions before the pass's first (those in the cache).
    pub offset: usize,
    /// How the pass uses the key/value cache.
    pub cache: CacheUse,
}

impl Window {
    /// A pass over whole sequences of real tokens, without a cache.
    pub const DENSE: Window = Window {
        mask: None,
        offset: 0,
        cache: CacheUse::Off,
    };

    /// This window for the sequences `rows` of the batch (a data-parallel replica's).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Result<Window> {
        let mask = match &self.mask {
            Some(mask) => Some(mask.narrow(0, rows.start, rows.len())?.contiguous()?),
            None => None,
        };
        Ok(Window {
            mask,
            offset: self.offset,
            cache: self.cache,
        })
    }

    /// Checks the mask against a pass over `b` sequences of `t` positions: `[b,
    /// offset + t]`, zeros and ones only, and a real token in every sequence.
    pub fn check(&self, b: usize, t: usize) -> Result<()> {
        let Some(mask) = &self.mask else {
            return Ok(());
        };
        let bad = |problem: String| Error::BadWindow { problem };
        if mask.dims() != [b, self.offset + t] {
            return Err(bad(format!(
                "the attention mask is {:?}, but the pass has {b} sequences of {} positions",
                mask.dims(),
                self.offset + t
            )));
        }
        let rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        if rows.iter().flatten().any(|&m| m != 0.0 && m != 1.0) {
            return Err(bad(
                "the attention mask holds values other than 0 and 1".into()
            ));
        }
        if let Some(i) = rows.iter().position(|row| row.iter().all(|&m| m == 0.0)) {
            return Err(bad(format!("sequence {i} of the batch has no real token")));
        }
        Ok(())
    }
}

/// The keys and values one shard computed for the positions so far, by layer: what a
/// decoding step attends to besides its own position.
#[derive(Debug, Default)]
pub struct KvCache {
    /// By layer: keys and values `[b, kv_heads, positions, d_head]`.
    layers: std::collections::BTreeMap<usize, (Tensor, Tensor)>,
}

impl KvCache {
    /// The positions cached (those of the first cached layer; every layer has as many).
    pub fn positions(&self) -> usize {
        self.layers
            .values()
            .next()
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// Appends `k` and `v` (`[b, kv_heads, t, d_head]`, detached) to `layer`'s cache;
    /// returns the whole keys and values cached for it, this pass's included.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = (k.detach(), v.detach());
        let whole = match self.layers.remove(&layer) {
            None => (k, v),
            Some((old_k, old_v)) => (
                Tensor::cat(&[&old_k, &k], 2)?,
                Tensor::cat(&[&old_v, &v], 2)?,
            ),
        };
        self.layers.insert(layer, whole.clone());
        Ok(whole)
    }

    /// Checks that a pass of `window` can use this cache: a decoding step must start
    /// where the cache ends.
    pub fn check(&self, window: &Window) -> Result<()> {
        let cached = self.positions();
        match window.cache {
            CacheUse::Extend if cached != window.offset => Err(Error::BadWindow {
                problem: format!(
                    "the key/value cache holds {cached} positions, but the pass starts at position {}",
                    window.offset
                ),
            }),
            CacheUse::Off | CacheUse::Start if window.offset != 0 => Err(Error::BadWindow {
                problem: format!(
                    "a pass without a cache starts at position 0, not {}",
                    window.offset
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.layers.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_cache_grows_along_positions_and_checks_where_a_step_starts() {
        let mut cache = KvCache::default();
        let step = |t| Tensor::ones((2, 3, t, 4), DType::F32, &Device::Cpu).unwrap();
        let (k, v) = cache.append(0, &step(5), &step(5)).unwrap();
        assert_eq!((k.dims(), v.dims()), (&[2, 3, 5, 4][..], &[2, 3, 5, 4][..]));
        let (k, _) = cache.append(0, &step(1), &step(1)).unwrap();
        assert_eq!(k.dims(), [2, 3, 6, 4]);
        assert_eq!(cache.positions(), 6);
        let extend = |offset| Window {
            mask: None,
            offset,
            cache: CacheUse::Extend,
        };
        assert!(cache.check(&extend(6)).is_ok());
        let err = cache.check(&extend(5)).unwrap_err().to_string();
        assert!(
            err.contains("holds 6 positions, but the pass starts at position 5"),
            "{err}"
        );
        cache.clear();
        assert_eq!(cache.positions(), 0);
    }

    #[test]
    fn masks_must_cover_the_pass_with_a_real_token_in_every_sequence() {
        let window = |rows: &[[f32; 3]]| Window {
            mask: Some(Tensor::from_vec(rows.concat(), (rows.len(), 3), &Device::Cpu).unwrap()),
            ..Window::DENSE
        };
        assert!(window(&[[0., 1., 1.], [1., 1., 1.]]).check(2, 3).is_ok());
        let err = |w: Window, b, t| w.check(b, t).unwrap_err().to_string();
        assert!(err(window(&[[0., 1., 1.]]), 2, 3).contains("2 sequences of 3 positions"));
        assert!(
            err(window(&[[0., 0., 0.]]), 1, 3)
                .contains("sequence 0 of the batch has no real token")
        );
        assert!(err(window(&[[0., 2., 1.]]), 1, 3).contains("other than 0 and 1"));
    }
}
