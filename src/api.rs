//! The JSON of `flexmodel serve`'s requests and answers, shared by the server and the
//! client ([`crate::client`]). The contract is in `docs/ARCHITECTURE.md` and the
//! server's `/openapi.json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `POST /v1/forward`: one pass over token ids or prompts, with captures and edits. The
/// answer is a safetensors file keyed as `flexmodel capture --out` writes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardRequest {
    /// Token ids, a row per sequence (rows of unequal length are left-padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<Vec<u32>>>,
    /// Texts to tokenize, a sequence each (instead of `tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<Vec<String>>,
    /// Hook points to capture: exact names or globs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<String>,
    /// Which positions of each capture to answer (along its positions, the queries'
    /// where a point has two): `"all"` (the default), `"last"` or a list of indices into
    /// the request's left-padded sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions: Option<Positions>,
    /// A reduction of each capture over its chosen positions, done on the server:
    /// `"mean"` (over the real tokens among them) or `"none"` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduce: Option<Reduce>,
    /// Edits, as the command line's `--edit` writes them; `NAME=add:@KEY` adds the tensor
    /// `KEY` of `tensors`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edits: Vec<String>,
    /// Tensors the edits add, by key: each a safetensors file, base64-encoded, holding a
    /// tensor under the key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tensors: BTreeMap<String, String>,
    /// Persistent edits installed on the server to apply, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub use_edits: Vec<String>,
    /// Which logits the pass computes: `all` (the default), `last` or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits: Option<String>,
    /// Run blocks `0..N` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_at_layer: Option<usize>,
    /// Also capture the gradient of this metric at each hooked point (`NAME_grad`); the
    /// answer's `loss` is the metric's value. Such a request runs in a pass of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad: Option<GradMetric>,
    /// Answer within this many milliseconds of arriving, or fail with 504 (the request
    /// is dropped if its pass has not started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

/// The positions of a forward request's captures to answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Positions {
    /// `"all"` or `"last"`.
    Named(NamedPositions),
    /// Indices into the request's left-padded sequences.
    List(Vec<usize>),
}

/// `"all"` or `"last"` of [`Positions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NamedPositions {
    /// Every position.
    All,
    /// The last position (every sequence's last token: they are left-padded).
    Last,
}

/// A reduction of a forward request's captures over their positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reduce {
    /// None: the positions stay.
    None,
    /// The mean over the chosen positions that are real tokens.
    Mean,
}

/// What a forward request's gradients are of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum GradMetric {
    /// `"loss"`: the mean next-token cross-entropy, as `flexmodel capture --grad`.
    Loss,
    /// `{"logit_diff": {"answer": A, "wrong": W}}`: the mean over sequences of the last
    /// position's logit of token `answer` minus that of token `wrong`.
    LogitDiff {
        /// The token the metric favours.
        answer: u32,
        /// The token it is measured against.
        wrong: u32,
    },
}

/// `POST /v1/generate`: continuations of prompts (one left-padded batch) through the
/// key/value cache, with captures and edits at every step. The answer is the JSON of
/// `flexmodel generate --json` (and `captures`, a base64 safetensors file of what
/// `generate --out` writes, when `hooks` are given); with `stream`, server-sent events:
/// `token` per token, then `done` with that JSON (or `error`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// The texts to continue.
    pub prompts: Vec<String>,
    /// The most tokens to generate per prompt (default 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    /// Hook points to capture over the whole generation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<String>,
    /// Edits at every step, as in [`ForwardRequest::edits`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edits: Vec<String>,
    /// The tensors of `add:@KEY` edits, as in [`ForwardRequest::tensors`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tensors: BTreeMap<String, String>,
    /// Persistent edits to apply, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub use_edits: Vec<String>,
    /// Sample at this temperature (above 0) instead of taking the most likely token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// With `temperature`: sample among the most likely tokens whose probabilities reach
    /// this together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// With `temperature`: the sampler's seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Stream the tokens as server-sent events.
    #[serde(default)]
    pub stream: bool,
}

/// The answer of `POST /v1/generate` (and the `done` event of a stream): the JSON of
/// `flexmodel generate --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateAnswer {
    /// Each prompt's completion.
    pub completions: Vec<Completion>,
    /// The time of the pass over the prompts.
    pub prefill_ms: f64,
    /// The time of the decoding steps.
    pub decode_ms: f64,
    /// Whether the key/value cache was used.
    pub kv_cache: bool,
    /// With `hooks`: the captures of the whole generation and `attention_mask`, as
    /// `generate --out` writes them, a base64 safetensors file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captures: Option<String>,
}

/// One prompt's completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// The prompt.
    pub prompt: String,
    /// Its tokens and then the generated ones.
    pub tokens: Vec<u32>,
    /// The generated text (without a final end-of-sequence token).
    pub text: String,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The model, as `--model` named it.
    pub model: String,
    /// The layout (`tp=2 pp=1 dp=1`, …).
    pub layout: String,
    /// The ranks whose shards answer.
    pub ranks_alive: usize,
    /// Requests waiting for a pass.
    pub queue: usize,
    /// Passes run since the server started (each serves one or more requests).
    #[serde(default)]
    pub passes: u64,
    /// Requests dropped before their pass because their client left (or their deadline
    /// passed).
    #[serde(default)]
    pub cancelled: u64,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

/// `POST /v1/edits`: a persistent edit, installed under a name that requests opt into
/// (`use_edits`); `GET /v1/edits` lists them as these.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedEdits {
    /// Its name.
    pub name: String,
    /// The edits, as `--edit` writes them (`add:@KEY` takes a tensor of `tensors`).
    pub edits: Vec<String>,
    /// The tensors its `add:@KEY` edits add (as in [`ForwardRequest::tensors`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tensors: BTreeMap<String, String>,
}
