//! Transformer models whose every hook point goes through the hook layer and whose
//! every linear layer can hold a tensor-parallel slice.

pub(crate) mod llama;
pub(crate) mod parallel;

pub use llama::{Architecture, Llama, LlamaConfig, Stage};
pub use parallel::{ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding};
