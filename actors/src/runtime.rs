//! The sharded runtime: the driver's pass loop over the ranks, wherever they run.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;
use crossbeam_channel::{Receiver, unbounded};
use flexmodel_cluster::{Layout, PassControl, split_evenly};

use crate::coordinator::{HookCoordinator, Replies};
use crate::protocol::{BackwardPass, BackwardPlan, Fault, RunPass, ShardEvent};
use crate::ranks::Ranks;
use crate::threads::ShardThreads;
use crate::{
    Error, HookSink, PassOutput, PointGeometry, PointId, PointMode, Result, ShardAction,
    ShardModel, ShardParameters, Window,
};

/// What the driver provides to start the runtime on threads of this process.
pub struct ShardSetup {
    /// Every rank's model shard, in rank order, built with collectives sharing `control`.
    pub models: Vec<Arc<dyn ShardModel>>,
    /// The pass control shared by every collective of the runtime.
    pub control: Arc<PassControl>,
    /// The geometry of every hook point, by point id.
    pub geometry: Vec<PointGeometry>,
    /// The geometry of the last stage's output.
    pub output: PointGeometry,
}

/// The ranks of a layout and the driver's side of the hook protocol.
pub struct ShardRuntime {
    layout: Layout,
    ranks: Box<dyn Ranks>,
    events: Receiver<ShardEvent>,
    geometry: Vec<PointGeometry>,
    output: PointGeometry,
    next_pass: u64,
    /// Faults to raise in the next pass, by rank.
    faults: HashMap<usize, (PointId, Fault)>,
}

impl ShardRuntime {
    /// Starts one supervised shard actor per rank, each on its own thread.
    pub fn start(layout: Layout, setup: ShardSetup) -> Result<Self> {
        if setup.models.len() != layout.world_size() {
            return Err(Error::ShardCount {
                shards: setup.models.len(),
                ranks: layout.world_size(),
            });
        }
        // Unbounded on purpose: a shard sending a capture must never wait (the protocol's
        // "captures are asynchronous"); what can queue is one pass's pieces, which the
        // coordinator drains as they come.
        let (events_tx, events) = unbounded();
        let threads = ShardThreads::start(layout, setup.models, setup.control, events_tx)?;
        Ok(Self::over(
            layout,
            Box::new(threads),
            events,
            setup.geometry,
            setup.output,
        ))
    }

    /// The runtime over `ranks`, whose events arrive on `events`.
    pub(crate) fn over(
        layout: Layout,
        ranks: Box<dyn Ranks>,
        events: Receiver<ShardEvent>,
        geometry: Vec<PointGeometry>,
        output: PointGeometry,
    ) -> Self {
        Self {
            layout,
            ranks,
            events,
            geometry,
            output,
            next_pass: 1,
            faults: HashMap::new(),
        }
    }

    /// The ranks, wherever they run.
    pub(crate) fn ranks(&self) -> &dyn Ranks {
        self.ranks.as_ref()
    }

    /// The layout of the ranks.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Makes rank `rank` fail with `fault` when it reaches `point` in the next pass: for
    /// testing that a failing shard is reported and that the runtime stays usable. Only
    /// with the `fault-injection` feature.
    #[cfg(feature = "fault-injection")]
    pub fn inject_fault(&mut self, rank: usize, point: PointId, fault: Fault) -> Result<()> {
        if rank >= self.layout.world_size() || point >= self.geometry.len() {
            return Err(Error::NoFaultTarget { rank, point });
        }
        self.faults.insert(rank, (point, fault));
        Ok(())
    }

    /// Every rank's parameter slices, with their gradients from the last backward pass,
    /// in rank order (a message to each shard).
    pub fn parameters(&self) -> Result<Vec<ShardParameters>> {
        (0..self.layout.world_size())
            .map(|rank| self.ranks.parameters(rank))
            .collect()
    }

    /// Runs one pass over `tokens` (`[b, t]`; replicas get contiguous, possibly uneven,
    /// runs of sequences) at the positions `window` says, with each point hooked as
    /// `modes` says; returns the assembled output of the last stage.
    pub fn run_pass(
        &mut self,
        tokens: &Tensor,
        window: &Window,
        modes: &[PointMode],
        sink: &mut dyn HookSink,
    ) -> Result<Tensor> {
        self.run(tokens, window, modes, None, sink, PassEnd::Whole)?
            .output
            .ok_or(Error::Internal("a whole pass gathered no output"))
    }

    /// [`run_pass`](Self::run_pass) ending where `end` says: the stages after its stage
    /// do not run, and its output (if any) is gathered as its geometry says.
    pub fn run_pass_to(
        &mut self,
        tokens: &Tensor,
        window: &Window,
        modes: &[PointMode],
        sink: &mut dyn HookSink,
        end: PassEnd<'_>,
    ) -> Result<Option<Tensor>> {
        Ok(self.run(tokens, window, modes, None, sink, end)?.output)
    }

    /// Runs a forward and a backward pass from the mean next-token loss over the pairs of
    /// real tokens of the global batch (sequences of at least two tokens); `grads[p]` says
    /// how the gradient at point `p` is hooked (it reaches the sink as
    /// [`Tap::Gradient`](crate::Tap)).
    pub fn run_forward_backward(
        &mut self,
        tokens: &Tensor,
        window: &Window,
        modes: &[PointMode],
        grads: &[PointMode],
        sink: &mut dyn HookSink,
    ) -> Result<PassOutput> {
        self.run(
            tokens,
            window,
            modes,
            Some((grads, false)),
            sink,
            PassEnd::Whole,
        )
    }

    /// Like [`run_forward_backward`](Self::run_forward_backward), with the loss computed
    /// by the sink: the gathered output reaches it as [`Tap::Output`](crate::Tap), and
    /// the gradient it returns is scattered to the last stage, where backward starts.
    pub fn run_forward_backward_with_driver_loss(
        &mut self,
        tokens: &Tensor,
        window: &Window,
        modes: &[PointMode],
        grads: &[PointMode],
        sink: &mut dyn HookSink,
    ) -> Result<PassOutput> {
        self.run(
            tokens,
            window,
            modes,
            Some((grads, true)),
            sink,
            PassEnd::Whole,
        )
    }

    fn run(
        &mut self,
        tokens: &Tensor,
        window: &Window,
        modes: &[PointMode],
        backward: Option<(&[PointMode], bool)>,
        sink: &mut dyn HookSink,
        end: PassEnd<'_>,
    ) -> Result<PassOutput> {
        let last = self.layout.pp() - 1;
        let (end_stage, output) = match end {
            PassEnd::Whole => (last, Some(&self.output)),
            PassEnd::Silent => (last, None),
            PassEnd::At(geometry) if geometry.stage <= last => (geometry.stage, Some(geometry)),
            PassEnd::At(_) => return Err(Error::Internal("a pass ending after the last stage")),
        };
        let grads = backward.map(|(grads, _)| grads);
        let driver_loss = backward.is_some_and(|(_, driver)| driver);
        let (batch, t) = tokens.dims2()?;
        window.check(batch, t)?;
        if batch < self.layout.dp() {
            return Err(Error::BatchTooSmall {
                batch,
                replicas: self.layout.dp(),
            });
        }
        self.ranks.recover()?;
        let pass = self.next_pass;
        self.next_pass += 1;
        self.ranks.begin(pass);
        let batches = split_evenly(batch, self.layout.dp());
        let normalizer = predicted_tokens(batch, t, window)?;
        let replies = Replies {
            values: modes.iter().map(|m| *m == PointMode::Edit).collect(),
            gradients: (0..self.geometry.len())
                .map(|p| grads.is_some_and(|g| g[p] == PointMode::Edit))
                .collect(),
        };
        for rank in 0..self.layout.world_size() {
            let coords = self.layout.coords(rank);
            let on_stage = |g: &PointGeometry, mode: PointMode| match g.stage == coords.pp {
                true => mode,
                false => PointMode::Off,
            };
            let actions: Vec<ShardAction> = self
                .geometry
                .iter()
                .zip(modes)
                .map(|(g, &mode)| match on_stage(g, mode) {
                    PointMode::Off => ShardAction::Skip,
                    mode => g.action(coords.tp, mode == PointMode::Edit),
                })
                .collect();
            let rows = &batches[coords.dp];
            let replica = tokens.narrow(0, rows.start, rows.len())?.contiguous()?;
            let backward = grads.map(|grads| BackwardPass {
                tokens: replica.clone(),
                plan: BackwardPlan {
                    driver_loss,
                    normalizer,
                    taps: self
                        .geometry
                        .iter()
                        .zip(grads)
                        .map(|(g, &mode)| on_stage(g, mode))
                        .collect(),
                    sends_gradients: self
                        .geometry
                        .iter()
                        .map(|g| g.sends_gradient(coords.tp))
                        .collect(),
                },
            });
            let run = RunPass {
                pass,
                input: (coords.pp == 0).then_some(replica),
                window: window.rows(rows.clone())?,
                actions,
                fault: self.faults.remove(&rank),
                backward,
                end_stage,
                sends_output: output.is_some(),
            };
            self.ranks.run(rank, run)?;
        }
        let coordinator = HookCoordinator::new(
            self.layout,
            pass,
            &self.geometry,
            output,
            &replies,
            &batches,
        );
        coordinator.run(&self.events, self.ranks.as_ref(), sink)
    }
}

/// Where a pass ends and what it gathers.
#[derive(Debug, Clone, Copy)]
pub enum PassEnd<'a> {
    /// Through every stage, gathering the last stage's output as the runtime's setup
    /// describes it.
    Whole,
    /// Through every stage, gathering no output.
    Silent,
    /// At the stage of a point: the stages after it do not run, and its output is
    /// gathered as the point's geometry says.
    At(&'a PointGeometry),
}

/// The next tokens a batch of `b` sequences of `t` positions predicts: the pairs of
/// consecutive real tokens.
fn predicted_tokens(b: usize, t: usize, window: &Window) -> Result<f64> {
    let Some(mask) = &window.mask else {
        return Ok((b * t.saturating_sub(1)) as f64);
    };
    if t < 2 {
        return Ok(0.0);
    }
    let pairs = (mask.narrow(1, 0, t - 1)? * mask.narrow(1, 1, t - 1)?)?;
    Ok(pairs
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?)
}
