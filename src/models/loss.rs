//! The language-modelling loss.

use std::ops::Range;

use candle_core::{D, DType, Tensor};
use flexmodel_cluster::{Collective, SingleRank, conjugate};

use crate::models::parallel::rows_in_slice;
use crate::{Error, Result};

/// The mean next-token cross-entropy over all sequences and positions: position `i`'s
/// logits predict token `i + 1`. `logits` is `[b, t, vocab]`, `tokens` `[b, t]` (u32);
/// sequences need at least two tokens.
pub fn next_token_loss(logits: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    let (b, t, vocab) = logits.dims3()?;
    let normalizer = (b * t.saturating_sub(1)) as f64;
    vocab_parallel_loss(logits, tokens, None, 0..vocab, &SingleRank, normalizer)
}

/// The mean next-token cross-entropy over the pairs of consecutive real tokens of a
/// padded batch: `mask` (`[b, t]`) is 1 for real tokens and 0 for padding.
pub fn masked_next_token_loss(logits: &Tensor, tokens: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (_, t, vocab) = logits.dims3()?;
    check_predicts_a_token(t)?;
    let pairs = real_pairs(mask)?;
    let normalizer = pairs.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if normalizer == 0.0 {
        return Err(Error::SequenceTooShort {
            what: "the next-token loss (no sequence has two real tokens)",
            need: 2,
            len: 1,
        });
    }
    vocab_parallel_loss(
        logits,
        tokens,
        Some(mask),
        0..vocab,
        &SingleRank,
        normalizer,
    )
}

/// `[b, t − 1]`: 1 where position `i` and `i + 1` are both real tokens.
fn real_pairs(mask: &Tensor) -> Result<Tensor> {
    let t = mask.dim(1)?;
    let mask = mask.to_dtype(DType::F32)?;
    Ok((mask.narrow(1, 0, t - 1)? * mask.narrow(1, 1, t - 1)?)?)
}

/// The next-token cross-entropy at each position, averaged over the sequences: entry
/// `i` (of `t − 1`) is the loss of predicting token `i + 1` from position `i`.
pub fn next_token_loss_by_position(logits: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    let (b, t, _) = logits.dims3()?;
    check_predicts_a_token(t)?;
    let log_probs = candle_nn::ops::log_softmax(&logits.narrow(1, 0, t - 1)?, D::Minus1)?;
    let targets = tokens.narrow(1, 1, t - 1)?.unsqueeze(2)?.contiguous()?;
    let target_log_probs = log_probs.gather(&targets, 2)?.squeeze(2)?;
    Ok((target_log_probs.sum(0)?.neg()? / b as f64)?)
}

/// Sequences of `t` tokens predict at least one next token only if `t ≥ 2`.
fn check_predicts_a_token(t: usize) -> Result<()> {
    match t {
        0 | 1 => Err(Error::SequenceTooShort {
            what: "the next-token loss",
            need: 2,
            len: t,
        }),
        _ => Ok(()),
    }
}

/// One tensor-parallel rank's part of the next-token cross-entropy, computed without
/// gathering the logits: `logits` is this rank's `[b, t, vocab / tp]` slice (vocabulary
/// rows `vocab`), the log-sum-exp and the target logits are summed across the group.
/// Returns the summed loss of these sequences divided by `normalizer` (the number of
/// predicted tokens in the whole global batch); every rank of the group gets the same
/// value, and backward gives each rank the gradient of its slice. With a `mask` (`[b,
/// t]`, 1 for real tokens), only pairs of real tokens count.
pub fn vocab_parallel_loss(
    logits: &Tensor,
    tokens: &Tensor,
    mask: Option<&Tensor>,
    vocab: Range<usize>,
    collective: &dyn Collective,
    normalizer: f64,
) -> Result<Tensor> {
    let (b, t, local_vocab) = logits.dims3()?;
    check_predicts_a_token(t)?;
    let n = b * (t - 1);
    // At least in f32 whatever the logits' dtype, as Hugging Face computes its loss.
    let dtype = match logits.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let predictions = logits.narrow(1, 0, t - 1)?.reshape((n, local_vocab))?;
    let predictions = predictions.to_dtype(dtype)?;
    let targets = tokens.narrow(1, 1, t - 1)?.reshape(n)?.to_vec1::<u32>()?;
    // The largest logit of each row over every rank (a constant: log-sum-exp is invariant).
    let local_max = predictions.detach().max_keepdim(D::Minus1)?;
    let max = collective
        .all_gather(&local_max, 1)?
        .max_keepdim(D::Minus1)?;
    let sum_exp = predictions
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?;
    let log_sum_exp = (conjugate::all_reduce_sum(&sum_exp, collective)?.log()? + &max)?;
    // Each target logit comes from the rank that holds its row; the others add zero.
    let (index, mine) = rows_in_slice(&targets, &vocab, logits.device())?;
    let index = index.reshape((n, 1))?;
    let mine = mine.to_dtype(dtype)?;
    let target_logit = (predictions.gather(&index, 1)? * mine)?;
    let target_logit = conjugate::all_reduce_sum(&target_logit, collective)?;
    let losses = (log_sum_exp - target_logit)?;
    let losses = match mask {
        Some(mask) => {
            let real = real_pairs(mask)?.reshape((n, 1))?;
            let real = real.to_device(losses.device())?.to_dtype(dtype)?;
            losses.broadcast_mul(&real)?
        }
        None => losses,
    };
    Ok((losses.sum_all()? / normalizer)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn loss_by_position_averages_to_the_mean_loss() {
        let logits = Tensor::randn(0f32, 2.0, (3, 5, 11), &Device::Cpu).unwrap();
        let tokens = Tensor::new(
            &[[1u32, 4, 9, 0, 2], [3, 3, 7, 10, 5], [6, 8, 1, 1, 0]],
            &Device::Cpu,
        )
        .unwrap();
        let by_position = next_token_loss_by_position(&logits, &tokens).unwrap();
        assert_eq!(by_position.dims(), [4]);
        let mean = by_position.mean_all().unwrap().to_scalar::<f32>().unwrap();
        let expected = next_token_loss(&logits, &tokens)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((mean - expected).abs() < 1e-5, "{mean} vs {expected}");
    }

    #[test]
    fn the_masked_loss_counts_pairs_of_real_tokens_only() {
        let logits = Tensor::randn(0f32, 2.0, (2, 4, 7), &Device::Cpu).unwrap();
        let tokens = Tensor::new(&[[0u32, 0, 3, 5], [1, 2, 6, 4]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[0f32, 0., 1., 1.], [1., 1., 1., 1.]], &Device::Cpu).unwrap();
        let masked = masked_next_token_loss(&logits, &tokens, &mask)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // One pair in the first sequence and three in the second: their mean.
        let short = next_token_loss(
            &logits.narrow(0, 0, 1).unwrap().narrow(1, 2, 2).unwrap(),
            &tokens.narrow(0, 0, 1).unwrap().narrow(1, 2, 2).unwrap(),
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        let long = next_token_loss(
            &logits.narrow(0, 1, 1).unwrap(),
            &tokens.narrow(0, 1, 1).unwrap(),
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        let expected = (short + 3.0 * long) / 4.0;
        assert!((masked - expected).abs() < 1e-5, "{masked} vs {expected}");
    }

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
