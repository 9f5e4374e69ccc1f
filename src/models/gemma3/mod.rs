//! Gemma 3 (text): one tensor-parallel shard.
//!
//! ```text
//! x = embed(tokens) · √d_model
//! for each block:  x = x + ln1_post(attn(ln1(x)));  x = x + ln2_post(mlp(ln2(x)))
//! logits = unembed(ln_final(x))
//! ```
//!
//! Every norm scales by `1 + w`; attention norms each head's queries and keys and
//! scales its scores by `query_pre_attn_scalar^−½`; five layers of six attend within a
//! sliding window, with their own RoPE base; the MLP is GeGLU (tanh-approximated GELU).

pub(crate) mod block;
mod config;
mod gguf;
mod hook_points;

pub use config::{Gemma3Config, LayerType};

/// A Gemma 3 model: one pipeline stage of one tensor-parallel rank.
pub type Gemma3 = crate::models::decoder::Decoder<Gemma3Config>;
