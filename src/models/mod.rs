//! Transformer models whose every hook point goes through the hook layer and whose
//! every linear layer can hold a tensor-parallel slice.

mod llama;
mod parallel;

pub use llama::{Architecture, Llama, LlamaConfig};
pub use parallel::{ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding};
