//! How a model splits over a layout: validation, stages, the geometry of
//! every hook point, and the shard models the runtime drives.

use std::ops::Range;
use std::sync::Arc;

use candle_core::Tensor;
use flexmodel_actors::{BoxError, KvCache, PointGeometry, ShardHooks, ShardModel, Window};
use flexmodel_cluster::{
    Collective, InProcessCollective, Layout, PassControl, RankCoords, ShardSpec, TpRank,
    split_evenly,
};

use crate::hooks::point::{HookPoint, ModelPoints};
use crate::hooks::site::Size;
use crate::models::kv_heads_of;
use crate::models::loss::vocab_parallel_loss;
use crate::models::{ModelConfig, ModelShard, Stage};
use crate::sae::{SaeAttachment, SaeConfig, ShardSaes};
use crate::weights::WeightSource;
use crate::{Error, HookLayer, Result};

/// Why a layout cannot split a model, or would not fit this machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutProblem {
    /// `tp` does not divide a dimension that tensor parallelism splits.
    #[error("tp={tp} does not divide {what} = {size}")]
    NotDivisible {
        /// The tensor-parallel ranks.
        tp: usize,
        /// The dimension, by its Hugging Face name.
        what: &'static str,
        /// Its size.
        size: usize,
    },
    /// More ranks than key/value heads, but not a multiple of them.
    #[error(
        "tp={tp} is more than num_key_value_heads = {kv_heads} but not a multiple of it, so the heads cannot be replicated evenly"
    )]
    KvHeadsNotReplicable {
        /// The tensor-parallel ranks.
        tp: usize,
        /// The key/value heads.
        kv_heads: usize,
    },
    /// More pipeline stages than layers.
    #[error("pp={pp} exceeds the model's {layers} layers")]
    TooManyStages {
        /// The stages.
        pp: usize,
        /// The model's layers.
        layers: usize,
    },
    /// The ranks this process would hold would not fit in this machine's memory.
    #[error(
        "{layout} holds about {} of weights in this process, but only {} of memory is available",
        size(*.needed_bytes),
        size(*.available_bytes)
    )]
    DoesNotFit {
        /// The layout.
        layout: Layout,
        /// The bytes of weights the ranks hold, plus what loading them holds for a while.
        needed_bytes: u64,
        /// The memory available (`MemAvailable` of `/proc/meminfo`, or
        /// `FLEXMODEL_MEMORY_BYTES`).
        available_bytes: u64,
    },
    /// One rank's share of the weights would not fit in its machine's memory.
    #[error(
        "rank {rank} needs about {} for its share of the weights, but only {} of memory is available on its machine",
        size(*.needed_bytes),
        size(*.available_bytes)
    )]
    RankDoesNotFit {
        /// The rank.
        rank: usize,
        /// The bytes of its weights, plus what loading them holds for a while.
        needed_bytes: u64,
        /// The memory available (`MemAvailable` of `/proc/meminfo`, or
        /// `FLEXMODEL_MEMORY_BYTES`).
        available_bytes: u64,
    },
}

/// `bytes` in GB, or in MB below one GB.
fn size(bytes: u64) -> String {
    match bytes >= 1_000_000_000 {
        true => format!("{:.1} GB", bytes as f64 / 1e9),
        false => format!("{:.1} MB", bytes as f64 / 1e6),
    }
}

/// Checks that `layout` can split a model of `config`, with a message that says why not.
pub fn check_layout(config: &ModelConfig, layout: &Layout) -> Result<()> {
    let tp = layout.tp();
    let bad = |problem| Err(Error::BadLayout(problem));
    let sizes = config.sizes();
    for (what, size) in [
        ("num_attention_heads", sizes.n_heads),
        ("intermediate_size (d_mlp)", sizes.d_mlp),
        ("vocab_size", sizes.vocab_size),
    ] {
        if !size.is_multiple_of(tp) {
            return bad(LayoutProblem::NotDivisible { tp, what, size });
        }
    }
    let kv = sizes.n_kv_heads;
    if tp <= kv && !kv.is_multiple_of(tp) {
        return bad(LayoutProblem::NotDivisible {
            tp,
            what: "num_key_value_heads",
            size: kv,
        });
    }
    if tp > kv && !tp.is_multiple_of(kv) {
        return bad(LayoutProblem::KvHeadsNotReplicable { tp, kv_heads: kv });
    }
    if layout.pp() > config.n_layers() {
        return bad(LayoutProblem::TooManyStages {
            pp: layout.pp(),
            layers: config.n_layers(),
        });
    }
    Ok(())
}

/// The bytes of weights (in the layout's dtype) rank `rank` of `layout` holds: its
/// tensor-parallel share of its stage ([`ModelSpec::stage_parameter_count`]), under FSDP
/// its piece of that.
pub fn rank_weight_bytes(config: &ModelConfig, layout: &Layout, rank: usize) -> u64 {
    let stage = stage_of(config, layout, layout.coords(rank).pp);
    let mut count = config.stage_parameter_count(&stage, layout.tp());
    if layout.fsdp() {
        count = count.div_ceil(layout.dp() as u64);
    }
    count * layout.model_dtype().size() as u64
}

/// The bytes a rank holds for a while as it loads, beyond its share: the largest slice
/// it reads, twice (as read, and held transposed), and once more in f32 where the
/// weights are held in half precision (a source that cannot convert as it reads
/// converts a whole f32 slice).
fn loading_bytes(config: &ModelConfig, layout: &Layout) -> u64 {
    let (tp, sizes) = (layout.tp(), config.sizes());
    let widest = [
        sizes.vocab_size / tp,
        sizes.d_mlp / tp,
        sizes.n_heads * sizes.d_head / tp,
    ];
    let largest = (widest.into_iter().max().unwrap_or(0) * sizes.d_model) as u64;
    let held = layout.model_dtype().size() as u64;
    largest * (2 * held + if held < 4 { 4 } else { 0 })
}

/// Checks that the ranks of `layout`, as threads of this process, fit in the memory
/// this machine has available (each replica holds a whole copy, under FSDP a piece;
/// with `whole_copy`, the weights are read into memory once more while the ranks cut
/// their slices), so that a mistyped layout fails at once instead of being killed.
/// Where the available memory cannot be read, nothing is checked. Ranks in worker
/// processes check their own share ([`check_rank_fits_in_memory`]).
/// `saes` are the SAEs spliced in, each at its layer: a rank holds its latents' share.
pub fn check_fits_in_memory(
    config: &ModelConfig,
    layout: &Layout,
    whole_copy: bool,
    saes: &[(usize, SaeConfig)],
) -> Result<()> {
    let Some(available_bytes) = available_memory() else {
        return Ok(());
    };
    let held: u64 = (0..layout.world_size())
        .map(|rank| host_weight_bytes(config, layout, rank, saes))
        .sum();
    let transient = match whole_copy {
        true => config.parameter_count() * 4 + loading_bytes(config, layout),
        false => loading_bytes(config, layout),
    };
    let needed_bytes = held.saturating_add(transient);
    if needed_bytes > available_bytes {
        return Err(Error::BadLayout(LayoutProblem::DoesNotFit {
            layout: *layout,
            needed_bytes,
            available_bytes,
        }));
    }
    Ok(())
}

/// Checks that rank `rank` of `layout` can hold its share of the weights and of the SAEs
/// `saes` (each at its layer), and load them, in the memory this machine has available;
/// an error names the rank and both sizes.
pub fn check_rank_fits_in_memory(
    config: &ModelConfig,
    layout: &Layout,
    rank: usize,
    saes: &[(usize, SaeConfig)],
) -> Result<()> {
    let Some(available_bytes) = available_memory() else {
        return Ok(());
    };
    let needed_bytes =
        host_weight_bytes(config, layout, rank, saes) + loading_bytes(config, layout);
    if needed_bytes > available_bytes {
        return Err(Error::BadLayout(LayoutProblem::RankDoesNotFit {
            rank,
            needed_bytes,
            available_bytes,
        }));
    }
    Ok(())
}

/// The bytes of weights rank `rank` holds in this machine's memory, its shares of the
/// SAEs `saes` (each at its layer) included: none when it holds them on a GPU.
fn host_weight_bytes(
    config: &ModelConfig,
    layout: &Layout,
    rank: usize,
    saes: &[(usize, SaeConfig)],
) -> u64 {
    if !layout.device().is_cpu() {
        return 0;
    }
    let coords = layout.coords(rank);
    let stage = stage_of(config, layout, coords.pp);
    let sae_bytes: u64 = saes
        .iter()
        .filter(|(layer, _)| stage.layers.contains(layer))
        .map(|(_, sae)| sae.share_bytes(coords.tp, layout.tp()))
        .sum();
    rank_weight_bytes(config, layout, rank) + sae_bytes
}

/// The variable that, set to a number of bytes, replaces `MemAvailable` in the memory
/// checks (to keep a share of a shared machine free, or to test the checks).
pub const MEMORY_VARIABLE: &str = "FLEXMODEL_MEMORY_BYTES";

/// The memory the checks count on: `FLEXMODEL_MEMORY_BYTES` if set, else
/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn available_memory() -> Option<u64> {
    if let Some(bytes) = std::env::var(MEMORY_VARIABLE)
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return Some(bytes);
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The part of the model pipeline stage `stage` of `layout` holds.
pub fn stage_of(config: &ModelConfig, layout: &Layout, stage: usize) -> Stage {
    let layers = split_evenly(config.n_layers(), layout.pp())[stage].clone();
    Stage {
        layers,
        first: stage == 0,
        last: stage + 1 == layout.pp(),
    }
}

/// The pipeline stage that computes `point` of a model of `n_layers` blocks.
fn stage_of_point(point: HookPoint, n_layers: usize, layout: &Layout) -> usize {
    match point {
        HookPoint::Tokens | HookPoint::Embed => 0,
        HookPoint::Block { layer, .. } | HookPoint::Sae { layer, .. } => {
            split_evenly(n_layers, layout.pp())
                .iter()
                .position(|r| r.contains(&layer))
                .unwrap_or(0)
        }
        HookPoint::LnFinalScale | HookPoint::LnFinalNormalized | HookPoint::UnembedOut => {
            layout.pp() - 1
        }
    }
}

/// The range each tensor-parallel rank holds of `dim` (of size `n`), the split dimension
/// of a point: even slices, but key/value heads are replicated where there are more ranks
/// than them, and an SAE's latents are split as evenly as they can be.
fn tp_ranges(dim: Size, n: usize, tp: usize) -> Result<Vec<Range<usize>>> {
    if dim == Size::Latents {
        return Ok(split_evenly(n, tp));
    }
    (0..tp)
        .map(|r| {
            let rank = TpRank::new(r, tp)?;
            match dim {
                Size::KvHeads => kv_heads_of(rank, n),
                _ => Ok(rank.slice_of("hook point", n)?),
            }
        })
        .collect()
}

/// Where `point` of a model with `points` lives on `layout`.
pub fn geometry(point: HookPoint, points: &ModelPoints, layout: &Layout) -> Result<PointGeometry> {
    let split = match point.shard_spec() {
        ShardSpec::Replicated => None,
        ShardSpec::Split { dim } => {
            let size = point.shape_spec()[dim];
            let n = points
                .size(point, size)
                .ok_or(Error::Internal("a hook point split along its positions"))?;
            Some((dim, tp_ranges(size, n, layout.tp())?))
        }
    };
    Ok(PointGeometry {
        name: point.to_string(),
        stage: stage_of_point(point, points.n_layers(), layout),
        split,
    })
}

/// One rank's shard of a model, as the runtime drives it.
pub struct Shard {
    model: Arc<dyn ModelShard>,
    points: ModelPoints,
    saes: ShardSaes,
}

impl Shard {
    /// `model`, a shard of a model with `points`, as a shard of the runtime.
    pub fn new(model: Arc<dyn ModelShard>, points: ModelPoints) -> Self {
        Self {
            model,
            points,
            saes: ShardSaes::default(),
        }
    }

    /// This shard with `saes` spliced in (their points are among its `points`).
    pub fn with_saes(self, saes: ShardSaes) -> Self {
        Self { saes, ..self }
    }

    /// The model's shard.
    pub fn model(&self) -> &Arc<dyn ModelShard> {
        &self.model
    }

    /// The bytes of weights it holds: the model's slices and its SAEs' latents.
    pub fn weight_bytes(&self) -> usize {
        self.model.weight_bytes() + self.saes.weight_bytes()
    }
}

/// Hands the model's hook calls to the runtime's hook layer by point index.
struct ByIndex<'a> {
    hooks: &'a mut dyn ShardHooks,
    points: &'a ModelPoints,
}

impl HookLayer for ByIndex<'_> {
    fn wants(&self, point: HookPoint) -> bool {
        self.hooks.wants(self.points.index(point))
    }

    fn hook(&mut self, point: HookPoint, value: Tensor) -> Result<Tensor> {
        let _op = crate::op_span!("hooks");
        self.hooks
            .hook(self.points.index(point), value)
            .map_err(Error::ShardHook)
    }
}

impl ShardModel for Shard {
    fn forward(
        &self,
        input: &Tensor,
        window: &Window,
        cache: &mut KvCache,
        hooks: &mut dyn ShardHooks,
        backward: bool,
    ) -> std::result::Result<Tensor, BoxError> {
        let mut by_index = ByIndex {
            hooks,
            points: &self.points,
        };
        let mut spliced = self.saes.around(&mut by_index);
        // The runtime's own errors (an aborted pass, an injected fault, a collective
        // whose peer is gone) go back as they are, so that their kind is known.
        match self
            .model
            .forward_stage(input, window, cache, &mut spliced, backward)
        {
            Ok(out) => Ok(out),
            Err(Error::ShardHook(e)) => Err(e),
            Err(Error::Cluster(e)) => Err(Box::new(e)),
            Err(e) => Err(Box::new(e)),
        }
    }

    fn loss(
        &self,
        output: &Tensor,
        tokens: &Tensor,
        mask: Option<&Tensor>,
        normalizer: f64,
    ) -> std::result::Result<Tensor, BoxError> {
        let collective = self.model.collective().as_ref();
        Ok(vocab_parallel_loss(
            output,
            tokens,
            mask,
            self.model.vocab_rows(),
            collective,
            normalizer,
        )?)
    }

    fn parameters(&self) -> Vec<flexmodel_cluster::ParamSlice> {
        self.model.parameters()
    }
}

/// Every rank's shard of the model, in rank order, each on its device of `layout`, with
/// tensor-parallel collectives (and under FSDP the replicas' collectives) that share
/// `control`.
pub fn build_shards(
    config: &ModelConfig,
    weights: &dyn WeightSource,
    layout: &Layout,
    control: &Arc<PassControl>,
    saes: (&ModelPoints, &[SaeAttachment]),
) -> Result<Vec<Arc<Shard>>> {
    let (points, attachments) = saes;
    check_layout(config, layout)?;
    let tp_groups = in_process_groups(layout, control, |c| c.tp, |r| layout.tp_group(r))?;
    let mut dp_groups = match layout.fsdp() {
        true => in_process_groups(layout, control, |c| c.dp, |r| layout.dp_group(r))?,
        false => Vec::new(),
    }
    .into_iter();
    tp_groups
        .into_iter()
        .enumerate()
        .map(|(rank, tp)| {
            let stage = stage_of(config, layout, layout.coords(rank).pp);
            let device = &layout.device().device(rank)?;
            let saes = ShardSaes::load(attachments, points, &stage, tp.clone(), device)?;
            let model = config.load(weights, tp, stage, device, dp_groups.next())?;
            Ok(Arc::new(Shard::new(model, points.clone()).with_saes(saes)))
        })
        .collect()
}

/// Each rank's member of its group along one axis of `layout` (`index`: the rank's
/// coordinate on it, `group`: the ranks of a rank's group in order), in rank order.
fn in_process_groups(
    layout: &Layout,
    control: &Arc<PassControl>,
    index: impl Fn(RankCoords) -> usize,
    group: impl Fn(usize) -> Vec<usize>,
) -> Result<Vec<Arc<dyn Collective>>> {
    let mut members: Vec<Option<InProcessCollective>> =
        (0..layout.world_size()).map(|_| None).collect();
    for rank in (0..layout.world_size()).filter(|&r| index(layout.coords(r)) == 0) {
        let ranks = group(rank);
        let group = InProcessCollective::group(ranks.len(), control.clone())?;
        for (r, member) in ranks.into_iter().zip(group) {
            members[r] = Some(member);
        }
    }
    members
        .into_iter()
        .map(|m| -> Result<Arc<dyn Collective>> {
            Ok(Arc::new(
                m.ok_or(Error::Internal("a rank outside its groups"))?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::BlockSite;
    use crate::models::{LlamaConfig, ModelSpec};
    use crate::tiny::tiny_config;

    fn layout(dp: usize, pp: usize, tp: usize) -> Layout {
        Layout::new(dp, pp, tp).unwrap()
    }

    #[test]
    fn layouts_that_cannot_split_the_model_say_why() {
        let c = tiny_config(); // 8 heads, 4 kv heads, d_mlp 192, vocab 256, 4 layers
        let err = |l| err_of(&c, l);
        assert_eq!(
            err(layout(1, 1, 3)),
            "bad layout: tp=3 does not divide num_attention_heads = 8"
        );
        assert_eq!(
            err(layout(1, 5, 1)),
            "bad layout: pp=5 exceeds the model's 4 layers"
        );
        assert!(
            check_layout(&c.clone().into(), &layout(2, 2, 8)).is_ok(),
            "8 ranks replicate the 4 kv heads"
        );
        let mut odd = c.clone();
        (odd.n_heads, odd.n_kv_heads) = (12, 6);
        assert!(
            err_of(&odd, layout(1, 1, 4)).contains("tp=4 does not divide num_key_value_heads = 6")
        );
        odd.n_kv_heads = 3;
        assert!(err_of(&odd, layout(1, 1, 4)).contains("not a multiple of it"));
    }

    fn err_of(c: &LlamaConfig, l: Layout) -> String {
        check_layout(&c.clone().into(), &l).unwrap_err().to_string()
    }

    #[test]
    fn replicated_kv_heads_are_sent_once() {
        let g = geometry(
            HookPoint::Block {
                layer: 0,
                site: BlockSite::K,
            },
            &tiny_config().points(),
            &layout(1, 1, 8),
        )
        .unwrap();
        let (_, ranges) = g.split.clone().unwrap();
        assert_eq!(ranges, [0..1, 0..1, 1..2, 1..2, 2..3, 2..3, 3..4, 3..4]);
        assert_eq!((0..8).filter(|&t| g.sends(t)).count(), 4);
    }

    #[test]
    fn points_live_on_the_stage_of_their_layer() {
        let c = tiny_config();
        let l = layout(1, 3, 1);
        let stage = |p| geometry(p, &c.points(), &l).unwrap().stage;
        assert_eq!(stage(HookPoint::Embed), 0);
        assert_eq!(
            stage(HookPoint::Block {
                layer: 1,
                site: BlockSite::Z
            }),
            0
        );
        assert_eq!(
            stage(HookPoint::Block {
                layer: 2,
                site: BlockSite::Z
            }),
            1
        );
        assert_eq!(
            stage(HookPoint::Block {
                layer: 3,
                site: BlockSite::Z
            }),
            2
        );
        assert_eq!(stage(HookPoint::UnembedOut), 2);
    }
}
