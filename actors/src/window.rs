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

/// Which logits a pass returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Logits {
    /// Every position's: `[b, t, vocab]`.
    #[default]
    All,
    /// The last position's only: `[b, 1, vocab]`.
    Last,
    /// None: the pass computes no LM head.
    None,
}

/// How much of the model a pass runs and what it returns. The model reads it; the
/// runtime learns only where the pass ends and what it gathers ([`PassEnd`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassScope {
    /// Run the blocks below this layer only, and return the residual stream there
    /// (TransformerLens's `stop_at_layer`); no final norm, logits or loss.
    pub stop_at_layer: Option<usize>,
    /// Which logits a pass that runs to the end returns.
    pub logits: Logits,
}

impl PassScope {
    /// The whole model, every position's logits.
    pub const FULL: PassScope = PassScope {
        stop_at_layer: None,
        logits: Logits::All,
    };
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
    /// How much of the model the pass runs.
    pub scope: PassScope,
}

impl Window {
    /// A pass over whole sequences of real tokens, without a cache.
    pub const DENSE: Window = Window {
        mask: None,
        offset: 0,
        cache: CacheUse::Off,
        scope: PassScope::FULL,
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
            scope: self.scope,
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
///
/// Each layer's keys and values live in buffers with room for more positions than are
/// cached; a step writes its own into the room left, and a full buffer grows to twice
/// its positions (in whole chunks of [`KvCache::CHUNK`]), so a generation of `n` tokens
/// copies O(n) positions in all instead of the O(n²) of growing by concatenation.
///
/// A layer that attends within a sliding window of `w` keys (Gemma's local layers,
/// Mistral) keeps only the last `w − 1` positions a later query can reach: when its
/// buffer is full it moves those to the front instead of growing, so it never holds
/// more than about `2w` positions however long the generation.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: std::collections::BTreeMap<usize, LayerCache>,
}

/// One layer's cached keys and values.
#[derive(Debug)]
struct LayerCache {
    /// Keys and values, `[b, kv_heads, capacity, d_head]`: buffer index `i` holds
    /// position `first + i`, for positions `first..len`.
    keys: Tensor,
    values: Tensor,
    /// The first position held (0 unless a sliding window dropped earlier ones).
    first: usize,
    /// The positions seen: one past the last held.
    len: usize,
}

impl LayerCache {
    /// Room for `positions` of keys and values shaped like `k` and `v`, holding the
    /// positions of `old` from `first` on.
    fn with_room(
        k: &Tensor,
        v: &Tensor,
        positions: usize,
        old: Option<Self>,
        first: usize,
    ) -> Result<Self> {
        let buffer = |t: &Tensor| -> Result<Tensor> {
            let (b, heads, _, d) = t.dims4()?;
            Ok(Tensor::zeros(
                (b, heads, positions, d),
                t.dtype(),
                t.device(),
            )?)
        };
        let (keys, values) = (buffer(k)?, buffer(v)?);
        let Some(old) = old else {
            return Ok(Self {
                keys,
                values,
                first: 0,
                len: 0,
            });
        };
        let (from, kept) = (first - old.first, old.len - first);
        keys.slice_set(&old.keys.narrow(2, from, kept)?, 2, 0)?;
        values.slice_set(&old.values.narrow(2, from, kept)?, 2, 0)?;
        Ok(Self {
            keys,
            values,
            first,
            len: old.len,
        })
    }

    fn capacity(&self) -> usize {
        self.keys.dim(2).unwrap_or(0)
    }

    /// The positions held.
    fn held(&self) -> usize {
        self.len - self.first
    }
}

/// The keys and values a pass's queries attend to in one layer: this pass's and the
/// cached ones before them, from position `first` on.
#[derive(Debug, Clone)]
pub struct CachedKeys {
    /// `[b, kv_heads, positions, d_head]`.
    pub keys: Tensor,
    /// `[b, kv_heads, positions, d_head]`.
    pub values: Tensor,
    /// The position of the first key: 0, unless a sliding window dropped earlier ones.
    pub first: usize,
}

impl KvCache {
    /// The positions a layer's buffers grow by, at the least.
    pub const CHUNK: usize = 256;

    /// The positions cached (those of the first cached layer; every layer has as many).
    pub fn positions(&self) -> usize {
        self.layers.values().next().map_or(0, |c| c.len)
    }

    /// Appends `k` and `v` (`[b, kv_heads, t, d_head]`, detached) to `layer`'s cache;
    /// returns the keys and values cached for it, this pass's included (views of the
    /// layer's buffers). With a sliding `window` of `w` keys, positions that no later
    /// query can reach (all but the last `w − 1`) may be dropped: the returned keys
    /// start at [`CachedKeys::first`], never after the first this pass's queries reach.
    pub fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        window: Option<usize>,
    ) -> Result<CachedKeys> {
        let (k, v) = (k.detach().contiguous()?, v.detach().contiguous()?);
        let t = k.dim(2)?;
        if let Some(cache) = self.layers.get(&layer) {
            let others = |t: &Tensor| [t.dim(0), t.dim(1), t.dim(3)].map(|d| d.unwrap_or(0));
            if others(&k) != others(&cache.keys) || others(&v) != others(&cache.values) {
                return Err(Error::BadWindow {
                    problem: format!(
                        "layer {layer}'s cache holds keys {:?} and values {:?}, and cannot take {:?} and {:?}",
                        cache.keys.dims(),
                        cache.values.dims(),
                        k.dims(),
                        v.dims()
                    ),
                });
            }
        }
        let cache = match self.layers.remove(&layer) {
            Some(cache) if cache.held() + t <= cache.capacity() => cache,
            old => {
                let len = old.as_ref().map_or(0, |c| c.len);
                // What a later query can still reach: the last `w − 1` positions.
                let first = match (window, &old) {
                    (Some(w), Some(old)) => len.saturating_sub(w - 1).max(old.first),
                    _ => old.as_ref().map_or(0, |c| c.first),
                };
                let kept = len - first;
                let room = (2 * kept).max(kept + t).next_multiple_of(Self::CHUNK);
                LayerCache::with_room(&k, &v, room, old, first)?
            }
        };
        let held = cache.held();
        cache.keys.slice_set(&k, 2, held)?;
        cache.values.slice_set(&v, 2, held)?;
        let cached = CachedKeys {
            keys: cache.keys.narrow(2, 0, held + t)?,
            values: cache.values.narrow(2, 0, held + t)?,
            first: cache.first,
        };
        self.layers.insert(
            layer,
            LayerCache {
                len: cache.len + t,
                ..cache
            },
        );
        Ok(cached)
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
        let cached = cache.append(0, &step(5), &step(5), None).unwrap();
        let (k, v) = (cached.keys, cached.values);
        assert_eq!((k.dims(), v.dims()), (&[2, 3, 5, 4][..], &[2, 3, 5, 4][..]));
        let k = cache.append(0, &step(1), &step(1), None).unwrap().keys;
        assert_eq!(k.dims(), [2, 3, 6, 4]);
        assert_eq!(cache.positions(), 6);
        let extend = |offset| Window {
            offset,
            cache: CacheUse::Extend,
            ..Window::DENSE
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
    fn the_cache_holds_every_step_in_order_as_its_buffers_grow() {
        let mut cache = KvCache::default();
        let step = |first: usize, t: usize| {
            let values: Vec<f32> = (0..2 * t * 3).map(|i| (first * 1000 + i) as f32).collect();
            Tensor::from_vec(values, (1, 2, t, 3), &Device::Cpu).unwrap()
        };
        let mut steps = vec![step(0, 300)];
        cache.append(4, &steps[0], &steps[0], None).unwrap();
        for position in 300..800 {
            steps.push(step(position, 1));
            let last = steps.last().unwrap();
            let cached = cache.append(4, last, &(last * 2.0).unwrap(), None).unwrap();
            let (k, v) = (cached.keys, cached.values);
            assert_eq!(k.dims(), [1, 2, position + 1, 3]);
            let expected = Tensor::cat(&steps, 2).unwrap();
            let same = |a: &Tensor, b: &Tensor| {
                let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                d.to_scalar::<f32>().unwrap() == 0.0
            };
            assert!(same(&k, &expected), "keys at {position}");
            let tail = v.narrow(2, 300, position - 299).unwrap();
            let doubled = (expected.narrow(2, 300, position - 299).unwrap() * 2.0).unwrap();
            assert!(same(&tail, &doubled), "values at {position}");
        }
        // 300 positions took 512 (two chunks), then 1024 once 512 were full.
        assert_eq!(cache.layers[&4].capacity(), 1024);
        let wrong = Tensor::zeros((2, 2, 1, 3), DType::F32, &Device::Cpu).unwrap();
        let err = cache
            .append(4, &wrong, &wrong, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot take [2, 2, 1, 3]"), "{err}");
        assert_eq!(
            cache.positions(),
            800,
            "a refused step leaves the cache as it was"
        );
    }

    #[test]
    fn a_windowed_layer_keeps_what_later_queries_reach_and_no_more() {
        let (w, mut cache) = (100, KvCache::default());
        let step = |first: usize, t: usize| {
            let values: Vec<f32> = (first..first + t).map(|p| p as f32).collect();
            Tensor::from_vec(values, (1, 1, t, 1), &Device::Cpu).unwrap()
        };
        // A prompt longer than the window, then one position at a time.
        let prompt = step(0, 150);
        let cached = cache.append(0, &prompt, &prompt, Some(w)).unwrap();
        assert_eq!((cached.first, cached.keys.dim(2).unwrap()), (0, 150));
        for position in 150..2000 {
            let one = step(position, 1);
            let cached = cache.append(0, &one, &one, Some(w)).unwrap();
            let held = cached.keys.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let expected: Vec<f32> = (cached.first..=position).map(|p| p as f32).collect();
            assert_eq!(held, expected, "at {position}");
            // The query at `position` reaches back to `position − w + 1`.
            assert!(cached.first <= position + 1 - w, "at {position}");
            assert!(cache.layers[&0].capacity() <= 2 * KvCache::CHUNK);
        }
        assert_eq!(cache.positions(), 2000);
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
