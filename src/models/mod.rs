//! Transformer models whose every hook point goes through the hook layer and whose
//! every linear layer can hold a tensor-parallel slice.
//!
//! A family is a folder (`llama/`, `gemma3/`) whose configuration declares what the rest of the
//! crate needs ([`ModelSpec`]: sizes, hook points, parameter counts, how to build a
//! shard) and whose model is a [`ModelShard`]; [`ModelConfig`] lists the families.

pub(crate) mod attention;
mod config;
pub(crate) mod decoder;
pub(crate) mod fsdp;
pub(crate) mod gemma3;
mod hf_json;
pub(crate) mod llama;
pub(crate) mod loss;
pub(crate) mod mlp;
pub(crate) mod parallel;
pub(crate) mod positions;
mod rms_norm;
mod rope;
pub(crate) mod shard;
mod spec;
pub(crate) mod stage;

pub use attention::AttentionSpec;
pub use config::ModelConfig;
pub use decoder::{Decoder, DecoderBlock, DecoderConfig};
pub use gemma3::{Gemma3, Gemma3Config, LayerType};
pub use llama::{Architecture, Llama, LlamaConfig, Unimplemented};
pub use loss::{
    masked_next_token_loss, next_token_loss, next_token_loss_by_position, vocab_parallel_loss,
};
pub use mlp::{Activation, Mlp};
pub use parallel::{ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, kv_heads_of};
pub use positions::PositionSpec;
pub use rms_norm::RmsNorm;
pub use rope::RopeScaling;
pub use shard::ModelShard;
pub use spec::ModelSpec;
pub use stage::Stage;
