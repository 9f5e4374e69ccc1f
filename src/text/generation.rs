//! Greedy decoding.

use candle_core::{D, Device, Tensor};

use crate::{Error, FlexModel, Result};

/// Extends `prompt` greedily by up to `max_new_tokens` tokens, calling `on_token` with
/// each new token; stops early at an end-of-sequence token or the context limit.
///
/// Each step runs the whole sequence again (no key/value cache), with the model's
/// registered hooks. Returns the new tokens.
pub fn generate_greedy(
    model: &mut FlexModel,
    prompt: &[u32],
    max_new_tokens: usize,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::NoTokens { what: "the prompt" });
    }
    let config = model.config().clone();
    let mut tokens = prompt.to_vec();
    let mut new = Vec::new();
    while new.len() < max_new_tokens && tokens.len() < config.max_position_embeddings {
        let input = Tensor::new(tokens.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward(&input)?;
        let last = logits.squeeze(0)?.get(tokens.len() - 1)?;
        let next = last.argmax(D::Minus1)?.to_scalar::<u32>()?;
        if config.eos_token_ids.contains(&next) {
            break;
        }
        on_token(next)?;
        tokens.push(next);
        new.push(next);
    }
    Ok(new)
}
