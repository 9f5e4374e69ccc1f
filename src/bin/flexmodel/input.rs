//! The token input of a command: `--prompt TEXT` or `--tokens-file F`.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use clap::Args;
use flexmodel::{Checkpoint, read_tokens_file};

/// Where the tokens of the batch come from.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct InputArgs {
    /// Text to tokenize (a batch of one sequence).
    #[arg(long)]
    prompt: Option<String>,
    /// One sequence per line, token ids separated by spaces, all lines of equal length.
    #[arg(long)]
    tokens_file: Option<PathBuf>,
}

impl InputArgs {
    /// The `[b, t]` u32 batch.
    pub fn tokens(&self, checkpoint: &Checkpoint) -> anyhow::Result<Tensor> {
        if let Some(path) = &self.tokens_file {
            return Ok(read_tokens_file(path, checkpoint.config.vocab_size)?);
        }
        let text = self.prompt.as_deref().unwrap_or_default();
        let ids = checkpoint.tokenizer.encode(text)?;
        anyhow::ensure!(!ids.is_empty(), "the prompt {text:?} has no tokens");
        let n = ids.len();
        Ok(Tensor::from_vec(ids, (1, n), &Device::Cpu)?)
    }
}
