//! A hook function: what it targets, when it runs, and what it does.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::Tensor;

use crate::hooks::Size;
use crate::hooks::catalog::HookKind;
use crate::{Error, HookPoint, Result, SaveContext};

/// An edit: receives the full, unsharded value of a hook point and returns the value
/// the model continues with (same shape and dtype).
pub type EditFn = dyn FnMut(&mut HookCtx<'_>, Tensor) -> Result<Tensor> + Send;

/// An edit shared by every hook point one registration matched.
pub(crate) type SharedEdit = Arc<Mutex<Box<EditFn>>>;

/// What an edit closure knows about the call it is running in.
pub struct HookCtx<'a> {
    pub(crate) point: HookPoint,
    pub(crate) name: &'a str,
    pub(crate) call: usize,
    pub(crate) positions: Range<usize>,
    pub(crate) attention_mask: Option<&'a Tensor>,
    pub(crate) save: &'a mut SaveContext,
}

impl HookCtx<'_> {
    /// The hook point being called.
    pub fn point(&self) -> HookPoint {
        self.point
    }

    /// Its TransformerLens name.
    pub fn name(&self) -> &str {
        self.name
    }

    /// How many times this hook point was called before in this pass (0 for the first).
    pub fn call(&self) -> usize {
        self.call
    }

    /// The positions of the sequences this call holds: `0..t` in a forward pass, the
    /// new position in a decoding step of a generation (its index in the padded batch).
    pub fn positions(&self) -> Range<usize> {
        self.positions.clone()
    }

    /// The attention mask `[b, positions().end]` (f32: 1 for a real token, 0 for
    /// padding) over every position up to this call's last, or `None` when no position
    /// is padding.
    pub fn attention_mask(&self) -> Option<&Tensor> {
        self.attention_mask
    }

    /// The save context shared by all hooks and kept across passes.
    pub fn save(&mut self) -> &mut SaveContext {
        self.save
    }
}

/// A hook to register: a target (an exact hook or module name, or a glob), a kind, an
/// optional edit, whether to capture, and group tags.
///
/// ```
/// use flexmodel::{HookFunction, edits};
///
/// // Capture the residual stream after every block.
/// let capture = HookFunction::new("blocks.*.hook_resid_post");
/// // Zero head 3 of layer 5's pattern without keeping a copy, in group "ablation".
/// let ablate = HookFunction::new("blocks.5.attn.hook_pattern")
///     .with_edit(edits::zero_head(3))
///     .without_capture()
///     .tagged("ablation");
/// # let _ = (capture, ablate);
/// ```
pub struct HookFunction {
    pub(crate) target: String,
    pub(crate) kind: HookKind,
    pub(crate) edit: Option<Box<EditFn>>,
    pub(crate) capture: bool,
    pub(crate) tags: Vec<String>,
}

impl HookFunction {
    /// A forward hook on `target` that captures its value.
    pub fn new(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            kind: HookKind::Forward,
            edit: None,
            capture: true,
            tags: Vec::new(),
        }
    }

    /// A forward-pre hook on a module's input (`model.layers.7` = `blocks.7.hook_resid_pre`).
    pub fn forward_pre(module: impl Into<String>) -> Self {
        Self {
            kind: HookKind::ForwardPre,
            ..Self::new(module)
        }
    }

    /// A backward hook on `target`: captures the gradient of the loss with respect to the
    /// point as `NAME_grad` in a [`FlexModel::forward_backward`](crate::FlexModel::forward_backward) pass.
    pub fn backward(target: impl Into<String>) -> Self {
        Self {
            kind: HookKind::Backward,
            ..Self::new(target)
        }
    }

    /// Runs `edit` on the full value at every call; the model continues with its result.
    pub fn with_edit(
        mut self,
        edit: impl FnMut(&mut HookCtx<'_>, Tensor) -> Result<Tensor> + Send + 'static,
    ) -> Self {
        self.edit = Some(Box::new(edit));
        self
    }

    /// Confines the edit to sequences `rows` of the batch and their first `len`
    /// positions: the edit sees only that part of the value (with its part of the
    /// attention mask), as if those sequences were a pass of their own, and the rest of
    /// the value goes on unchanged. This is how one batch serves many requests, each
    /// with its own edits (their sequences padded on the right to the batch's length).
    pub fn on_sequences(mut self, rows: Range<usize>, len: usize) -> Self {
        if let Some(edit) = self.edit.take() {
            self.edit = Some(confined(edit, rows, len));
        }
        self
    }

    /// Does not store the value in the activation store (edit-only hooks).
    pub fn without_capture(mut self) -> Self {
        self.capture = false;
        self
    }

    /// Adds the hook to group `group`.
    pub fn tagged(mut self, group: impl Into<String>) -> Self {
        self.tags.push(group.into());
        self
    }

    /// The target this hook was built with.
    pub fn target(&self) -> &str {
        &self.target
    }
}

/// `edit`, run on sequences `rows` over their first `len` positions only.
fn confined(mut edit: Box<EditFn>, rows: Range<usize>, len: usize) -> Box<EditFn> {
    Box::new(move |ctx, x| {
        let spec = ctx.point.shape_spec();
        if spec.len() != x.rank() {
            return Err(Error::Internal(
                "a hook point's value has another rank than its shape says",
            ));
        }
        let end = ctx.positions.end;
        let mut ranges = Vec::with_capacity(spec.len());
        for (dim, size) in spec.iter().enumerate() {
            let n = x.dim(dim)?;
            ranges.push(match size {
                Size::Batch => rows.start.min(n)..rows.end.min(n),
                // A dimension of positions holds the call's last `n` positions up to
                // `end`: queries (`positions()`) or keys (`0..end`).
                Size::Seq => 0..len.saturating_sub(end.saturating_sub(n)).min(n),
                _ => 0..n,
            });
        }
        if ranges.iter().any(|r| r.is_empty()) {
            return Ok(x);
        }
        let mut part = x.clone();
        for (dim, range) in ranges.iter().enumerate() {
            part = part.narrow(dim, range.start, range.len())?;
        }
        let mask = match ctx.attention_mask {
            Some(mask) => {
                let keys = len.min(mask.dim(1)?);
                let mask = mask.narrow(0, ranges[0].start, ranges[0].len())?;
                let mask = mask.narrow(1, 0, keys)?;
                let padded = mask.flatten_all()?.min(0)?.to_scalar::<f32>()? == 0.0;
                padded.then_some(mask)
            }
            None => None,
        };
        let mut own = HookCtx {
            point: ctx.point,
            name: ctx.name,
            call: ctx.call,
            positions: ctx.positions.start.min(len)..end.min(len),
            attention_mask: mask.as_ref(),
            save: ctx.save,
        };
        let edited = edit(&mut own, part)?;
        Ok(x.slice_assign(&ranges, &edited)?)
    })
}
