//! Batches of token ids: from text, or from a tokens file.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// Reads a tokens file: one sequence per line, ids separated by whitespace, every line
/// of the same length, every id below `vocab_size`; blank lines are skipped. Returns
/// the `[lines, length]` u32 batch.
pub fn read_tokens_file(path: &Path, vocab_size: usize) -> Result<Tensor> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |line: usize, problem: String| Error::BadTokensFile {
        path: path.to_path_buf(),
        line: Some(line),
        problem,
    };
    let mut rows: Vec<Vec<u32>> = Vec::new();
    let mut first_line = 0;
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row = line
            .split_whitespace()
            .map(|word| {
                let id: u32 = word
                    .parse()
                    .map_err(|_| bad(i + 1, format!("{word:?} is not a token id")))?;
                if id as usize >= vocab_size {
                    return Err(bad(
                        i + 1,
                        format!("token id {id} is outside the vocabulary (size {vocab_size})"),
                    ));
                }
                Ok(id)
            })
            .collect::<Result<Vec<u32>>>()?;
        match rows.first() {
            None => first_line = i + 1,
            Some(first) if first.len() != row.len() => {
                return Err(bad(
                    i + 1,
                    format!(
                        "{} tokens, but line {first_line} has {}: all lines must have equal length",
                        row.len(),
                        first.len()
                    ),
                ));
            }
            Some(_) => {}
        }
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(Error::BadTokensFile {
            path: path.to_path_buf(),
            line: None,
            problem: "no sequences".into(),
        });
    }
    let (b, t) = (rows.len(), rows[0].len());
    Ok(Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu)?)
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
        assert_eq!(t.to_vec2::<u32>().unwrap(), [[1, 2, 3], [4, 5, 6]]);
    }

    #[test]
    fn bad_files_name_the_line_and_the_problem() {
        for (text, why) in [
            ("1 2 3\n4 5\n", ":2: 2 tokens, but line 1 has 3"),
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
