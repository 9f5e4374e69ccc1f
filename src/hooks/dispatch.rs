//! The hook layer of one pass: captures and edits at the points the plan names.

use std::collections::{BTreeMap, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};

use candle_core::Tensor;
use flexmodel_cluster::host_copy::to_host;

use flexmodel_actors::{BoxError, HookSink, PointMode, Tap, Window};

use crate::hooks::function::HookCtx;
use crate::hooks::point::ModelPoints;
use crate::hooks::registry::{Entry, PassPlan};
use crate::hooks::store::zero_padding;
use crate::{ActivationStore, Error, HookLayer, HookPoint, Result, SaveContext};

/// A loss computed by the driver from the full logits `[b, t, vocab]`: a scalar.
pub type LossFn<'a> = dyn FnMut(&Tensor) -> Result<Tensor> + 'a;

/// Runs the registered hooks of one pass, on one shard (as its hook layer) or on the
/// gathered tensors of a sharded pass (as the coordinator's sink). Its captures are kept
/// apart until the pass succeeds, so a failed pass leaves the store as it was.
pub(crate) struct PassHooks<'a> {
    plan: PassPlan,
    entries: &'a [Entry],
    save: &'a mut SaveContext,
    points: &'a ModelPoints,
    /// Calls so far of each hook point in this pass, by point index.
    calls: Vec<usize>,
    /// In a backward pass through the runtime: the pre-edit leaf and the edited result of
    /// every edited `(point index, call)`, to back-propagate through the edit.
    edit_graphs: Option<HashMap<(usize, usize), (Tensor, Tensor)>>,
    /// A loss the driver computes from the gathered logits, and its value once computed.
    loss_fn: Option<Box<LossFn<'a>>>,
    pub(crate) loss: Option<f32>,
    /// The trainable variables edits may use, by name, and their gradients so far.
    trainables: Vec<(String, Tensor)>,
    pub(crate) trainable_grads: BTreeMap<String, Tensor>,
    pub(crate) captures: ActivationStore,
    /// Where the pass's positions are: the attention mask over every position up to
    /// its last (`None` without padding), the pass's own positions, and their columns
    /// of the mask (`[b, t]`), zero where captures are zeroed.
    mask: Option<Tensor>,
    positions: std::ops::Range<usize>,
    padding: Option<Tensor>,
}

impl<'a> PassHooks<'a> {
    /// The hooks of `plan` on a model with `points`.
    pub(crate) fn new(
        plan: PassPlan,
        entries: &'a [Entry],
        save: &'a mut SaveContext,
        points: &'a ModelPoints,
    ) -> Self {
        let calls = vec![0; plan.by_point.len()];
        Self {
            plan,
            entries,
            save,
            points,
            calls,
            edit_graphs: None,
            loss_fn: None,
            loss: None,
            trainables: Vec::new(),
            trainable_grads: BTreeMap::new(),
            captures: ActivationStore::default(),
            mask: None,
            positions: 0..0,
            padding: None,
        }
    }

    /// The hooks of a pass of `window` over `t` positions: captures are zero at padded
    /// positions, and edits see the positions and the mask in their context.
    pub(crate) fn at(mut self, window: &Window, t: usize) -> Result<Self> {
        self.positions = window.offset..window.offset + t;
        if let Some(mask) = &window.mask {
            self.padding = Some(mask.narrow(1, window.offset, t)?);
            self.mask = Some(mask.clone());
        }
        Ok(self)
    }

    /// Keeps the graph of every edit, for a pass whose backward runs through the edits.
    /// Computes the loss with `loss` from the gathered logits instead of the default.
    pub(crate) fn with_loss(mut self, loss: Box<LossFn<'a>>) -> Self {
        self.loss_fn = Some(loss);
        self
    }

    /// The driver's loss of the full `logits`, and the gradient of the logits.
    fn driver_loss(&mut self, logits: &Tensor) -> Result<Tensor> {
        let loss_fn = self
            .loss_fn
            .as_mut()
            .ok_or(Error::Internal("the runtime asked for a loss nobody gave"))?;
        // A loss of the user's is computed on the host, where its other tensors are.
        let logits = to_host(logits)?;
        let logits = candle_core::Var::from_tensor(&logits)?.as_tensor().clone();
        let loss = loss_fn(&logits)?;
        if loss.elem_count() != 1 {
            return Err(Error::LossNotScalar {
                dims: loss.dims().to_vec(),
            });
        }
        self.loss = Some(
            loss.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?[0],
        );
        let grads = loss.sum_all()?.backward()?;
        Ok(match grads.get(&logits) {
            Some(g) => g.clone(),
            None => logits.zeros_like()?,
        })
    }

    /// `trainables` (name, variable) get their gradients summed over every edit.
    pub(crate) fn keeping_edit_graphs(mut self, trainables: Vec<(String, Tensor)>) -> Self {
        self.edit_graphs = Some(HashMap::new());
        self.trainables = trainables;
        self
    }

    /// How the runtime must treat each point's value: not at all, gather it, or gather
    /// and edit it.
    pub(crate) fn modes(&self) -> Vec<PointMode> {
        self.modes_of(&self.plan.by_point)
    }

    /// How the runtime must treat each point's gradient in a backward pass.
    pub(crate) fn grad_modes(&self) -> Vec<PointMode> {
        self.modes_of(&self.plan.grad_by_point)
    }

    fn modes_of(&self, table: &[Vec<usize>]) -> Vec<PointMode> {
        table
            .iter()
            .map(|active| {
                let mut entries = active.iter().map(|&i| &self.entries[i]);
                if entries.clone().any(|e| e.edit.is_some()) {
                    PointMode::Edit
                } else if entries.any(|e| e.capture) {
                    PointMode::Observe
                } else {
                    PointMode::Off
                }
            })
            .collect()
    }

    /// Captures `value` (call `call` of `point`) and runs the edits on it, in order; with
    /// `gradient`, `value` is the gradient at the point and the backward hooks run.
    fn apply(
        &mut self,
        point: HookPoint,
        call: usize,
        value: Tensor,
        gradient: bool,
    ) -> Result<Tensor> {
        let index = self.points.index(point);
        let active = match gradient {
            true => &self.plan.grad_by_point[index],
            false => &self.plan.by_point[index],
        };
        let name = point.to_string();
        let key = match gradient {
            true => format!("{name}_grad"),
            false => name.clone(),
        };
        let bytes = (value.elem_count() * value.dtype().size_in_bytes()) as i64;
        if active.iter().any(|&i| self.entries[i].capture) {
            let _span = tracing::info_span!(
                "hook.store",
                hook.name = %key,
                hook.call = call as i64,
                hook.bytes = bytes,
            )
            .entered();
            // The store keeps captures on the host, whatever device computed them.
            let host = to_host(&value.detach())?;
            let captured = match &self.padding {
                Some(padding) => zero_padding(&host, padding, point.position_dim())?,
                None => host,
            };
            self.captures.push(key.clone(), captured);
        }
        let has_edit = active.iter().any(|&i| self.entries[i].edit.is_some());
        let _edit_span = has_edit.then(|| {
            tracing::info_span!(
                "hook.edit",
                hook.name = %key,
                hook.call = call as i64,
                hook.bytes = bytes,
            )
            .entered()
        });
        // The leaf whose gradient the backward pass through the edit asks for.
        let leaf = match (&self.edit_graphs, has_edit && !gradient) {
            (Some(_), true) => Some(candle_core::Var::from_tensor(&value)?.as_tensor().clone()),
            _ => None,
        };
        let mut x = leaf.clone().unwrap_or(value);
        for edit in active.iter().filter_map(|&i| self.entries[i].edit.as_ref()) {
            let mut ctx = HookCtx {
                point,
                name: &name,
                call,
                positions: self.positions.clone(),
                attention_mask: self.mask.as_ref(),
                save: self.save,
            };
            // A poisoned lock only means an earlier call panicked; the closure is still usable.
            let mut edit = edit.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let input = x.clone();
            let result = catch_unwind(AssertUnwindSafe(|| edit(&mut ctx, input)));
            let edited = match result {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    return Err(Error::HookFailed {
                        hook: name,
                        source: Box::new(e),
                    });
                }
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".to_string());
                    return Err(Error::HookFailed {
                        hook: name,
                        source: Box::new(Error::EditPanicked { message }),
                    });
                }
            };
            if edited.dims() != x.dims() || edited.dtype() != x.dtype() {
                return Err(Error::EditChangedTensor {
                    hook: name,
                    expected: format!("{:?} {:?}", x.dims(), x.dtype()),
                    found: format!("{:?} {:?}", edited.dims(), edited.dtype()),
                });
            }
            x = edited;
        }
        if let (Some(graphs), Some(leaf)) = (&mut self.edit_graphs, leaf) {
            graphs.insert((index, call), (leaf, x.clone()));
            return Ok(x.detach());
        }
        Ok(x)
    }

    /// The gradient of the pre-edit value of `(point, call)` from `grad`, the gradient of
    /// its edited value (the edit's trainable variables get theirs on the way).
    fn through_edit(&mut self, index: usize, call: usize, grad: &Tensor) -> Result<Tensor> {
        let graphs = self.edit_graphs.as_mut();
        let Some((leaf, edited)) = graphs.and_then(|g| g.remove(&(index, call))) else {
            return Err(Error::Internal(
                "a gradient came back for an edit that did not run",
            ));
        };
        let grads = (edited * grad.detach())?.sum_all()?.backward()?;
        for (name, var) in &self.trainables {
            if let Some(g) = grads.get(var) {
                let total = match self.trainable_grads.remove(name) {
                    Some(sum) => (sum + g)?,
                    None => g.clone(),
                };
                self.trainable_grads.insert(name.clone(), total);
            }
        }
        Ok(match grads.get(&leaf) {
            Some(g) => g.clone(),
            None => leaf.zeros_like()?,
        })
    }
}

impl HookLayer for PassHooks<'_> {
    fn wants(&self, point: HookPoint) -> bool {
        let index = self.points.index(point);
        !self.plan.by_point[index].is_empty() || !self.plan.grad_by_point[index].is_empty()
    }

    fn hook(&mut self, point: HookPoint, value: Tensor) -> Result<Tensor> {
        let index = self.points.index(point);
        if self.plan.by_point[index].is_empty() {
            return Ok(value);
        }
        let _op = crate::op_span!("hooks");
        let call = self.calls[index];
        self.calls[index] += 1;
        self.apply(point, call, value, false)
    }
}

impl HookSink for PassHooks<'_> {
    fn gathered(
        &mut self,
        tap: Tap,
        call: usize,
        full: Tensor,
    ) -> std::result::Result<Option<Tensor>, BoxError> {
        let (id, gradient) = match tap {
            Tap::Output => return Ok(Some(self.driver_loss(&full)?)),
            Tap::EditGradient(id) => return Ok(Some(self.through_edit(id, call, &full)?)),
            Tap::Value(id) => (id, false),
            Tap::Gradient(id) => (id, true),
        };
        let point = self
            .points
            .at(id)
            .ok_or(Error::Internal("a hook point index outside the model"))?;
        let index = self.points.index(point);
        let table = if gradient {
            &self.plan.grad_by_point
        } else {
            &self.plan.by_point
        };
        let edits = table[index].iter().any(|&i| self.entries[i].edit.is_some());
        let result = self.apply(point, call, full, gradient)?;
        Ok(edits.then_some(result))
    }
}
