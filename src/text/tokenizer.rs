//! Tokenizers: Hugging Face `tokenizer.json`, or built from GGUF metadata: byte-level BPE
//! (GPT-2's, LLaMA 3's) or SentencePiece BPE (Gemma's, LLaMA 2's).

use std::path::Path;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::text::TokenBatch;
use crate::{Error, Result};

/// LLaMA 3's pre-tokenizer pattern (llama.cpp's `llama-bpe`).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer pattern: as LLaMA 3's, with single digits.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The SentencePiece marker that stands for a space.
const SPACE: &str = "\u{2581}";

/// What a SentencePiece vocabulary entry is (llama.cpp's `token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    /// A piece of text, merged by its score.
    Normal,
    /// A control token (`<bos>`): never produced from text, matched whole as special.
    Control,
    /// A user-defined token (a run of spaces, `\n`): matched whole before anything else.
    UserDefined,
    /// A byte, `<0xAB>`: what text the vocabulary lacks falls back to.
    Byte,
    /// Unknown or unused.
    Other,
}

impl PieceKind {
    /// The kind llama.cpp's `token_type` code says.
    pub fn of_code(code: i32) -> Self {
        match code {
            1 => PieceKind::Normal,
            3 => PieceKind::Control,
            4 => PieceKind::UserDefined,
            6 => PieceKind::Byte,
            _ => PieceKind::Other,
        }
    }
}

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
        let vocab: Vocab = tokens
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

    /// A SentencePiece BPE tokenizer from its vocabulary: `pieces` (id = index), their
    /// `scores` (a higher score merges first) and `kinds`; `bos` is put before every
    /// text, and with `space_prefix` a space too. It encodes as SentencePiece and
    /// llama.cpp do: user-defined tokens are split out whole, spaces become `▁`, adjacent
    /// pieces merge highest score first, and what is left of no piece becomes its bytes.
    pub fn sentencepiece_bpe(
        pieces: &[String],
        scores: &[f32],
        kinds: &[PieceKind],
        bos: Option<u32>,
        space_prefix: bool,
    ) -> Result<Self> {
        if scores.len() != pieces.len() || kinds.len() != pieces.len() {
            return Err(Error::Tokenizer(format!(
                "{} pieces with {} scores and {} kinds",
                pieces.len(),
                scores.len(),
                kinds.len()
            )));
        }
        let vocab: Vocab = pieces
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges_by_score(pieces, scores, kinds, &vocab);
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .build()
            .map_err(tokenizer_error)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let spaces = Replace::new(" ", SPACE).map_err(tokenizer_error)?;
        let normalizer: NormalizerWrapper = match space_prefix {
            true => tokenizers::normalizers::Sequence::new(vec![
                Prepend::new(SPACE.into()).into(),
                spaces.into(),
            ])
            .into(),
            false => spaces.into(),
        };
        inner
            .with_normalizer(Some(normalizer))
            .map_err(tokenizer_error)?;
        let mut decoders: Vec<DecoderWrapper> = vec![
            Replace::new(SPACE, " ").map_err(tokenizer_error)?.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if space_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        inner.with_decoder(Some(DecoderSequence::new(decoders)));
        let added = pieces
            .iter()
            .zip(kinds)
            .filter_map(|(piece, kind)| match kind {
                PieceKind::Control => Some(AddedToken::from(piece.clone(), true)),
                PieceKind::UserDefined => {
                    Some(AddedToken::from(piece.clone(), false).normalized(false))
                }
                _ => None,
            });
        inner
            .add_tokens(added.collect::<Vec<_>>())
            .map_err(tokenizer_error)?;
        if let Some(bos) = bos {
            let token = pieces.get(bos as usize).ok_or_else(|| {
                Error::Tokenizer(format!("bos token id {bos} is not in the vocabulary"))
            })?;
            let template = TemplateProcessing::builder()
                .try_single(format!("{token} $A"))
                .map_err(tokenizer_error)?
                .special_tokens(vec![(token.clone(), bos)])
                .build()
                .map_err(tokenizer_error)?;
            inner.with_post_processor(Some(template));
        }
        Ok(Self { inner })
    }

    /// The ids of `text`, with what the tokenizer puts before every text (a model's
    /// beginning-of-sequence token, where its tokenizer says so).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, true).map_err(tokenizer_error)?;
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

/// The merges of a SentencePiece BPE vocabulary as a BPE model ranks them: every way to
/// split a normal piece into two pieces of the vocabulary, the pieces of higher score
/// first (so that BPE's lowest rank merges what SentencePiece's highest score would), and
/// of one piece the splits into higher-scored halves first.
fn merges_by_score(
    pieces: &[String],
    scores: &[f32],
    kinds: &[PieceKind],
    vocab: &Vocab,
) -> Vec<(String, String)> {
    let score = |piece: &str| vocab.get(piece).map(|&id| scores[id as usize]);
    let mut merges: Vec<(f32, f32, f32, &str, &str)> = Vec::new();
    for (piece, (&merged, kind)) in pieces.iter().zip(scores.iter().zip(kinds)) {
        if *kind != PieceKind::Normal {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if let (Some(l), Some(r)) = (score(left), score(right)) {
                merges.push((merged, l, r, left, right));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(b.1.total_cmp(&a.1))
            .then(b.2.total_cmp(&a.2))
    });
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect()
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
