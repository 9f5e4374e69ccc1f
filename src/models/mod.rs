//! Transformer models whose every hook point goes through the hook layer and whose
//! every linear layer can hold a tensor-parallel slice.

pub(crate) mod fsdp;
pub(crate) mod llama;
pub(crate) mod loss;
pub(crate) mod parallel;
pub(crate) mod shard;
pub(crate) mod stage;

pub use llama::{Architecture, Llama, LlamaConfig, RmsNorm, RopeScaling, Unimplemented};
pub use loss::{
    masked_next_token_loss, next_token_loss, next_token_loss_by_position, vocab_parallel_loss,
};
pub use parallel::{ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, kv_heads_of};
pub use shard::ModelShard;
pub use stage::Stage;
