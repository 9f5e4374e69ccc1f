//! Every message of the hook protocol between the driver, the coordinator and the
//! shards, in one place.
//!
//! A pass is numbered; every message carries its pass, and messages of an earlier
//! (aborted) pass are dropped on receipt. A hook call is `(point, call)`: the point's
//! index and how many times the shard reached it before in the pass. Gradients travel
//! as points `n_points + p`, gradients of an edit's result as `2 n_points + p`, and the
//! last stage's output (for a loss the driver computes) as `3 n_points`.

use std::sync::Arc;

use candle_core::Tensor;
use crossbeam_channel::Sender;

use crate::error::ShardFailure;
use crate::geometry::{PointMode, ShardAction};
use crate::{PointId, ShardParameters};

/// What a shard tells the coordinator.
#[derive(Debug)]
pub enum ShardEvent {
    /// Its piece of one call of a hook point.
    Piece {
        pass: u64,
        rank: usize,
        point: PointId,
        call: usize,
        value: Tensor,
    },
    /// The pass is done; the last stage sends its slice of the output (and, after a
    /// backward pass, its replica's share of the loss).
    Done {
        pass: u64,
        rank: usize,
        output: Option<Tensor>,
        loss: Option<f32>,
    },
    /// The pass failed on this shard (after an abort: a consequence, not the cause).
    Failed {
        pass: u64,
        rank: usize,
        /// The hook point the shard last reached, and whether in backward.
        at: Option<(PointId, bool)>,
        cause: ShardFailure,
        after_abort: bool,
    },
}

/// An edited piece the coordinator sends back.
#[derive(Debug)]
pub struct EditedPiece {
    pub(crate) pass: u64,
    pub(crate) point: PointId,
    pub(crate) call: usize,
    pub(crate) value: Tensor,
}

/// Runs one pass on a shard.
pub struct RunPass {
    pub(crate) pass: u64,
    /// The replica's token ids (first stage only).
    pub(crate) input: Option<Tensor>,
    /// What to do at each hook point, by point id.
    pub(crate) actions: Arc<Vec<ShardAction>>,
    /// A fault to raise at a hook point (testing the failure path).
    pub(crate) fault: Option<(PointId, Fault)>,
    /// Run backward too.
    pub(crate) backward: Option<BackwardPass>,
    /// The pass's root span, the parent of this shard's spans.
    pub(crate) span: tracing::Span,
}

/// The backward half of a pass.
pub(crate) struct BackwardPass {
    /// The replica's token ids (the targets of the loss).
    pub(crate) tokens: Tensor,
    /// The number of predicted tokens in the global batch.
    pub(crate) normalizer: f64,
    /// Whether the driver computes the loss from the gathered output instead.
    pub(crate) driver_loss: bool,
    /// How the gradient at each hook point is hooked on this shard.
    pub(crate) taps: Arc<Vec<PointMode>>,
    /// Whether this shard sends its piece of a gradient at each point.
    pub(crate) sends_gradients: Arc<Vec<bool>>,
}

/// A deliberate failure of one shard, to test that failures are reported and survived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The shard's pass returns an error on reaching the hook point.
    Error,
    /// The shard's pass panics on reaching the hook point.
    Panic,
    /// The backward pass returns an error when the gradient reaches the hook point.
    ErrorInBackward,
    /// The backward pass panics when the gradient reaches the hook point.
    PanicInBackward,
}

impl Fault {
    /// Whether the fault strikes in the backward pass.
    pub fn in_backward(self) -> bool {
        matches!(self, Fault::ErrorInBackward | Fault::PanicInBackward)
    }
}

/// Asks a shard for its parameter slices and their gradients from the last backward pass.
pub struct ReadParameters {
    pub(crate) reply: Sender<ShardParameters>,
}
