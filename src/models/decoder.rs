//! A decoder-only transformer as held by one tensor-parallel shard: embedding, a
//! family's blocks, final norm and LM head. A family says what its blocks are and how
//! they place their queries and keys ([`DecoderConfig`]); LLaMA is one
//! ([`Llama`](crate::models::Llama)).

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use flexmodel_actors::{CacheUse, KvCache, Logits, Window};
use flexmodel_cluster::ParamSlice;
use flexmodel_cluster::{Collective, TpRank, conjugate};

use crate::models::fsdp::Fsdp;
use crate::models::parallel::ParamMap;
use crate::models::positions::{PositionSpec, Positions};
use crate::models::stage::Stage;
use crate::models::{
    ColumnParallelLinear, ModelConfig, ModelShard, ModelSpec, RmsNorm, VocabParallelEmbedding,
};
use crate::text::token_batch::check_tokens;
use crate::weights::{HeldWeights, PieceReads, WeightSource};
use crate::{Error, HookLayer, HookPoint, Result};

/// What a decoder needs of a family's configuration beyond [`ModelSpec`].
pub trait DecoderConfig: ModelSpec + Clone + Into<ModelConfig> + 'static {
    /// The family's block.
    type Block: DecoderBlock;

    /// Loads block `layer` for tensor-parallel rank `tp`.
    fn load_block(
        &self,
        weights: &HeldWeights<'_>,
        layer: usize,
        tp: TpRank,
    ) -> Result<Self::Block>;

    /// Where block `layer` places its queries and keys.
    fn layer_positions(&self, layer: usize) -> PositionSpec;

    /// What the token embeddings are multiplied by (Gemma's `√d_model`), if anything.
    fn embed_scale(&self) -> Option<f64> {
        None
    }
}

/// Builds `stage` of a decoder of family `C` for `collective`'s tensor-parallel rank
/// on `device` (under FSDP, `replicas`' member's pieces): what [`ModelSpec::load`] is for
/// every decoder.
pub(crate) fn load_shard<C: DecoderConfig>(
    config: &C,
    weights: &dyn WeightSource,
    collective: Arc<dyn Collective>,
    stage: Stage,
    device: &Device,
    replicas: Option<Arc<dyn Collective>>,
) -> Result<Arc<dyn ModelShard>> {
    let model = match replicas {
        Some(replicas) => {
            Decoder::load_stage_fsdp(config, weights, collective, stage, device, replicas)?
        }
        None => Decoder::load_stage(config, weights, collective, stage, device)?,
    };
    Ok(Arc::new(model))
}

/// The weights one of `tp` tensor-parallel ranks holds of `stage` of a decoder whose
/// blocks hold `per_layer` each: with the embedding's slice on the first stage (and on
/// the last with a tied head), the final norm and the LM head's slice on the last.
pub(crate) fn stage_parameter_count(
    spec: &dyn ModelSpec,
    stage: &Stage,
    tp: usize,
    per_layer: u64,
) -> u64 {
    let (v, d, tp) = (spec.vocab_size() as u64, spec.d_model() as u64, tp as u64);
    let mut count = stage.layers.len() as u64 * per_layer;
    let tied = spec.tied_embeddings();
    if stage.first || (stage.last && tied) {
        count += v * d / tp;
    }
    if stage.last {
        count += d + if tied { 0 } else { v * d / tp };
    }
    count
}

/// A family's transformer block, as a decoder runs it.
pub trait DecoderBlock: Clone + Send + Sync + 'static {
    /// The block's layer in the whole model.
    fn layer(&self) -> usize;

    /// Every parameter slice the block holds.
    fn parameters(&self) -> Vec<ParamSlice>;

    /// The same block with `f` of each of its parameters, in the order of
    /// [`parameters`](Self::parameters).
    fn map_parameters(&self, f: &mut ParamMap<'_>) -> Result<Self>;

    /// The residual stream after the block; with a cache, attention reads the cached
    /// keys and values of the block's layer and appends its own.
    fn forward(
        &self,
        x: Tensor,
        positions: &Positions,
        cache: Option<&mut KvCache>,
        hooks: &mut dyn HookLayer,
        collective: &Arc<dyn Collective>,
    ) -> Result<Tensor>;
}

/// A decoder-only transformer of family `C`: one pipeline stage of one tensor-parallel
/// rank.
///
/// With [`SingleRank`](flexmodel_cluster::SingleRank) and [`Stage::whole`] it is the
/// whole model. Clones share the weights.
#[derive(Clone)]
pub struct Decoder<C: DecoderConfig> {
    config: C,
    stage: Stage,
    embed: Option<VocabParallelEmbedding>,
    blocks: Vec<C::Block>,
    final_norm: Option<RmsNorm>,
    lm_head: Option<ColumnParallelLinear>,
    collective: Arc<dyn Collective>,
    /// Under FSDP, the replicas holding the other pieces of every parameter.
    fsdp: Option<Arc<Fsdp>>,
    /// Boxed: a CUDA device is a few hundred bytes.
    device: Box<Device>,
}

impl<C: DecoderConfig> Decoder<C> {
    /// Builds the whole model for `collective`'s rank from Hugging Face-named weights,
    /// on the CPU.
    pub fn load(
        config: &C,
        weights: &dyn WeightSource,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        let whole = Stage::whole(config.n_layers());
        Self::load_stage(config, weights, collective, whole, &Device::Cpu)
    }

    /// Builds `stage` of the model for `collective`'s tensor-parallel rank on `device`,
    /// holding only that rank's slices of that stage's weights.
    pub fn load_stage(
        config: &C,
        weights: &dyn WeightSource,
        collective: Arc<dyn Collective>,
        stage: Stage,
        device: &Device,
    ) -> Result<Self> {
        Self::load_parts(config, weights, collective, stage, device, None)
    }

    /// Builds `stage` of the model for `collective`'s tensor-parallel rank under FSDP:
    /// of each of its slices the shard keeps only the piece of `replicas`' member (see
    /// the `fsdp` module), and gathers a layer's whole slices from `replicas` just
    /// before the layer computes. Every parameter is cut: the blocks', the embedding,
    /// the final norm and the LM head. Every replica of the shard must be built so, and
    /// run every pass with the others.
    pub fn load_stage_fsdp(
        config: &C,
        weights: &dyn WeightSource,
        collective: Arc<dyn Collective>,
        stage: Stage,
        device: &Device,
        replicas: Arc<dyn Collective>,
    ) -> Result<Self> {
        let fsdp = Fsdp::new(replicas);
        Self::load_parts(config, weights, collective, stage, device, Some(fsdp))
    }

    /// Builds `stage`, under FSDP cutting each layer as it is read.
    fn load_parts(
        config: &C,
        weights: &dyn WeightSource,
        collective: Arc<dyn Collective>,
        stage: Stage,
        device: &Device,
        mut fsdp: Option<Fsdp>,
    ) -> Result<Self> {
        let tp = collective.tp_rank();
        // Under FSDP a replica reads only its piece of every slice, and holds at most
        // one slice while it reads (a tied head shares the embedding's piece).
        let reads = fsdp.as_ref().map(Fsdp::reads);
        let weights = &HeldWeights {
            source: weights,
            dtype: config.dtype(),
            device,
            pieces: reads.as_ref(),
        };
        let fsdp = &mut fsdp;
        let (v, d) = (config.vocab_size(), config.d_model());
        let tied = config.tied_embeddings();
        let vocab = tp.slice_of("vocab_size", v)?;
        let embed_name = "model.embed_tokens.weight";
        let embed = match stage.first || (stage.last && tied) {
            true => {
                let e = VocabParallelEmbedding::load(weights, embed_name, [v, d], vocab.clone())?;
                Some(adopted(fsdp, &reads, e.parameters(), e)?)
            }
            false => None,
        };
        let lm_head = match (stage.last, &embed) {
            (false, _) => None,
            (true, Some(e)) if tied => Some(ColumnParallelLinear::from_weight(
                "model.embed_tokens",
                e.weight(),
                vocab.clone(),
            )?),
            (true, _) => {
                let h = ColumnParallelLinear::load(weights, "lm_head", [v, d], vocab, false)?;
                Some(adopted(fsdp, &reads, h.parameters(), h)?)
            }
        };
        let mut blocks = Vec::with_capacity(stage.layers.len());
        for layer in stage.layers.clone() {
            let block = config.load_block(weights, layer, tp)?;
            blocks.push(adopted(fsdp, &reads, block.parameters(), block)?);
        }
        let final_norm = match stage.last {
            true => {
                let weight = weights.slice("model.norm.weight", &[d], None)?;
                let n = config.final_norm(crate::models::parallel::param(weight)?);
                Some(adopted(fsdp, &reads, n.parameters(), n)?)
            }
            false => None,
        };
        let fsdp = fsdp.take();
        Ok(Self {
            config: config.clone(),
            embed: embed.filter(|_| stage.first),
            stage,
            blocks,
            final_norm,
            lm_head,
            collective,
            fsdp: fsdp.map(Arc::new),
            device: Box::new(device.clone()),
        })
    }

    /// The device this shard computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The model's configuration.
    pub fn config(&self) -> &C {
        &self.config
    }

    /// `layer` whole (under FSDP gathered from the replicas' pieces by `map`, its
    /// `map_parameters`), its parameters in the autograd graph only when `tracked`:
    /// untracked, a pass keeps nothing for a backward pass, and each activation is
    /// freed once the next is computed.
    fn whole<'a, M: Clone>(
        &self,
        layer: &'a M,
        tracked: bool,
        map: impl FnOnce(&M, &mut ParamMap<'_>) -> Result<M>,
    ) -> Result<Cow<'a, M>> {
        match (&self.fsdp, tracked) {
            (Some(fsdp), _) => Ok(Cow::Owned(fsdp.gathered(tracked, |f| map(layer, f))?)),
            (None, true) => Ok(Cow::Borrowed(layer)),
            (None, false) => Ok(Cow::Owned(map(layer, &mut |t| Ok(t.detach()))?)),
        }
    }
}

/// The residual stream `x` plus what a sublayer wrote, `out`.
pub(crate) fn residual(x: &Tensor, out: &Tensor) -> Result<Tensor> {
    let _op = crate::op_span!("residual");
    Ok((x + out)?)
}

/// `layer` as this shard holds it: under FSDP taken as its replica's pieces (read
/// through `reads`), else as it is.
fn adopted<M>(
    fsdp: &mut Option<Fsdp>,
    reads: &Option<PieceReads>,
    parameters: Vec<ParamSlice>,
    layer: M,
) -> Result<M> {
    match (fsdp, reads) {
        (Some(fsdp), Some(reads)) => fsdp.adopt(layer, parameters, reads),
        _ => Ok(layer),
    }
}

/// A hook layer whose returned values are brought to `device`, the shard's: an edit
/// may compute where it likes.
struct OnDevice<'a> {
    hooks: &'a mut dyn HookLayer,
    device: &'a Device,
}

impl HookLayer for OnDevice<'_> {
    fn hook(&mut self, point: HookPoint, value: Tensor) -> Result<Tensor> {
        let out = self.hooks.hook(point, value)?;
        match out.device().same_device(self.device) {
            true => Ok(out),
            false => Ok(out.to_device(self.device)?),
        }
    }

    fn wants(&self, point: HookPoint) -> bool {
        self.hooks.wants(point)
    }
}

impl<C: DecoderConfig> ModelShard for Decoder<C> {
    /// Runs this stage: `input` is token ids `[b, t]` on the first stage and the hidden
    /// state `[b, t, d]` otherwise, at the positions `window` says; returns the hidden
    /// state, or on the last stage this rank's logits `[b, t, vocab / tp]`. A window that
    /// uses the cache attends to the keys and values in `cache` and appends its own.
    /// `backward` says whether a backward pass may follow; without one the pass keeps
    /// no autograd graph, and a shard under FSDP frees each gathered layer as soon as
    /// it has computed.
    fn forward_stage(
        &self,
        input: &Tensor,
        window: &Window,
        cache: &mut KvCache,
        hooks: &mut dyn HookLayer,
        backward: bool,
    ) -> Result<Tensor> {
        let collective = &self.collective;
        let (vocab, context) = (self.config.vocab_size(), self.config.context());
        let (b, t) = match &self.embed {
            Some(_) => check_tokens(input, vocab, context)?,
            None => (input.dim(0)?, input.dim(1)?),
        };
        if window.offset + t > context {
            return Err(Error::SequenceTooLong {
                len: window.offset + t,
                context,
            });
        }
        window.check(b, t)?;
        if window.cache != CacheUse::Extend {
            cache.clear();
        }
        cache.check(window)?;
        // Token ids (or the previous stage's hidden state) may arrive from the host; what
        // a hook gives back, from wherever its edit ran.
        let input = &input.to_device(&self.device)?;
        let hooks = &mut OnDevice {
            hooks,
            device: &self.device,
        };
        let mut x = match &self.embed {
            Some(embed) => {
                // An edit of `hook_tokens` may replace the ids; they are checked again.
                let ids = match hooks.wants(HookPoint::Tokens) {
                    false => input.clone(),
                    true => {
                        let ids = hooks.hook(HookPoint::Tokens, input.to_dtype(DType::F32)?)?;
                        let ids = ids.to_dtype(DType::U32)?;
                        check_tokens(&ids, vocab, context)?;
                        ids
                    }
                };
                let embed = self.whole(embed, backward, VocabParallelEmbedding::map_parameters)?;
                let embedded = embed.forward(&ids, collective.as_ref())?;
                let embedded = match self.config.embed_scale() {
                    Some(scale) => (embedded * scale)?,
                    None => embedded,
                };
                hooks.hook(HookPoint::Embed, embedded)?
            }
            None => input.clone(),
        };
        // One set of positions for each way the blocks place queries and keys.
        let mut positions: Vec<(PositionSpec, Positions)> = Vec::new();
        let mut cache = (window.cache != CacheUse::Off).then_some(cache);
        let stop = window.scope.stop_at_layer;
        for block in &self.blocks {
            if stop.is_some_and(|n| block.layer() >= n) {
                break;
            }
            let spec = self.config.layer_positions(block.layer());
            let at = match positions.iter().position(|(s, _)| *s == spec) {
                Some(at) => at,
                None => {
                    let made = Positions::new(window, (b, t), &spec, x.device())?;
                    positions.push((spec, made));
                    positions.len() - 1
                }
            };
            let block = self.whole(block, backward, C::Block::map_parameters)?;
            x = block.forward(x, &positions[at].1, cache.as_deref_mut(), hooks, collective)?;
        }
        let (Some(norm), Some(head)) = (&self.final_norm, &self.lm_head) else {
            return Ok(x);
        };
        if stop.is_some() {
            return Ok(x);
        }
        let norm = self.whole(norm, backward, RmsNorm::map_parameters)?;
        let head = self.whole(head, backward, ColumnParallelLinear::map_parameters)?;
        let ln_final = [HookPoint::LnFinalScale, HookPoint::LnFinalNormalized];
        let normed = norm.forward_hooked(&x, hooks, ln_final)?;
        if window.scope.logits == Logits::None {
            // No LM head: the pass returns nothing (the runtime gathers no output).
            return Ok(normed);
        }
        if window.scope.logits == Logits::Last {
            // Only the last position's logits (not a hook point of such a pass).
            let last = normed.narrow(1, t - 1, 1)?.contiguous()?;
            return head.forward(&conjugate::copy_to_group(&last, collective)?);
        }
        let logits = head.forward(&conjugate::copy_to_group(&normed, collective)?)?;
        hooks.hook(HookPoint::UnembedOut, logits)
    }

    /// The vocabulary rows of this rank's LM-head slice.
    fn vocab_rows(&self) -> Range<usize> {
        let tp = self.collective.tp_rank();
        let per_rank = self.config.vocab_size() / tp.size();
        tp.rank() * per_rank..(tp.rank() + 1) * per_rank
    }

    /// The tensor-parallel group of this shard.
    fn collective(&self) -> &Arc<dyn Collective> {
        &self.collective
    }

    /// The part of the model this shard holds.
    fn stage(&self) -> &Stage {
        &self.stage
    }

    /// Every parameter slice this shard holds, under Hugging Face names (tied
    /// embeddings appear once, as `model.embed_tokens.weight`); under FSDP, the blocks'
    /// pieces.
    fn parameters(&self) -> Vec<ParamSlice> {
        let mut all = Vec::new();
        all.extend(self.embed.iter().flat_map(|e| e.parameters()));
        all.extend(self.blocks.iter().flat_map(|b| b.parameters()));
        all.extend(self.final_norm.iter().flat_map(|n| n.parameters()));
        all.extend(self.lm_head.iter().flat_map(|h| h.parameters()));
        // A tied head on a shard that also embeds shares the embedding's tensor.
        let mut seen = std::collections::HashSet::new();
        all.retain(|p| seen.insert(p.value.id()));
        match &self.fsdp {
            Some(fsdp) => all.into_iter().map(|p| fsdp.describe(p)).collect(),
            None => all,
        }
    }

    fn model_config(&self) -> ModelConfig {
        self.config.clone().into()
    }
}
