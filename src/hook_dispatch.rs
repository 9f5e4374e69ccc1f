//! The hook layer of one pass: captures and edits at the points the plan names.

use std::panic::{AssertUnwindSafe, catch_unwind};

use candle_core::Tensor;

use crate::hook_function::HookCtx;
use crate::hook_registry::{Entry, PassPlan};
use crate::{ActivationStore, Error, HookLayer, HookPoint, Result, SaveContext};

/// Runs the registered hooks of one pass; its captures are kept apart until the pass
/// succeeds, so a failed pass leaves the store as it was.
pub(crate) struct PassHooks<'a> {
    plan: PassPlan,
    entries: &'a [Entry],
    save: &'a mut SaveContext,
    n_layers: usize,
    /// Calls so far of each hook point in this pass, by point index.
    calls: Vec<usize>,
    pub(crate) captures: ActivationStore,
}

impl<'a> PassHooks<'a> {
    pub(crate) fn new(
        plan: PassPlan,
        entries: &'a [Entry],
        save: &'a mut SaveContext,
        n_layers: usize,
    ) -> Self {
        let calls = vec![0; plan.by_point.len()];
        Self {
            plan,
            entries,
            save,
            n_layers,
            calls,
            captures: ActivationStore::default(),
        }
    }
}

impl HookLayer for PassHooks<'_> {
    fn hook(&mut self, point: HookPoint, value: Tensor) -> Result<Tensor> {
        let index = point.index(self.n_layers);
        let active = &self.plan.by_point[index];
        if active.is_empty() {
            return Ok(value);
        }
        let call = self.calls[index];
        self.calls[index] += 1;
        let name = point.to_string();
        if active.iter().any(|&i| self.entries[i].capture) {
            self.captures.push(name.clone(), value.detach());
        }
        let mut x = value;
        for edit in active.iter().filter_map(|&i| self.entries[i].edit.as_ref()) {
            let mut ctx = HookCtx {
                point,
                name: &name,
                call,
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
                        source: Box::new(Error::BadInput(format!("the edit panicked: {message}"))),
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
        Ok(x)
    }
}
