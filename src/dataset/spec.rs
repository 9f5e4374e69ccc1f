//! What an activation dataset is made of: the model, the hook points, how the corpus is
//! cut into rows and how the rows are stored. Two runs with equal specs over the same
//! corpus write the same dataset, bit for bit.

use std::fmt;

/// How the values of the hook columns are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoredDType {
    /// 32-bit floats, exactly as the model computed them.
    F32,
    /// The values rounded to bfloat16. Arrow and `datasets` have no bfloat16, so they
    /// are stored as float16, which holds every bfloat16 value of magnitude between
    /// 2⁻¹⁴ and 65504 exactly (smaller ones to within 2⁻²⁵); a larger one is an error.
    Bf16,
}

impl StoredDType {
    /// The `dtype` of the columns in `dataset_info.json` and in the Arrow files.
    pub fn feature_dtype(self) -> &'static str {
        match self {
            StoredDType::F32 => "float32",
            StoredDType::Bf16 => "float16",
        }
    }

    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            StoredDType::F32 => 4,
            StoredDType::Bf16 => 2,
        }
    }
}

impl fmt::Display for StoredDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoredDType::F32 => "f32",
            StoredDType::Bf16 => "bf16",
        })
    }
}

/// Which positions of each sequence a row keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// Every position: rows `[seq_len, d]` (attention scores and patterns
    /// `[heads, seq_len, seq_len]`).
    All,
    /// The last position only: rows `[1, d]` (`[heads, 1, seq_len]`).
    Last,
}

impl fmt::Display for Positions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Positions::All => "all",
            Positions::Last => "last",
        })
    }
}

/// The options of an activation dataset, with what identifies the model and its edits.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSpec {
    /// What identifies the weights (their fingerprint: `checkpoint.weights.fingerprint()`).
    pub model: String,
    /// The hook points to store: exact names or globs, a column each, in forward order.
    pub hooks: Vec<String>,
    /// What the model's registered edits do, one entry each
    /// ([`EditSpec::fingerprint`](crate::edits::EditSpec::fingerprint)); recorded so that
    /// a run under other edits is not taken for a resume.
    pub edits: Vec<String>,
    /// The SAEs spliced into the model, whose points may be columns.
    pub saes: Vec<crate::sae::SaeAttachment>,
    /// Tokens per sequence (a row).
    pub seq_len: usize,
    /// Sequences per forward pass.
    pub batch: usize,
    /// The most tokens of the corpus to use (whole sequences of them).
    pub max_tokens: Option<usize>,
    /// How the values are stored.
    pub dtype: StoredDType,
    /// Which positions a row keeps.
    pub positions: Positions,
    /// The most bytes of one shard file.
    pub shard_bytes: u64,
}

impl DatasetSpec {
    /// The defaults of `flexmodel cache` for `hooks` of the model `model`: sequences of
    /// 128 tokens in batches of 8, the whole corpus, f32 at every position, shards of at
    /// most 64 MB, no edits.
    pub fn new<S: Into<String>>(
        model: impl Into<String>,
        hooks: impl IntoIterator<Item = S>,
    ) -> Self {
        Self {
            model: model.into(),
            hooks: hooks.into_iter().map(Into::into).collect(),
            edits: Vec::new(),
            saes: Vec::new(),
            seq_len: 128,
            batch: 8,
            max_tokens: None,
            dtype: StoredDType::F32,
            positions: Positions::All,
            shard_bytes: 64_000_000,
        }
    }
}
