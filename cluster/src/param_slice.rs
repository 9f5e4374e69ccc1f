//! One parameter tensor as one rank holds it.

use std::ops::Range;

use candle_core::Tensor;

/// A rank's slice of a named parameter.
#[derive(Debug, Clone)]
pub struct ParamSlice {
    /// The parameter's name (Hugging Face naming for LLaMA models).
    pub name: String,
    /// The values this rank holds.
    pub value: Tensor,
    /// `None` if the rank's tensor-parallel slice is the whole parameter; else the
    /// dimension it is sliced along and the range of it the slice covers.
    pub split: Option<(usize, Range<usize>)>,
    /// Under FSDP, the piece of that slice this replica holds (the other replicas of
    /// the shard hold the rest): the dimension it is cut along and the range of it
    /// within the slice. `None` when every replica holds the whole slice.
    pub piece: Option<(usize, Range<usize>)>,
    /// Whether `value` holds the slice transposed: a linear layer's `[out, in]` weight
    /// kept as `[in, out]`, the layout its products read fastest. `split` and `piece`
    /// name the dimensions of the parameter itself, not of `value`.
    pub transposed: bool,
}

impl ParamSlice {
    /// The slice as the parameter is laid out (`value` transposed back if it is held
    /// transposed), with `grad`, a gradient of `value`, laid out alike.
    pub fn presented(self, grad: Option<Tensor>) -> candle_core::Result<(Self, Option<Tensor>)> {
        if !self.transposed {
            return Ok((self, grad));
        }
        let grad = grad.map(|g| g.t()?.contiguous()).transpose()?;
        let slice = Self {
            value: self.value.t()?.contiguous()?,
            transposed: false,
            ..self
        };
        Ok((slice, grad))
    }

    /// The dimension of `value` that is dimension `dim` of the parameter.
    pub fn held_dim(&self, dim: usize) -> usize {
        match self.transposed {
            true => 1 - dim,
            false => dim,
        }
    }
}
