//! The hook points of a Gemma 3 block: TransformerLens's sites, the query and key
//! norms, and the norms after attention and after the MLP (`ln1_post`, `ln2_post`), in
//! the order TransformerLens's Gemma block reaches them; and the Hugging Face modules
//! (`Gemma3DecoderLayer`'s) that are points too.

use crate::hooks::site::Size::{Batch as B, DModel, One, Seq as T};
use crate::hooks::{BlockModule, BlockSite, HookKind, ModelPoints, SiteSpec, Sizes};

/// `√(mean(x²) + ε)` of the attention's output, the divisor of the norm after
/// attention (Hugging Face's `post_attention_layernorm`).
pub const LN1_POST_SCALE: BlockSite =
    BlockSite(&SiteSpec::new("ln1_post.hook_scale", &[B, T, One]));
/// The attention's output over its RMS, before the weight of the norm after attention.
pub const LN1_POST_NORMALIZED: BlockSite =
    BlockSite(&SiteSpec::new("ln1_post.hook_normalized", &[B, T, DModel]));
/// `√(mean(x²) + ε)` of the MLP's output, the divisor of the norm after the MLP
/// (`post_feedforward_layernorm`).
pub const LN2_POST_SCALE: BlockSite =
    BlockSite(&SiteSpec::new("ln2_post.hook_scale", &[B, T, One]));
/// The MLP's output over its RMS, before the weight of the norm after the MLP.
pub const LN2_POST_NORMALIZED: BlockSite =
    BlockSite(&SiteSpec::new("ln2_post.hook_normalized", &[B, T, DModel]));

/// Every site of a Gemma 3 block, in forward order.
const SITES: [BlockSite; 33] = [
    BlockSite::RESID_PRE,
    BlockSite::LN1_SCALE,
    BlockSite::LN1_NORMALIZED,
    BlockSite::Q_INPUT,
    BlockSite::K_INPUT,
    BlockSite::V_INPUT,
    BlockSite::Q,
    BlockSite::K,
    BlockSite::V,
    BlockSite::Q_NORM_SCALE,
    BlockSite::Q_NORM_NORMALIZED,
    BlockSite::K_NORM_SCALE,
    BlockSite::K_NORM_NORMALIZED,
    BlockSite::ROT_Q,
    BlockSite::ROT_K,
    BlockSite::ATTN_SCORES,
    BlockSite::PATTERN,
    BlockSite::Z,
    BlockSite::RESULT,
    LN1_POST_SCALE,
    LN1_POST_NORMALIZED,
    BlockSite::ATTN_OUT,
    BlockSite::RESID_MID,
    BlockSite::MLP_IN,
    BlockSite::LN2_SCALE,
    BlockSite::LN2_NORMALIZED,
    BlockSite::MLP_PRE,
    BlockSite::MLP_PRE_LINEAR,
    BlockSite::MLP_POST,
    LN2_POST_SCALE,
    LN2_POST_NORMALIZED,
    BlockSite::MLP_OUT,
    BlockSite::RESID_POST,
];

/// Modules of block `i` (after `model.layers.{i}`) whose output (forward) or input
/// (forward-pre) is a hook point. Gemma's attention and MLP modules return what its
/// norms after them take, which no TransformerLens point is: the norms' outputs are.
const MODULES: [BlockModule; 10] = {
    use HookKind::{Forward as Out, ForwardPre as In};
    const fn module(path: &'static str, kind: HookKind, site: BlockSite) -> BlockModule {
        BlockModule { path, kind, site }
    }
    [
        module("", Out, BlockSite::RESID_POST),
        module(".post_attention_layernorm", Out, BlockSite::ATTN_OUT),
        module(".post_feedforward_layernorm", Out, BlockSite::MLP_OUT),
        module(".mlp.gate_proj", Out, BlockSite::MLP_PRE),
        module(".mlp.up_proj", Out, BlockSite::MLP_PRE_LINEAR),
        module("", In, BlockSite::RESID_PRE),
        module(".input_layernorm", In, BlockSite::RESID_PRE),
        module(".pre_feedforward_layernorm", In, BlockSite::RESID_MID),
        module(".mlp.down_proj", In, BlockSite::MLP_POST),
        module(".mlp.act_fn", In, BlockSite::MLP_PRE),
    ]
};

/// The hook points of a Gemma 3 model of `n_layers` blocks.
pub(super) fn points(n_layers: usize, sizes: Sizes) -> ModelPoints {
    ModelPoints::new(n_layers, &SITES, sizes, &MODULES)
}
