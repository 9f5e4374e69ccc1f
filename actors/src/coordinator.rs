//! The hook coordinator: gathers pieces, hands full tensors to the driver, scatters edits.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use candle_core::Tensor;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use flexmodel_cluster::{Layout, RankCoords};

use crate::error::FailedAt;
use crate::protocol::{EditedPiece, ShardEvent, Tap};
use crate::ranks::{Lost, Ranks};
use crate::{BoxError, Error, FailureKind, PointGeometry, PointId, Result};

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
    /// The full tensor of call `call` of `tap`. For a tap hooked with an edit, returns
    /// the edited tensor (same shape and dtype), which is split and sent back. The
    /// gradient through an edit ([`Tap::EditGradient`]) and the output's gradient when
    /// the driver computes the loss ([`Tap::Output`]) are always returned.
    fn gathered(
        &mut self,
        tap: Tap,
        call: usize,
        full: Tensor,
    ) -> std::result::Result<Option<Tensor>, BoxError>;
}

/// Which gathered tensors the shards wait for a reply to: by point, the values and the
/// gradients hooked with an edit (gradients through edits and the output's always are).
pub(crate) struct Replies {
    /// Whether the value at each point is edited.
    pub(crate) values: Vec<bool>,
    /// Whether the gradient at each point is edited.
    pub(crate) gradients: Vec<bool>,
}

impl Replies {
    fn answered(&self, tap: Tap) -> bool {
        match tap {
            Tap::Value(p) => self.values[p],
            Tap::Gradient(p) => self.gradients[p],
            Tap::EditGradient(_) | Tap::Output => true,
        }
    }
}

/// What a pass produced: the assembled output and, after a backward pass, the loss.
#[derive(Debug, Clone)]
pub struct PassOutput {
    /// The ending stage's output, assembled over every rank (`None` for a pass that
    /// gathers none).
    pub output: Option<Tensor>,
    /// The mean next-token loss over the global batch, after a backward pass.
    pub loss: Option<f32>,
}

/// Assembles the pieces of one pass: hook points as they complete, then the output.
pub struct HookCoordinator<'a> {
    layout: Layout,
    pass: u64,
    geometry: &'a [PointGeometry],
    /// Where the pass's output is and how it is assembled, if it has one.
    output: Option<&'a PointGeometry>,
    /// Which gathered tensors are answered.
    replies: &'a Replies,
    /// The batch rows of each data-parallel replica.
    batches: &'a [Range<usize>],
    /// `(tap, call)` → pieces by `[dp][tp]`, with the count still missing.
    pending: HashMap<(Tap, usize), Gathering>,
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
        output: Option<&'a PointGeometry>,
        replies: &'a Replies,
        batches: &'a [Range<usize>],
    ) -> Self {
        Self {
            layout,
            pass,
            geometry,
            output,
            replies,
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
        ranks: &dyn Ranks,
        sink: &mut dyn HookSink,
    ) -> Result<PassOutput> {
        while self.finished.iter().any(|f| !f) {
            let event = match events.recv_timeout(LIVENESS_POLL) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => {
                    for rank in 0..self.finished.len() {
                        if self.finished[rank] {
                            continue;
                        }
                        if let Some(lost) = ranks.lost(rank) {
                            let gone = self.gone(rank, ranks.host(rank), lost);
                            self.fail(gone, true, ranks);
                            self.finished[rank] = true;
                        }
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Internal("every sender of shard events is gone"));
                }
            };
            match event {
                ShardEvent::Piece { pass, .. }
                | ShardEvent::Done { pass, .. }
                | ShardEvent::Failed { pass, .. }
                    if pass != self.pass => {}
                ShardEvent::Piece {
                    rank,
                    tap,
                    call,
                    value,
                    ..
                } => {
                    if let Err(e) = self.piece(rank, tap, call, value, ranks, sink) {
                        self.fail(e, true, ranks);
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
                    // A collective that failed (a peer gone, the pass aborted) is the
                    // consequence of another rank's failure, found by `lost` if not reported.
                    let consequence = after_abort || cause.kind == FailureKind::Collective;
                    let error = Error::ShardFailed {
                        rank,
                        coords: self.layout.coords(rank),
                        host: ranks.host(rank),
                        at: self.failed_at(at),
                        cause,
                    };
                    self.fail(error, !consequence, ranks);
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
                    .map(|(tp, t)| {
                        t.clone()
                            .filter(|_| self.output.is_some_and(|o| o.sends(tp)))
                    })
                    .collect()
            })
            .collect();
        let output = match self.output {
            Some(geometry) => Some(geometry.assemble(&senders)?),
            None => None,
        };
        Ok(PassOutput { output, loss })
    }

    /// Where a shard was, by hook name.
    fn failed_at(&self, at: Option<(PointId, bool)>) -> Option<FailedAt> {
        let (point, backward) = at?;
        Some(FailedAt {
            hook: self.geometry.get(point)?.name.clone(),
            backward,
        })
    }

    /// The error for `rank`, which is gone.
    fn gone(&self, rank: usize, host: Option<String>, lost: Lost) -> Error {
        Error::ShardGone {
            rank,
            coords: self.layout.coords(rank),
            host,
            at: self.failed_at(lost.at),
            reason: lost.reason,
        }
    }

    /// Records the first failure that is a cause (else the first consequence) and aborts
    /// the pass so that no shard stays blocked.
    fn fail(&mut self, error: Error, cause: bool, ranks: &dyn Ranks) {
        let replace = match &self.failure {
            None => true,
            Some((_, known_cause)) => cause && !known_cause,
        };
        if replace {
            self.failure = Some((error, cause));
        }
        ranks.abort(self.pass);
    }

    fn piece(
        &mut self,
        rank: usize,
        tap: Tap,
        call: usize,
        value: Tensor,
        ranks: &dyn Ranks,
        sink: &mut dyn HookSink,
    ) -> Result<()> {
        if self.failure.is_some() {
            return Ok(());
        }
        let geometry = match tap.point() {
            None => self.output.ok_or(Error::Protocol {
                rank,
                what: "a piece of the output of a pass that gathers none".to_string(),
            })?,
            Some(point) => self.geometry.get(point).ok_or(Error::Protocol {
                rank,
                what: format!("a piece of hook point {point}, which does not exist"),
            })?,
        };
        if rank >= self.layout.world_size() {
            return Err(Error::Internal("a piece from a rank outside the layout"));
        }
        let RankCoords { dp, tp, .. } = self.layout.coords(rank);
        let gradient = tap.is_gradient();
        let sends = |t: usize| match gradient {
            true => geometry.sends_gradient(t),
            false => geometry.sends(t),
        };
        let expected = self.layout.dp() * (0..self.layout.tp()).filter(|&t| sends(t)).count();
        let (pieces, missing) = self.pending.entry((tap, call)).or_insert_with(|| {
            (
                vec![vec![None; self.layout.tp()]; self.layout.dp()],
                expected,
            )
        });
        if pieces[dp][tp].replace(value).is_some() || !sends(tp) {
            return Err(Error::Protocol {
                rank,
                what: format!("an unexpected piece of {tap:?}, call {call}"),
            });
        }
        *missing -= 1;
        if *missing > 0 {
            return Ok(());
        }
        let (pieces, _) = self.pending.remove(&(tap, call)).unwrap_or_default();
        let name = match tap {
            Tap::Value(_) => geometry.name.clone(),
            Tap::Gradient(_) => format!("{}_grad", geometry.name),
            Tap::EditGradient(_) => format!("{}_edit_grad", geometry.name),
            Tap::Output => "output".to_string(),
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
        let edited = sink.gathered(tap, call, full).map_err(Error::Sink)?;
        if !self.replies.answered(tap) {
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
                tap,
                call,
                value,
            };
            ranks.reply(self.layout.rank(coords), reply);
        }
        scatter.record("hook.bytes", sent as i64);
        Ok(())
    }
}
