//! Induction heads: on a random sequence repeated twice, an induction head attends from
//! each token of the second copy to the token after that token's first occurrence.

use candle_core::{Device, IndexOp, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Error, FlexModel, HookFunction, Result};

/// `batch` sequences of `half` random token ids (below `vocab`, from `seed`), each
/// followed by itself: `[batch, 2·half]`.
pub fn repeated_random_tokens(
    batch: usize,
    half: usize,
    vocab: usize,
    seed: u64,
) -> Result<Tensor> {
    if batch == 0 || half < 2 {
        return Err(Error::BadInput(format!(
            "induction needs at least one sequence of at least 2 tokens, got batch {batch}, length {half}"
        )));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids = Vec::with_capacity(batch * 2 * half);
    for _ in 0..batch {
        let first: Vec<u32> = (0..half)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        ids.extend_from_slice(&first);
        ids.extend_from_slice(&first);
    }
    Ok(Tensor::from_vec(ids, (batch, 2 * half), &Device::Cpu)?)
}

/// Checks that every sequence of `tokens` is a sequence followed by itself.
pub fn check_repeated(tokens: &Tensor) -> Result<usize> {
    let (_, t) = tokens.dims2()?;
    let rows = tokens.to_vec2::<u32>()?;
    let half = t / 2;
    for (i, row) in rows.iter().enumerate() {
        if t % 2 == 1 || half < 2 || row[..half] != row[half..] {
            return Err(Error::BadInput(format!(
                "sequence {} is not a sequence of at least 2 tokens followed by itself",
                i + 1
            )));
        }
    }
    Ok(half)
}

/// The induction score of every head, `[n_layers, n_heads]`: the mean attention (over
/// sequences and positions) from each token of the second copy to the token after its
/// first occurrence. `tokens` must be repeated sequences (see [`check_repeated`]).
pub fn induction_scores(model: &mut FlexModel, tokens: &Tensor) -> Result<Tensor> {
    let half = check_repeated(tokens)?;
    let n_layers = model.config().n_layers;
    let hook = model
        .hooks_mut()
        .register(HookFunction::new("blocks.*.attn.hook_pattern"))?;
    let pass = model.forward(tokens);
    model.hooks_mut().remove(hook)?;
    pass?;
    let mut scores = Vec::with_capacity(n_layers);
    for layer in 0..n_layers {
        let name = format!("blocks.{layer}.attn.hook_pattern");
        let calls = model
            .store_mut()
            .take(&name)
            .ok_or_else(|| Error::Protocol(format!("{name} was not captured")))?;
        let pattern = calls
            .last()
            .ok_or_else(|| Error::Protocol(format!("{name} is empty")))?;
        // pattern[b, h, half + i, i + 1] for i < half: a diagonal of the lower-left block.
        let block = pattern
            .i((.., .., half..2 * half, 1..half + 1))?
            .contiguous()?;
        let (b, h, _, _) = block.dims4()?;
        let eye = Tensor::eye(half, block.dtype(), block.device())?;
        let diagonal = block.broadcast_mul(&eye)?.sum((2, 3))?;
        scores.push((diagonal.sum(0)? / (b * half) as f64)?.reshape(h)?);
    }
    Ok(Tensor::stack(&scores, 0)?)
}

/// The `n` highest-scoring heads, `(layer, head, score)`, best first.
pub fn top_heads(scores: &Tensor, n: usize) -> Result<Vec<(usize, usize, f32)>> {
    let rows = scores.to_vec2::<f32>()?;
    let mut all: Vec<(usize, usize, f32)> = rows
        .iter()
        .enumerate()
        .flat_map(|(l, row)| row.iter().enumerate().map(move |(h, &s)| (l, h, s)))
        .collect();
    all.sort_by(|a, b| b.2.total_cmp(&a.2));
    all.truncate(n);
    Ok(all)
}
