//! The named points of the forward pass that hooks can read and edit.
//!
//! Names follow TransformerLens (`blocks.3.attn.hook_pattern`); see the table in
//! `docs/ARCHITECTURE.md`. A [`HookPoint`] is a small value, cheap to pass on every call, and its
//! name is only built when someone asks for it.

use std::fmt;

use flexmodel_cluster::ShardSpec;

use crate::hooks::catalog::HookKind;
use crate::hooks::site::{self, BlockSite, SaeSite, Size};

/// A named tensor of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    /// `hook_tokens`: the token ids, as f32 (an edit may replace them).
    Tokens,
    /// `hook_embed`: the token embeddings.
    Embed,
    /// `blocks.{layer}.{site}`.
    Block {
        /// The block's index.
        layer: usize,
        /// The point inside the block.
        site: BlockSite,
    },
    /// `ln_final.hook_scale`: the final norm's RMS divisor.
    LnFinalScale,
    /// `ln_final.hook_normalized`: `x / rms(x)` before the final norm's weight.
    LnFinalNormalized,
    /// `unembed.hook_out`: the logits.
    UnembedOut,
    /// `blocks.{layer}.{host}.{site}`: a point inside the sparse autoencoder spliced at
    /// a block's point (`blocks.6.hook_resid_post.hook_sae_acts_post`).
    Sae {
        /// The host point's block.
        layer: usize,
        /// The host point, where the SAE reads and what its output replaces.
        host: BlockSite,
        /// The point inside the SAE.
        site: SaeSite,
    },
}

impl HookPoint {
    /// The full shape of this point, in the model's sizes.
    pub fn shape_spec(self) -> &'static [Size] {
        use Size::{Batch as B, DModel, One, Seq as T, Vocab};
        match self {
            HookPoint::Tokens => &[B, T],
            HookPoint::Embed | HookPoint::LnFinalNormalized => &[B, T, DModel],
            HookPoint::Block { site, .. } => site.shape(),
            HookPoint::LnFinalScale => &[B, T, One],
            HookPoint::UnembedOut => &[B, T, Vocab],
            HookPoint::Sae { site, .. } => site.shape(),
        }
    }

    /// The block this point is in, if it is in one.
    pub fn layer(self) -> Option<usize> {
        match self {
            HookPoint::Block { layer, .. } | HookPoint::Sae { layer, .. } => Some(layer),
            _ => None,
        }
    }

    /// Whether the point is opt-in: computed only when a hook names it, and matched by a
    /// pattern only if the pattern spells its own final name ([`BlockSite::is_opt_in`]).
    pub fn is_opt_in(self) -> bool {
        matches!(self, HookPoint::Block { site, .. } if site.is_opt_in())
    }

    /// Whether the loss has a gradient with respect to this point (token ids have none).
    pub fn has_gradient(self) -> bool {
        self != HookPoint::Tokens
    }

    /// The dimension that indexes attention heads: 2 of `[b, t, h, ·]`, 1 of
    /// `[b, h, q, k]`; `None` for points without heads.
    pub fn head_dim(self) -> Option<usize> {
        site::head_dim(self.shape_spec())
    }

    /// The dimension that indexes a call's positions: 1, or 2 (the queries) of the
    /// attention scores and patterns `[b, h, q, k]`.
    pub fn position_dim(self) -> usize {
        site::position_dim(self.shape_spec())
    }

    /// Whether the point is attention scores or a pattern, `[b, h, q, k]`, whose last
    /// dimension indexes keys: every position up to the call's last.
    pub fn attends(self) -> bool {
        site::attends(self.shape_spec())
    }

    /// How the tensor at this point is split across tensor-parallel ranks: heads,
    /// MLP hidden units and the vocabulary are split, the residual stream is replicated.
    pub fn shard_spec(self) -> ShardSpec {
        match site::split_dim(self.shape_spec()) {
            Some(dim) => ShardSpec::Split { dim },
            None => ShardSpec::Replicated,
        }
    }
}

/// The sizes of a model that its hook points' shapes are made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// The width of one head.
    pub d_head: usize,
    /// The width of the residual stream.
    pub d_model: usize,
    /// The MLP's hidden units.
    pub d_mlp: usize,
    /// The vocabulary.
    pub vocab_size: usize,
}

impl Sizes {
    /// The size of `dim`; `None` for the batch and positions, which each call sets, and
    /// for an SAE's latents, which are the SAE's ([`ModelPoints::size`]).
    pub fn of(self, dim: Size) -> Option<usize> {
        Some(match dim {
            Size::Batch | Size::Seq | Size::Latents => return None,
            Size::Heads => self.n_heads,
            Size::KvHeads => self.n_kv_heads,
            Size::DHead => self.d_head,
            Size::DModel => self.d_model,
            Size::DMlp => self.d_mlp,
            Size::Vocab => self.vocab_size,
            Size::One => 1,
        })
    }
}

/// A Hugging Face module path inside block `i` (after `model.layers.{i}`) whose output
/// (a forward hook) or input (a forward-pre hook) is one of the block's points.
#[derive(Debug, Clone, Copy)]
pub struct BlockModule {
    /// The path after `model.layers.{i}` (`""` for the block itself, `.mlp`, …).
    pub path: &'static str,
    /// [`HookKind::Forward`] for its output, [`HookKind::ForwardPre`] for its input.
    pub kind: HookKind,
    /// The point it is.
    pub site: BlockSite,
}

/// The hook points of one model, as its family declares them: the sites of each block,
/// in the order the forward pass reaches them, the sizes of their shapes, the number of
/// blocks, and the Hugging Face modules that are points too. Points are numbered in
/// forward order ([`index`](Self::index)).
///
/// A model with sparse autoencoders spliced at some of its points has their points too
/// ([`with_sae`](Self::with_sae)), numbered after the model's own.
#[derive(Debug, Clone)]
pub struct ModelPoints {
    n_layers: usize,
    sites: &'static [BlockSite],
    sizes: Sizes,
    modules: &'static [BlockModule],
    saes: Vec<Splice>,
}

/// A sparse autoencoder spliced at a point: where, and how many latents it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Splice {
    /// The host point (a block's).
    pub host: HookPoint,
    /// The SAE's latents.
    pub d_sae: usize,
}

/// The points outside the blocks: before them, and after.
const BEFORE_BLOCKS: [HookPoint; 2] = [HookPoint::Tokens, HookPoint::Embed];
const AFTER_BLOCKS: [HookPoint; 3] = [
    HookPoint::LnFinalScale,
    HookPoint::LnFinalNormalized,
    HookPoint::UnembedOut,
];

impl ModelPoints {
    /// The points of a model of `n_layers` blocks, each with `sites`, whose shapes are
    /// made of `sizes`; `modules` are the block's Hugging Face modules that are points.
    pub fn new(
        n_layers: usize,
        sites: &'static [BlockSite],
        sizes: Sizes,
        modules: &'static [BlockModule],
    ) -> Self {
        Self {
            n_layers,
            sites,
            sizes,
            modules,
            saes: Vec::new(),
        }
    }

    /// These points and those of an SAE of `d_sae` latents spliced at `host`: a point
    /// of a block whose value is the residual stream's width and the same on every
    /// tensor-parallel rank (`hook_resid_pre`, `hook_attn_out`, `hook_mlp_out`, …), with
    /// no SAE yet.
    pub fn with_sae(mut self, host: HookPoint, d_sae: usize) -> Result<Self, CannotSplice> {
        let refuse = |why: &str| CannotSplice {
            hook: host.to_string(),
            why: why.to_string(),
        };
        if !matches!(host, HookPoint::Block { .. }) || !self.contains(host) {
            return Err(refuse("it is not a point inside one of the model's blocks"));
        }
        if host.shape_spec() != [Size::Batch, Size::Seq, Size::DModel] {
            return Err(refuse(
                "an SAE reads a point of shape [b, t, d_model] (the residual stream's width)",
            ));
        }
        if host.is_opt_in() {
            return Err(refuse("it is an opt-in point"));
        }
        if self.splice_at(host).is_some() {
            return Err(refuse("an SAE is spliced there already"));
        }
        if d_sae == 0 {
            return Err(refuse("the SAE has no latents"));
        }
        self.saes.push(Splice { host, d_sae });
        Ok(self)
    }

    /// The SAEs spliced at these points, in the order they were.
    pub fn splices(&self) -> &[Splice] {
        &self.saes
    }

    /// The position in [`splices`](Self::splices) of the SAE spliced at `host`.
    pub fn splice_at(&self, host: HookPoint) -> Option<usize> {
        self.saes.iter().position(|s| s.host == host)
    }

    /// The size of `dim` in `point`'s shape; `None` for the batch and positions.
    pub fn size(&self, point: HookPoint, dim: Size) -> Option<usize> {
        match (dim, point) {
            (Size::Latents, HookPoint::Sae { layer, host, .. }) => {
                let host = HookPoint::Block { layer, site: host };
                self.splice_at(host).map(|i| self.saes[i].d_sae)
            }
            _ => self.sizes.of(dim),
        }
    }

    /// The number of blocks.
    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    /// Each block's sites, in forward order.
    pub fn sites(&self) -> &'static [BlockSite] {
        self.sites
    }

    /// The sizes of the points' shapes.
    pub fn sizes(&self) -> Sizes {
        self.sizes
    }

    /// The block's Hugging Face modules that are points.
    pub fn modules(&self) -> &'static [BlockModule] {
        self.modules
    }

    /// Every hook point, in forward order.
    pub fn all(&self) -> Vec<HookPoint> {
        let blocks = (0..self.n_layers).flat_map(|layer| {
            self.sites
                .iter()
                .map(move |&site| HookPoint::Block { layer, site })
        });
        let saes = self.saes.iter().flat_map(|splice| sae_points(splice.host));
        BEFORE_BLOCKS
            .into_iter()
            .chain(blocks)
            .chain(AFTER_BLOCKS)
            .chain(saes)
            .collect()
    }

    /// The number of hook points.
    pub fn count(&self) -> usize {
        self.own_count() + self.saes.len() * SaeSite::ALL.len()
    }

    /// The number of the model's own points (without its SAEs').
    fn own_count(&self) -> usize {
        BEFORE_BLOCKS.len() + self.n_layers * self.sites.len() + AFTER_BLOCKS.len()
    }

    /// Whether `point` is one of this model's.
    pub fn contains(&self, point: HookPoint) -> bool {
        match point {
            HookPoint::Block { layer, site } => layer < self.n_layers && self.sites.contains(&site),
            HookPoint::Sae { layer, host, .. } => self
                .splice_at(HookPoint::Block { layer, site: host })
                .is_some(),
            _ => true,
        }
    }

    /// `point`'s position in [`all`](Self::all): a dense index for lookup tables.
    ///
    /// # Panics
    ///
    /// If `point` is not one of this model's (a site its family does not have, an SAE
    /// point where no SAE is spliced).
    pub fn index(&self, point: HookPoint) -> usize {
        let per_block = self.sites.len();
        let after = BEFORE_BLOCKS.len() + self.n_layers * per_block;
        match point {
            HookPoint::Tokens => 0,
            HookPoint::Embed => 1,
            HookPoint::Block { layer, site } => {
                let ordinal = self.sites.iter().position(|&s| s == site);
                let ordinal =
                    ordinal.unwrap_or_else(|| panic!("{site:?} is not a site of this model"));
                BEFORE_BLOCKS.len() + layer * per_block + ordinal
            }
            HookPoint::LnFinalScale => after,
            HookPoint::LnFinalNormalized => after + 1,
            HookPoint::UnembedOut => after + 2,
            HookPoint::Sae { layer, host, site } => {
                let host = HookPoint::Block { layer, site: host };
                let splice = self.splice_at(host);
                let splice = splice.unwrap_or_else(|| panic!("no SAE is spliced at {host}"));
                let ordinal = SaeSite::ALL.iter().position(|&s| s == site).unwrap_or(0);
                self.own_count() + splice * SaeSite::ALL.len() + ordinal
            }
        }
    }

    /// The point at `index` of [`all`](Self::all), if there is one.
    pub fn at(&self, index: usize) -> Option<HookPoint> {
        let per_block = self.sites.len();
        let blocks = self.n_layers * per_block;
        match index.checked_sub(BEFORE_BLOCKS.len()) {
            None => BEFORE_BLOCKS.get(index).copied(),
            Some(i) if i < blocks => Some(HookPoint::Block {
                layer: i / per_block,
                site: self.sites[i % per_block],
            }),
            Some(i) if i < blocks + AFTER_BLOCKS.len() => AFTER_BLOCKS.get(i - blocks).copied(),
            Some(i) => {
                let i = i - blocks - AFTER_BLOCKS.len();
                let per_sae = SaeSite::ALL.len();
                let splice = self.saes.get(i / per_sae)?;
                sae_points(splice.host).nth(i % per_sae)
            }
        }
    }

    /// The full (unsharded) shape of `point` for `batch` sequences of `seq` tokens.
    pub fn shape(&self, point: HookPoint, batch: usize, seq: usize) -> Vec<usize> {
        self.dims(point)
            .into_iter()
            .map(|d| match d {
                Dim::Batch => batch,
                Dim::Seq => seq,
                Dim::Fixed(n) => n,
            })
            .collect()
    }

    /// The full shape of `point` with the batch and sequence left symbolic.
    pub fn dims(&self, point: HookPoint) -> Vec<Dim> {
        point
            .shape_spec()
            .iter()
            .map(|&size| match (size, self.size(point, size)) {
                (_, Some(n)) => Dim::Fixed(n),
                (Size::Batch, None) => Dim::Batch,
                (_, None) => Dim::Seq,
            })
            .collect()
    }

    /// The point named `name`; an error if this model has none of that name.
    pub fn parse(&self, name: &str) -> Result<HookPoint, NotAHookPoint> {
        let fail = || NotAHookPoint(name.to_string());
        if let Some(point) = BEFORE_BLOCKS
            .into_iter()
            .chain(AFTER_BLOCKS)
            .find(|p| p.to_string() == name)
        {
            return Ok(point);
        }
        if let Some((host, suffix)) = name.rsplit_once('.')
            && let Some(&site) = SaeSite::ALL.iter().find(|s| s.suffix() == suffix)
        {
            let point = match self.parse(host)? {
                HookPoint::Block { layer, site: host } => HookPoint::Sae { layer, host, site },
                _ => return Err(fail()),
            };
            return match self.contains(point) {
                true => Ok(point),
                false => Err(fail()),
            };
        }
        let rest = name.strip_prefix("blocks.").ok_or_else(fail)?;
        let (layer, suffix) = rest.split_once('.').ok_or_else(fail)?;
        if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
            return Err(fail());
        }
        let layer: usize = layer.parse().map_err(|_| fail())?;
        let site = self
            .sites
            .iter()
            .find(|s| s.suffix() == suffix)
            .ok_or_else(fail)?;
        if layer >= self.n_layers {
            return Err(fail());
        }
        Ok(HookPoint::Block { layer, site: *site })
    }
}

/// One dimension of a hook point's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// The batch: sequences.
    Batch,
    /// Positions in a sequence.
    Seq,
    /// A size fixed by the model.
    Fixed(usize),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Batch => f.write_str("b"),
            Dim::Seq => f.write_str("t"),
            Dim::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookPoint::Tokens => f.write_str("hook_tokens"),
            HookPoint::Embed => f.write_str("hook_embed"),
            HookPoint::Block { layer, site } => write!(f, "blocks.{layer}.{}", site.suffix()),
            HookPoint::LnFinalScale => f.write_str("ln_final.hook_scale"),
            HookPoint::LnFinalNormalized => f.write_str("ln_final.hook_normalized"),
            HookPoint::UnembedOut => f.write_str("unembed.hook_out"),
            HookPoint::Sae { layer, host, site } => {
                write!(f, "blocks.{layer}.{}.{}", host.suffix(), site.suffix())
            }
        }
    }
}

/// The six points of the SAE spliced at `host` (a block's point), in forward order.
fn sae_points(host: HookPoint) -> impl Iterator<Item = HookPoint> {
    let (layer, host) = match host {
        HookPoint::Block { layer, site } => (layer, Some(site)),
        _ => (0, None),
    };
    host.into_iter().flat_map(move |host| {
        SaeSite::ALL
            .into_iter()
            .map(move |site| HookPoint::Sae { layer, host, site })
    })
}

/// A point where no SAE can be spliced, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot splice an SAE at {hook}: {why}")]
pub struct CannotSplice {
    /// The point's name.
    pub hook: String,
    /// Why not.
    pub why: String,
}

/// A string that is not the name of any hook point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a hook point name")]
pub struct NotAHookPoint(pub String);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The points of a small model with TransformerLens's block sites.
    pub(crate) fn points(n_layers: usize) -> ModelPoints {
        let sizes = Sizes {
            n_heads: 4,
            n_kv_heads: 2,
            d_head: 8,
            d_model: 32,
            d_mlp: 64,
            vocab_size: 100,
        };
        ModelPoints::new(n_layers, &BlockSite::TRANSFORMER_LENS, sizes, &[])
    }

    #[test]
    fn every_name_parses_back_to_its_point() {
        let points = points(3);
        for point in points.all() {
            assert_eq!(points.parse(&point.to_string()), Ok(point));
        }
        assert!(
            points.parse("blocks.3.hook_resid_pre").is_err(),
            "no block 3"
        );
    }

    #[test]
    fn a_model_has_its_sites_in_every_block_and_five_points_outside() {
        let points = points(30);
        assert_eq!(points.all().len(), 30 * 25 + 5);
        assert_eq!(points.count(), 30 * 25 + 5);
        let opt_in = points.all().into_iter().filter(|p| p.is_opt_in());
        assert_eq!(opt_in.count(), 30 * 4, "result and the q/k/v inputs");
    }

    #[test]
    fn index_is_the_position_in_forward_order() {
        let points = points(4);
        for (i, point) in points.all().into_iter().enumerate() {
            assert_eq!(points.index(point), i, "{point}");
            assert_eq!(points.at(i), Some(point));
        }
        assert_eq!(points.at(points.count()), None);
    }

    #[test]
    fn shapes_come_from_the_model_sizes() {
        let points = points(2);
        let pattern = HookPoint::Block {
            layer: 1,
            site: BlockSite::PATTERN,
        };
        assert_eq!(points.shape(pattern, 3, 5), [3, 4, 5, 5]);
        let k = HookPoint::Block {
            layer: 0,
            site: BlockSite::K,
        };
        assert_eq!(points.shape(k, 3, 5), [3, 5, 2, 8]);
        assert_eq!(points.shape(HookPoint::UnembedOut, 1, 2), [1, 2, 100]);
        assert_eq!(
            HookPoint::UnembedOut.shard_spec(),
            ShardSpec::Split { dim: 2 }
        );
        assert_eq!(HookPoint::Embed.shard_spec(), ShardSpec::Replicated);
    }

    #[test]
    fn an_saes_points_follow_the_models_and_take_its_latents_size() {
        let host = HookPoint::Block {
            layer: 1,
            site: BlockSite::RESID_POST,
        };
        let plain = points(2);
        let points = plain.clone().with_sae(host, 10).unwrap();
        assert_eq!(points.count(), plain.count() + 6);
        for (i, point) in points.all().into_iter().enumerate() {
            assert_eq!(points.index(point), i, "{point}");
            assert_eq!(points.at(i), Some(point));
            assert_eq!(points.parse(&point.to_string()), Ok(point));
        }
        let post = points
            .parse("blocks.1.hook_resid_post.hook_sae_acts_post")
            .unwrap();
        assert_eq!(points.shape(post, 3, 5), [3, 5, 10]);
        assert_eq!(post.shard_spec(), ShardSpec::Split { dim: 2 });
        assert!(
            points
                .parse("blocks.0.hook_resid_post.hook_sae_acts_post")
                .is_err()
        );
        let refused = |site| {
            points
                .clone()
                .with_sae(HookPoint::Block { layer: 0, site }, 4)
        };
        assert!(
            refused(BlockSite::Z)
                .unwrap_err()
                .why
                .contains("[b, t, d_model]")
        );
        assert!(refused(BlockSite::LN1_SCALE).is_err());
        assert!(
            points
                .clone()
                .with_sae(host, 4)
                .unwrap_err()
                .why
                .contains("already")
        );
    }

    #[test]
    fn malformed_names_are_rejected() {
        for name in [
            "blocks.x.hook_resid_pre",
            "blocks.1",
            "blocks..hook_z",
            "hook",
            "",
        ] {
            assert!(points(3).parse(name).is_err(), "{name}");
        }
    }

    #[test]
    fn names_match_transformer_lens() {
        let p = HookPoint::Block {
            layer: 7,
            site: BlockSite::PATTERN,
        };
        assert_eq!(p.to_string(), "blocks.7.attn.hook_pattern");
        assert_eq!(p.shard_spec(), ShardSpec::Split { dim: 1 });
    }
}
