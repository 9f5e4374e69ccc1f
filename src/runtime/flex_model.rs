//! `FlexModel`: a model with registered hooks, an activation store and a save context.

use std::sync::Arc;

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};
use flexmodel_actors::{
    KvCache, Logits, PassEnd, PassScope, PointGeometry, ShardModel, ShardRuntime, ShardSetup,
    Window,
};
use flexmodel_cluster::host_copy::to_host;
use flexmodel_cluster::{Layout, PassControl, SingleRank};

use crate::hooks::catalog::scope_limits;
use crate::hooks::dispatch::{LossFn, PassHooks};
use crate::hooks::registry::{Groups, HookRegistry};
use crate::hooks::{HookCatalog, ModelPoints};
use crate::models::{ModelConfig, ModelShard, Stage};
use crate::runtime::launch::Placement;
use crate::runtime::parameters::{self, RankSlices};
use crate::runtime::sharding::{Shard, build_shards, check_fits_in_memory, check_layout, geometry};
use crate::sae::{SaeAttachment, ShardSaes, splice_all};
use crate::text::TokenBatch;
use crate::text::token_batch::check_tokens;
use crate::weights::{TensorMap, WeightSource};
use crate::{
    ActivationStore, BlockSite, Checkpoint, Error, HookPoint, NoHooks, Result, SaveContext,
};

/// Where the model runs.
enum Backend {
    /// One shard: forward passes in the calling thread (with its key/value cache);
    /// backward passes in a one-rank runtime started on first use (it shares the weights).
    Single {
        model: Arc<dyn ModelShard>,
        saes: ShardSaes,
        cache: KvCache,
        runtime: Option<Box<ShardRuntime>>,
    },
    /// One shard actor per rank of a layout, on threads or in worker processes.
    Sharded {
        runtime: ShardRuntime,
        /// The bytes of weights each rank holds.
        weight_bytes: Vec<usize>,
    },
}

/// A model whose hook points can be read and edited by registered [`HookFunction`]s.
///
/// ```no_run
/// use flexmodel::{Checkpoint, FlexModel, HookFunction, edits};
///
/// # fn main() -> flexmodel::Result<()> {
/// let checkpoint = Checkpoint::open("smollm2")?;
/// let mut model = FlexModel::new(checkpoint.load_model()?);
/// model.hooks_mut().register(HookFunction::new("blocks.*.hook_resid_post"))?;
/// model.hooks_mut().register(HookFunction::new("blocks.3.attn.hook_z").with_edit(edits::zero_head(1)))?;
/// let tokens = checkpoint.tokenizer.encode_batch(&["The capital of France is"])?;
/// let logits = model.forward(&tokens)?;
/// let resid = model.store().last("blocks.29.hook_resid_post").unwrap();
/// # let _ = (logits, resid);
/// # Ok(())
/// # }
/// ```
///
/// [`HookFunction`]: crate::HookFunction
pub struct FlexModel {
    config: ModelConfig,
    layout: Layout,
    backend: Backend,
    points: ModelPoints,
    registry: HookRegistry,
    store: ActivationStore,
    save: SaveContext,
    /// Variables that edits use, by name, and their gradients from the last backward pass.
    trainables: BTreeMap<String, Var>,
    trainable_grads: BTreeMap<String, Tensor>,
}

impl FlexModel {
    /// Wraps a single-shard `model` (one holding the whole model) with no hooks
    /// registered.
    pub fn new(model: Arc<dyn ModelShard>) -> Self {
        let config = model.model_config();
        let backend = Backend::Single {
            model,
            saes: ShardSaes::default(),
            cache: KvCache::default(),
            runtime: None,
        };
        Self::with_backend(config.points(), config, Layout::SINGLE, backend)
    }

    /// Builds the model of `checkpoint` split over `layout`: one shard actor per rank,
    /// each holding only its slices, or the whole model in this thread for one rank.
    ///
    /// The layout is checked against the model and this machine's memory before any
    /// weight is read.
    pub fn build(checkpoint: &Checkpoint, layout: Layout) -> Result<Self> {
        Self::build_on(checkpoint, layout, &Placement::Threads)
    }

    /// Builds the model of `checkpoint` split over `layout`, its ranks placed as
    /// `placement` says: threads of this process, one worker process per rank, or the
    /// workers of a job (each worker opens the model itself, and reads only its slices).
    pub fn build_on(
        checkpoint: &Checkpoint,
        layout: Layout,
        placement: &Placement,
    ) -> Result<Self> {
        Self::build_with_saes(checkpoint, layout, placement, &[])
    }

    /// Builds the model of `checkpoint` split over `layout`, its ranks placed as
    /// `placement` says, with the sparse autoencoders `saes` spliced at their hook
    /// points: each tensor-parallel rank holds its share of every SAE's latents, and
    /// the SAEs' points (`HOOK.hook_sae_acts_post`, …) are the model's points too.
    pub fn build_with_saes(
        checkpoint: &Checkpoint,
        layout: Layout,
        placement: &Placement,
        saes: &[SaeAttachment],
    ) -> Result<Self> {
        let config = checkpoint
            .config
            .clone()
            .with_dtype(layout.model_dtype().dtype());
        check_layout(&config, &layout)?;
        let (points, sae_configs) = splice_all(config.points(), saes)?;
        let workers = match placement {
            Placement::Threads => {
                let whole_copy = !checkpoint.weights.reads_slices();
                check_fits_in_memory(&config, &layout, whole_copy, &sae_configs)?;
                None
            }
            Placement::Processes(processes) => {
                let origin = checkpoint.weights.origin();
                let fingerprint = checkpoint.weights.fingerprint()?;
                let launch = processes.launch(&layout, origin, saes, fingerprint)?;
                let (geometry, output) = geometry_of(&points, layout)?;
                Some(ShardRuntime::launch(layout, &launch, geometry, output)?)
            }
            Placement::Cluster(_) if !layout.device().is_cpu() => {
                return Err(Error::InvalidArgument {
                    argument: "device",
                    problem: format!(
                        "{} with a job's workers: each computes on the device it was \
                         started with (`flexmodel worker --device cpu|cuda:N`)",
                        layout.device()
                    ),
                });
            }
            Placement::Cluster(cluster) => {
                let origin = checkpoint.weights.origin();
                let launch = cluster.launch(origin, saes, checkpoint.weights.fingerprint()?)?;
                let (geometry, output) = geometry_of(&points, layout)?;
                Some(ShardRuntime::join(layout, &launch, geometry, output)?)
            }
        };
        if let Some(runtime) = workers {
            let weight_bytes = runtime
                .worker_param_bytes()
                .ok_or(Error::Internal(
                    "worker processes report no parameter bytes",
                ))?
                .into_iter()
                .map(|b| b as usize)
                .collect();
            let backend = Backend::Sharded {
                runtime,
                weight_bytes,
            };
            return Ok(Self::with_backend(points, config, layout, backend));
        }
        if layout.world_size() == 1 {
            let whole = Stage::whole(config.n_layers());
            let device = &layout.device().device(0)?;
            let (weights, one) = (checkpoint.weights.as_ref(), Arc::new(SingleRank));
            let saes = ShardSaes::load(saes, &points, &whole, one.clone(), device)?;
            let model = config.load(weights, one, whole, device, None)?;
            let backend = Backend::Single {
                model,
                saes,
                cache: KvCache::default(),
                runtime: None,
            };
            return Ok(Self::with_backend(points, config, layout, backend));
        }
        // A source that cannot read a slice alone (GGUF's quantized blocks) is read and
        // dequantized once; each shard copies its slices.
        let source = checkpoint.weights.as_ref();
        let in_memory = match source.reads_slices() {
            true => None,
            false => Some(TensorMap::read_all(source)?),
        };
        let weights = in_memory
            .as_ref()
            .map_or(source, |w| w as &dyn WeightSource);
        let control = Arc::new(PassControl::default());
        let shards = build_shards(&config, weights, &layout, &control, (&points, saes))?;
        drop(in_memory);
        let runtime = start_runtime(&points, layout, &shards, control)?;
        let weight_bytes = shards.iter().map(|s| s.weight_bytes()).collect();
        Ok(Self::with_backend(
            points,
            config,
            layout,
            Backend::Sharded {
                runtime,
                weight_bytes,
            },
        ))
    }

    fn with_backend(
        points: ModelPoints,
        config: ModelConfig,
        layout: Layout,
        backend: Backend,
    ) -> Self {
        Self {
            registry: HookRegistry::new(HookCatalog::new(points.clone())),
            points,
            config,
            layout,
            backend,
            store: ActivationStore::default(),
            save: SaveContext::default(),
            trainables: BTreeMap::new(),
            trainable_grads: BTreeMap::new(),
        }
    }

    /// Registers `var` (a steering vector, a probe's weights) as trainable under `name`:
    /// edit closures that use it get its gradient in [`forward_backward`](Self::forward_backward),
    /// read with [`trainable_grad`](Self::trainable_grad).
    pub fn register_trainable(&mut self, name: impl Into<String>, var: &Var) -> Result<()> {
        let name = name.into();
        if self.trainables.contains_key(&name) {
            return Err(Error::TrainableExists { name });
        }
        self.trainables.insert(name, var.clone());
        Ok(())
    }

    /// The gradient of the loss with respect to the trainable variable `name` from the
    /// last backward pass (zero if no edit used it).
    pub fn trainable_grad(&self, name: &str) -> Result<Tensor> {
        let var = self
            .trainables
            .get(name)
            .ok_or_else(|| Error::UnknownTrainable {
                name: name.to_string(),
                known: self.trainables.keys().cloned().collect(),
            })?;
        match self.trainable_grads.get(name) {
            Some(g) => Ok(g.clone()),
            None => Ok(var.as_tensor().zeros_like()?),
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The model's hook points: their names, shapes and order.
    pub fn points(&self) -> &ModelPoints {
        &self.points
    }

    /// How the model is split.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The bytes of weights each rank holds, in rank order.
    pub fn shard_weight_bytes(&self) -> Vec<usize> {
        match &self.backend {
            Backend::Single { model, saes, .. } => vec![model.weight_bytes() + saes.weight_bytes()],
            Backend::Sharded { weight_bytes, .. } => weight_bytes.clone(),
        }
    }

    /// The process id of each rank's worker, in rank order, when the ranks are worker
    /// processes.
    pub fn worker_pids(&self) -> Option<Vec<u32>> {
        match &self.backend {
            Backend::Sharded { runtime, .. } => runtime.worker_pids(),
            Backend::Single { .. } => None,
        }
    }

    /// Whether each rank's worker kept the slice it already held (for an earlier
    /// driver) rather than loading it, in rank order, when the ranks are worker processes.
    pub fn workers_reused(&self) -> Option<Vec<bool>> {
        match &self.backend {
            Backend::Sharded { runtime, .. } => runtime.workers_reused(),
            Backend::Single { .. } => None,
        }
    }

    /// The peak resident memory of each rank's worker process so far (as its last
    /// heartbeat said), in rank order, when the ranks are worker processes.
    pub fn worker_peak_rss_bytes(&self) -> Option<Vec<Option<u64>>> {
        match &self.backend {
            Backend::Sharded { runtime, .. } => runtime.worker_peak_rss_bytes(),
            Backend::Single { .. } => None,
        }
    }

    /// The registered hooks.
    pub fn hooks(&self) -> &HookRegistry {
        &self.registry
    }

    /// The registered hooks, to register, remove, tag, enable or disable.
    pub fn hooks_mut(&mut self) -> &mut HookRegistry {
        &mut self.registry
    }

    /// Logits `[b, t, vocab]` of `batch` (a `[b, t]` u32 tensor of ids, or a padded
    /// [`TokenBatch`]), running every enabled hook.
    pub fn forward(&mut self, batch: impl Into<TokenBatch>) -> Result<Tensor> {
        self.forward_groups(batch, &Groups::All)
    }

    /// Logits of `batch`, running the enabled hooks that `groups` selects.
    ///
    /// If the pass fails (an edit errs, panics or changes the shape), the store is left
    /// as it was before the pass and the model stays usable.
    pub fn forward_groups(
        &mut self,
        batch: impl Into<TokenBatch>,
        groups: &Groups,
    ) -> Result<Tensor> {
        self.forward_scoped_groups(batch, PassScope::FULL, groups)?
            .ok_or(Error::Internal("a whole pass returned no logits"))
    }

    /// One forward pass over as much of the model as `scope` says, running every enabled
    /// hook. With `stop_at_layer: Some(n)` (TransformerLens's `stop_at_layer`), blocks
    /// `0..n` run and the residual stream there, `[b, t, d_model]`, is returned (no final
    /// norm, logits or loss; under pipeline parallelism the later stages do not run).
    /// Otherwise the logits `scope.logits` asks for are returned: `[b, t, vocab]`, the
    /// last position's `[b, 1, vocab]`, or none (no LM head is computed).
    ///
    /// A hook registered by the exact name of a point the pass does not compute (after
    /// the stop, or `unembed.hook_out` without every position's logits) is an error;
    /// patterns skip such points.
    pub fn forward_scoped(
        &mut self,
        batch: impl Into<TokenBatch>,
        scope: PassScope,
    ) -> Result<Option<Tensor>> {
        self.forward_scoped_groups(batch, scope, &Groups::All)
    }

    /// [`forward_scoped`](Self::forward_scoped) running the hooks `groups` selects.
    pub fn forward_scoped_groups(
        &mut self,
        batch: impl Into<TokenBatch>,
        scope: PassScope,
        groups: &Groups,
    ) -> Result<Option<Tensor>> {
        let batch = batch.into();
        let window = Window {
            mask: batch.attention_mask().cloned(),
            scope,
            ..Window::DENSE
        };
        let (output, captures) = self.pass(batch.tokens(), &window, groups)?;
        self.store.append(captures);
        Ok(output)
    }

    /// One forward pass over `tokens` at the positions and over the part of the model
    /// `window` says, running the hooks `groups` selects; returns the pass's output (see
    /// [`forward_scoped`](Self::forward_scoped)) and its captures.
    pub(crate) fn pass(
        &mut self,
        tokens: &Tensor,
        window: &Window,
        groups: &Groups,
    ) -> Result<(Option<Tensor>, ActivationStore)> {
        let span = self.pass_span(false, tokens);
        let _entered = span.enter();
        let (_, t) = self.check_batch(tokens)?;
        let scope = window.scope;
        let n_layers = self.config.n_layers();
        if let Some(n) = scope.stop_at_layer.filter(|&n| n > n_layers) {
            return Err(Error::InvalidArgument {
                argument: "stop_at_layer",
                problem: format!("{n} is beyond the model's {n_layers} layers"),
            });
        }
        // What the driver gets back is on the host, whatever device computed it.
        let returned = |out: Tensor| match (scope.stop_at_layer, scope.logits) {
            (None, Logits::None) => Ok(None),
            _ => to_host(&out).map(Some),
        };
        if let Backend::Single {
            model, cache, saes, ..
        } = &mut self.backend
            && self.registry.is_empty()
            && saes.is_empty()
        {
            // A forward pass keeps no autograd graph: backward passes run in the runtime.
            let out = single_shard_span()
                .in_scope(|| model.forward_stage(tokens, window, cache, &mut NoHooks, false))?;
            return Ok((returned(out)?, ActivationStore::default()));
        }
        let plan = self.registry.plan(groups)?;
        let plan = match scope_limits(scope, n_layers) {
            Some((computed, why)) => {
                plan.within(self.registry.entries(), &self.points, computed, &why)?
            }
            None => plan,
        };
        let mut hooks = PassHooks::new(plan, self.registry.entries(), &mut self.save, &self.points)
            .at(window, t)?;
        let out = match &mut self.backend {
            Backend::Single {
                model, cache, saes, ..
            } => single_shard_span()
                .in_scope(|| {
                    let hooks = &mut saes.around(&mut hooks);
                    model.forward_stage(tokens, window, cache, hooks, false)
                })
                .map(returned)??,
            Backend::Sharded { runtime, .. } => {
                let modes = hooks.modes();
                let resid = match scope.stop_at_layer {
                    Some(0) => Some(HookPoint::Embed),
                    Some(n) => Some(HookPoint::Block {
                        layer: n - 1,
                        site: BlockSite::RESID_POST,
                    }),
                    None => None,
                };
                let resid = resid
                    .map(|p| geometry(p, &self.points, &self.layout))
                    .transpose()?;
                let end = match (&resid, scope.logits) {
                    (Some(resid), _) => PassEnd::At(resid),
                    (None, Logits::None) => PassEnd::Silent,
                    (None, _) => PassEnd::Whole,
                };
                let out = runtime.run_pass_to(tokens, window, &modes, &mut hooks, end)?;
                out.as_ref().map(to_host).transpose()?
            }
        };
        Ok((out, hooks.captures))
    }

    /// A forward and a backward pass from the mean next-token cross-entropy over the whole
    /// batch (the pairs of consecutive real tokens; sequences of at least two tokens),
    /// running every enabled hook; backward hooks capture the gradient at their points
    /// as `NAME_grad`. Returns the logits and the loss.
    pub fn forward_backward(&mut self, batch: impl Into<TokenBatch>) -> Result<(Tensor, f32)> {
        self.forward_backward_groups(batch, &Groups::All)
    }

    /// [`forward_backward`](Self::forward_backward) running the hooks `groups` selects.
    pub fn forward_backward_groups(
        &mut self,
        batch: impl Into<TokenBatch>,
        groups: &Groups,
    ) -> Result<(Tensor, f32)> {
        self.backward_pass(&batch.into(), groups, None)
    }

    /// A forward and a backward pass from a loss of your own, computed from the gathered
    /// logits `[b, t, vocab]` (a scalar tensor); returns the logits and the loss.
    pub fn forward_backward_with_loss(
        &mut self,
        batch: impl Into<TokenBatch>,
        groups: &Groups,
        loss: impl FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, f32)> {
        self.backward_pass(&batch.into(), groups, Some(Box::new(loss)))
    }

    fn backward_pass(
        &mut self,
        batch: &TokenBatch,
        groups: &Groups,
        loss_fn: Option<Box<LossFn>>,
    ) -> Result<(Tensor, f32)> {
        let tokens = batch.tokens();
        let (_, t) = self.check_batch(tokens)?;
        let span = self.pass_span(true, tokens);
        let _entered = span.enter();
        if loss_fn.is_none() {
            let longest = batch.sequences()?.iter().map(Vec::len).max().unwrap_or(0);
            if longest < 2 {
                return Err(Error::SequenceTooShort {
                    what: "a backward pass from the next-token loss",
                    need: 2,
                    len: longest,
                });
            }
        }
        let window = Window {
            mask: batch.attention_mask().cloned(),
            ..Window::DENSE
        };
        let runtime = match &mut self.backend {
            Backend::Sharded { runtime, .. } => runtime,
            Backend::Single {
                model,
                saes,
                runtime,
                ..
            } => match runtime {
                Some(runtime) => runtime,
                None => {
                    let shard = Shard::new(model.clone(), self.points.clone());
                    let shards = vec![Arc::new(shard.with_saes(saes.clone()))];
                    let control = Arc::new(PassControl::default());
                    runtime.insert(Box::new(start_runtime(
                        &self.points,
                        self.layout,
                        &shards,
                        control,
                    )?))
                }
            },
        };
        let plan = self.registry.plan(groups)?;
        let trainables = self
            .trainables
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let mut hooks = PassHooks::new(plan, self.registry.entries(), &mut self.save, &self.points)
            .keeping_edit_graphs(trainables)
            .at(&window, t)?;
        let (modes, grad_modes) = (hooks.modes(), hooks.grad_modes());
        let out = match loss_fn {
            Some(loss_fn) => {
                hooks = hooks.with_loss(loss_fn);
                runtime.run_forward_backward_with_driver_loss(
                    tokens,
                    &window,
                    &modes,
                    &grad_modes,
                    &mut hooks,
                )?
            }
            None => {
                runtime.run_forward_backward(tokens, &window, &modes, &grad_modes, &mut hooks)?
            }
        };
        self.store.append(hooks.captures);
        self.trainable_grads = hooks.trainable_grads;
        let loss = out
            .loss
            .or(hooks.loss)
            .ok_or(Error::Internal("the backward pass reported no loss"))?;
        let logits = out
            .output
            .ok_or(Error::Internal("a backward pass gathered no logits"))?;
        let logits = to_host(&logits)?;
        Ok((logits, loss))
    }

    /// Checks `tokens` against the vocabulary, the context and the data-parallel
    /// replicas before any shard runs; returns `(batch, seq)`.
    fn check_batch(&self, tokens: &Tensor) -> Result<(usize, usize)> {
        let config = &self.config;
        let (b, t) = check_tokens(tokens, config.sizes().vocab_size, config.context())?;
        if b < self.layout.dp() {
            return Err(Error::BatchTooSmall {
                batch: b,
                replicas: self.layout.dp(),
            });
        }
        Ok((b, t))
    }

    /// The span of one pass: `forward`, or `backward` for a forward and backward pass; a
    /// child of the span current when it runs (a server's pass of many requests), else
    /// the root of a new trace.
    fn pass_span(&self, backward: bool, tokens: &Tensor) -> tracing::Span {
        let (b, t) = tokens.dims2().unwrap_or_default();
        let layout = self.layout();
        let (tp, pp, dp) = (layout.tp() as i64, layout.pp() as i64, layout.dp() as i64);
        let (batch, seq) = (b as i64, t as i64);
        match backward {
            false => tracing::info_span!("forward", batch, seq, tp, pp, dp),
            true => tracing::info_span!("backward", batch, seq, tp, pp, dp),
        }
    }

    /// Every rank's parameter slices and their gradients from the last backward pass.
    fn parameter_slices(&self) -> Result<RankSlices> {
        match &self.backend {
            Backend::Sharded { runtime, .. } => Ok(runtime.parameters()?),
            Backend::Single {
                runtime: Some(runtime),
                ..
            } => Ok(runtime.parameters()?),
            Backend::Single {
                model,
                runtime: None,
                ..
            } => Ok(vec![
                model.parameters().into_iter().map(|p| (p, None)).collect(),
            ]),
        }
    }

    /// The names of every parameter (Hugging Face naming), sorted.
    pub fn parameter_names(&self) -> Result<Vec<String>> {
        Ok(parameters::names(&self.parameter_slices()?))
    }

    /// The whole value of parameter `name`, joined from every rank's slices (on the host).
    pub fn parameter(&self, name: &str) -> Result<Tensor> {
        Ok(parameters::gather(name, &self.layout, &self.parameter_slices()?)?.0)
    }

    /// The whole gradient of parameter `name` from the last backward pass (on the host).
    pub fn parameter_grad(&self, name: &str) -> Result<Tensor> {
        parameters::gather(name, &self.layout, &self.parameter_slices()?)?
            .1
            .ok_or_else(|| Error::NoGradient {
                parameter: name.to_string(),
            })
    }

    /// Makes rank `rank` fail with `fault` on reaching hook point `hook` in the next
    /// pass (sharded layouts only): for testing that failures are reported and survived.
    /// Only with the `fault-injection` feature, which the tests turn on.
    #[cfg(feature = "fault-injection")]
    pub fn inject_fault(
        &mut self,
        rank: usize,
        hook: HookPoint,
        fault: crate::Fault,
    ) -> Result<()> {
        match &mut self.backend {
            Backend::Single { .. } => Err(Error::FaultNeedsShards),
            Backend::Sharded { runtime, .. } => {
                Ok(runtime.inject_fault(rank, self.points.index(hook), fault)?)
            }
        }
    }

    /// The captured activations.
    pub fn store(&self) -> &ActivationStore {
        &self.store
    }

    /// The captured activations, to take or clear.
    pub fn store_mut(&mut self) -> &mut ActivationStore {
        &mut self.store
    }

    /// The save context shared by all hooks.
    pub fn save_ctx(&mut self) -> &mut SaveContext {
        &mut self.save
    }
}

/// Where every hook point, and the output, lives on `layout`.
fn geometry_of(
    points: &ModelPoints,
    layout: Layout,
) -> Result<(Vec<PointGeometry>, PointGeometry)> {
    let geometry = points
        .all()
        .into_iter()
        .map(|p| geometry(p, points, &layout))
        .collect::<Result<Vec<_>>>()?;
    let output = geometry[points.index(HookPoint::UnembedOut)].clone();
    Ok((geometry, output))
}

/// Starts the shard actors of `shards` (in rank order) with every hook point's geometry.
fn start_runtime(
    points: &ModelPoints,
    layout: Layout,
    shards: &[Arc<Shard>],
    control: Arc<PassControl>,
) -> Result<ShardRuntime> {
    let (geometry, output) = geometry_of(points, layout)?;
    let models = shards
        .iter()
        .map(|s| s.clone() as Arc<dyn ShardModel>)
        .collect();
    Ok(ShardRuntime::start(
        layout,
        ShardSetup {
            models,
            control,
            geometry,
            output,
        },
    )?)
}

/// The span of the one shard's forward pass when the model runs in the calling thread.
fn single_shard_span() -> tracing::Span {
    tracing::info_span!(
        "shard.forward",
        rank = 0i64,
        tp = 0i64,
        pp = 0i64,
        dp = 0i64
    )
}
