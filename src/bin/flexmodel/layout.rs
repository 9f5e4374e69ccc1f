//! The `[--tp N] [--pp N] [--dp N] [--fsdp] [--model-dtype D] [--device D] [--procs | --cluster URL] [--token-file F] [--sae DIR@HOOK]...`
//! options every command takes, and the checks a command makes before it reads any
//! weight.

use std::path::PathBuf;

use candle_core::Tensor;
use clap::Args;
use flexmodel::runtime::sharding::check_layout;
use flexmodel::runtime::{Cluster, Placement, Processes};
use flexmodel::sae::{SaeAttachment, splice_all};
use flexmodel::text::check_tokens;
use flexmodel::{Checkpoint, FlexModel, HookCatalog, HookKind, PassScope};
use flexmodel_cluster::membership::ClusterUrl;
use flexmodel_cluster::{DeviceSpec, Layout, ModelDtype};

/// How the model is split: tensor × pipeline × data parallel.
#[derive(Args, Debug, Clone)]
pub struct LayoutArgs {
    /// Tensor-parallel ranks.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub tp: u32,
    /// Pipeline-parallel stages.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub pp: u32,
    /// Data-parallel replicas.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub dp: u32,
    /// Shard every parameter across the data-parallel replicas as well (FSDP): each
    /// holds 1/dp of its shard's parameters and gathers a layer's whole slices just
    /// before it computes. Needs `--dp` 2 or more.
    #[arg(long)]
    pub fsdp: bool,
    /// The dtype the weights are held in: f32, bf16 or f16 (half the memory). On the
    /// CPU products are computed in f32 whatever the weights' dtype, so hooks see f32.
    #[arg(long, default_value_t = ModelDtype::F32, value_name = "f32|bf16|f16")]
    pub model_dtype: ModelDtype,
    /// The device the ranks compute on: `cpu`, `cuda:N` (every rank on GPU N: ranks of
    /// one process share it) or `cuda` (rank r on GPU r mod the number of GPUs). Needs a
    /// build with the `cuda` feature (scripts/build-cuda). A job's workers compute on
    /// the device each was started with instead.
    #[arg(long, default_value_t = DeviceSpec::Cpu, value_name = "cpu|cuda[:N]", conflicts_with = "cluster")]
    pub device: DeviceSpec,
    /// Run every rank in a worker process of its own on this machine (by default, every
    /// rank is a thread of this process).
    #[arg(long, conflicts_with = "cluster")]
    pub procs: bool,
    /// Run every rank on a worker of the job at `etcd://HOST:PORT[,HOST:PORT...]/JOB`
    /// (workers started with `flexmodel worker --etcd ... --job JOB`, on any machine).
    #[arg(long, value_name = "URL", requires = "token_file")]
    pub cluster: Option<ClusterUrl>,
    /// The job's secret token (a file, mode 0600) that every connection between its
    /// processes proves it holds; with `--procs`, by default a fresh one; with
    /// `--cluster`, required (the job's workers hold the same one).
    #[arg(long, value_name = "F")]
    pub token_file: Option<PathBuf>,
    /// A sparse autoencoder saved by SAELens (`cfg.json`, `sae_weights.safetensors` in
    /// DIR) spliced at the hook point HOOK, its points named `HOOK.hook_sae_acts_post`
    /// and so on; its latents are split across tensor-parallel ranks. Repeatable.
    #[arg(long = "sae", value_name = "DIR@HOOK", value_parser = parse_sae)]
    pub saes: Vec<SaeAttachment>,
}

fn parse_sae(spec: &str) -> Result<SaeAttachment, String> {
    spec.parse().map_err(|e: flexmodel::Error| e.to_string())
}

/// What a command will run, checked against the model before its weights are read.
#[derive(Default)]
pub struct Plan<'a> {
    /// The batches it will run (their sequences split over the replicas).
    pub batches: &'a [Tensor],
    /// The hook targets it will register, with their kinds.
    pub targets: Vec<(&'a str, HookKind)>,
    /// How much of the model its passes run.
    pub scope: PassScope,
}

impl LayoutArgs {
    /// The layout these options describe.
    pub fn layout(&self) -> anyhow::Result<Layout> {
        let layout = Layout::new(self.dp as usize, self.pp as usize, self.tp as usize)?;
        Ok(layout
            .with_fsdp(self.fsdp)?
            .with_model_dtype(self.model_dtype)
            .with_device(self.device))
    }

    /// The model of `checkpoint` split over this layout, after checking `plan`: the
    /// layout against the model, the machine and every batch; the token ids and lengths
    /// against the vocabulary and the context; every hook target against the model's
    /// names. Bad input fails here, before any weight is read or dequantized.
    /// `model` is the model's name as given (`--model`), which a job's workers resolve
    /// on their own disks.
    pub fn build(
        &self,
        checkpoint: &Checkpoint,
        model: &str,
        plan: Plan<'_>,
    ) -> anyhow::Result<FlexModel> {
        let config = &checkpoint.config;
        let layout = self.layout()?;
        check_layout(config, &layout)?;
        for tokens in plan.batches {
            let (batch, _) = check_tokens(tokens, config.vocab_size(), config.context())?;
            if batch < layout.dp() {
                return Err(flexmodel::Error::BatchTooSmall {
                    batch,
                    replicas: layout.dp(),
                }
                .into());
            }
        }
        let (points, _) = splice_all(config.points(), &self.saes)?;
        let catalog = HookCatalog::new(points);
        for (target, kind) in plan.targets {
            catalog.resolve(target, kind)?;
            catalog.check_in_scope(target, kind, plan.scope)?;
        }
        Ok(FlexModel::build_with_saes(
            checkpoint,
            layout,
            &self.placement(model)?,
            &self.saes,
        )?)
    }

    /// Where the ranks run, for the model named `model`.
    pub fn placement(&self, model: &str) -> anyhow::Result<Placement> {
        if let Some(url) = &self.cluster {
            let Some(token_file) = &self.token_file else {
                anyhow::bail!(
                    "--cluster needs --token-file F: the job's token, which its workers hold too"
                );
            };
            return Ok(Placement::Cluster(Cluster {
                url: url.clone(),
                model: Some(model.to_string()),
                token_file: token_file.clone(),
            }));
        }
        Ok(match self.procs {
            true => Placement::Processes(Processes {
                token_file: self.token_file.clone(),
                ..Processes::default()
            }),
            false => Placement::Threads,
        })
    }
}
