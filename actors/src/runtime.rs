//! The sharded runtime: shard actors under a supervisor, and the driver's pass loop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Tensor;
use crossbeam_channel::{Receiver, Sender, unbounded};
use flexmodel_cluster::{InProcessCollective, Layout, PassControl, split_evenly};
use kameo::Actor;
use kameo::actor::{ActorRef, Spawn};
use kameo::error::Infallible;
use kameo::supervision::RestartPolicy;

use crate::coordinator::HookCoordinator;
use crate::protocol::{BackwardPass, EditedPiece, Fault, ReadParameters, RunPass, ShardEvent};
use crate::shard::ShardArgs;
use crate::{
    Error, HookSink, PassOutput, PointGeometry, PointId, PointMode, Result, ShardAction,
    ShardActor, ShardModel, ShardParameters,
};

/// How many times a shard's actor is restarted within [`RESTART_WINDOW`] before the
/// supervisor gives up on it.
const RESTART_LIMIT: u32 = 3;
/// The window [`RESTART_LIMIT`] counts restarts in.
const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// How long a shard may take to hand over its parameter slices.
const PARAMETERS_TIMEOUT: Duration = Duration::from_secs(60);

/// The supervisor of the shard actors: restarts a shard whose actor stopped.
struct ShardSupervisor;

impl Actor for ShardSupervisor {
    type Args = ();
    type Error = Infallible;

    async fn on_start(_: Self::Args, _: ActorRef<Self>) -> std::result::Result<Self, Self::Error> {
        Ok(ShardSupervisor)
    }
}

/// What the driver provides to start the runtime.
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

/// Shard actors for every rank of a layout, and the channels of the hook protocol.
pub struct ShardRuntime {
    layout: Layout,
    runtime: tokio::runtime::Runtime,
    supervisor: ActorRef<ShardSupervisor>,
    shards: Vec<ActorRef<ShardActor>>,
    events: Receiver<ShardEvent>,
    replies: Vec<Sender<EditedPiece>>,
    control: Arc<PassControl>,
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("flexmodel-supervisor")
            .enable_time()
            .build()
            .map_err(Error::RuntimeStart)?;
        // Unbounded on purpose: a shard sending a capture must never wait (the protocol's
        // "captures are asynchronous"); what can queue is one pass's pieces, which the
        // coordinator drains as they come.
        let (events_tx, events) = unbounded();
        // A shard waits for each reply before it goes on, so at most one is queued.
        let (replies, reply_rxs): (Vec<_>, Vec<_>) =
            (0..layout.world_size()).map(|_| unbounded()).unzip();
        // One pipeline group per (replica, tensor-parallel rank): member s is stage s.
        let mut pipeline: Vec<Option<Arc<InProcessCollective>>> = vec![None; layout.world_size()];
        for first in layout.all().filter(|c| c.pp == 0) {
            let members = InProcessCollective::group(layout.pp(), setup.control.clone())?;
            for (stage, member) in members.into_iter().enumerate() {
                let rank = layout.rank(flexmodel_cluster::RankCoords { pp: stage, ..first });
                pipeline[rank] = Some(Arc::new(member));
            }
        }
        let args: Vec<ShardArgs> = (0..layout.world_size())
            .map(|rank| ShardArgs {
                rank,
                coords: layout.coords(rank),
                stages: layout.pp(),
                model: setup.models[rank].clone(),
                pipeline: pipeline[rank]
                    .clone()
                    .unwrap_or_else(|| unreachable!("every rank is in a pipeline")),
                events: events_tx.clone(),
                replies: reply_rxs[rank].clone(),
                control: setup.control.clone(),
            })
            .collect();
        let (supervisor, shards) = runtime.block_on(async {
            let supervisor = ShardSupervisor::spawn(());
            let mut shards = Vec::with_capacity(args.len());
            for a in args {
                let shard = ShardActor::supervise(&supervisor, a)
                    .restart_policy(RestartPolicy::Permanent)
                    .restart_limit(RESTART_LIMIT, RESTART_WINDOW)
                    .spawn_in_thread()
                    .await;
                shards.push(shard);
            }
            (supervisor, shards)
        });
        Ok(Self {
            layout,
            runtime,
            supervisor,
            shards,
            events,
            replies,
            control: setup.control,
            geometry: setup.geometry,
            output: setup.output,
            next_pass: 1,
            faults: HashMap::new(),
        })
    }

    /// The layout of the ranks.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Makes rank `rank` fail with `fault` when it reaches `point` in the next pass: for
    /// testing that a failing shard is reported and that the runtime stays usable.
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
        self.shards
            .iter()
            .enumerate()
            .map(|(rank, shard)| {
                let (reply, answer) = crossbeam_channel::bounded(1);
                let coords = self.layout.coords(rank);
                shard
                    .tell(ReadParameters { reply })
                    .blocking_send()
                    .map_err(|_| Error::ShardGone { rank, coords })?;
                answer
                    .recv_timeout(PARAMETERS_TIMEOUT)
                    .map_err(|e| match e {
                        crossbeam_channel::RecvTimeoutError::Timeout => Error::ShardTimedOut {
                            rank,
                            coords,
                            seconds: PARAMETERS_TIMEOUT.as_secs(),
                        },
                        crossbeam_channel::RecvTimeoutError::Disconnected => {
                            Error::ShardGone { rank, coords }
                        }
                    })
            })
            .collect()
    }

    /// Runs one pass over `tokens` (`[b, t]`; replicas get contiguous, possibly uneven,
    /// runs of sequences) with each point hooked as `modes` says; returns the assembled
    /// output.
    pub fn run_pass(
        &mut self,
        tokens: &Tensor,
        modes: &[PointMode],
        sink: &mut dyn HookSink,
    ) -> Result<Tensor> {
        Ok(self.run(tokens, modes, None, sink)?.output)
    }

    /// Runs a forward and a backward pass from the mean next-token loss over the global
    /// batch (sequences of at least two tokens); `grads[p]` says how the gradient at
    /// point `p` is hooked (it reaches the sink as point `n_points + p`).
    pub fn run_forward_backward(
        &mut self,
        tokens: &Tensor,
        modes: &[PointMode],
        grads: &[PointMode],
        sink: &mut dyn HookSink,
    ) -> Result<PassOutput> {
        self.run(tokens, modes, Some((grads, false)), sink)
    }

    /// Like [`run_forward_backward`](Self::run_forward_backward), with the loss computed
    /// by the sink: the gathered output reaches it as point `3 n_points`, and the gradient
    /// it returns is scattered to the last stage, where backward starts.
    pub fn run_forward_backward_with_driver_loss(
        &mut self,
        tokens: &Tensor,
        modes: &[PointMode],
        grads: &[PointMode],
        sink: &mut dyn HookSink,
    ) -> Result<PassOutput> {
        self.run(tokens, modes, Some((grads, true)), sink)
    }

    fn run(
        &mut self,
        tokens: &Tensor,
        modes: &[PointMode],
        backward: Option<(&[PointMode], bool)>,
        sink: &mut dyn HookSink,
    ) -> Result<PassOutput> {
        let grads = backward.map(|(grads, _)| grads);
        let driver_loss = backward.is_some_and(|(_, driver)| driver);
        let batch = tokens.dim(0)?;
        if batch < self.layout.dp() {
            return Err(Error::BatchTooSmall {
                batch,
                replicas: self.layout.dp(),
            });
        }
        let pass = self.next_pass;
        self.next_pass += 1;
        self.control.begin(pass);
        let batches = split_evenly(batch, self.layout.dp());
        // Which gathered tensors get a reply: edited values, edited gradients, and the
        // gradients of edits (points 0..n, n..2n, 2n..3n).
        let n = self.geometry.len();
        let mut replies: Vec<bool> = modes.iter().map(|m| *m == PointMode::Edit).collect();
        replies.extend((0..n).map(|p| grads.is_some_and(|g| g[p] == PointMode::Edit)));
        replies.extend(std::iter::repeat_n(true, n + 1));
        for (rank, shard) in self.shards.iter().enumerate() {
            let coords = self.layout.coords(rank);
            let actions: Vec<ShardAction> = self
                .geometry
                .iter()
                .zip(modes)
                .map(|(g, mode)| match mode {
                    PointMode::Off => ShardAction::Skip,
                    _ if g.stage != coords.pp => ShardAction::Skip,
                    mode => g.action(coords.tp, *mode == PointMode::Edit),
                })
                .collect();
            let rows = &batches[coords.dp];
            let replica = tokens.narrow(0, rows.start, rows.len())?.contiguous()?;
            let sends_gradients: Vec<bool> = self
                .geometry
                .iter()
                .map(|g| g.sends_gradient(coords.tp))
                .collect();
            let backward = grads.map(|grads| BackwardPass {
                driver_loss,
                sends_gradients: Arc::new(sends_gradients),
                tokens: replica.clone(),
                normalizer: (batch * tokens.dim(1).unwrap_or(1).saturating_sub(1)) as f64,
                taps: Arc::new(
                    self.geometry
                        .iter()
                        .zip(grads)
                        .map(|(g, &mode)| {
                            if g.stage == coords.pp {
                                mode
                            } else {
                                PointMode::Off
                            }
                        })
                        .collect(),
                ),
            });
            let input = (coords.pp == 0).then_some(replica);
            let fault = self.faults.remove(&rank);
            let run = RunPass {
                pass,
                input,
                actions: Arc::new(actions),
                fault,
                backward,
                span: tracing::Span::current(),
            };
            shard
                .tell(run)
                .blocking_send()
                .map_err(|_| Error::ShardGone { rank, coords })?;
        }
        let coordinator = HookCoordinator::new(
            self.layout,
            pass,
            &self.geometry,
            &self.output,
            &replies,
            &batches,
        );
        let shards = &self.shards;
        let _enter = self.runtime.enter();
        coordinator.run(
            &self.events,
            &self.replies,
            &self.control,
            |r| shards[r].is_alive(),
            sink,
        )
    }
}

impl Drop for ShardRuntime {
    /// Stops the supervisor (so that nothing restarts), then every shard, and waits for
    /// their threads to end; the shards' weights are freed with them.
    fn drop(&mut self) {
        let shards = std::mem::take(&mut self.shards);
        let supervisor = self.supervisor.clone();
        self.runtime.block_on(async move {
            supervisor.kill();
            supervisor.wait_for_shutdown().await;
            for shard in &shards {
                shard.kill();
                shard.wait_for_shutdown().await;
            }
        });
    }
}
