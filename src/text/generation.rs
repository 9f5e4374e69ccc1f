//! Generation: decoding a batch of prompts (greedy, or sampled), through the key/value
//! cache and the registered hooks.
//!
//! The prompts form one left-padded batch. With the cache, the prefill is one pass over
//! the prompts and each decoding step is one pass over one new position per sequence;
//! every hook point is called once per pass. Without it, every step runs the whole
//! sequence again. Either way the generation's captures, joined along positions, equal
//! the captures of one forward pass over the final sequence without its last token.

use std::time::{Duration, Instant};

use candle_core::{D, DType, Device, Tensor};
use flexmodel_actors::{CacheUse, PassScope, Window};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::hooks::ModelPoints;
use crate::hooks::store::zero_padding;
use crate::text::{PAD_TOKEN, TokenBatch};
use crate::{ActivationStore, Error, FlexModel, Groups, HookPoint, Result};

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// The most tokens to generate per sequence (at least 1).
    pub max_new_tokens: usize,
    /// Decode through the key/value cache (`false` recomputes every position at every
    /// step: the check).
    pub kv_cache: bool,
    /// Stop a sequence at an end-of-sequence token of the model (it keeps being padded
    /// while the others go on).
    pub stop_at_eos: bool,
    /// The registered hooks that run.
    pub groups: Groups,
    /// How each next token is chosen.
    pub decoding: Decoding,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            kv_cache: true,
            stop_at_eos: true,
            groups: Groups::All,
            decoding: Decoding::Greedy,
        }
    }
}

/// How a generation chooses each next token from the logits at a sequence's last
/// position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decoding {
    /// The most likely token.
    Greedy,
    /// A token drawn from the softmax of the logits divided by `temperature`, among the
    /// most likely tokens whose probabilities first reach `top_p` together (nucleus
    /// sampling), by a generator seeded with `seed`.
    Sample {
        /// Above 0: below 1 sharpens, above 1 flattens the distribution.
        temperature: f64,
        /// In (0, 1]: 1 keeps every token.
        top_p: f64,
        /// The seed of the generator: the same seed, the same tokens.
        seed: u64,
    },
}

impl Decoding {
    /// Checks the parameters of sampling.
    pub fn check(self) -> Result<()> {
        let Decoding::Sample {
            temperature, top_p, ..
        } = self
        else {
            return Ok(());
        };
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(Error::InvalidArgument {
                argument: "temperature",
                problem: format!("must be a number above 0, not {temperature}"),
            });
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Error::InvalidArgument {
                argument: "top_p",
                problem: format!("must be in (0, 1], not {top_p}"),
            });
        }
        Ok(())
    }
}

/// Chooses the next token of every sequence from `logits` (`[b, vocab]`).
struct Chooser {
    decoding: Decoding,
    rng: StdRng,
}

impl Chooser {
    fn new(decoding: Decoding) -> Self {
        let seed = match decoding {
            Decoding::Sample { seed, .. } => seed,
            Decoding::Greedy => 0,
        };
        Self {
            decoding,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn choose(&mut self, logits: &Tensor) -> Result<Vec<u32>> {
        match self.decoding {
            Decoding::Greedy => Ok(logits.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1()?),
            Decoding::Sample {
                temperature, top_p, ..
            } => {
                let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                Ok(rows
                    .iter()
                    .map(|row| sample(row, temperature, top_p, &mut self.rng))
                    .collect())
            }
        }
    }
}

/// A token drawn from `softmax(logits / temperature)` restricted to its top-`top_p` mass.
fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut StdRng) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut weights: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / temperature).exp()))
        .collect();
    let total: f64 = weights.iter().map(|(_, w)| w).sum();
    weights.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut nucleus = 0;
    for (_, w) in &weights {
        kept += w;
        nucleus += 1;
        if kept >= top_p * total {
            break;
        }
    }
    let mut draw = rng.random::<f64>() * kept;
    for &(token, w) in &weights[..nucleus] {
        if draw < w {
            return token;
        }
        draw -= w;
    }
    weights[nucleus - 1].0
}

/// Why a generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Every sequence got `max_new_tokens` (or stopped at an end-of-sequence token first).
    MaxNewTokens,
    /// Every sequence reached an end-of-sequence token.
    EndOfSequence,
    /// The batch reached the model's context.
    Context,
}

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Each prompt's tokens followed by its generated ones (an end-of-sequence token
    /// included, padding not).
    pub sequences: Vec<Vec<u32>>,
    /// The number of tokens of each prompt.
    pub prompt_lengths: Vec<usize>,
    /// The final batch: the left-padded prompts, the generated tokens, and padding
    /// after the sequences that stopped early.
    pub batch: TokenBatch,
    /// Why it stopped.
    pub stop: Stop,
    /// The wall time of the prefill (the first pass).
    pub prefill: Duration,
    /// The wall time of each decoding step after it.
    pub steps: Vec<Duration>,
}

impl Generation {
    /// The tokens generated for sequence `i`.
    pub fn generated(&self, i: usize) -> &[u32] {
        &self.sequences[i][self.prompt_lengths[i]..]
    }

    /// The wall time of every decoding step together.
    pub fn decode_time(&self) -> Duration {
        self.steps.iter().sum()
    }

    /// The attention mask `[b, T − 1]` of the positions the captures cover: every
    /// position of the final batch but the last.
    pub fn captured_mask(&self) -> Result<Tensor> {
        let mask = self.batch.mask_or_ones()?;
        let t = mask.dim(1)?;
        Ok(mask.narrow(1, 0, t - 1)?)
    }
}

impl FlexModel {
    /// Continues each of `prompts` greedily, running the hooks `options.groups` selects
    /// at every pass; the captures of the whole generation, joined along positions (the
    /// attention scores and patterns as `[b, h, T, T]`), go to the store as one tensor per
    /// hook point, zero at padded positions.
    pub fn generate<P: AsRef<[u32]>>(
        &mut self,
        prompts: &[P],
        options: &GenerateOptions,
    ) -> Result<Generation> {
        self.generate_with(prompts, options, |_| Ok(()))
    }

    /// [`generate`](Self::generate), calling `on_step` after every pass with the token
    /// each sequence got (`None` for sequences already stopped).
    pub fn generate_with<P: AsRef<[u32]>>(
        &mut self,
        prompts: &[P],
        options: &GenerateOptions,
        mut on_step: impl FnMut(&[Option<u32>]) -> Result<()>,
    ) -> Result<Generation> {
        options.decoding.check()?;
        if options.max_new_tokens == 0 {
            return Err(Error::InvalidArgument {
                argument: "max_new_tokens",
                problem: "must be at least 1".into(),
            });
        }
        let prompt_lengths: Vec<usize> = prompts.iter().map(|p| p.as_ref().len()).collect();
        let prompt = TokenBatch::left_padded(prompts)?;
        let (b, t0) = prompt.dims()?;
        let context = self.config().context();
        if t0 > context {
            return Err(Error::SequenceTooLong { len: t0, context });
        }
        let eos = self.config().eos_token_ids().to_vec();
        let mut rows = Rows::new(&prompt)?;
        let mut chooser = Chooser::new(options.decoding);
        let mut finished = vec![false; b];
        let mut steps_captures = Vec::new();
        let (mut prefill, mut steps) = (Duration::ZERO, Vec::new());
        let stop = loop {
            let started = Instant::now();
            let (input, window) = rows.next_pass(options.kv_cache)?;
            let (logits, captures) = self.pass(&input, &window, &options.groups)?;
            let logits = logits.ok_or(Error::Internal("a generation step returned no logits"))?;
            match options.kv_cache {
                true => steps_captures.push(captures),
                false => steps_captures = vec![captures],
            }
            let last = logits.dim(1)? - 1;
            let next = chooser.choose(&logits.narrow(1, last, 1)?.squeeze(1)?)?;
            let got: Vec<Option<u32>> = next
                .iter()
                .zip(&finished)
                .map(|(&token, &done)| (!done).then_some(token))
                .collect();
            rows.push(&got);
            for (done, token) in finished.iter_mut().zip(&got) {
                *done |= options.stop_at_eos && token.is_some_and(|t| eos.contains(&t));
            }
            match rows.len() - t0 {
                1 => prefill = started.elapsed(),
                _ => steps.push(started.elapsed()),
            }
            on_step(&got)?;
            if finished.iter().all(|&f| f) {
                break Stop::EndOfSequence;
            }
            if rows.len() - t0 == options.max_new_tokens {
                break Stop::MaxNewTokens;
            }
            if rows.len() == context {
                tracing::info!(context, "the generation stopped at the model's context");
                break Stop::Context;
            }
        };
        let batch = rows.batch()?;
        let generation = Generation {
            sequences: batch.sequences()?,
            prompt_lengths,
            batch,
            stop,
            prefill,
            steps,
        };
        let joined =
            join_along_positions(self.points(), steps_captures, &generation.captured_mask()?)?;
        self.store_mut().append(joined);
        Ok(generation)
    }
}

/// The growing batch of a generation: token ids and mask by sequence.
struct Rows {
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<f32>>,
    /// Whether any position is padding.
    padded: bool,
    /// Whether a pass ran before (the cache holds the positions so far but the last).
    started: bool,
}

impl Rows {
    fn new(prompt: &TokenBatch) -> Result<Self> {
        Ok(Self {
            ids: prompt.tokens().to_vec2::<u32>()?,
            mask: prompt.mask_or_ones()?.to_vec2::<f32>()?,
            padded: prompt.attention_mask().is_some(),
            started: false,
        })
    }

    /// The positions so far.
    fn len(&self) -> usize {
        self.ids[0].len()
    }

    /// The next pass's input and window: through the cache, the prompts then one new
    /// position at a time; without it, every position so far.
    fn next_pass(&mut self, kv_cache: bool) -> Result<(Tensor, Window)> {
        let (b, t) = (self.ids.len(), self.len());
        let mask = match self.padded {
            // Ids and masks are made on the host; the ranks bring them to their devices.
            true => Some(Tensor::from_vec(self.mask.concat(), (b, t), &Device::Cpu)?),
            false => None,
        };
        let (first, cache) = match (kv_cache, self.started) {
            (false, _) => (0, CacheUse::Off),
            (true, false) => (0, CacheUse::Start),
            (true, true) => (t - 1, CacheUse::Extend),
        };
        self.started = true;
        let columns: Vec<u32> = self
            .ids
            .iter()
            .flat_map(|row| row[first..].to_vec())
            .collect();
        let input = Tensor::from_vec(columns, (b, t - first), &Device::Cpu)?;
        let window = Window {
            mask,
            offset: first,
            cache,
            scope: PassScope::FULL,
        };
        Ok((input, window))
    }

    /// Appends one position: each sequence's token, or padding where it has stopped.
    fn push(&mut self, got: &[Option<u32>]) {
        for ((ids, mask), token) in self.ids.iter_mut().zip(&mut self.mask).zip(got) {
            ids.push(token.unwrap_or(PAD_TOKEN));
            mask.push(f32::from(u8::from(token.is_some())));
            self.padded |= token.is_none();
        }
    }

    fn batch(&self) -> Result<TokenBatch> {
        let (b, t) = (self.ids.len(), self.len());
        // On the host, as every input (see above).
        let tokens = Tensor::from_vec(self.ids.concat(), (b, t), &Device::Cpu)?;
        let mask = Tensor::from_vec(self.mask.concat(), (b, t), &Device::Cpu)?;
        TokenBatch::with_mask(tokens, mask)
    }
}

/// The captures of consecutive passes joined along positions into one tensor per hook
/// point: scores and patterns `[b, h, q, k]` are widened to every key (−∞ and 0 where a
/// step's query cannot see), and padded positions of `mask` (`[b, T]`) are zero.
fn join_along_positions(
    points: &ModelPoints,
    passes: Vec<ActivationStore>,
    mask: &Tensor,
) -> Result<ActivationStore> {
    let keys = mask.dim(1)?;
    let mut by_name: std::collections::BTreeMap<String, Vec<Tensor>> = Default::default();
    for mut pass in passes {
        for (name, values) in pass.take_all() {
            by_name.entry(name).or_default().extend(values);
        }
    }
    let mut joined = ActivationStore::default();
    for (name, values) in by_name {
        let point = points
            .parse(&name)
            .map_err(|_| Error::Internal("a capture under a name that is no hook point"))?;
        let values = match point.attends() {
            false => values,
            true => {
                let is_pattern = matches!(
                    point,
                    HookPoint::Block { site, .. } if site == crate::BlockSite::PATTERN
                );
                let hidden = if is_pattern { 0.0 } else { f32::NEG_INFINITY };
                values
                    .into_iter()
                    .map(|v| widen_keys(&v, keys, hidden))
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let dim = point.position_dim();
        let whole = Tensor::cat(&values, dim)?;
        joined.push(name, zero_padding(&whole, mask, dim)?);
    }
    Ok(joined)
}

/// `[b, h, q, k]` widened to `keys` keys, the new ones `hidden`.
fn widen_keys(value: &Tensor, keys: usize, hidden: f32) -> Result<Tensor> {
    let (b, h, q, k) = value.dims4()?;
    if k == keys {
        return Ok(value.clone());
    }
    let rest = (Tensor::ones((b, h, q, keys - k), value.dtype(), value.device())? * hidden as f64)?;
    Ok(Tensor::cat(&[value, &rest], 3)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_follows_the_softmax_within_the_nucleus_and_repeats_with_its_seed() {
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let softmax: Vec<f64> = {
            let e: Vec<f64> = logits.iter().map(|&l| (l as f64).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.iter().map(|x| x / sum).collect()
        };
        let mut rng = StdRng::seed_from_u64(1);
        let draws = 40_000;
        let mut counts = [0usize; 4];
        for _ in 0..draws {
            counts[sample(&logits, 1.0, 1.0, &mut rng) as usize] += 1;
        }
        for (count, p) in counts.iter().zip(&softmax) {
            let frequency = *count as f64 / draws as f64;
            // Four standard deviations of a frequency over 40 000 draws is below 0.01.
            assert!((frequency - p).abs() < 0.01, "{counts:?} vs {softmax:?}");
        }
        // A nucleus of 0.5 holds the first token only (its probability is 0.64).
        assert!((0..100).all(|_| sample(&logits, 1.0, 0.5, &mut rng) == 0));
        // The same seed draws the same tokens.
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| sample(&logits, 2.0, 0.9, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
