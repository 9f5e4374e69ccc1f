//! Which part of a model a pipeline stage holds.

use std::ops::Range;

/// Which part of the model a shard holds: a contiguous run of blocks, plus the
/// embedding on the first stage and the final norm and LM head on the last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The blocks of this stage.
    pub layers: Range<usize>,
    /// Whether this stage starts with the token embedding.
    pub first: bool,
    /// Whether this stage ends with the final norm and the LM head.
    pub last: bool,
}

impl Stage {
    /// The whole model in one stage.
    pub fn whole(n_layers: usize) -> Self {
        Self {
            layers: 0..n_layers,
            first: true,
            last: true,
        }
    }
}
