//! The named points of the forward pass that hooks can read and edit.
//!
//! Names follow TransformerLens (`blocks.3.attn.hook_pattern`); see the table in
//! `docs/ARCHITECTURE.md`. A [`HookPoint`] is a small value, cheap to pass on every call, and its
//! name is only built when someone asks for it.

use std::fmt;
use std::str::FromStr;

use flexmodel_cluster::ShardSpec;

use crate::models::LlamaConfig;

/// A point inside one transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockSite {
    /// The residual stream entering the block.
    ResidPre,
    /// `√(mean(x²) + ε)`, the attention norm's RMS divisor.
    Ln1Scale,
    /// `x / rms(x)` before the attention norm's weight.
    Ln1Normalized,
    /// The residual stream repeated per query head, the input of each head's query
    /// (opt-in).
    QInput,
    /// The residual stream repeated per key/value head, the input of each head's key
    /// (opt-in).
    KInput,
    /// The residual stream repeated per key/value head, the input of each head's value
    /// (opt-in).
    VInput,
    /// Queries, before RoPE.
    Q,
    /// Keys, before RoPE.
    K,
    /// Values.
    V,
    /// Queries after RoPE.
    RotQ,
    /// Keys after RoPE.
    RotK,
    /// `q·k/√d_head` with masked entries at −∞.
    AttnScores,
    /// The softmax of the scores.
    Pattern,
    /// The attention-weighted values of each head.
    Z,
    /// Each head's contribution to the residual stream: its `z` through its slice of the
    /// output projection (opt-in).
    Result,
    /// The attention output, after the output projection.
    AttnOut,
    /// The residual stream between attention and MLP.
    ResidMid,
    /// The MLP block's input (the residual stream between attention and MLP).
    MlpIn,
    /// `√(mean(x²) + ε)`, the MLP norm's RMS divisor.
    Ln2Scale,
    /// `x / rms(x)` before the MLP norm's weight.
    Ln2Normalized,
    /// The gate projection, before SiLU.
    MlpPre,
    /// The up projection.
    MlpPreLinear,
    /// `silu(gate) · up`.
    MlpPost,
    /// The MLP output, after the down projection.
    MlpOut,
    /// The residual stream leaving the block.
    ResidPost,
}

impl BlockSite {
    /// Every site, in the order the forward pass reaches them.
    pub const ALL: [BlockSite; 25] = [
        BlockSite::ResidPre,
        BlockSite::Ln1Scale,
        BlockSite::Ln1Normalized,
        BlockSite::QInput,
        BlockSite::KInput,
        BlockSite::VInput,
        BlockSite::Q,
        BlockSite::K,
        BlockSite::V,
        BlockSite::RotQ,
        BlockSite::RotK,
        BlockSite::AttnScores,
        BlockSite::Pattern,
        BlockSite::Z,
        BlockSite::Result,
        BlockSite::AttnOut,
        BlockSite::ResidMid,
        BlockSite::MlpIn,
        BlockSite::Ln2Scale,
        BlockSite::Ln2Normalized,
        BlockSite::MlpPre,
        BlockSite::MlpPreLinear,
        BlockSite::MlpPost,
        BlockSite::MlpOut,
        BlockSite::ResidPost,
    ];

    /// The name after `blocks.i.`.
    pub fn suffix(self) -> &'static str {
        match self {
            BlockSite::ResidPre => "hook_resid_pre",
            BlockSite::Ln1Scale => "ln1.hook_scale",
            BlockSite::Ln1Normalized => "ln1.hook_normalized",
            BlockSite::QInput => "hook_q_input",
            BlockSite::KInput => "hook_k_input",
            BlockSite::VInput => "hook_v_input",
            BlockSite::Q => "attn.hook_q",
            BlockSite::K => "attn.hook_k",
            BlockSite::V => "attn.hook_v",
            BlockSite::RotQ => "attn.hook_rot_q",
            BlockSite::RotK => "attn.hook_rot_k",
            BlockSite::AttnScores => "attn.hook_attn_scores",
            BlockSite::Pattern => "attn.hook_pattern",
            BlockSite::Z => "attn.hook_z",
            BlockSite::Result => "attn.hook_result",
            BlockSite::AttnOut => "hook_attn_out",
            BlockSite::ResidMid => "hook_resid_mid",
            BlockSite::MlpIn => "hook_mlp_in",
            BlockSite::Ln2Scale => "ln2.hook_scale",
            BlockSite::Ln2Normalized => "ln2.hook_normalized",
            BlockSite::MlpPre => "mlp.hook_pre",
            BlockSite::MlpPreLinear => "mlp.hook_pre_linear",
            BlockSite::MlpPost => "mlp.hook_post",
            BlockSite::MlpOut => "hook_mlp_out",
            BlockSite::ResidPost => "hook_resid_post",
        }
    }

    /// Whether the site is one of TransformerLens's opt-in points, computed only when a
    /// hook names it: each head's result and the per-head q/k/v inputs.
    pub fn is_opt_in(self) -> bool {
        matches!(
            self,
            BlockSite::Result | BlockSite::QInput | BlockSite::KInput | BlockSite::VInput
        )
    }
}

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
}

impl HookPoint {
    /// Every hook point of a model with `n_layers` blocks, in forward order.
    pub fn all(n_layers: usize) -> Vec<HookPoint> {
        let blocks = (0..n_layers)
            .flat_map(|layer| BlockSite::ALL.map(|site| HookPoint::Block { layer, site }));
        [HookPoint::Tokens, HookPoint::Embed]
            .into_iter()
            .chain(blocks)
            .chain([
                HookPoint::LnFinalScale,
                HookPoint::LnFinalNormalized,
                HookPoint::UnembedOut,
            ])
            .collect()
    }

    /// The number of hook points of a model with `n_layers` blocks.
    pub fn count(n_layers: usize) -> usize {
        n_layers * BlockSite::ALL.len() + 5
    }

    /// The number of blocks of a model with `count` hook points (the inverse of
    /// [`HookPoint::count`]).
    pub fn layers_of(count: usize) -> usize {
        count.saturating_sub(5) / BlockSite::ALL.len()
    }

    /// This point's position in [`HookPoint::all`]: a dense index for lookup tables.
    pub fn index(self, n_layers: usize) -> usize {
        let per_block = BlockSite::ALL.len();
        match self {
            HookPoint::Tokens => 0,
            HookPoint::Embed => 1,
            HookPoint::Block { layer, site } => 2 + layer * per_block + site as usize,
            HookPoint::LnFinalScale => 2 + n_layers * per_block,
            HookPoint::LnFinalNormalized => 3 + n_layers * per_block,
            HookPoint::UnembedOut => 4 + n_layers * per_block,
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
        match self {
            HookPoint::Block { site, .. } => match site {
                BlockSite::Q
                | BlockSite::K
                | BlockSite::V
                | BlockSite::RotQ
                | BlockSite::RotK
                | BlockSite::Z
                | BlockSite::Result
                | BlockSite::QInput
                | BlockSite::KInput
                | BlockSite::VInput => Some(2),
                BlockSite::AttnScores | BlockSite::Pattern => Some(1),
                _ => None,
            },
            _ => None,
        }
    }

    /// The dimension that indexes a call's positions: 1, or 2 (the queries) of the
    /// attention scores and patterns `[b, h, q, k]`.
    pub fn position_dim(self) -> usize {
        match self.attends() {
            true => 2,
            false => 1,
        }
    }

    /// Whether the point is attention scores or a pattern, `[b, h, q, k]`, whose last
    /// dimension indexes keys: every position up to the call's last.
    pub fn attends(self) -> bool {
        matches!(
            self,
            HookPoint::Block {
                site: BlockSite::AttnScores | BlockSite::Pattern,
                ..
            }
        )
    }

    /// How the tensor at this point is split across tensor-parallel ranks: heads,
    /// MLP hidden units and the vocabulary are split, the residual stream is replicated.
    pub fn shard_spec(self) -> ShardSpec {
        if let Some(dim) = self.head_dim() {
            return ShardSpec::Split { dim };
        }
        match self {
            HookPoint::Block {
                site: BlockSite::MlpPre | BlockSite::MlpPreLinear | BlockSite::MlpPost,
                ..
            }
            | HookPoint::UnembedOut => ShardSpec::Split { dim: 2 },
            _ => ShardSpec::Replicated,
        }
    }

    /// The full (unsharded) shape of this point for `batch` sequences of `seq` tokens.
    pub fn shape(self, config: &LlamaConfig, batch: usize, seq: usize) -> Vec<usize> {
        self.dims(config)
            .into_iter()
            .map(|d| match d {
                Dim::Batch => batch,
                Dim::Seq => seq,
                Dim::Fixed(n) => n,
            })
            .collect()
    }

    /// The full shape of this point with the batch and sequence left symbolic.
    pub fn dims(self, config: &LlamaConfig) -> Vec<Dim> {
        let c = config;
        let (b, t, n) = (Dim::Batch, Dim::Seq, Dim::Fixed);
        match self {
            HookPoint::Block { site, .. } => match site {
                BlockSite::Q | BlockSite::RotQ | BlockSite::Z => {
                    vec![b, t, n(c.n_heads), n(c.d_head)]
                }
                BlockSite::K | BlockSite::V | BlockSite::RotK => {
                    vec![b, t, n(c.n_kv_heads), n(c.d_head)]
                }
                BlockSite::QInput | BlockSite::Result => vec![b, t, n(c.n_heads), n(c.d_model)],
                BlockSite::KInput | BlockSite::VInput => {
                    vec![b, t, n(c.n_kv_heads), n(c.d_model)]
                }
                BlockSite::AttnScores | BlockSite::Pattern => vec![b, n(c.n_heads), t, t],
                BlockSite::MlpPre | BlockSite::MlpPreLinear | BlockSite::MlpPost => {
                    vec![b, t, n(c.d_mlp)]
                }
                BlockSite::Ln1Scale | BlockSite::Ln2Scale => vec![b, t, n(1)],
                _ => vec![b, t, n(c.d_model)],
            },
            HookPoint::Tokens => vec![b, t],
            HookPoint::LnFinalScale => vec![b, t, n(1)],
            HookPoint::UnembedOut => vec![b, t, n(c.vocab_size)],
            HookPoint::Embed | HookPoint::LnFinalNormalized => vec![b, t, n(c.d_model)],
        }
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
        }
    }
}

/// A string that is not the name of any hook point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a hook point name")]
pub struct NotAHookPoint(pub String);

impl FromStr for HookPoint {
    type Err = NotAHookPoint;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let fail = || NotAHookPoint(name.to_string());
        match name {
            "hook_tokens" => return Ok(HookPoint::Tokens),
            "hook_embed" => return Ok(HookPoint::Embed),
            "ln_final.hook_scale" => return Ok(HookPoint::LnFinalScale),
            "ln_final.hook_normalized" => return Ok(HookPoint::LnFinalNormalized),
            "unembed.hook_out" => return Ok(HookPoint::UnembedOut),
            _ => {}
        }
        let rest = name.strip_prefix("blocks.").ok_or_else(fail)?;
        let (layer, suffix) = rest.split_once('.').ok_or_else(fail)?;
        if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
            return Err(fail());
        }
        let layer = layer.parse().map_err(|_| fail())?;
        let site = BlockSite::ALL
            .into_iter()
            .find(|s| s.suffix() == suffix)
            .ok_or_else(fail)?;
        Ok(HookPoint::Block { layer, site })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_to_its_point() {
        for point in HookPoint::all(3) {
            assert_eq!(point.to_string().parse::<HookPoint>(), Ok(point));
        }
    }

    #[test]
    fn a_model_has_twenty_five_points_per_block_and_five_outside() {
        assert_eq!(HookPoint::all(30).len(), 30 * 25 + 5);
        assert_eq!(HookPoint::count(30), 30 * 25 + 5);
        let opt_in = HookPoint::all(30).into_iter().filter(|p| p.is_opt_in());
        assert_eq!(opt_in.count(), 30 * 4, "result and the q/k/v inputs");
    }

    #[test]
    fn index_is_the_position_in_forward_order() {
        for (i, point) in HookPoint::all(4).into_iter().enumerate() {
            assert_eq!(point.index(4), i, "{point}");
        }
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
            assert!(name.parse::<HookPoint>().is_err(), "{name}");
        }
    }

    #[test]
    fn names_match_transformer_lens() {
        let p = HookPoint::Block {
            layer: 7,
            site: BlockSite::Pattern,
        };
        assert_eq!(p.to_string(), "blocks.7.attn.hook_pattern");
        assert_eq!(p.shard_spec(), ShardSpec::Split { dim: 1 });
    }
}
