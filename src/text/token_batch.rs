//! Batches of token ids: from text, or from a tokens file; padded when sequences differ
//! in length.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The id that fills padded positions (any id would do: padding is masked out).
pub const PAD_TOKEN: u32 = 0;

/// A batch of token sequences `[b, t]` (u32) and, when some are padded, the attention
/// mask `[b, t]` (f32: 1 for a real token, 0 for padding).
///
/// Sequences of unequal length are left-padded ([`left_padded`](Self::left_padded)), so
/// that their last tokens line up. A tensor of ids is a batch without padding.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    tokens: Tensor,
    mask: Option<Tensor>,
}

impl TokenBatch {
    /// The sequences `rows`, left-padded with [`PAD_TOKEN`] to the longest.
    pub fn left_padded<R: AsRef<[u32]>>(rows: &[R]) -> Result<Self> {
        let t = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
        if rows.is_empty() || t == 0 {
            return Err(Error::NoTokens { what: "the batch" });
        }
        if let Some(i) = rows.iter().position(|r| r.as_ref().is_empty()) {
            return Err(Error::EmptySequence { index: i });
        }
        let mut ids = Vec::with_capacity(rows.len() * t);
        let mut mask = Vec::with_capacity(rows.len() * t);
        for row in rows {
            let row = row.as_ref();
            let pad = t - row.len();
            ids.extend(std::iter::repeat_n(PAD_TOKEN, pad).chain(row.iter().copied()));
            mask.extend(std::iter::repeat_n(0f32, pad).chain(std::iter::repeat_n(1f32, row.len())));
        }
        let b = rows.len();
        // Inputs are made on the host; the ranks bring them to their devices.
        let tokens = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu)?;
        Self::with_mask(tokens, mask)
    }

    /// `tokens` (`[b, t]`, u32) with `mask` (`[b, t]`, 1 for a real token, 0 for padding,
    /// at least one real token per sequence), wherever the padding is.
    pub fn with_mask(tokens: Tensor, mask: Tensor) -> Result<Self> {
        let mask = mask.to_dtype(DType::F32)?;
        if mask.dims() != tokens.dims() {
            return Err(Error::BadAttentionMask {
                problem: format!(
                    "the mask is {:?} but the tokens are {:?}",
                    mask.dims(),
                    tokens.dims()
                ),
            });
        }
        let rows = mask.to_vec2::<f32>()?;
        if rows.iter().flatten().any(|&m| m != 0.0 && m != 1.0) {
            return Err(Error::BadAttentionMask {
                problem: "it holds values other than 0 and 1".into(),
            });
        }
        if let Some(index) = rows.iter().position(|r| r.iter().all(|&m| m == 0.0)) {
            return Err(Error::EmptySequence { index });
        }
        let padded = rows.iter().flatten().any(|&m| m == 0.0);
        Ok(Self {
            tokens,
            mask: padded.then_some(mask),
        })
    }

    /// The token ids `[b, t]` (u32), padding included.
    pub fn tokens(&self) -> &Tensor {
        &self.tokens
    }

    /// The attention mask `[b, t]` (f32), or `None` when no position is padding.
    pub fn attention_mask(&self) -> Option<&Tensor> {
        self.mask.as_ref()
    }

    /// The attention mask, all ones when no position is padding.
    pub fn mask_or_ones(&self) -> Result<Tensor> {
        match &self.mask {
            Some(mask) => Ok(mask.clone()),
            None => Ok(Tensor::ones(
                self.tokens.dims(),
                DType::F32,
                self.tokens.device(),
            )?),
        }
    }

    /// `(b, t)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(self.tokens.dims2()?)
    }

    /// The real tokens of each sequence, without padding.
    pub fn sequences(&self) -> Result<Vec<Vec<u32>>> {
        let ids = self.tokens.to_vec2::<u32>()?;
        let Some(mask) = &self.mask else {
            return Ok(ids);
        };
        let mask = mask.to_vec2::<f32>()?;
        Ok(ids
            .into_iter()
            .zip(mask)
            .map(|(row, real)| {
                row.into_iter()
                    .zip(real)
                    .filter(|(_, m)| *m != 0.0)
                    .map(|(id, _)| id)
                    .collect()
            })
            .collect())
    }
}

impl From<Tensor> for TokenBatch {
    /// A batch of ids without padding.
    fn from(tokens: Tensor) -> Self {
        Self { tokens, mask: None }
    }
}

impl From<&Tensor> for TokenBatch {
    /// A batch of ids without padding.
    fn from(tokens: &Tensor) -> Self {
        tokens.clone().into()
    }
}

impl From<&TokenBatch> for TokenBatch {
    fn from(batch: &TokenBatch) -> Self {
        batch.clone()
    }
}

/// Reads a tokens file: one sequence per line, ids separated by whitespace, every id
/// below `vocab_size`; blank lines are skipped. Lines of unequal length are left-padded.
pub fn read_tokens_file(path: &Path, vocab_size: usize) -> Result<TokenBatch> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut rows: Vec<Vec<u32>> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let row = parse_tokens_line(path, i + 1, line, vocab_size)?;
        if !row.is_empty() {
            rows.push(row);
        }
    }
    if rows.is_empty() {
        return Err(Error::BadTokensFile {
            path: path.to_path_buf(),
            line: None,
            problem: "no sequences".into(),
        });
    }
    TokenBatch::left_padded(&rows)
}

/// The ids of line `line` (1-based) of the tokens file at `path`: whitespace-separated,
/// every one below `vocab_size`; none for a blank line.
pub(crate) fn parse_tokens_line(
    path: &Path,
    line: usize,
    text: &str,
    vocab_size: usize,
) -> Result<Vec<u32>> {
    let bad = |problem: String| Error::BadTokensFile {
        path: path.to_path_buf(),
        line: Some(line),
        problem,
    };
    text.split_whitespace()
        .map(|word| {
            let id: u32 = word
                .parse()
                .map_err(|_| bad(format!("{word:?} is not a token id")))?;
            if id as usize >= vocab_size {
                return Err(bad(format!(
                    "token id {id} is outside the vocabulary (size {vocab_size})"
                )));
            }
            Ok(id)
        })
        .collect()
}

/// Cuts `ids` (a tokenized text) into batches of up to `batch` consecutive sequences of
/// `seq_len` tokens (`[rows, seq_len]` u32 each), at most `max_tokens` tokens in all: whole
/// batches first, then one smaller batch of the whole sequences left within the budget.
/// A text (or budget) shorter than one sequence gives one shorter sequence.
pub fn chunk_tokens(
    ids: &[u32],
    seq_len: usize,
    batch: usize,
    max_tokens: usize,
) -> Result<Vec<Tensor>> {
    for (argument, n) in [
        ("seq_len", seq_len),
        ("batch", batch),
        ("max_tokens", max_tokens),
    ] {
        if n == 0 {
            return Err(Error::InvalidArgument {
                argument,
                problem: "must be positive".into(),
            });
        }
    }
    if ids.is_empty() {
        return Err(Error::NoTokens { what: "the text" });
    }
    let usable = &ids[..ids.len().min(max_tokens)];
    if usable.len() < seq_len {
        let n = usable.len();
        // Inputs are made on the host; the ranks bring them to their devices.
        return Ok(vec![Tensor::from_slice(usable, (1, n), &Device::Cpu)?]);
    }
    let sequences = usable.len() / seq_len;
    let mut batches = Vec::with_capacity(sequences.div_ceil(batch));
    for first in (0..sequences).step_by(batch) {
        let rows = batch.min(sequences - first);
        let chunk = &usable[first * seq_len..(first + rows) * seq_len];
        batches.push(Tensor::from_slice(chunk, (rows, seq_len), &Device::Cpu)?);
    }
    Ok(batches)
}

/// Checks that `tokens` is a non-empty `[b, t]` u32 batch of ids below `vocab_size`,
/// at most `context` tokens long; returns `(b, t)`.
pub fn check_tokens(tokens: &Tensor, vocab_size: usize, context: usize) -> Result<(usize, usize)> {
    let bad = || Error::BadTokens {
        dims: tokens.dims().to_vec(),
        dtype: tokens.dtype(),
    };
    let (b, t) = tokens.dims2().map_err(|_| bad())?;
    if b == 0 || t == 0 || tokens.dtype() != candle_core::DType::U32 {
        return Err(bad());
    }
    if t > context {
        return Err(Error::SequenceTooLong { len: t, context });
    }
    let max = tokens.flatten_all()?.max(0)?.to_scalar::<u32>()?;
    if max as usize >= vocab_size {
        return Err(Error::TokenOutOfVocabulary {
            id: max,
            vocab_size,
        });
    }
    Ok((b, t))
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunks_are_consecutive_sequences_of_seq_len_within_the_budget() {
        let ids: Vec<u32> = (0..50).collect();
        let batches = super::chunk_tokens(&ids, 4, 3, 40).unwrap();
        // 40 tokens: 10 sequences of 4, in batches of 3, 3, 3 and 1.
        let rows: Vec<usize> = batches.iter().map(|b| b.dim(0).unwrap()).collect();
        assert_eq!(rows, [3, 3, 3, 1]);
        assert_eq!(batches[1].dims(), [3, 4]);
        assert_eq!(batches[1].to_vec2::<u32>().unwrap()[0], [12, 13, 14, 15]);
        assert_eq!(batches[3].to_vec2::<u32>().unwrap()[0], [36, 37, 38, 39]);
        // A budget below one batch still cuts sequences of seq_len.
        let small = super::chunk_tokens(&ids, 4, 32, 10).unwrap();
        assert_eq!(small.len(), 1);
        assert_eq!(small[0].dims(), [2, 4]);
        assert!(super::chunk_tokens(&ids, 0, 3, 40).is_err());
        assert!(super::chunk_tokens(&[], 4, 3, 40).is_err());
        let short = super::chunk_tokens(&ids[..3], 4, 3, 40).unwrap();
        assert_eq!(short.len(), 1);
        assert_eq!(short[0].dims(), [1, 3]);
    }

    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn lines_are_the_batch() {
        let f = file("1 2 3\n\n4 5 6\n");
        let t = read_tokens_file(f.path(), 10).unwrap();
        assert_eq!(t.tokens().to_vec2::<u32>().unwrap(), [[1, 2, 3], [4, 5, 6]]);
        assert!(
            t.attention_mask().is_none(),
            "lines of equal length need no mask"
        );
    }

    #[test]
    fn lines_of_unequal_length_are_left_padded_with_a_mask() {
        let t = read_tokens_file(file("1 2 3\n4\n5 6\n").path(), 10).unwrap();
        assert_eq!(
            t.tokens().to_vec2::<u32>().unwrap(),
            [[1, 2, 3], [PAD_TOKEN, PAD_TOKEN, 4], [PAD_TOKEN, 5, 6]]
        );
        let mask = t.attention_mask().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(mask, [[1., 1., 1.], [0., 0., 1.], [0., 1., 1.]]);
        assert_eq!(t.sequences().unwrap(), [vec![1, 2, 3], vec![4], vec![5, 6]]);
    }

    #[test]
    fn a_batch_needs_a_real_token_in_every_sequence() {
        let empty: [&[u32]; 2] = [&[1, 2], &[]];
        let err = TokenBatch::left_padded(&empty).unwrap_err().to_string();
        assert!(err.contains("sequence 1 of the batch is empty"), "{err}");
        let tokens = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1f32, 0.5]], &Device::Cpu).unwrap();
        assert!(TokenBatch::with_mask(tokens, mask).is_err());
    }

    #[test]
    fn bad_files_name_the_line_and_the_problem() {
        for (text, why) in [
            ("1 2 x\n", ":1: \"x\" is not a token id"),
            ("1 2 -3\n", "\"-3\" is not a token id"),
            (
                "1 2 10\n",
                ":1: token id 10 is outside the vocabulary (size 10)",
            ),
            ("\n  \n", "no sequences"),
        ] {
            let err = read_tokens_file(file(text).path(), 10)
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }
}
