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
    /// `None` if the rank holds the whole parameter; else the dimension it is sliced
    /// along and the range of it the rank holds.
    pub split: Option<(usize, Range<usize>)>,
}
