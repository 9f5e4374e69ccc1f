//! The hook layer: the model hands the value of every hook point to it.

use candle_core::Tensor;

use crate::{HookPoint, Result};

/// Receives the value of each hook point as the forward pass reaches it and returns
/// the value the model continues with (the same tensor, or an edited one).
///
/// [`NoHooks`] returns every value untouched, so an unhooked pass costs one virtual
/// call per point. Any `FnMut(HookPoint, Tensor) -> Result<Tensor>` is a hook layer
/// that sees every point, opt-in ones included.
pub trait HookLayer {
    /// The value at `point`; returns what the model continues with.
    fn hook(&mut self, point: HookPoint, value: Tensor) -> Result<Tensor>;

    /// Whether a hook is on `point`. The model computes an opt-in point
    /// ([`HookPoint::is_opt_in`]) and converts the token ids for `hook_tokens` only where
    /// this says so, and calls [`hook`](Self::hook) at every other point whatever it says.
    fn wants(&self, point: HookPoint) -> bool {
        let _ = point;
        true
    }
}

/// The hook layer of an unhooked pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl HookLayer for NoHooks {
    fn hook(&mut self, _point: HookPoint, value: Tensor) -> Result<Tensor> {
        Ok(value)
    }

    fn wants(&self, _point: HookPoint) -> bool {
        false
    }
}

impl<F> HookLayer for F
where
    F: FnMut(HookPoint, Tensor) -> Result<Tensor>,
{
    fn hook(&mut self, point: HookPoint, value: Tensor) -> Result<Tensor> {
        self(point, value)
    }
}
