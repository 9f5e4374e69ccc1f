//! Captured activations: hook name → one tensor per call.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::Result;

/// `value` with its padded positions zeroed: `padding` (`[b, t]`, 0 at padded positions)
/// indexes dimensions 0 and `dim` of `value`.
pub(crate) fn zero_padding(value: &Tensor, padding: &Tensor, dim: usize) -> Result<Tensor> {
    let (b, t) = padding.dims2()?;
    let mut shape = vec![1; value.rank()];
    (shape[0], shape[dim]) = (b, t);
    let real = padding
        .ne(0f32)?
        .reshape(shape)?
        .broadcast_as(value.shape())?;
    let zeros = Tensor::zeros(value.shape(), value.dtype(), value.device())?;
    Ok(real.where_cond(value, &zeros)?)
}

/// What the hooks captured: for each hook point, one tensor per call, in call order.
///
/// Each tensor is the value the model produced (before any edit), detached from the
/// autograd graph, on the host, with the full unsharded shape, batch first. Captures
/// accumulate across passes until taken or cleared.
#[derive(Debug, Clone, Default)]
pub struct ActivationStore {
    captures: BTreeMap<String, Vec<Tensor>>,
}

impl ActivationStore {
    /// Appends the capture of one call of `name`.
    pub fn push(&mut self, name: impl Into<String>, value: Tensor) {
        self.captures.entry(name.into()).or_default().push(value);
    }

    /// Every call's capture of `name`.
    pub fn get(&self, name: &str) -> Option<&[Tensor]> {
        self.captures.get(name).map(Vec::as_slice)
    }

    /// The latest call's capture of `name`.
    pub fn last(&self, name: &str) -> Option<&Tensor> {
        self.captures.get(name)?.last()
    }

    /// Removes and returns the captures of `name`.
    pub fn take(&mut self, name: &str) -> Option<Vec<Tensor>> {
        self.captures.remove(name)
    }

    /// Removes and returns everything.
    pub fn take_all(&mut self) -> BTreeMap<String, Vec<Tensor>> {
        std::mem::take(&mut self.captures)
    }

    /// Moves every capture of `other` to the end of this store's lists.
    pub fn append(&mut self, other: ActivationStore) {
        for (name, mut values) in other.captures {
            self.captures.entry(name).or_default().append(&mut values);
        }
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.captures.clear();
    }

    /// `(name, captures)` in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[Tensor])> {
        self.captures
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// The number of hook points with captures.
    pub fn len(&self) -> usize {
        self.captures.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.captures.is_empty()
    }

    /// The bytes of tensor data held (element count × element size, summed).
    pub fn bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.captures.values().flatten().map(size).sum()
    }
}
