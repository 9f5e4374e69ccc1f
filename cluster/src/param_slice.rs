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
}
