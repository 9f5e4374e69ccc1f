//! The points inside a transformer block, as a model family declares them: a name, a
//! shape in the model's sizes, and whether it is opt-in. Everything else (which
//! dimension indexes heads or positions, how tensor-parallel ranks split it) follows
//! from the shape.
//!
//! TransformerLens's block points, which every family here has, are the constants of
//! [`BlockSite`]; a family with points of its own (Gemma's norms after attention and
//! the MLP) declares them in its folder the same way.

use std::fmt;

use Size::{Batch as B, DHead, DMlp, DModel, Heads, KvHeads, One, Seq as T};

/// One dimension of a point's shape, in the model's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Size {
    /// The batch: sequences.
    Batch,
    /// Positions in a sequence (queries, or keys when it is the last of two).
    Seq,
    /// Query heads (split across tensor-parallel ranks).
    Heads,
    /// Key/value heads (split across tensor-parallel ranks).
    KvHeads,
    /// The width of one head.
    DHead,
    /// The width of the residual stream.
    DModel,
    /// The MLP's hidden units (split across tensor-parallel ranks).
    DMlp,
    /// The vocabulary (split across tensor-parallel ranks).
    Vocab,
    /// One: a per-position scalar such as a norm's RMS.
    One,
    /// The latents of the sparse autoencoder spliced at a point (split across
    /// tensor-parallel ranks).
    Latents,
}

impl Size {
    /// Whether tensor-parallel ranks each hold a slice of this dimension.
    fn is_split(self) -> bool {
        matches!(
            self,
            Size::Heads | Size::KvHeads | Size::DMlp | Size::Vocab | Size::Latents
        )
    }
}

/// What a family declares about one point inside its blocks.
#[derive(Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteSpec {
    /// The name after `blocks.i.` (`attn.hook_pattern`).
    pub suffix: &'static str,
    /// The full (unsharded) shape.
    pub shape: &'static [Size],
    /// Whether it is computed only when a hook names it (TransformerLens's opt-in points).
    pub opt_in: bool,
}

/// A point inside a transformer block: `blocks.{layer}.{suffix}`. Its constants work
/// as patterns (`HookPoint::Block { site: BlockSite::Z, .. }`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockSite(pub &'static SiteSpec);

impl SiteSpec {
    /// A site of `shape`, computed on every pass.
    pub const fn new(suffix: &'static str, shape: &'static [Size]) -> Self {
        Self {
            suffix,
            shape,
            opt_in: false,
        }
    }

    /// A site of `shape`, computed only when a hook names it.
    pub const fn opt_in(suffix: &'static str, shape: &'static [Size]) -> Self {
        Self {
            suffix,
            shape,
            opt_in: true,
        }
    }
}

impl BlockSite {
    /// The residual stream entering the block.
    pub const RESID_PRE: Self = BlockSite(&SiteSpec::new("hook_resid_pre", &[B, T, DModel]));
    /// `√(mean(x²) + ε)`, the attention norm's RMS divisor.
    pub const LN1_SCALE: Self = BlockSite(&SiteSpec::new("ln1.hook_scale", &[B, T, One]));
    /// `x / rms(x)` before the attention norm's weight.
    pub const LN1_NORMALIZED: Self =
        BlockSite(&SiteSpec::new("ln1.hook_normalized", &[B, T, DModel]));
    /// The residual stream repeated per query head, the input of each head's query.
    pub const Q_INPUT: Self = BlockSite(&SiteSpec::opt_in("hook_q_input", &[B, T, Heads, DModel]));
    /// The residual stream repeated per key/value head, the input of each head's key.
    pub const K_INPUT: Self =
        BlockSite(&SiteSpec::opt_in("hook_k_input", &[B, T, KvHeads, DModel]));
    /// The residual stream repeated per key/value head, the input of each head's value.
    pub const V_INPUT: Self =
        BlockSite(&SiteSpec::opt_in("hook_v_input", &[B, T, KvHeads, DModel]));
    /// Queries, before RoPE.
    pub const Q: Self = BlockSite(&SiteSpec::new("attn.hook_q", &[B, T, Heads, DHead]));
    /// Keys, before RoPE.
    pub const K: Self = BlockSite(&SiteSpec::new("attn.hook_k", &[B, T, KvHeads, DHead]));
    /// Values.
    pub const V: Self = BlockSite(&SiteSpec::new("attn.hook_v", &[B, T, KvHeads, DHead]));
    /// `√(mean(q²) + ε)` of each head's queries, the query norm's RMS divisor (the
    /// families with a query norm: Gemma 3).
    pub const Q_NORM_SCALE: Self = BlockSite(&SiteSpec::new(
        "attn.q_norm.hook_scale",
        &[B, T, Heads, One],
    ));
    /// Each head's queries over their RMS, before the query norm's weight.
    pub const Q_NORM_NORMALIZED: Self = BlockSite(&SiteSpec::new(
        "attn.q_norm.hook_normalized",
        &[B, T, Heads, DHead],
    ));
    /// `√(mean(k²) + ε)` of each head's keys, the key norm's RMS divisor.
    pub const K_NORM_SCALE: Self = BlockSite(&SiteSpec::new(
        "attn.k_norm.hook_scale",
        &[B, T, KvHeads, One],
    ));
    /// Each head's keys over their RMS, before the key norm's weight.
    pub const K_NORM_NORMALIZED: Self = BlockSite(&SiteSpec::new(
        "attn.k_norm.hook_normalized",
        &[B, T, KvHeads, DHead],
    ));
    /// Queries after RoPE.
    pub const ROT_Q: Self = BlockSite(&SiteSpec::new("attn.hook_rot_q", &[B, T, Heads, DHead]));
    /// Keys after RoPE.
    pub const ROT_K: Self = BlockSite(&SiteSpec::new("attn.hook_rot_k", &[B, T, KvHeads, DHead]));
    /// The scaled `q·k` with masked entries at −∞.
    pub const ATTN_SCORES: Self =
        BlockSite(&SiteSpec::new("attn.hook_attn_scores", &[B, Heads, T, T]));
    /// The softmax of the scores.
    pub const PATTERN: Self = BlockSite(&SiteSpec::new("attn.hook_pattern", &[B, Heads, T, T]));
    /// The attention-weighted values of each head.
    pub const Z: Self = BlockSite(&SiteSpec::new("attn.hook_z", &[B, T, Heads, DHead]));
    /// Each head's contribution to the residual stream: its `z` through its slice of the
    /// output projection.
    pub const RESULT: Self = BlockSite(&SiteSpec::opt_in(
        "attn.hook_result",
        &[B, T, Heads, DModel],
    ));
    /// The attention output, after the output projection.
    pub const ATTN_OUT: Self = BlockSite(&SiteSpec::new("hook_attn_out", &[B, T, DModel]));
    /// The residual stream between attention and MLP.
    pub const RESID_MID: Self = BlockSite(&SiteSpec::new("hook_resid_mid", &[B, T, DModel]));
    /// The MLP block's input.
    pub const MLP_IN: Self = BlockSite(&SiteSpec::new("hook_mlp_in", &[B, T, DModel]));
    /// `√(mean(x²) + ε)`, the MLP norm's RMS divisor.
    pub const LN2_SCALE: Self = BlockSite(&SiteSpec::new("ln2.hook_scale", &[B, T, One]));
    /// `x / rms(x)` before the MLP norm's weight.
    pub const LN2_NORMALIZED: Self =
        BlockSite(&SiteSpec::new("ln2.hook_normalized", &[B, T, DModel]));
    /// The gate projection, before its activation.
    pub const MLP_PRE: Self = BlockSite(&SiteSpec::new("mlp.hook_pre", &[B, T, DMlp]));
    /// The up projection.
    pub const MLP_PRE_LINEAR: Self =
        BlockSite(&SiteSpec::new("mlp.hook_pre_linear", &[B, T, DMlp]));
    /// `act(gate) · up`.
    pub const MLP_POST: Self = BlockSite(&SiteSpec::new("mlp.hook_post", &[B, T, DMlp]));
    /// The MLP output, after the down projection.
    pub const MLP_OUT: Self = BlockSite(&SiteSpec::new("hook_mlp_out", &[B, T, DModel]));
    /// The residual stream leaving the block.
    pub const RESID_POST: Self = BlockSite(&SiteSpec::new("hook_resid_post", &[B, T, DModel]));

    /// TransformerLens's sites of a block, in the order the forward pass reaches them:
    /// every one a LLaMA block has.
    pub const TRANSFORMER_LENS: [BlockSite; 25] = [
        Self::RESID_PRE,
        Self::LN1_SCALE,
        Self::LN1_NORMALIZED,
        Self::Q_INPUT,
        Self::K_INPUT,
        Self::V_INPUT,
        Self::Q,
        Self::K,
        Self::V,
        Self::ROT_Q,
        Self::ROT_K,
        Self::ATTN_SCORES,
        Self::PATTERN,
        Self::Z,
        Self::RESULT,
        Self::ATTN_OUT,
        Self::RESID_MID,
        Self::MLP_IN,
        Self::LN2_SCALE,
        Self::LN2_NORMALIZED,
        Self::MLP_PRE,
        Self::MLP_PRE_LINEAR,
        Self::MLP_POST,
        Self::MLP_OUT,
        Self::RESID_POST,
    ];

    /// The name after `blocks.i.`.
    pub fn suffix(self) -> &'static str {
        self.0.suffix
    }

    /// The full shape, in the model's sizes.
    pub fn shape(self) -> &'static [Size] {
        self.0.shape
    }

    /// Whether the site is one of TransformerLens's opt-in points, computed only when a
    /// hook names it: each head's result and the per-head q/k/v inputs.
    pub fn is_opt_in(self) -> bool {
        self.0.opt_in
    }
}

/// What follows from a shape: where its heads, positions and tensor-parallel split are.
pub(crate) fn head_dim(shape: &[Size]) -> Option<usize> {
    shape.iter().position(|s| matches!(s, Heads | KvHeads))
}

/// The dimension of `shape` that indexes a call's positions: the first (the queries).
pub(crate) fn position_dim(shape: &[Size]) -> usize {
    shape.iter().position(|&s| s == T).unwrap_or(1)
}

/// Whether `shape` is attention's `[b, h, q, k]`: two position dimensions.
pub(crate) fn attends(shape: &[Size]) -> bool {
    shape.iter().filter(|&&s| s == T).count() == 2
}

/// The dimension tensor-parallel ranks split: heads first, else hidden units or the
/// vocabulary; `None` when every rank holds all of it.
pub(crate) fn split_dim(shape: &[Size]) -> Option<usize> {
    head_dim(shape).or_else(|| shape.iter().position(|s| s.is_split()))
}

/// A point inside a sparse autoencoder spliced at a hook point, named after it
/// (`blocks.6.hook_resid_post.hook_sae_acts_post`) as SAELens's `HookedSAETransformer`
/// names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SaeSite {
    /// What the SAE reads: the hook point's value.
    Input,
    /// The latents' pre-activations.
    ActsPre,
    /// The latents' activations.
    ActsPost,
    /// The reconstruction, before the normalization is undone.
    Recons,
    /// What the reconstruction misses of the input (with the error term on).
    Error,
    /// What the model continues with.
    Output,
}

impl SaeSite {
    /// Every site, in the order a pass reaches them.
    pub const ALL: [SaeSite; 6] = [
        SaeSite::Input,
        SaeSite::ActsPre,
        SaeSite::ActsPost,
        SaeSite::Recons,
        SaeSite::Error,
        SaeSite::Output,
    ];

    /// The name after the hook point's (`hook_sae_acts_post`).
    pub fn suffix(self) -> &'static str {
        match self {
            SaeSite::Input => "hook_sae_input",
            SaeSite::ActsPre => "hook_sae_acts_pre",
            SaeSite::ActsPost => "hook_sae_acts_post",
            SaeSite::Recons => "hook_sae_recons",
            SaeSite::Error => "hook_sae_error",
            SaeSite::Output => "hook_sae_output",
        }
    }

    /// Its shape: the latents for the activations, else the host point's `[b, t, d]`.
    pub fn shape(self) -> &'static [Size] {
        match self {
            SaeSite::ActsPre | SaeSite::ActsPost => &[B, T, Size::Latents],
            _ => &[B, T, DModel],
        }
    }
}

impl fmt::Debug for BlockSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockSite({:?})", self.0.suffix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_positions_and_splits_follow_from_the_shape() {
        let pattern = BlockSite::PATTERN.shape();
        assert_eq!(head_dim(pattern), Some(1));
        assert_eq!(position_dim(pattern), 2);
        assert!(attends(pattern));
        assert_eq!(split_dim(pattern), Some(1));
        let z = BlockSite::Z.shape();
        assert_eq!(
            (head_dim(z), position_dim(z), attends(z)),
            (Some(2), 1, false)
        );
        assert_eq!(split_dim(BlockSite::MLP_POST.shape()), Some(2));
        assert_eq!(split_dim(BlockSite::RESID_POST.shape()), None);
        assert_eq!(split_dim(BlockSite::LN1_SCALE.shape()), None);
    }

    #[test]
    fn site_constants_work_as_patterns() {
        let is_z = |site| matches!(site, BlockSite::Z);
        assert!(is_z(BlockSite::Z));
        assert!(!is_z(BlockSite::PATTERN));
    }
}
