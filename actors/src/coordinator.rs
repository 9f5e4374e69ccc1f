//! The hook coordinator: gathers pieces, hands full tensors to the driver, scatters edits.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use candle_core::Tensor;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use flexmodel_cluster::{Layout, PassControl, RankCoords};

use crate::error::FailedAt;
use crate::protocol::{EditedPiece, ShardEvent};
use crate::{BoxError, Error, PointGeometry, PointId, Result};

/// How often the coordinator checks that the shards are alive while it waits.
const LIVENESS_POLL: Duration = Duration::from_millis(200);

/// The pieces of one hook call by `[dp][tp]` (`None` until sent), and how many are missing.
type Gathering = (Vec<Vec<Option<Tensor>>>, usize);

/// The bytes of a tensor's elements.
fn bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// The driver's side of a pass: it receives every full tensor once.
pub trait HookSink {
    /// The full tensor of call `call` of `point`. For a point hooked with an edit, returns
    /// the edited tensor (same shape and dtype), which is split and sent back. In a
    /// backward pass, the gradient at point `p` arrives as point `n_points + p`, the
    /// gradient of an edit's result as `2 n_points + p`, and the output as `3 n_points`
    /// when the driver computes the loss (the sink returns the output's gradient).
    fn gathered(
        &mut self,
        point: PointId,
        call: usize,
        full: Tensor,
    ) -> std::result::Result<Option<Tensor>, BoxError>;
}

/// What a pass produced: the assembled output and, after a backward pass, the loss.
#[derive(Debug, Clone)]
pub struct PassOutput {
    /// The last stage's output, assembled over every rank.
    pub output: Tensor,
    /// The mean next-token loss over the global batch, after a backward pass.
    pub loss: Option<f32>,
}

/// Assembles the pieces of one pass: hook points as they complete, then the output.
pub struct HookCoordinator<'a> {
    layout: Layout,
    pass: u64,
    geometry: &'a [PointGeometry],
    output: &'a PointGeometry,
    /// Whether each gathered tensor (by point id, `0..3n`) is answered.
    replies_for: &'a [bool],
    /// The batch rows of each data-parallel replica.
    batches: &'a [Range<usize>],
    /// `(point, call)` → pieces by `[dp][tp]`, with the count still missing.
    pending: HashMap<(PointId, usize), Gathering>,
    outputs: Vec<Vec<Option<Tensor>>>,
    /// Each replica's share of the loss (from its first tensor-parallel rank).
    losses: Vec<Option<f32>>,
    finished: Vec<bool>,
    /// The failure to report, and whether it is a cause (not a consequence of an abort).
    failure: Option<(Error, bool)>,
}

impl<'a> HookCoordinator<'a> {
    /// A coordinator for pass `pass`.
    pub(crate) fn new(
        layout: Layout,
        pass: u64,
        geometry: &'a [PointGeometry],
        output: &'a PointGeometry,
        replies_for: &'a [bool],
        batches: &'a [Range<usize>],
    ) -> Self {
        Self {
            layout,
            pass,
            geometry,
            output,
            replies_for,
            batches,
            pending: HashMap::new(),
            outputs: vec![vec![None; layout.tp()]; layout.dp()],
            losses: vec![None; layout.dp()],
            finished: vec![false; layout.world_size()],
            failure: None,
        }
    }

    /// Handles events until every shard has finished the pass; returns the assembled
    /// output, or the first failure (a shard's, or the sink's) after all shards stopped.
    pub(crate) fn run(
        mut self,
        events: &Receiver<ShardEvent>,
        replies: &[Sender<EditedPiece>],
        control: &PassControl,
        alive: impl Fn(usize) -> bool,
        sink: &mut dyn HookSink,
    ) -> Result<PassOutput> {
        while self.finished.iter().any(|f| !f) {
            let event = match events.recv_timeout(LIVENESS_POLL) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(rank) =
                        (0..self.finished.len()).find(|&r| !self.finished[r] && !alive(r))
                    {
                        self.fail(self.gone(rank), true, control);
                        self.finished[rank] = true;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let rank = self.finished.iter().position(|f| !f).unwrap_or(0);
                    return Err(self.gone(rank));
                }
            };
            match event {
                ShardEvent::Piece { pass, .. }
                | ShardEvent::Done { pass, .. }
                | ShardEvent::Failed { pass, .. }
                    if pass != self.pass => {}
                ShardEvent::Piece {
                    rank,
                    point,
                    call,
                    value,
                    ..
                } => {
                    if let Err(e) = self.piece(rank, point, call, value, replies, sink) {
                        self.fail(e, true, control);
                    }
                }
                ShardEvent::Done {
                    rank, output, loss, ..
                } => {
                    self.finished[rank] = true;
                    let c = self.layout.coords(rank);
                    if let Some(out) = output {
                        self.outputs[c.dp][c.tp] = Some(out);
                    }
                    if c.tp == 0 && loss.is_some() {
                        self.losses[c.dp] = loss;
                    }
                }
                ShardEvent::Failed {
                    rank,
                    at,
                    cause,
                    after_abort,
                    ..
                } => {
                    self.finished[rank] = true;
                    let n = self.geometry.len();
                    let at = at.map(|(point, backward)| FailedAt {
                        hook: self.geometry[point % n].name.clone(),
                        backward,
                    });
                    let error = Error::ShardFailed {
                        rank,
                        coords: self.layout.coords(rank),
                        host: None,
                        at,
                        cause,
                    };
                    self.fail(error, !after_abort, control);
                }
            }
        }
        if let Some((e, _)) = self.failure {
            return Err(e);
        }
        let loss = self.losses.iter().copied().sum::<Option<f32>>();
        let senders: Vec<Vec<Option<Tensor>>> = self
            .outputs
            .iter()
            .map(|row| {
                row.iter()
                    .enumerate()
                    .map(|(tp, t)| t.clone().filter(|_| self.output.sends(tp)))
                    .collect()
            })
            .collect();
        Ok(PassOutput {
            output: self.output.assemble(&senders)?,
            loss,
        })
    }

    /// The error for `rank`, whose thread is gone.
    fn gone(&self, rank: usize) -> Error {
        Error::ShardGone {
            rank,
            coords: self.layout.coords(rank),
        }
    }

    /// Records the first failure that is a cause (else the first consequence) and aborts
    /// the pass so that no shard stays blocked.
    fn fail(&mut self, error: Error, cause: bool, control: &PassControl) {
        let replace = match &self.failure {
            None => true,
            Some((_, known_cause)) => cause && !known_cause,
        };
        if replace {
            self.failure = Some((error, cause));
        }
        control.abort();
    }

    fn piece(
        &mut self,
        rank: usize,
        point: PointId,
        call: usize,
        value: Tensor,
        replies: &[Sender<EditedPiece>],
        sink: &mut dyn HookSink,
    ) -> Result<()> {
        if self.failure.is_some() {
            return Ok(());
        }
        let n = self.geometry.len();
        // Point `3 n` is the output, for a loss the driver computes.
        let geometry = match point == 3 * n {
            true => self.output,
            false => &self.geometry[point % n],
        };
        let RankCoords { dp, tp, .. } = self.layout.coords(rank);
        let gradient = point >= n;
        let sends = |t: usize| match gradient {
            true => geometry.sends_gradient(t),
            false => geometry.sends(t),
        };
        let expected = self.layout.dp() * (0..self.layout.tp()).filter(|&t| sends(t)).count();
        let (pieces, missing) = self.pending.entry((point, call)).or_insert_with(|| {
            (
                vec![vec![None; self.layout.tp()]; self.layout.dp()],
                expected,
            )
        });
        pieces[dp][tp] = Some(value);
        *missing -= 1;
        if *missing > 0 {
            return Ok(());
        }
        let (pieces, _) = self.pending.remove(&(point, call)).unwrap_or_default();
        let name = match point / n {
            0 => geometry.name.clone(),
            1 => format!("{}_grad", geometry.name),
            2 => format!("{}_edit_grad", geometry.name),
            _ => "output".to_string(),
        };
        let received: usize = pieces.iter().flatten().flatten().map(bytes).sum();
        let full = tracing::info_span!(
            "hook.gather",
            hook.name = %name,
            hook.call = call as i64,
            hook.bytes = received as i64,
        )
        .in_scope(|| match gradient {
            true => geometry.assemble_gradient(&pieces),
            false => geometry.assemble(&pieces),
        })?;
        let edited = sink.gathered(point, call, full).map_err(Error::Sink)?;
        // Points `0..n` are values, `n..2n` gradients, `2n..3n` gradients of edits.
        if !self.replies_for[point] {
            return Ok(());
        }
        let edited = edited.ok_or_else(|| Error::NoEditedTensor { hook: name.clone() })?;
        let scatter = tracing::info_span!(
            "hook.scatter",
            hook.name = %name,
            hook.call = call as i64,
            hook.bytes = tracing::field::Empty,
        );
        let _entered = scatter.enter();
        let mut sent = 0;
        for coords in self.layout.all().filter(|c| c.pp == geometry.stage) {
            let mut value = geometry.piece(&edited, &self.batches[coords.dp], coords.tp)?;
            // Only one copy of a replicated key/value head carries the gradient upstream.
            if gradient && geometry.split.is_some() && !geometry.sends(coords.tp) {
                value = value.zeros_like()?;
            }
            sent += bytes(&value);
            let reply = EditedPiece {
                pass: self.pass,
                point,
                call,
                value,
            };
            let _ = replies[self.layout.rank(coords)].send(reply);
        }
        scatter.record("hook.bytes", sent as i64);
        Ok(())
    }
}
