//! The token input of a command: `--prompt TEXT...` or `--tokens-file F`.

use std::path::PathBuf;

use clap::Args;
use flexmodel::{Checkpoint, TokenBatch, read_tokens_file};

/// Where the tokens of the batch come from.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct InputArgs {
    /// Text to tokenize; repeat for a batch (sequences of unequal length are left-padded).
    #[arg(long = "prompt", num_args = 1..)]
    prompts: Vec<String>,
    /// One sequence per line, token ids separated by spaces (lines of unequal length are
    /// left-padded).
    #[arg(long)]
    tokens_file: Option<PathBuf>,
}

impl InputArgs {
    /// The batch, padded where its sequences differ in length.
    pub fn tokens(&self, checkpoint: &Checkpoint) -> anyhow::Result<TokenBatch> {
        if let Some(path) = &self.tokens_file {
            return Ok(read_tokens_file(path, checkpoint.config.vocab_size())?);
        }
        prompt_batch(checkpoint, &self.prompts)
    }
}

/// The batch of `prompts`, left-padded; a prompt without tokens is an error naming it.
pub fn prompt_batch(checkpoint: &Checkpoint, prompts: &[String]) -> anyhow::Result<TokenBatch> {
    let mut rows = Vec::with_capacity(prompts.len());
    for text in prompts {
        let ids = checkpoint.tokenizer.encode(text)?;
        anyhow::ensure!(!ids.is_empty(), "the prompt {text:?} has no tokens");
        rows.push(ids);
    }
    Ok(TokenBatch::left_padded(&rows)?)
}
