//! How a LLaMA-family model splits over a layout: validation, stages, the geometry of
//! every hook point, and the shard models the runtime drives.

use std::ops::Range;
use std::sync::Arc;

use candle_core::Tensor;
use flexmodel_actors::{BoxError, PointGeometry, ShardHooks, ShardModel};
use flexmodel_cluster::{
    Collective, InProcessCollective, Layout, PassControl, ShardSpec, TpRank, split_evenly,
};

use crate::hook_point::{BlockSite, HookPoint};
use crate::loss::vocab_parallel_loss;
use crate::models::llama::kv_heads_of;
use crate::models::{Llama, LlamaConfig, Stage};
use crate::weights::WeightSource;
use crate::{Error, HookLayer, Result};

/// Checks that `layout` can split a model of `config`, with a message that says why not.
pub fn check_layout(config: &LlamaConfig, layout: &Layout) -> Result<()> {
    let tp = layout.tp();
    let bad = |message: String| Err(Error::Cluster(flexmodel_cluster::Error::BadLayout(message)));
    for (name, size) in [
        ("num_attention_heads", config.n_heads),
        ("intermediate_size (d_mlp)", config.d_mlp),
        ("vocab_size", config.vocab_size),
    ] {
        if !size.is_multiple_of(tp) {
            return bad(format!("tp={tp} does not divide {name} = {size}"));
        }
    }
    let kv = config.n_kv_heads;
    if tp <= kv && !kv.is_multiple_of(tp) {
        return bad(format!(
            "tp={tp} does not divide num_key_value_heads = {kv}"
        ));
    }
    if tp > kv && !tp.is_multiple_of(kv) {
        return bad(format!(
            "tp={tp} is more than num_key_value_heads = {kv} but not a multiple of it, so the heads cannot be replicated evenly"
        ));
    }
    if layout.pp() > config.n_layers {
        return bad(format!(
            "pp={} exceeds the model's {} layers",
            layout.pp(),
            config.n_layers
        ));
    }
    Ok(())
}

/// The part of the model pipeline stage `stage` of `layout` holds.
pub fn stage_of(config: &LlamaConfig, layout: &Layout, stage: usize) -> Stage {
    let layers = split_evenly(config.n_layers, layout.pp())[stage].clone();
    Stage {
        layers,
        first: stage == 0,
        last: stage + 1 == layout.pp(),
    }
}

/// The pipeline stage that computes `point`.
fn stage_of_point(point: HookPoint, config: &LlamaConfig, layout: &Layout) -> usize {
    match point {
        HookPoint::Embed => 0,
        HookPoint::Block { layer, .. } => split_evenly(config.n_layers, layout.pp())
            .iter()
            .position(|r| r.contains(&layer))
            .unwrap_or(0),
        HookPoint::LnFinalNormalized | HookPoint::UnembedOut => layout.pp() - 1,
    }
}

/// The range each tensor-parallel rank holds of `point`'s split dimension.
fn tp_ranges(point: HookPoint, config: &LlamaConfig, tp: usize) -> Result<Vec<Range<usize>>> {
    let even = |n: usize| -> Result<Vec<Range<usize>>> {
        (0..tp)
            .map(|r| Ok(TpRank::new(r, tp)?.slice_of("hook point", n)?))
            .collect()
    };
    match point {
        HookPoint::Block { site, .. } => match site {
            BlockSite::K | BlockSite::V | BlockSite::RotK => (0..tp)
                .map(|r| kv_heads_of(TpRank::new(r, tp)?, config.n_kv_heads))
                .collect(),
            BlockSite::MlpPre | BlockSite::MlpPreLinear | BlockSite::MlpPost => even(config.d_mlp),
            _ => even(config.n_heads),
        },
        _ => even(config.vocab_size),
    }
}

/// Where `point` lives on `layout`.
pub fn geometry(point: HookPoint, config: &LlamaConfig, layout: &Layout) -> Result<PointGeometry> {
    let split = match point.shard_spec() {
        ShardSpec::Replicated => None,
        ShardSpec::Split { dim } => Some((dim, tp_ranges(point, config, layout.tp())?)),
    };
    Ok(PointGeometry {
        name: point.to_string(),
        stage: stage_of_point(point, config, layout),
        split,
    })
}

/// One shard of a LLaMA model, as the runtime drives it.
pub struct LlamaShard {
    model: Llama,
    n_layers: usize,
}

impl LlamaShard {
    /// `model` as a shard of the runtime.
    pub fn new(model: Llama) -> Self {
        let n_layers = model.config().n_layers;
        Self { model, n_layers }
    }

    /// The model shard.
    pub fn model(&self) -> &Llama {
        &self.model
    }
}

/// Hands the model's hook calls to the runtime's hook layer by point index.
struct ByIndex<'a> {
    hooks: &'a mut dyn ShardHooks,
    n_layers: usize,
}

impl HookLayer for ByIndex<'_> {
    fn hook(&mut self, point: HookPoint, value: Tensor) -> Result<Tensor> {
        self.hooks
            .hook(point.index(self.n_layers), value)
            .map_err(|e| Error::Protocol(e.to_string()))
    }
}

impl ShardModel for LlamaShard {
    fn forward(
        &self,
        input: &Tensor,
        hooks: &mut dyn ShardHooks,
    ) -> std::result::Result<Tensor, BoxError> {
        let mut by_index = ByIndex {
            hooks,
            n_layers: self.n_layers,
        };
        Ok(self.model.forward_stage(input, &mut by_index)?)
    }

    fn loss(
        &self,
        output: &Tensor,
        tokens: &Tensor,
        normalizer: f64,
    ) -> std::result::Result<Tensor, BoxError> {
        let collective = self.model.collective().as_ref();
        Ok(vocab_parallel_loss(
            output,
            tokens,
            self.model.vocab_rows(),
            collective,
            normalizer,
        )?)
    }

    fn parameters(&self) -> Vec<flexmodel_actors::ParamSlice> {
        self.model.parameters()
    }
}

/// Every rank's shard of the model, in rank order, with tensor-parallel collectives that
/// share `control`.
pub fn build_shards(
    config: &LlamaConfig,
    weights: &dyn WeightSource,
    layout: &Layout,
    control: &Arc<PassControl>,
) -> Result<Vec<Arc<LlamaShard>>> {
    check_layout(config, layout)?;
    let mut collectives: Vec<Option<InProcessCollective>> =
        (0..layout.world_size()).map(|_| None).collect();
    for first in layout.all().filter(|c| c.tp == 0) {
        let members = InProcessCollective::group(layout.tp(), control.clone())?;
        for (tp, member) in members.into_iter().enumerate() {
            collectives[layout.rank(flexmodel_cluster::RankCoords { tp, ..first })] = Some(member);
        }
    }
    collectives
        .into_iter()
        .enumerate()
        .map(|(rank, collective)| {
            let collective: Arc<dyn Collective> = Arc::new(
                collective.ok_or_else(|| Error::BadInput(format!("rank {rank} has no group")))?,
            );
            let stage = stage_of(config, layout, layout.coords(rank).pp);
            let model = Llama::load_stage(config, weights, collective, stage)?;
            Ok(Arc::new(LlamaShard {
                model,
                n_layers: config.n_layers,
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::tiny_config;

    fn layout(dp: usize, pp: usize, tp: usize) -> Layout {
        Layout::new(dp, pp, tp).unwrap()
    }

    #[test]
    fn layouts_that_cannot_split_the_model_say_why() {
        let c = tiny_config(); // 8 heads, 4 kv heads, d_mlp 192, vocab 256, 4 layers
        let err = |l| check_layout(&c, &l).unwrap_err().to_string();
        assert_eq!(
            err(layout(1, 1, 3)),
            "bad layout: tp=3 does not divide num_attention_heads = 8"
        );
        assert_eq!(
            err(layout(1, 5, 1)),
            "bad layout: pp=5 exceeds the model's 4 layers"
        );
        assert!(
            check_layout(&c, &layout(2, 2, 8)).is_ok(),
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
        check_layout(c, &l).unwrap_err().to_string()
    }

    #[test]
    fn replicated_kv_heads_are_sent_once() {
        let g = geometry(
            HookPoint::Block {
                layer: 0,
                site: BlockSite::K,
            },
            &tiny_config(),
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
        let stage = |p| geometry(p, &c, &l).unwrap().stage;
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
