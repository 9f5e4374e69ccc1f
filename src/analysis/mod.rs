//! Interpretability analyses built on the hook API.

pub mod induction;
pub mod lens;
pub mod patching;
pub mod steering;

use candle_core::Tensor;

use crate::{Error, FlexModel, HookFunction, Result};

/// Runs `tokens` through `model` with a temporary capture hook on `blocks.*.{site}`
/// (removed whatever happens) and returns the logits and, for every layer in order, the
/// last call of `blocks.{layer}.{site}`, taken out of the store.
fn capture_every_layer(
    model: &mut FlexModel,
    tokens: impl Into<crate::TokenBatch>,
    site: &str,
) -> Result<(Tensor, Vec<Tensor>)> {
    let hook = model
        .hooks_mut()
        .register(HookFunction::new(format!("blocks.*.{site}")))?;
    let pass = model.forward(tokens);
    model.hooks_mut().remove(hook)?;
    let logits = pass?;
    let values = (0..model.config().n_layers())
        .map(|layer| {
            let name = format!("blocks.{layer}.{site}");
            model
                .store_mut()
                .take(&name)
                .and_then(|calls| calls.last().cloned())
                .ok_or(Error::NotCaptured { hook: name })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((logits, values))
}
