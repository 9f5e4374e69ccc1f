//! Tokenizers: Hugging Face `tokenizer.json`, or byte-level BPE built from GGUF metadata.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::text::TokenBatch;
use crate::{Error, Result};

/// LLaMA 3's pre-tokenizer pattern (llama.cpp's `llama-bpe`).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer pattern: as LLaMA 3's, with single digits.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Text ↔ token ids.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

fn tokenizer_error(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    /// A byte-level BPE tokenizer (GPT-2 style) from its vocabulary `tokens` (id = index),
    /// `merges` (`"a b"`), the ids of `special` tokens that are matched whole, and
    /// llama.cpp's name of the pre-tokenizer (`tokenizer.ggml.pre`).
    pub fn byte_level_bpe(
        tokens: &[String],
        merges: &[String],
        special: &[u32],
        pre: &str,
    ) -> Result<Self> {
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| Error::Tokenizer(format!("malformed merge {m:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tokenizer_error)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
        inner.with_decoder(Some(ByteLevel::default()));
        let special = special
            .iter()
            .map(|&id| match tokens.get(id as usize) {
                Some(token) => Ok(AddedToken::from(token.clone(), true)),
                None => Err(Error::Tokenizer(format!(
                    "special token id {id} is not in the vocabulary"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        inner.add_special_tokens(special).map_err(tokenizer_error)?;
        Ok(Self { inner })
    }

    /// The ids of `text`, without any added special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(tokenizer_error)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The batch of `texts`, left-padded where they encode to unequal token counts; every
    /// text needs a token.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<TokenBatch> {
        let rows = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<Vec<_>>>()?;
        TokenBatch::left_padded(&rows)
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tokenizer_error)
    }

    /// The vocabulary entry of `id` (e.g. `"ĠParis"`), if there is one.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }
}

/// The pre-tokenizer llama.cpp calls `name`.
fn pre_tokenizer(name: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex).into();
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tokenizer_error)?;
        Ok(split.into())
    };
    Ok(match name {
        "default" | "gpt2" => byte_level(true),
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into(),
        "llama-bpe" | "llama3" => {
            Sequence::new(vec![split(LLAMA3_PATTERN)?, byte_level(false)]).into()
        }
        "qwen2" => Sequence::new(vec![split(QWEN2_PATTERN)?, byte_level(false)]).into(),
        other => {
            return Err(Error::Tokenizer(format!(
                "pre-tokenizer {other:?} is not supported (supported: gpt2, smollm, llama-bpe, qwen2)"
            )));
        }
    })
}
