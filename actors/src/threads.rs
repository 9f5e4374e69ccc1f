//! The ranks as shard actors on threads of this process, under a supervisor that
//! restarts a shard whose actor stopped.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Sender, unbounded};
use flexmodel_cluster::{InProcessCollective, Layout, PassControl, RankCoords};
use kameo::Actor;
use kameo::actor::{ActorRef, Spawn};
use kameo::error::Infallible;
use kameo::supervision::RestartPolicy;

use crate::protocol::{EditedPiece, RunPass, ShardEvent};
use crate::ranks::{Lost, Ranks};
use crate::shard::{ReadParameters, Run, ShardArgs};
use crate::{Error, Result, ShardActor, ShardModel, ShardParameters};

/// How many times a shard's actor is restarted within [`RESTART_WINDOW`] before the
/// supervisor gives up on it.
const RESTART_LIMIT: u32 = 3;
/// The window [`RESTART_LIMIT`] counts restarts in.
const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// How long a shard may take to hand over its parameter slices.
pub(crate) const PARAMETERS_TIMEOUT: Duration = Duration::from_secs(60);

/// The supervisor of the shard actors: restarts a shard whose actor stopped.
struct ShardSupervisor;

impl Actor for ShardSupervisor {
    type Args = ();
    type Error = Infallible;

    async fn on_start(_: Self::Args, _: ActorRef<Self>) -> std::result::Result<Self, Self::Error> {
        Ok(ShardSupervisor)
    }
}

/// Supervised shard actors, one per rank, each on its own thread.
pub(crate) struct ShardThreads {
    layout: Layout,
    runtime: tokio::runtime::Runtime,
    supervisor: ActorRef<ShardSupervisor>,
    shards: Vec<ActorRef<ShardActor>>,
    replies: Vec<Sender<EditedPiece>>,
    control: Arc<PassControl>,
}

impl ShardThreads {
    /// Starts one actor per rank of `layout` for `models` (in rank order), sending their
    /// events to `events`; `control` is shared with the models' collectives.
    pub(crate) fn start(
        layout: Layout,
        models: Vec<Arc<dyn ShardModel>>,
        control: Arc<PassControl>,
        events: Sender<ShardEvent>,
    ) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("flexmodel-supervisor")
            .enable_time()
            .build()
            .map_err(Error::RuntimeStart)?;
        // A shard waits for each reply before it goes on, so at most one is queued.
        let (replies, reply_rxs): (Vec<_>, Vec<_>) =
            (0..layout.world_size()).map(|_| unbounded()).unzip();
        // One pipeline group per (replica, tensor-parallel rank): member s is stage s.
        let mut pipeline: Vec<Option<Arc<InProcessCollective>>> = vec![None; layout.world_size()];
        for first in layout.all().filter(|c| c.pp == 0) {
            let members = InProcessCollective::group(layout.pp(), control.clone())?;
            for (stage, member) in members.into_iter().enumerate() {
                let rank = layout.rank(RankCoords { pp: stage, ..first });
                pipeline[rank] = Some(Arc::new(member));
            }
        }
        let args = (0..layout.world_size())
            .map(|rank| {
                Ok(ShardArgs {
                    rank,
                    coords: layout.coords(rank),
                    model: models[rank].clone(),
                    pipeline: pipeline[rank]
                        .clone()
                        .ok_or(Error::Internal("a rank is in no pipeline"))?,
                    events: events.clone(),
                    replies: reply_rxs[rank].clone(),
                    control: control.clone(),
                    at: Arc::default(),
                })
            })
            .collect::<Result<Vec<ShardArgs>>>()?;
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
            replies,
            control,
        })
    }

    fn gone(&self, rank: usize) -> Error {
        Error::ShardGone {
            rank,
            coords: self.layout.coords(rank),
            host: None,
            at: None,
            reason: "its thread stopped".into(),
        }
    }
}

impl Ranks for ShardThreads {
    fn begin(&self, pass: u64) {
        self.control.begin(pass);
    }

    fn run(&self, rank: usize, run: RunPass) -> Result<()> {
        let message = Run {
            run,
            parent: tracing::Span::current(),
            remote: None,
        };
        self.shards[rank]
            .tell(message)
            .blocking_send()
            .map_err(|_| self.gone(rank))
    }

    fn reply(&self, rank: usize, piece: EditedPiece) {
        let _ = self.replies[rank].send(piece);
    }

    fn abort(&self, _pass: u64) {
        self.control.abort();
    }

    fn lost(&self, rank: usize) -> Option<Lost> {
        let _enter = self.runtime.enter();
        (!self.shards[rank].is_alive()).then(|| Lost {
            at: None,
            reason: "its thread stopped".into(),
        })
    }

    fn host(&self, _rank: usize) -> Option<String> {
        None
    }

    fn parameters(&self, rank: usize) -> Result<ShardParameters> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        let coords = self.layout.coords(rank);
        self.shards[rank]
            .tell(ReadParameters { reply })
            .blocking_send()
            .map_err(|_| self.gone(rank))?;
        answer
            .recv_timeout(PARAMETERS_TIMEOUT)
            .map_err(|e| match e {
                crossbeam_channel::RecvTimeoutError::Timeout => Error::ShardTimedOut {
                    rank,
                    coords,
                    seconds: PARAMETERS_TIMEOUT.as_secs(),
                },
                crossbeam_channel::RecvTimeoutError::Disconnected => self.gone(rank),
            })
    }
}

impl Drop for ShardThreads {
    /// Stops the supervisor (so that nothing restarts), then every shard, and waits for
    /// their threads to end; the shards' weights are freed with them.
    fn drop(&mut self) {
        let shards = std::mem::take(&mut self.shards);
        let supervisor = self.supervisor.clone();
        let stopped = self.runtime.block_on(async move {
            let stop = async {
                supervisor.kill();
                supervisor.wait_for_shutdown().await;
                for shard in &shards {
                    shard.kill();
                    shard.wait_for_shutdown().await;
                }
            };
            tokio::time::timeout(crate::shard::SHUTDOWN_TIMEOUT, stop).await
        });
        if stopped.is_err() {
            tracing::error!(
                "the shards did not stop within {} s; their threads are left behind",
                crate::shard::SHUTDOWN_TIMEOUT.as_secs()
            );
        }
    }
}
