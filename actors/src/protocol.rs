//! Every message of the hook protocol between the driver, the coordinator and the
//! shards, in one place. Messages are plain data: no channel end, span or shared
//! pointer, so the same messages travel between threads and, framed, between processes.
//!
//! A pass is numbered; every message carries its pass, and messages of an earlier
//! (aborted) pass are dropped on receipt. A hook call is `(tap, call)`: what is tapped
//! at which point, and how many times the shard reached it before in the pass.

use candle_core::Tensor;
use flexmodel_cluster::Layout;
use serde::{Deserialize, Serialize};

use crate::error::ShardFailure;
use crate::geometry::{PointMode, ShardAction};
use crate::{CacheUse, PassScope, PointId, Window};

/// What a piece of a hook call is: the value at a point, its gradient, the gradient
/// at the result of its edit, or the last stage's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Tap {
    /// The value at a hook point in the forward pass.
    Value(PointId),
    /// The gradient of the loss with respect to a hook point.
    Gradient(PointId),
    /// The gradient at the result of a point's forward edit: the coordinator
    /// back-propagates it through the edit and returns the pre-edit gradient.
    EditGradient(PointId),
    /// The last stage's output, for a loss the driver computes; the coordinator returns
    /// the loss's gradient with respect to it.
    Output,
}

impl Tap {
    /// The most points a tap can name on the wire.
    pub const MAX_POINTS: usize = 1 << 30;

    /// The hook point tapped, if any.
    pub fn point(self) -> Option<PointId> {
        match self {
            Tap::Value(p) | Tap::Gradient(p) | Tap::EditGradient(p) => Some(p),
            Tap::Output => None,
        }
    }

    /// Whether the tap carries a gradient (pieces are assembled as gradients).
    pub fn is_gradient(self) -> bool {
        matches!(self, Tap::Gradient(_) | Tap::EditGradient(_))
    }

    /// The tap as the `point` field of a frame: the kind in the top two bits.
    pub fn to_wire(self) -> u32 {
        let (kind, point) = match self {
            Tap::Value(p) => (0, p),
            Tap::Gradient(p) => (1, p),
            Tap::EditGradient(p) => (2, p),
            Tap::Output => (3, 0),
        };
        (kind << 30) | (point as u32 & (Self::MAX_POINTS as u32 - 1))
    }

    /// The tap a frame's `point` field names.
    pub fn from_wire(code: u32) -> Tap {
        let point = (code & (Self::MAX_POINTS as u32 - 1)) as PointId;
        match code >> 30 {
            0 => Tap::Value(point),
            1 => Tap::Gradient(point),
            2 => Tap::EditGradient(point),
            _ => Tap::Output,
        }
    }
}

/// What a shard tells the coordinator.
#[derive(Debug)]
pub enum ShardEvent {
    /// Its piece of one hook call.
    Piece {
        pass: u64,
        rank: usize,
        tap: Tap,
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

/// An edited piece (or the gradient through an edit) the coordinator sends back.
#[derive(Debug)]
pub struct EditedPiece {
    pub(crate) pass: u64,
    pub(crate) tap: Tap,
    pub(crate) call: usize,
    pub(crate) value: Tensor,
}

/// Runs one pass on a shard.
#[derive(Debug, Clone)]
pub struct RunPass {
    pub(crate) pass: u64,
    /// The replica's token ids (first stage only).
    pub(crate) input: Option<Tensor>,
    /// The replica's rows of the pass's window.
    pub(crate) window: Window,
    /// What to do at each hook point, by point id.
    pub(crate) actions: Vec<ShardAction>,
    /// A fault to raise at a hook point (testing the failure path).
    pub(crate) fault: Option<(PointId, Fault)>,
    /// Run backward too.
    pub(crate) backward: Option<BackwardPass>,
    /// The stage whose output ends the pass: later stages do not run.
    pub(crate) end_stage: usize,
    /// Whether the ending stage sends its output to the coordinator.
    pub(crate) sends_output: bool,
}

/// The backward half of a pass.
#[derive(Debug, Clone)]
pub(crate) struct BackwardPass {
    /// The replica's token ids (the targets of the loss).
    pub(crate) tokens: Tensor,
    /// The tensor-free rest.
    pub(crate) plan: BackwardPlan,
}

/// How a shard runs its backward pass.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BackwardPlan {
    /// The number of predicted tokens in the global batch.
    pub(crate) normalizer: f64,
    /// Whether the driver computes the loss from the gathered output instead.
    pub(crate) driver_loss: bool,
    /// How the gradient at each hook point is hooked on this shard.
    pub(crate) taps: Vec<PointMode>,
    /// Whether this shard sends its piece of a gradient at each point.
    pub(crate) sends_gradients: Vec<bool>,
}

/// A deliberate failure of one shard, to test that failures are reported and survived;
/// asked for only with the `fault-injection` feature (tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// What a worker's shard is: the rank it serves and how to reach its peers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignment {
    /// The assignment's epoch in the job's membership (0 for workers a driver started).
    pub epoch: u64,
    /// The job member the driver means to serve it, when the workers joined a job.
    pub member: Option<String>,
    /// The rank this worker serves.
    pub rank: usize,
    /// The layout.
    pub layout: Layout,
    /// Every rank's peer address (`HOST:PORT`), in rank order.
    pub peers: Vec<String>,
    /// What to load, as the driver's loader describes it (a model name, say).
    pub model: String,
}

/// The control messages from the driver to a worker (tensors travel in frames of their
/// own after the message that needs them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ToWorker {
    /// Serve this rank of this model; again between passes when the group changed (a
    /// rank was replaced).
    Assign(Assignment),
    /// Run a pass; followed by the input tokens (if `input`), the attention mask (if
    /// `mask`) and the backward pass's tokens (if `backward` is set). `trace` is the
    /// pass's trace context; `offset` and `cache` are the rest of its window.
    Run {
        pass: u64,
        trace: Vec<(String, String)>,
        input: bool,
        mask: bool,
        offset: usize,
        cache: CacheUse,
        scope: PassScope,
        end_stage: usize,
        sends_output: bool,
        actions: Vec<ShardAction>,
        /// Never on the wire without the `fault-injection` feature: a release worker
        /// neither sends nor reads it.
        #[cfg_attr(not(feature = "fault-injection"), serde(skip))]
        fault: Option<(PointId, Fault)>,
        backward: Option<BackwardPlan>,
    },
    /// Abort the pass (another rank failed).
    Abort { pass: u64 },
    /// The driver is alive (every [`HEARTBEAT`](crate::worker::HEARTBEAT), once the
    /// worker is ready); a worker whose driver is silent for
    /// [`DRIVER_SILENCE`](crate::worker::DRIVER_SILENCE) ends the session.
    Heartbeat,
    /// Send the parameter slices and their gradients.
    ReadParameters,
    /// Leave: the driver is done.
    Shutdown,
}

/// The control messages from a worker to the driver.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ToDriver {
    /// The worker is up: its process and the address its peers reach it at.
    Joined {
        pid: u32,
        host: String,
        peer_address: String,
    },
    /// The shard is loaded.
    Ready {
        /// The bytes of parameters it holds.
        param_bytes: u64,
        /// The process's peak resident memory while it loaded them.
        peak_rss_bytes: Option<u64>,
        /// The fingerprint of the weights the shard was read from.
        fingerprint: String,
        /// Whether the shard was already loaded (for an earlier driver or assignment).
        reused: bool,
    },
    /// The worker could not load its shard or join its groups.
    Refused { message: String },
    /// The worker is alive; where its shard is.
    Heartbeat {
        pass: u64,
        at: Option<(PointId, bool)>,
        /// The process's peak resident memory so far.
        peak_rss_bytes: Option<u64>,
    },
    /// The pass is done; followed by the output slice if `output`.
    Done {
        pass: u64,
        output: bool,
        loss: Option<f32>,
        /// The process's peak resident memory so far.
        peak_rss_bytes: Option<u64>,
    },
    /// The pass failed on the shard.
    Failed {
        pass: u64,
        at: Option<(PointId, bool)>,
        cause: ShardFailure,
        after_abort: bool,
    },
    /// The parameter slices; each slice's value follows, then its gradient if it has one.
    Parameters { slices: Vec<SliceHeader> },
}

/// A parameter slice as a worker describes it; its tensors follow the message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SliceHeader {
    /// The parameter's name.
    pub(crate) name: String,
    /// The dimension it is sliced along and the range of it held: `(dim, start, end)`.
    pub(crate) split: Option<(usize, usize, usize)>,
    /// Under FSDP, the piece of the slice held: `(dim, start, end)` within the slice.
    pub(crate) piece: Option<(usize, usize, usize)>,
    /// Whether the value (and the gradient) is the slice transposed.
    pub(crate) transposed: bool,
    /// Whether its gradient follows its value.
    pub(crate) has_grad: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_round_trip_through_the_wire_code() {
        for tap in [
            Tap::Value(0),
            Tap::Value(542),
            Tap::Gradient(7),
            Tap::EditGradient(Tap::MAX_POINTS - 1),
            Tap::Output,
        ] {
            assert_eq!(Tap::from_wire(tap.to_wire()), tap);
        }
    }
}
