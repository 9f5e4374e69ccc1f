//! One pass that exercises everything a placement must get right — edits on values
//! and on gradients, a trainable, every capture, parameter gradients, a second pass —
//! for comparing placements with each other and with the single shard.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};
use flexmodel::models::LlamaConfig;
use flexmodel::runtime::{Placement, Processes};
use flexmodel::tiny::{random_checkpoint, tiny_checkpoint, tiny_config};
use flexmodel::{Checkpoint, FlexModel, HookFunction, edits};
use flexmodel_cluster::Layout;

use super::{batch, take_last_calls};

/// The tiny model written to a directory the workers open, and opened from it.
pub fn tiny_on_disk(seed: u64) -> (tempfile::TempDir, Checkpoint) {
    on_disk(tiny_checkpoint(seed).unwrap())
}

/// A tiny model whose heads, key/value heads, MLP and vocabulary split three ways (12,
/// 6, 192 and 264), for tp=3, on disk as [`tiny_on_disk`] puts it.
pub fn tiny_for_tp3_on_disk(seed: u64) -> (tempfile::TempDir, Checkpoint) {
    let config = LlamaConfig {
        vocab_size: 264,
        d_model: 96,
        n_heads: 12,
        n_kv_heads: 6,
        ..tiny_config()
    };
    on_disk(random_checkpoint(config, seed).unwrap())
}

fn on_disk(checkpoint: Checkpoint) -> (tempfile::TempDir, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    checkpoint.save_hf_dir(dir.path()).unwrap();
    let checkpoint = Checkpoint::open(dir.path().to_str().unwrap()).unwrap();
    (dir, checkpoint)
}

pub fn parity_tokens() -> Tensor {
    batch(&[
        &[5, 17, 200, 3, 99, 1],
        &[1, 2, 3, 4, 5, 6],
        &[250, 0, 7, 7, 7, 9],
    ])
}

/// Registers edits on values and on gradients, and a trainable steering vector.
pub fn register_edits(model: &mut FlexModel, steer: &Var) {
    model.register_trainable("steer", steer).unwrap();
    let hooks = model.hooks_mut();
    hooks
        .register(HookFunction::new("blocks.1.attn.hook_z").with_edit(edits::zero_head(5)))
        .unwrap();
    hooks
        .register(HookFunction::new("blocks.2.attn.hook_k").with_edit(edits::zero_head(1)))
        .unwrap();
    let v = steer.as_tensor().clone();
    let steering = HookFunction::new("blocks.2.hook_resid_post")
        .with_edit(move |_, x| Ok(x.broadcast_add(&v)?));
    hooks.register(steering).unwrap();
    hooks
        .register(HookFunction::backward("blocks.0.hook_resid_mid").with_edit(edits::scale(0.5)))
        .unwrap();
}

/// Everything a pass produces: the logits, the loss, every capture (values and
/// gradients), the trainable's gradient and two parameters' gradients.
pub fn everything(
    checkpoint: &Checkpoint,
    layout: Layout,
    placement: &Placement,
) -> BTreeMap<String, Tensor> {
    let mut model = FlexModel::build_on(checkpoint, layout, placement).unwrap();
    let d_model = checkpoint.config.d_model() as f32;
    let start = Tensor::arange(0f32, d_model, &candle_core::Device::Cpu).unwrap();
    let steer = Var::from_tensor(&(start.sin().unwrap() * 0.1).unwrap()).unwrap();
    register_edits(&mut model, &steer);
    model.hooks_mut().register(HookFunction::new("*")).unwrap();
    model
        .hooks_mut()
        .register(HookFunction::backward("*"))
        .unwrap();
    let (logits, loss) = model.forward_backward(parity_tokens()).unwrap();
    let mut all = take_last_calls(&mut model);
    all.insert("logits".into(), logits);
    all.insert(
        "loss".into(),
        Tensor::new(&[loss], &candle_core::Device::Cpu).unwrap(),
    );
    all.insert("steer_grad".into(), model.trainable_grad("steer").unwrap());
    for name in [
        "model.layers.1.self_attn.o_proj.weight",
        "model.embed_tokens.weight",
    ] {
        all.insert(format!("{name}.grad"), model.parameter_grad(name).unwrap());
        all.insert(name.into(), model.parameter(name).unwrap());
    }
    // A plain forward pass afterwards, with the same hooks.
    model.store_mut().clear();
    let again = model.forward(parity_tokens()).unwrap();
    all.insert("logits_again".into(), again);
    all
}

/// One worker process per rank, of this build's `flexmodel`, one compute thread each.
pub fn worker_processes() -> Placement {
    Placement::Processes(Processes {
        program: Some(crate::common::flexmodel_binary()),
        threads: Some(1),
        token_file: None,
    })
}
