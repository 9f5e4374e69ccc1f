//! The LLaMA family (LLaMA 2/3, Mistral, Qwen2, SmolLM2): one tensor-parallel shard.
//!
//! ```text
//! x = embed(tokens)
//! for each block:  x = x + attn(rmsnorm₁(x));  x = x + mlp(rmsnorm₂(x))
//! logits = unembed(rmsnorm_f(x))
//! ```
//!
//! Every hook point of `docs/ARCHITECTURE.md` is a call into the [`HookLayer`](crate::HookLayer).

pub(crate) mod block;
mod config;
mod gguf;
mod hook_points;

pub use config::{Architecture, LlamaConfig, Unimplemented};

/// A LLaMA-family model: one pipeline stage of one tensor-parallel rank.
pub type Llama = crate::models::decoder::Decoder<LlamaConfig>;
