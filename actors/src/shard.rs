//! The shard actor: one rank's slice of the model on its own OS thread.
//!
//! # Failure
//!
//! A pass that errs or panics on a shard is reported to the coordinator as
//! [`ShardEvent::Failed`], with the hook point the shard last reached (in the forward
//! or the backward pass) and the kind of failure; the actor then waits for the next
//! pass. A shard blocked on a collective or on an edited piece notices an aborted pass
//! within [`PassControl::ABORT_POLL`] and fails with [`flexmodel_cluster::Error::Aborted`], which the
//! coordinator reports as a consequence, not a cause.
//!
//! # Shutdown
//!
//! The runtime kills the actors when it is dropped; a shard whose coordinator is gone
//! fails its pass with [`flexmodel_cluster::Error::CoordinatorGone`].

use std::ops::ControlFlow;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use candle_core::Tensor;
use crossbeam_channel::{Receiver, Sender};
use flexmodel_cluster::{Collective, PassControl, RankCoords, conjugate};
use kameo::actor::{ActorRef, WeakActorRef};
use kameo::error::{ActorStopReason, Infallible, PanicError};
use kameo::message::{Context, Message};

use crate::error::{InjectedFault, ShardFailure};
use crate::geometry::{PointMode, ShardAction};
use crate::protocol::{EditedPiece, Fault, RunPass, ShardEvent, Tap};
use crate::trace_context::RemoteParent;
use crate::{BoxError, CacheUse, Error, KvCache, PointId, ShardHooks, ShardModel, ShardParameters};

/// How long a shard may take to stop once told to (it stops at its next hook point or
/// collective, each of which checks for the pass's abort); past it, whoever waits gives
/// up on it and says so.
pub(crate) const SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Everything a shard starts from; cloned to restart it.
#[derive(Clone)]
pub struct ShardArgs {
    pub(crate) rank: usize,
    pub(crate) coords: RankCoords,
    pub(crate) model: Arc<dyn ShardModel>,
    /// This rank's member of its pipeline group (stage `s` is member `s`).
    pub(crate) pipeline: Arc<dyn Collective>,
    pub(crate) events: Sender<ShardEvent>,
    pub(crate) replies: Receiver<EditedPiece>,
    pub(crate) control: Arc<PassControl>,
    /// Where the shard is in its pass (read by a worker's heartbeat).
    pub(crate) at: Arc<Position>,
}

/// Runs a pass; the shard's spans go under `parent`, or under `remote`, a span of the
/// driver's process.
pub(crate) struct Run {
    pub(crate) run: RunPass,
    pub(crate) parent: tracing::Span,
    pub(crate) remote: Option<RemoteParent>,
}

/// Asks a shard for its parameter slices and their gradients from the last backward pass.
pub(crate) struct ReadParameters {
    pub(crate) reply: Sender<ShardParameters>,
}

/// Where a shard is in its pass, shared with the closures that run in its backward
/// pass: the hook point it last reached (and whether in backward), and the failure a
/// closure raised (candle's backward keeps only the message of an error it carries).
#[derive(Debug, Default)]
pub(crate) struct Position {
    progress: Mutex<Progress>,
    /// Signalled when the shard starts waiting on the coordinator.
    waiting: Condvar,
}

/// What [`Position`] holds.
#[derive(Debug, Default)]
struct Progress {
    at: Option<(PointId, bool)>,
    failure: Option<ShardFailure>,
}

impl Position {
    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells whoever watches (a worker's heartbeat) that the shard waits where it is.
    pub(crate) fn announce(&self) {
        self.waiting.notify_all();
    }

    /// Waits up to `timeout` for the shard to start waiting on the coordinator.
    pub(crate) fn watch(&self, timeout: Duration) {
        let guard = self.lock();
        let _ = self.waiting.wait_timeout(guard, timeout);
    }

    fn set(&self, at: Option<(PointId, bool)>) {
        self.lock().at = at;
    }

    pub(crate) fn get(&self) -> Option<(PointId, bool)> {
        self.lock().at
    }

    /// Records `error`, raised in backward, and returns it for candle to carry.
    fn fail(&self, error: impl std::error::Error + Send + Sync + 'static) -> candle_core::Error {
        self.lock().failure = Some(ShardFailure::of(&error));
        candle_core::Error::wrap(error)
    }

    /// The failure a backward closure raised in this pass, if any.
    fn take_failure(&self) -> Option<ShardFailure> {
        self.lock().failure.take()
    }
}

/// One rank: its stage of its tensor-parallel slice of the model, on a dedicated thread.
///
/// A pass that errs or panics is reported to the coordinator with the hook point the
/// shard was at; the actor keeps running and serves the next pass.
pub struct ShardActor {
    args: ShardArgs,
    pass: u64,
    at: Arc<Position>,
    /// The gradients of the last backward pass.
    grads: Option<candle_core::backprop::GradStore>,
    /// The keys and values of the generation in progress.
    cache: KvCache,
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
            at: args.at.clone(),
            args,
            pass: 0,
            grads: None,
            cache: KvCache::default(),
        })
    }

    async fn on_panic(
        &mut self,
        _: WeakActorRef<Self>,
        err: PanicError,
    ) -> Result<ControlFlow<ActorStopReason>, Self::Error> {
        self.report_failure(ShardFailure {
            kind: crate::FailureKind::Panicked,
            message: err.to_string(),
        });
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

impl Message<Run> for ShardActor {
    type Reply = ();

    async fn handle(&mut self, msg: Run, _: &mut Context<Self, Self::Reply>) {
        self.pass = msg.run.pass;
        self.at.set(None);
        self.at.take_failure();
        match self.run(msg.run, &msg.parent, msg.remote.as_ref()) {
            Ok((output, loss)) => {
                let done = ShardEvent::Done {
                    pass: self.pass,
                    rank: self.args.rank,
                    output,
                    loss,
                };
                let _ = self.args.events.send(done);
            }
            Err(e) => self.report_failure(ShardFailure::of(e.as_ref())),
        }
    }
}

impl ShardActor {
    /// Runs the pass; returns the last stage's output slice and loss.
    fn run(
        &mut self,
        msg: RunPass,
        parent: &tracing::Span,
        remote: Option<&RemoteParent>,
    ) -> Result<(Option<Tensor>, Option<f32>), BoxError> {
        let args = &self.args;
        let stage = args.coords.pp;
        if stage > msg.end_stage {
            // The pass ends before this stage.
            return Ok((None, None));
        }
        let last = stage == msg.end_stage;
        let window = &msg.window;
        if window.cache != CacheUse::Off && msg.backward.is_some() {
            return Err(Box::new(Error::BadWindow {
                problem: "a pass through the key/value cache has no backward pass".into(),
            }));
        }
        let input = match (stage, msg.input) {
            (0, Some(tokens)) => tokens,
            (0, None) => return Err(Box::new(Error::NoInput { rank: args.rank })),
            (_, _) => args.pipeline.recv(stage - 1)?,
        };
        // A later stage's input is a leaf whose gradient goes back to the stage before.
        let input = match (&msg.backward, stage) {
            (Some(_), 1..) => candle_core::Var::from_tensor(&input)?.as_tensor().clone(),
            _ => input,
        };
        let link = Link {
            events: args.events.clone(),
            replies: args.replies.clone(),
            control: args.control.clone(),
            pass: msg.pass,
            rank: args.rank,
        };
        let mut hooks = HookClient {
            link: &link,
            actions: &msg.actions,
            taps: msg.backward.as_ref().map(|b| b.plan.taps.as_slice()),
            sends_gradients: msg
                .backward
                .as_ref()
                .map(|b| b.plan.sends_gradients.as_slice()),
            calls: vec![0; msg.actions.len()],
            at: &self.at,
            fault: msg.fault,
        };
        let forward_span = shard_span!("shard.forward", parent, args);
        if let Some(remote) = remote {
            remote.adopt(&forward_span);
        }
        let cache = &mut self.cache;
        let backward = msg.backward.is_some();
        let out = forward_span.in_scope(|| {
            args.model
                .forward(&input, window, cache, &mut hooks, backward)
        });
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                // A step that failed half-way leaves some layers extended: start again.
                cache.clear();
                return Err(e);
            }
        };
        let Some(backward) = msg.backward else {
            if !last {
                args.pipeline.send(&out, stage + 1)?;
                return Ok((None, None));
            }
            return Ok((msg.sends_output.then_some(out), None));
        };
        let backward_span = shard_span!("shard.backward", parent, args);
        if let Some(remote) = remote {
            remote.adopt(&backward_span);
        }
        let _entered = backward_span.enter();
        let (root, loss) = match (last, backward.plan.driver_loss) {
            (true, true) => {
                // The driver computes its loss on the gathered output and sends back the
                // gradient of this rank's slice.
                link.send(Tap::Output, 0, &out.detach())?;
                let grad = link.wait(Tap::Output, 0)?.to_device(out.device())?;
                ((&out * grad)?.sum_all()?, None)
            }
            (true, false) => {
                let mask = window.mask.as_ref();
                let normalizer = backward.plan.normalizer;
                let loss = args.model.loss(&out, &backward.tokens, mask, normalizer)?;
                let value = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
                (loss, Some(value))
            }
            (false, _) => {
                args.pipeline.send(&out.detach(), stage + 1)?;
                let grad = args.pipeline.recv(stage + 1)?.to_device(out.device())?;
                ((&out * grad)?.sum_all()?, None)
            }
        };
        let grads = match root.backward() {
            Ok(grads) => self.grads.insert(grads),
            Err(e) => match self.at.take_failure() {
                Some(failure) => return Err(Box::new(failure)),
                None => return Err(Box::new(e)),
            },
        };
        if stage > 0 {
            let grad = match grads.get(&input) {
                Some(g) => g.clone(),
                None => input.zeros_like()?,
            };
            args.pipeline.send(&grad, stage - 1)?;
        }
        Ok((last.then_some(out.detach()), loss))
    }

    fn report_failure(&self, cause: ShardFailure) {
        let failed = ShardEvent::Failed {
            pass: self.pass,
            rank: self.args.rank,
            at: self.at.get(),
            cause,
            after_abort: self.args.control.aborted(),
        };
        let _ = self.args.events.send(failed);
    }
}

/// A shard's line to the coordinator in one pass: pieces out, edited pieces back. Cloned
/// into the closures of the backward pass.
#[derive(Clone)]
struct Link {
    events: Sender<ShardEvent>,
    replies: Receiver<EditedPiece>,
    control: Arc<PassControl>,
    pass: u64,
    rank: usize,
}

impl Link {
    /// Sends `value` as this shard's piece of `(tap, call)`.
    fn send(&self, tap: Tap, call: usize, value: &Tensor) -> flexmodel_cluster::Result<()> {
        let piece = ShardEvent::Piece {
            pass: self.pass,
            rank: self.rank,
            tap,
            call,
            value: value.clone(),
        };
        self.events
            .send(piece)
            .map_err(|_| flexmodel_cluster::Error::CoordinatorGone)
    }

    /// The coordinator's reply for `(tap, call)` of this pass; stale replies of aborted
    /// passes are dropped, and an abort ends the wait.
    fn wait(&self, tap: Tap, call: usize) -> flexmodel_cluster::Result<Tensor> {
        let wanted = |r: &EditedPiece| (r.pass, r.tap, r.call) == (self.pass, tap, call);
        let gone = flexmodel_cluster::Error::CoordinatorGone;
        Ok(self.control.receive(&self.replies, wanted, gone)?.value)
    }
}

/// The shard side of the hook protocol.
struct HookClient<'a> {
    link: &'a Link,
    actions: &'a [ShardAction],
    /// In a backward pass: how the gradient at each point is hooked.
    taps: Option<&'a [PointMode]>,
    /// In a backward pass: whether this shard sends its piece of a gradient at each point.
    sends_gradients: Option<&'a [bool]>,
    calls: Vec<usize>,
    at: &'a Arc<Position>,
    fault: Option<(PointId, Fault)>,
}

impl HookClient<'_> {
    /// The edited piece of `value` at `(point, call)`. In a backward pass it stands in for
    /// `value` in the graph: its gradient goes to the coordinator (from the ranks that
    /// send gradients), which back-propagates through the edit and returns the gradient
    /// of the pre-edit piece.
    fn edited(&self, value: &Tensor, point: PointId, call: usize) -> Result<Tensor, BoxError> {
        self.at.announce();
        // Edits run where the coordinator is: the edited piece comes back to this device.
        let edited = self
            .link
            .wait(Tap::Value(point), call)?
            .to_device(value.device())?;
        let Some(sends) = self.sends_gradients.map(|sends| sends[point]) else {
            return Ok(edited);
        };
        let edit_grad = Tap::EditGradient(point);
        let (link, at) = (self.link.clone(), self.at.clone());
        let through_edit = move |grad: &Tensor| -> candle_core::Result<Tensor> {
            at.set(Some((point, true)));
            if sends {
                link.send(edit_grad, call, grad).map_err(|e| at.fail(e))?;
            }
            at.announce();
            let edited = link.wait(edit_grad, call).map_err(|e| at.fail(e))?;
            edited.to_device(grad.device())
        };
        Ok(conjugate::substitute(value, &edited, through_edit)?)
    }

    /// The fault to raise at `point` in `backward` or forward, if any.
    fn fault_at(&self, point: PointId, backward: bool) -> Option<Fault> {
        self.fault
            .filter(|(at, fault)| *at == point && fault.in_backward() == backward)
            .map(|(_, fault)| fault)
    }
}

impl ShardHooks for HookClient<'_> {
    fn wants(&self, point: PointId) -> bool {
        let action = self.actions.get(point).copied();
        let tap = self.taps.and_then(|taps| taps.get(point).copied());
        action.is_some_and(|a| a != ShardAction::Skip)
            || tap.is_some_and(|t| t != PointMode::Off)
            || self.fault.is_some_and(|(at, _)| at == point)
    }

    fn hook(&mut self, point: PointId, value: Tensor) -> Result<Tensor, BoxError> {
        self.at.set(Some((point, false)));
        match self.fault_at(point, false) {
            Some(Fault::Panic) => panic!("injected fault"),
            Some(_) => return Err(Box::new(InjectedFault)),
            None => {}
        }
        let action = self
            .actions
            .get(point)
            .copied()
            .unwrap_or(ShardAction::Skip);
        let tap = self.taps.map_or(PointMode::Off, |taps| taps[point]);
        let backward_fault = self.taps.and(self.fault_at(point, true));
        if action == ShardAction::Skip && tap == PointMode::Off && backward_fault.is_none() {
            return Ok(value);
        }
        let call = self.calls[point];
        self.calls[point] += 1;
        let value = match action {
            ShardAction::Send => {
                self.link.send(Tap::Value(point), call, &value)?;
                value
            }
            ShardAction::SendAndWait => {
                self.link.send(Tap::Value(point), call, &value)?;
                self.edited(&value, point, call)?
            }
            ShardAction::Wait => self.edited(&value, point, call)?,
            ShardAction::Skip => value,
        };
        if tap == PointMode::Off && backward_fault.is_none() {
            return Ok(value);
        }
        // The gradient's pieces go to the coordinator; an edited gradient comes back.
        let sends = tap != PointMode::Off && self.sends_gradients.is_some_and(|s| s[point]);
        let grad_point = Tap::Gradient(point);
        let (link, at) = (self.link.clone(), self.at.clone());
        Ok(conjugate::on_backward(&value, move |grad| {
            at.set(Some((point, true)));
            match backward_fault {
                Some(Fault::PanicInBackward) => panic!("injected fault"),
                Some(_) => return Err(at.fail(InjectedFault)),
                None => {}
            }
            if sends {
                link.send(grad_point, call, grad).map_err(|e| at.fail(e))?;
            }
            match tap {
                PointMode::Edit => {
                    at.announce();
                    let edited = link.wait(grad_point, call).map_err(|e| at.fail(e))?;
                    edited.to_device(grad.device())
                }
                _ => Ok(grad.clone()),
            }
        })?)
    }
}
