//! The hook points of a LLaMA block: TransformerLens's sites, and the Hugging Face
//! modules (`LlamaDecoderLayer`'s) that are points too.

use crate::hooks::{BlockModule, BlockSite, HookKind, ModelPoints, Sizes};

/// Modules of block `i` (after `model.layers.{i}`) whose output (forward) or input
/// (forward-pre) is a hook point.
const MODULES: [BlockModule; 12] = {
    use HookKind::{Forward as Out, ForwardPre as In};
    const fn module(path: &'static str, kind: HookKind, site: BlockSite) -> BlockModule {
        BlockModule { path, kind, site }
    }
    [
        module("", Out, BlockSite::RESID_POST),
        module(".self_attn", Out, BlockSite::ATTN_OUT),
        module(".self_attn.o_proj", Out, BlockSite::ATTN_OUT),
        module(".mlp", Out, BlockSite::MLP_OUT),
        module(".mlp.down_proj", Out, BlockSite::MLP_OUT),
        module(".mlp.gate_proj", Out, BlockSite::MLP_PRE),
        module(".mlp.up_proj", Out, BlockSite::MLP_PRE_LINEAR),
        module("", In, BlockSite::RESID_PRE),
        module(".input_layernorm", In, BlockSite::RESID_PRE),
        module(".post_attention_layernorm", In, BlockSite::RESID_MID),
        module(".mlp.down_proj", In, BlockSite::MLP_POST),
        module(".mlp.act_fn", In, BlockSite::MLP_PRE),
    ]
};

/// The hook points of a LLaMA model of `n_layers` blocks: TransformerLens's sites in
/// each of them.
pub(super) fn points(n_layers: usize, sizes: Sizes) -> ModelPoints {
    ModelPoints::new(n_layers, &BlockSite::TRANSFORMER_LENS, sizes, &MODULES)
}

#[cfg(test)]
mod tests {
    use crate::hooks::{BlockSite, HookCatalog, HookKind, HookPoint};
    use crate::models::ModelSpec;
    use crate::tiny::tiny_config;

    #[test]
    fn module_outputs_and_inputs_are_hook_points() {
        let c = HookCatalog::new(tiny_config().points());
        let (out, input) = (HookKind::Forward, HookKind::ForwardPre);
        let block = |layer, site| HookPoint::Block { layer, site };
        for (name, kind, point) in [
            ("model.layers.3.mlp", out, block(3, BlockSite::MLP_OUT)),
            ("model.layers.3", input, block(3, BlockSite::RESID_PRE)),
            ("model.layers.3", out, block(3, BlockSite::RESID_POST)),
            (
                "model.layers.1.mlp.down_proj",
                input,
                block(1, BlockSite::MLP_POST),
            ),
            ("lm_head", out, HookPoint::UnembedOut),
        ] {
            assert_eq!(c.resolve(name, kind).unwrap(), [point], "{name}");
        }
    }
}
