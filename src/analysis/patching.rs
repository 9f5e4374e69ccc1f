//! Activation patching: run a corrupted prompt, replace the residual stream entering one
//! layer at one position with its value from a clean run, and measure how much of the
//! clean run's preference for the right answer comes back. Where that fraction is high,
//! the residual stream at that (layer, position) carries what the answer depends on.
//!
//! Prompts of unequal length are aligned at their ends (left-padded in one batch): the
//! positions patched are the last ones, as many as the shorter prompt has.

use candle_core::{DType, Device, IndexOp, Tensor};
use indicatif::ProgressBar;

use crate::text::TokenBatch;
use crate::{Error, FlexModel, HookFunction, Result};

/// The result of patching `blocks.i.hook_resid_pre` at every (layer, position).
#[derive(Debug, Clone)]
pub struct Patching {
    /// `restored[layer][position]`: (patched − corrupted) / (clean − corrupted) logit
    /// difference; 1 means the patch alone restores the clean behaviour. Position `j`
    /// is the `j`-th of the last `n` positions of both prompts, `n` the shorter's length.
    pub restored: Vec<Vec<f32>>,
    /// logit(answer) − logit(wrong) at the last position of the clean prompt.
    pub clean_diff: f32,
    /// The same difference on the corrupted prompt.
    pub corrupted_diff: f32,
}

/// logit(answer) − logit(wrong) at the last position of every sequence of `logits`
/// (`[b, t, vocab]`).
fn logit_diffs(logits: &Tensor, answer: u32, wrong: u32) -> Result<Vec<f32>> {
    let last = logits.i((.., logits.dim(1)? - 1))?.to_dtype(DType::F32)?;
    let (answer, wrong) = (answer as usize, wrong as usize);
    Ok((last.i((.., answer))? - last.i((.., wrong))?)?.to_vec1()?)
}

/// Patches the residual stream of `clean` into `corrupted` at every layer and at each of
/// their last `n` positions (`n` the shorter's length; the prompts are aligned at their
/// ends), measuring the logit difference between the token ids `answer` (right for the
/// clean prompt) and `wrong` (right for the corrupted one).
///
/// One pass per layer: the batch holds one copy of the corrupted prompt per position,
/// copy `j` patched at position `j`; `progress` advances once per layer.
pub fn patch_residual_stream(
    model: &mut FlexModel,
    clean: &[u32],
    corrupted: &[u32],
    answer: u32,
    wrong: u32,
    progress: &ProgressBar,
) -> Result<Patching> {
    if clean.is_empty() || corrupted.is_empty() {
        return Err(Error::Analysis {
            analysis: "activation patching",
            problem: format!(
                "it needs a clean and a corrupted prompt of at least one token; they have {} \
                 and {}",
                clean.len(),
                corrupted.len()
            ),
        });
    }
    let vocab_size = model.config().vocab_size();
    for id in [answer, wrong] {
        if id as usize >= vocab_size {
            return Err(Error::TokenOutOfVocabulary { id, vocab_size });
        }
    }
    // Both prompts in one left-padded batch of t positions, so that they line up.
    let both = TokenBatch::left_padded(&[clean, corrupted])?;
    let t = both.dims()?.1;
    let n = clean.len().min(corrupted.len());
    let (logits, residuals) = super::capture_every_layer(model, &both, "hook_resid_pre")?;
    let both_diffs = logit_diffs(&logits, answer, wrong)?;
    let (clean_diff, corrupted_diff) = (both_diffs[0], both_diffs[1]);
    let gap = clean_diff - corrupted_diff;
    if gap.abs() < 1e-6 {
        return Err(Error::Analysis {
            analysis: "activation patching",
            problem: format!(
                "the clean and corrupted prompts give the same logit difference \
                 ({clean_diff}): there is nothing to restore"
            ),
        });
    }
    // n copies of the corrupted row; copy j is patched at position t − n + j.
    let corrupted_batch = TokenBatch::with_mask(
        both.tokens().i(1..2)?.repeat((n, 1))?,
        both.mask_or_ones()?.i(1..2)?.repeat((n, 1))?,
    )?;
    // Built on the host, where the captures are; the edit takes it to the value's device.
    let device = Device::Cpu;
    let at: Vec<f32> = (0..n)
        .flat_map(|j| (0..t).map(move |p| f32::from(u8::from(p == t - n + j))))
        .collect();
    let at = Tensor::from_vec(at, (n, t, 1), &device)?;
    let mut restored = Vec::with_capacity(residuals.len());
    for (layer, resid) in residuals.into_iter().enumerate() {
        let clean_resid = resid.i(0..1)?;
        let mask = at.to_dtype(clean_resid.dtype())?;
        let patch = HookFunction::new(format!("blocks.{layer}.hook_resid_pre"))
            .with_edit(move |_, x| {
                // The captures are on the host; the value where the model computes.
                let (mask, clean) = (
                    mask.to_device(x.device())?,
                    clean_resid.to_device(x.device())?,
                );
                let (mask, clean) = (mask.to_dtype(x.dtype())?, clean.to_dtype(x.dtype())?);
                let keep = mask.affine(-1.0, 1.0)?;
                Ok((x.broadcast_mul(&keep)? + clean.broadcast_mul(&mask)?)?)
            })
            .without_capture();
        let hook = model.hooks_mut().register(patch)?;
        let pass = model.forward(&corrupted_batch);
        model.hooks_mut().remove(hook)?;
        let diffs = logit_diffs(&pass?, answer, wrong)?;
        restored.push(diffs.iter().map(|d| (d - corrupted_diff) / gap).collect());
        progress.inc(1);
    }
    Ok(Patching {
        restored,
        clean_diff,
        corrupted_diff,
    })
}

impl Patching {
    /// Draws the restored fraction (layers × positions) into the PNG file `path`;
    /// `positions` labels the columns (for example "clean / corrupted" token pairs).
    #[cfg(feature = "plot")]
    pub fn save_heatmap(
        &self,
        path: &std::path::Path,
        title: &str,
        positions: &[String],
    ) -> Result<()> {
        crate::plot::Heatmap {
            title,
            x_label: "position (clean / corrupted token)",
            y_label: "layer (patching blocks.i.hook_resid_pre)",
            value_label: "fraction of the clean logit difference restored",
            rows: &self.restored,
            column_names: Some(positions),
            row_names: None,
        }
        .save(path)
    }

    /// The (layer, position, fraction) with the largest restored fraction.
    pub fn best(&self) -> Option<(usize, usize, f32)> {
        self.restored
            .iter()
            .enumerate()
            .flat_map(|(l, row)| row.iter().enumerate().map(move |(p, &f)| (l, p, f)))
            .max_by(|a, b| a.2.total_cmp(&b.2))
    }
}
