//! How a tensor is laid out across the tensor-parallel ranks.

use std::fmt;

/// How the tensor of a hook point is distributed over the tensor-parallel ranks.
///
/// The batch dimension is always split across data-parallel replicas; this only
/// describes the tensor-parallel split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShardSpec {
    /// Every rank holds the whole tensor.
    Replicated,
    /// Rank `r` of `n` holds the `r`-th of `n` equal slices along `dim`.
    Split {
        /// The dimension that is split.
        dim: usize,
    },
}

impl fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardSpec::Replicated => write!(f, "replicated"),
            ShardSpec::Split { dim } => write!(f, "split dim {dim}"),
        }
    }
}
