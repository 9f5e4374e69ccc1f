//! Text and token ids: tokenizers, batches of token ids, greedy generation.

pub(crate) mod generation;
pub(crate) mod token_batch;
pub(crate) mod tokenizer;

pub use generation::generate_greedy;
pub use token_batch::{check_tokens, chunk_tokens, read_tokens_file};
pub use tokenizer::Tokenizer;
