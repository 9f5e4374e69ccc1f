//! Where the ranks run — threads of this process (the default), one worker process
//! per rank on this machine, or the workers of a job in etcd — and what a worker
//! process loads.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use flexmodel_actors::{Assignment, BoxError, JobLaunch, LoadedShard, ShardLoader, WorkerLaunch};
use flexmodel_cluster::membership::ClusterUrl;
use flexmodel_cluster::transport::Token;
use flexmodel_cluster::{Collective, Layout};

use crate::Checkpoint;
use crate::runtime::sharding::{Shard, check_layout, check_rank_fits_in_memory, stage_of};
use crate::sae::{self, SaeAttachment, ShardSaes};
use crate::{Error, Result};

/// Where the ranks of a model run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Placement {
    /// Every rank is a thread of this process.
    #[default]
    Threads,
    /// Every rank is a `flexmodel worker` process on this machine, started when the
    /// model is built and stopped when it is dropped.
    Processes(Processes),
    /// Every rank is a worker of a job in etcd, on this machine or another, taken when
    /// the model is built and let go (with its shard, for the next driver) when it is
    /// dropped.
    Cluster(Cluster),
}

/// How worker processes are started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Processes {
    /// The `flexmodel` binary to run; by default `FLEXMODEL_WORKER_BIN`, else this
    /// program if it is `flexmodel`, else a `flexmodel` next to it or above it (how
    /// Cargo lays out tests), else `flexmodel` on the `PATH`.
    pub program: Option<PathBuf>,
    /// Compute threads per worker; by default this machine's cores split evenly among
    /// the workers (`RAYON_NUM_THREADS`, when set, is passed to every worker instead).
    pub threads: Option<usize>,
    /// The job's token file (mode 0600); by default a fresh token, given to the workers
    /// in a private file that is removed once they have joined.
    pub token_file: Option<PathBuf>,
}

impl Processes {
    /// How to start the workers of `layout` for the model at `model`, whose weights
    /// have `fingerprint`.
    pub(crate) fn launch(
        &self,
        layout: &Layout,
        model: &std::path::Path,
        saes: &[SaeAttachment],
        fingerprint: String,
    ) -> Result<WorkerLaunch> {
        Ok(WorkerLaunch {
            program: self.program.clone().unwrap_or_else(worker_program),
            args: vec!["worker".into()],
            model: sae::describe(&model_name(model)?, saes),
            fingerprint: Some(fingerprint),
            threads: self
                .threads
                .unwrap_or_else(|| WorkerLaunch::default_threads(layout.world_size())),
            trace: crate::telemetry::propagation(),
            token_file: self.token_file.clone(),
        })
    }
}

/// The workers of a job in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// The job.
    pub url: ClusterUrl,
    /// The model as each worker names it on its own disk (the same names as `--model`);
    /// by default the checkpoint's file or directory.
    pub model: Option<String>,
    /// The job's token file (mode 0600), which the job's workers hold too. A job's
    /// token lives only in files: nothing that would let someone join is kept in etcd.
    pub token_file: PathBuf,
}

impl Cluster {
    /// How to take the job's workers for the model at `origin`, with `saes` spliced in,
    /// whose weights have `fingerprint`.
    pub(crate) fn launch(
        &self,
        origin: &std::path::Path,
        saes: &[SaeAttachment],
        fingerprint: String,
    ) -> Result<JobLaunch> {
        let model = match &self.model {
            Some(model) => model.clone(),
            None => model_name(origin)?,
        };
        Ok(JobLaunch {
            url: self.url.clone(),
            model: sae::describe(&model, saes),
            fingerprint: Some(fingerprint),
            token: Token::read(&self.token_file)?,
            trace: crate::telemetry::propagation(),
        })
    }
}

/// `path` as a worker is told it.
fn model_name(path: &std::path::Path) -> Result<String> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| Error::InvalidArgument {
            argument: "model path",
            problem: format!(
                "{} is not valid UTF-8, so a worker cannot be told it",
                path.display()
            ),
        })
}

/// The `flexmodel` binary a driver starts its workers with, by default.
fn worker_program() -> PathBuf {
    if let Some(path) = std::env::var_os("FLEXMODEL_WORKER_BIN") {
        return path.into();
    }
    let name = format!("flexmodel{}", std::env::consts::EXE_SUFFIX);
    if let Ok(me) = std::env::current_exe() {
        if me.file_name().is_some_and(|n| n == name.as_str()) {
            return me;
        }
        // Tests run from target/<profile>/deps; the binary lies in target/<profile>.
        for dir in me.ancestors().skip(1).take(2) {
            let candidate = dir.join(&name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(name)
}

/// Loads a worker's shard of a model: opens the model the assignment names on this
/// machine's disk and reads only the tensors of its rank, one at a time,
/// onto the worker's device, with its share of the SAEs the assignment names
/// (`MODEL --sae DIR@HOOK ...`).
pub struct CheckpointLoader;

impl ShardLoader for CheckpointLoader {
    fn load(
        &self,
        assignment: &Assignment,
        device: &Device,
        tp: Arc<dyn Collective>,
        replicas: Option<Arc<dyn Collective>>,
    ) -> std::result::Result<LoadedShard, BoxError> {
        let (model, saes) = sae::parse_description(&assignment.model)?;
        let checkpoint = Checkpoint::open(&model)?;
        let layout = assignment.layout;
        let config = &checkpoint
            .config
            .clone()
            .with_dtype(layout.model_dtype().dtype());
        check_layout(config, &layout)?;
        // Weights on a GPU take none of this machine's memory (a job's worker computes
        // on its own device, whatever the layout says).
        let (points, sae_configs) = sae::splice_all(config.points(), &saes)?;
        if device.is_cpu() {
            check_rank_fits_in_memory(config, &layout, assignment.rank, &sae_configs)?;
        }
        let stage = stage_of(config, &layout, layout.coords(assignment.rank).pp);
        let weights = checkpoint.weights.as_ref();
        let saes = ShardSaes::load(&saes, &points, &stage, tp.clone(), device)?;
        let model = config.load(weights, tp, stage, device, replicas)?;
        Ok(LoadedShard {
            model: Arc::new(Shard::new(model, points).with_saes(saes)),
            fingerprint: checkpoint.weights.fingerprint()?,
        })
    }
}
