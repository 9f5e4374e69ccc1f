//! Text and token ids: tokenizers, batches of token ids (padded when ragged), generation.

pub(crate) mod generation;
pub(crate) mod token_batch;
pub(crate) mod tokenizer;

pub use generation::{Decoding, GenerateOptions, Generation, Stop};
pub use token_batch::{PAD_TOKEN, TokenBatch, check_tokens, chunk_tokens, read_tokens_file};
pub use tokenizer::Tokenizer;
