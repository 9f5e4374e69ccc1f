//! Induction heads: on a random sequence repeated twice, an induction head attends from
//! each token of the second copy to the token after that token's first occurrence.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::weights::write_safetensors;
use crate::{Error, FlexModel, Result, next_token_loss_by_position};

/// `batch` sequences of `half` random token ids (below `vocab`, from `seed`), each
/// followed by itself: `[batch, 2·half]`.
pub fn repeated_random_tokens(
    batch: usize,
    half: usize,
    vocab: usize,
    seed: u64,
) -> Result<Tensor> {
    let invalid = |argument, problem: String| Err(Error::InvalidArgument { argument, problem });
    if batch == 0 {
        return invalid("batch", "induction needs at least one sequence".into());
    }
    if half < 2 {
        return invalid(
            "half",
            format!("each sequence needs at least 2 tokens before it repeats, got {half}"),
        );
    }
    let Ok(vocab) = u32::try_from(vocab) else {
        return invalid(
            "vocab",
            format!("{vocab} is more than u32 token ids can name"),
        );
    };
    if vocab == 0 {
        return invalid(
            "vocab",
            "the vocabulary must have at least one token".into(),
        );
    }
    let Some(total) = half.checked_mul(2).and_then(|t| t.checked_mul(batch)) else {
        return invalid(
            "batch",
            format!("{batch} sequences of 2 × {half} tokens are more than this machine can count"),
        );
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids = Vec::with_capacity(total);
    for _ in 0..batch {
        let first: Vec<u32> = (0..half).map(|_| rng.random_range(0..vocab)).collect();
        ids.extend_from_slice(&first);
        ids.extend_from_slice(&first);
    }
    // Inputs are made on the host; the ranks bring them to their devices.
    Ok(Tensor::from_vec(ids, (batch, 2 * half), &Device::Cpu)?)
}

/// Checks that every sequence of `tokens` is a sequence followed by itself.
pub fn check_repeated(tokens: &Tensor) -> Result<usize> {
    let (_, t) = tokens.dims2()?;
    let rows = tokens.to_vec2::<u32>()?;
    let half = t / 2;
    for (i, row) in rows.iter().enumerate() {
        if t % 2 == 1 || half < 2 || row[..half] != row[half..] {
            return Err(Error::Analysis {
                analysis: "induction",
                problem: format!(
                    "sequence {} is not a sequence of at least 2 tokens followed by itself",
                    i + 1
                ),
            });
        }
    }
    Ok(half)
}

/// What a pass over repeated random tokens shows.
#[derive(Debug, Clone)]
pub struct Induction {
    /// The induction score of every head, `[n_layers, n_heads]`: the mean attention (over
    /// sequences and positions) from each token of the second copy to the token after
    /// its first occurrence.
    pub scores: Tensor,
    /// The next-token loss at each position (`2·half − 1` of them), averaged over the
    /// sequences: high on the random first copy, low on the second if the model copies.
    pub loss_by_position: Vec<f32>,
}

/// Runs `model` on `tokens` (repeated sequences, see [`check_repeated`]) and measures
/// every head's induction score and the loss at each position.
pub fn measure(model: &mut FlexModel, tokens: &Tensor) -> Result<Induction> {
    let half = check_repeated(tokens)?;
    let (logits, patterns) = super::capture_every_layer(model, tokens, "attn.hook_pattern")?;
    let mut scores = Vec::with_capacity(patterns.len());
    for pattern in patterns {
        // pattern[b, h, half + i, i + 1] for i < half: a diagonal of the lower-left block.
        let block = pattern
            .i((.., .., half..2 * half, 1..half + 1))?
            .contiguous()?;
        let (b, h, _, _) = block.dims4()?;
        let eye = Tensor::eye(half, block.dtype(), block.device())?;
        let diagonal = block.broadcast_mul(&eye)?.sum((2, 3))?;
        scores.push((diagonal.sum(0)? / (b * half) as f64)?.reshape(h)?);
    }
    let loss_by_position = next_token_loss_by_position(&logits, tokens)?
        .to_dtype(DType::F32)?
        .to_vec1()?;
    Ok(Induction {
        scores: Tensor::stack(&scores, 0)?.to_dtype(DType::F32)?,
        loss_by_position,
    })
}

impl Induction {
    /// Writes `dir/induction_scores.safetensors` (key `score`), the heatmap
    /// `dir/induction_scores.png` and the loss plot `dir/loss_by_position.png`; returns
    /// the paths written.
    #[cfg(feature = "plot")]
    pub fn save(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut written = vec![self.save_scores(dir)?];
        written.extend(self.save_figures(dir)?);
        Ok(written)
    }

    /// Writes `dir/induction_scores.safetensors` (key `score`); returns its path.
    pub fn save_scores(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let scores_path = dir.join("induction_scores.safetensors");
        write_safetensors(
            &HashMap::from([("score".to_string(), self.scores.contiguous()?)]),
            &scores_path,
        )?;
        Ok(scores_path)
    }

    /// Draws the heatmap `dir/induction_scores.png` and the loss plot
    /// `dir/loss_by_position.png`; returns their paths.
    #[cfg(feature = "plot")]
    pub fn save_figures(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        use crate::plot::{Heatmap, Line, LineChart};
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let heatmap_path = dir.join("induction_scores.png");
        let rows = self.scores.to_vec2::<f32>()?;
        Heatmap {
            title: "Induction score per head (repeated random tokens)",
            x_label: "head",
            y_label: "layer",
            value_label: "mean attention to the token after the first occurrence",
            rows: &rows,
            column_names: None,
            row_names: None,
        }
        .save(&heatmap_path)?;

        let loss_path = dir.join("loss_by_position.png");
        let half = self.loss_by_position.len().div_ceil(2);
        let line = Line {
            label: format!("sequence of {half} random tokens, then itself"),
            points: self
                .loss_by_position
                .iter()
                .enumerate()
                .map(|(i, &loss)| ((i + 1) as f32, loss))
                .collect(),
        };
        LineChart {
            title: "Next-token loss per position on repeated random tokens",
            x_label: "position of the predicted token",
            y_label: "cross-entropy (nats), mean over sequences",
            lines: &[line],
            log_y: false,
        }
        .save(&loss_path)?;
        Ok(vec![heatmap_path, loss_path])
    }
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
