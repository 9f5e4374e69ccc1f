//! The shard actor: one rank's slice of the model on its own OS thread.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Tensor;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use flexmodel_cluster::{Collective, InProcessCollective, PassControl, RankCoords, conjugate};
use kameo::actor::{ActorRef, WeakActorRef};
use kameo::error::{ActorStopReason, Infallible, PanicError};
use kameo::message::{Context, Message};

use crate::geometry::{PointMode, ShardAction};
use crate::{BoxError, PointId, ShardHooks, ShardModel, ShardParameters};

/// How often a shard waiting for an edited piece checks whether the pass was aborted.
const ABORT_POLL: Duration = Duration::from_millis(20);

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
        point: Option<PointId>,
        message: String,
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

/// Everything a shard starts from; cloned to restart it.
#[derive(Clone)]
pub struct ShardArgs {
    pub(crate) rank: usize,
    pub(crate) coords: RankCoords,
    pub(crate) stages: usize,
    pub(crate) model: Arc<dyn ShardModel>,
    /// This rank's member of its pipeline group (stage `s` is member `s`).
    pub(crate) pipeline: Arc<InProcessCollective>,
    pub(crate) events: Sender<ShardEvent>,
    pub(crate) replies: Receiver<EditedPiece>,
    pub(crate) control: Arc<PassControl>,
}

/// Runs one pass on this shard.
pub struct RunPass {
    pub(crate) pass: u64,
    /// The replica's token ids (first stage only).
    pub(crate) input: Option<Tensor>,
    /// What to do at each hook point, by point id.
    pub(crate) actions: Arc<Vec<ShardAction>>,
    /// A fault to raise on reaching a hook point (testing the failure path).
    pub(crate) fault: Option<(PointId, Fault)>,
    /// Run backward too, from the next-token loss.
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
    /// The shard's pass returns an error.
    Error,
    /// The shard's pass panics.
    Panic,
}

/// One rank: its stage of its tensor-parallel slice of the model, on a dedicated thread.
///
/// A pass that errs or panics is reported to the coordinator with the hook point the
/// shard was at; the actor keeps running and serves the next pass.
pub struct ShardActor {
    args: ShardArgs,
    pass: u64,
    at: Option<PointId>,
    /// The gradients of the last backward pass.
    grads: Option<candle_core::backprop::GradStore>,
}

/// Asks a shard for its parameter slices and their gradients from the last backward pass.
pub struct ReadParameters {
    pub(crate) reply: Sender<ShardParameters>,
}

impl Message<ReadParameters> for ShardActor {
    type Reply = ();

    async fn handle(&mut self, msg: ReadParameters, _: &mut Context<Self, Self::Reply>) {
        let slices = self
            .args
            .model
            .parameters()
            .into_iter()
            .map(|p| {
                let grad = self.grads.as_ref().and_then(|g| g.get(&p.value)).cloned();
                (p, grad)
            })
            .collect();
        let _ = msg.reply.send(slices);
    }
}

impl kameo::Actor for ShardActor {
    type Args = ShardArgs;
    type Error = Infallible;

    async fn on_start(args: Self::Args, _: ActorRef<Self>) -> Result<Self, Self::Error> {
        Ok(Self {
            args,
            pass: 0,
            at: None,
            grads: None,
        })
    }

    async fn on_panic(
        &mut self,
        _: WeakActorRef<Self>,
        err: PanicError,
    ) -> Result<ControlFlow<ActorStopReason>, Self::Error> {
        self.report_failure(format!("panicked: {err}"));
        Ok(ControlFlow::Continue(()))
    }
}

/// A span `$name` of the shard `$args` under the pass span `$parent`, with the shard's
/// rank and coordinates (span names must be literals, hence a macro).
macro_rules! shard_span {
    ($name:literal, $parent:expr, $args:expr) => {
        tracing::info_span!(
            parent: $parent,
            $name,
            rank = $args.rank as i64,
            tp = $args.coords.tp as i64,
            pp = $args.coords.pp as i64,
            dp = $args.coords.dp as i64,
        )
    };
}

impl Message<RunPass> for ShardActor {
    type Reply = ();

    async fn handle(&mut self, msg: RunPass, _: &mut Context<Self, Self::Reply>) {
        self.pass = msg.pass;
        self.at = None;
        match self.run(msg) {
            Ok((output, loss)) => {
                let done = ShardEvent::Done {
                    pass: self.pass,
                    rank: self.args.rank,
                    output,
                    loss,
                };
                let _ = self.args.events.send(done);
            }
            Err(e) => self.report_failure(e.to_string()),
        }
    }
}

impl ShardActor {
    /// Runs the pass; returns the last stage's output slice and loss.
    fn run(&mut self, msg: RunPass) -> Result<(Option<Tensor>, Option<f32>), BoxError> {
        let args = &self.args;
        let stage = args.coords.pp;
        let last = stage + 1 == args.stages;
        let input = match (stage, msg.input) {
            (0, Some(tokens)) => tokens,
            (0, None) => return Err("the first stage got no tokens".into()),
            (_, _) => args.pipeline.recv(stage - 1)?,
        };
        // A later stage's input is a leaf whose gradient goes back to the stage before.
        let input = match (&msg.backward, stage) {
            (Some(_), 1..) => candle_core::Var::from_tensor(&input)?.as_tensor().clone(),
            _ => input,
        };
        let mut hooks = HookClient {
            args,
            pass: msg.pass,
            actions: &msg.actions,
            taps: msg.backward.as_ref().map(|b| b.taps.as_slice()),
            sends_gradients: msg.backward.as_ref().map(|b| b.sends_gradients.as_slice()),
            calls: vec![0; msg.actions.len()],
            at: &mut self.at,
            fault: msg.fault,
        };
        let forward_span = shard_span!("shard.forward", &msg.span, args);
        let out = forward_span.in_scope(|| args.model.forward(&input, &mut hooks))?;
        let Some(backward) = msg.backward else {
            if !last {
                args.pipeline.send(&out, stage + 1)?;
                return Ok((None, None));
            }
            return Ok((Some(out), None));
        };
        let backward_span = shard_span!("shard.backward", &msg.span, args);
        let _entered = backward_span.enter();
        let (root, loss) = match (last, backward.driver_loss) {
            (true, true) => {
                // The driver computes its loss on the gathered output and sends back the
                // gradient of this rank's slice (the output travels as point `3 n`).
                let point = 3 * msg.actions.len();
                let piece = ShardEvent::Piece {
                    pass: msg.pass,
                    rank: args.rank,
                    point,
                    call: 0,
                    value: out.detach(),
                };
                args.events
                    .send(piece)
                    .map_err(|_| "the coordinator is gone")?;
                let grad = wait_reply(&args.replies, &args.control, msg.pass, point, 0)?;
                ((&out * grad)?.sum_all()?, None)
            }
            (true, false) => {
                let loss = args
                    .model
                    .loss(&out, &backward.tokens, backward.normalizer)?;
                let value = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
                (loss, Some(value))
            }
            (false, _) => {
                args.pipeline.send(&out.detach(), stage + 1)?;
                let grad = args.pipeline.recv(stage + 1)?;
                ((&out * grad)?.sum_all()?, None)
            }
        };
        let grads = root.backward()?;
        self.grads = Some(grads);
        let grads = self.grads.as_ref().ok_or("no gradients")?;
        if stage > 0 {
            let grad = match grads.get(&input) {
                Some(g) => g.clone(),
                None => input.zeros_like()?,
            };
            args.pipeline.send(&grad, stage - 1)?;
        }
        Ok((last.then_some(out.detach()), loss))
    }

    fn report_failure(&self, message: String) {
        let failed = ShardEvent::Failed {
            pass: self.pass,
            rank: self.args.rank,
            point: self.at,
            message,
            after_abort: self.args.control.aborted(),
        };
        let _ = self.args.events.send(failed);
    }
}

/// The shard side of the hook protocol.
struct HookClient<'a> {
    args: &'a ShardArgs,
    pass: u64,
    actions: &'a [ShardAction],
    /// In a backward pass: how the gradient at each point is hooked.
    taps: Option<&'a [PointMode]>,
    /// In a backward pass: whether this shard sends its piece of a gradient at each point.
    sends_gradients: Option<&'a [bool]>,
    calls: Vec<usize>,
    at: &'a mut Option<PointId>,
    fault: Option<(PointId, Fault)>,
}

impl HookClient<'_> {
    fn send(&self, point: PointId, call: usize, value: &Tensor) -> Result<(), BoxError> {
        let piece = ShardEvent::Piece {
            pass: self.pass,
            rank: self.args.rank,
            point,
            call,
            value: value.clone(),
        };
        self.args
            .events
            .send(piece)
            .map_err(|_| "the coordinator is gone".into())
    }

    /// The edited piece of `(point, call)`.
    fn wait(&self, point: PointId, call: usize) -> Result<Tensor, BoxError> {
        Ok(wait_reply(
            &self.args.replies,
            &self.args.control,
            self.pass,
            point,
            call,
        )?)
    }

    /// The edited piece of `value` at `(point, call)`. In a backward pass it stands in for
    /// `value` in the graph: its gradient goes to the coordinator (from the ranks that
    /// send gradients), which back-propagates through the edit and returns the gradient
    /// of the pre-edit piece.
    fn edited(&self, value: &Tensor, point: PointId, call: usize) -> Result<Tensor, BoxError> {
        let edited = self.wait(point, call)?;
        let Some(sends) = self.sends_gradients.map(|sends| sends[point]) else {
            return Ok(edited);
        };
        let n = self.actions.len();
        let (pass, rank) = (self.pass, self.args.rank);
        let (events, replies, control) = (
            self.args.events.clone(),
            self.args.replies.clone(),
            self.args.control.clone(),
        );
        let through_edit = move |grad: &Tensor| -> flexmodel_cluster::Result<Tensor> {
            let point = 2 * n + point;
            if sends {
                send_piece(&events, pass, rank, point, call, grad)?;
            }
            wait_reply(&replies, &control, pass, point, call)
        };
        Ok(conjugate::substitute(value, &edited, through_edit)?)
    }
}

/// Sends `value` as the piece of `(point, call)` from a backward pass.
fn send_piece(
    events: &Sender<ShardEvent>,
    pass: u64,
    rank: usize,
    point: PointId,
    call: usize,
    value: &Tensor,
) -> flexmodel_cluster::Result<()> {
    let piece = ShardEvent::Piece {
        pass,
        rank,
        point,
        call,
        value: value.clone(),
    };
    events
        .send(piece)
        .map_err(|_| flexmodel_cluster::Error::Protocol("the coordinator is gone".into()))
}

/// The coordinator's reply for `(pass, point, call)`; stale replies of aborted passes are
/// dropped, and an abort ends the wait.
fn wait_reply(
    replies: &Receiver<EditedPiece>,
    control: &PassControl,
    pass: u64,
    point: PointId,
    call: usize,
) -> flexmodel_cluster::Result<Tensor> {
    loop {
        match replies.recv_timeout(ABORT_POLL) {
            Ok(r) if (r.pass, r.point, r.call) == (pass, point, call) => return Ok(r.value),
            Ok(_stale) => continue,
            Err(RecvTimeoutError::Timeout) if control.aborted() => {
                return Err(flexmodel_cluster::Error::Aborted);
            }
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                return Err(flexmodel_cluster::Error::Protocol(
                    "the coordinator is gone".into(),
                ));
            }
        }
    }
}

impl ShardHooks for HookClient<'_> {
    fn hook(&mut self, point: PointId, value: Tensor) -> Result<Tensor, BoxError> {
        *self.at = Some(point);
        match self.fault {
            Some((at, Fault::Error)) if at == point => return Err("injected fault".into()),
            Some((at, Fault::Panic)) if at == point => panic!("injected fault"),
            _ => {}
        }
        let action = self
            .actions
            .get(point)
            .copied()
            .unwrap_or(ShardAction::Skip);
        let tap = self.taps.map_or(PointMode::Off, |taps| taps[point]);
        if action == ShardAction::Skip && tap == PointMode::Off {
            return Ok(value);
        }
        let call = self.calls[point];
        self.calls[point] += 1;
        let value = match action {
            ShardAction::Send => {
                self.send(point, call, &value)?;
                value
            }
            ShardAction::SendAndWait => {
                self.send(point, call, &value)?;
                self.edited(&value, point, call)?
            }
            ShardAction::Wait => self.edited(&value, point, call)?,
            ShardAction::Skip => value,
        };
        if tap == PointMode::Off {
            return Ok(value);
        }
        // Gradient pieces travel as points `n_points + point`; an edited gradient comes back.
        let sends = self.sends_gradients.is_some_and(|s| s[point]);
        let (pass, rank, point) = (self.pass, self.args.rank, self.actions.len() + point);
        let (events, replies, control) = (
            self.args.events.clone(),
            self.args.replies.clone(),
            self.args.control.clone(),
        );
        Ok(conjugate::on_backward(&value, move |grad| {
            if sends {
                send_piece(&events, pass, rank, point, call, grad)?;
            }
            match tap {
                PointMode::Edit => wait_reply(&replies, &control, pass, point, call),
                _ => Ok(grad.clone()),
            }
        })?)
    }
}
