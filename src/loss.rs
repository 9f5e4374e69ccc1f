//! The language-modelling loss.

use candle_core::{D, Tensor};

use crate::{Error, Result};

/// The mean next-token cross-entropy over all sequences and positions: position `i`'s
/// logits predict token `i + 1`. `logits` is `[b, t, vocab]`, `tokens` `[b, t]` (u32);
/// sequences need at least two tokens.
pub fn next_token_loss(logits: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    let (b, t, vocab) = logits.dims3()?;
    if t < 2 {
        return Err(Error::BadInput(
            "the loss needs sequences of at least two tokens".into(),
        ));
    }
    let predictions = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), vocab))?;
    let targets = tokens.narrow(1, 1, t - 1)?.reshape(b * (t - 1))?;
    let log_probs = candle_nn::ops::log_softmax(&predictions, D::Minus1)?;
    let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn uniform_logits_cost_log_vocab() {
        let logits = Tensor::zeros((2, 3, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let tokens = Tensor::new(&[[0u32, 1, 2], [3, 4, 0]], &Device::Cpu).unwrap();
        let loss = next_token_loss(&logits, &tokens)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((loss - 5f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn one_token_sequences_have_no_loss() {
        let logits = Tensor::zeros((1, 1, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let tokens = Tensor::new(&[[0u32]], &Device::Cpu).unwrap();
        assert!(next_token_loss(&logits, &tokens).is_err());
    }
}
