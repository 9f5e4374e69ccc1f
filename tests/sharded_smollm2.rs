//! SmolLM2 split over the layouts of the sharded-execution issue: every hook point and
//! edited run equal the single-shard run; shards hold their share of the weights.

mod common;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use common::{
    assert_matches_single, batch, register_smollm2_edits, rel_error, smollm2, smollm2_tokens,
    take_last_calls,
};

/// Relative error allowed between a layout and the single shard at every point: the
/// worst measured is 3.1e-6 (tp=3).
const TOLERANCE: f64 = 2e-5;
/// The same for gradients: the worst measured is 3.4e-5 (tp=3, edited).
const GRADIENT_TOLERANCE: f64 = 1e-4;
use flexmodel::{FlexModel, HookFunction};
use flexmodel_cluster::Layout;

/// `(tp, pp, dp)` as in the issue; [`Layout::new`] takes `(dp, pp, tp)`.
fn layout(tp: usize, pp: usize, dp: usize) -> Layout {
    Layout::new(dp, pp, tp).unwrap()
}

/// Logits and the last capture of every point, with or without the edits.
fn run(layout: Layout, edited: bool) -> (Tensor, BTreeMap<String, Tensor>) {
    let (checkpoint, _) = smollm2();
    let mut model = FlexModel::build(checkpoint, layout).unwrap();
    if edited {
        register_smollm2_edits(&mut model);
    }
    model.hooks_mut().register(HookFunction::new("*")).unwrap();
    let logits = model.forward(smollm2_tokens()).unwrap();
    let captured = take_last_calls(&mut model);
    (logits, captured)
}

#[test]
fn every_layout_matches_the_single_shard_at_every_point_plain_and_edited() {
    for edited in [false, true] {
        let single = run(Layout::SINGLE, edited);
        for (tp, pp, dp) in [(3, 1, 1), (1, 3, 1), (1, 1, 2), (3, 2, 2), (3, 3, 2)] {
            let (logits, mut captured) = run(layout(tp, pp, dp), edited);
            captured.insert("logits".into(), logits);
            let mut expected = single.1.clone();
            expected.insert("logits".into(), single.0.clone());
            let label = format!("smollm2 tp={tp} pp={pp} dp={dp} edited={edited}");
            // Without tensor parallelism the floats are the same, in the same order.
            assert_matches_single(&label, &expected, &captured, TOLERANCE, tp == 1);
        }
    }
}

#[test]
fn a_random_edit_is_drawn_once_per_call_and_every_shard_continues_with_that_draw() {
    let (checkpoint, _) = smollm2();
    let mut model = FlexModel::build(checkpoint, layout(3, 2, 2)).unwrap();
    let noisy = HookFunction::new("blocks.20.hook_mlp_out").with_edit(|ctx, x| {
        let noise = Tensor::randn(0f32, 1.0, x.shape(), x.device())?;
        ctx.save()
            .get_or_insert_with("draws", Vec::<Tensor>::new)?
            .push(noise.clone());
        Ok((x + noise)?)
    });
    model.hooks_mut().register(noisy).unwrap();
    model
        .hooks_mut()
        .register(HookFunction::new("blocks.20.hook_resid_*"))
        .unwrap();
    model.forward(smollm2_tokens()).unwrap();
    let draws = model
        .save_ctx()
        .get::<Vec<Tensor>>("draws")
        .unwrap()
        .unwrap()
        .clone();
    assert_eq!(draws.len(), 1, "one draw for the one call");
    let store = model.store();
    let mlp_out = store.last("blocks.20.hook_mlp_out").unwrap();
    let expected =
        ((store.last("blocks.20.hook_resid_mid").unwrap() + mlp_out).unwrap() + &draws[0]).unwrap();
    // Every replica and rank continued with the same draw.
    assert!(rel_error(store.last("blocks.20.hook_resid_post").unwrap(), &expected) < 1e-5);
}

#[test]
fn each_shard_holds_its_share_of_the_weights() {
    let (checkpoint, single) = smollm2();
    let total = single.weight_bytes() as f64;
    let model = FlexModel::build(checkpoint, layout(3, 1, 1)).unwrap();
    let bytes = model.shard_weight_bytes();
    eprintln!(
        "SmolLM2 weights {:.1} MB; tp=3 shards hold {:?} MB",
        total / 1e6,
        bytes.iter().map(|b| *b as f64 / 1e6).collect::<Vec<_>>()
    );
    for b in &bytes {
        let share = *b as f64 / total;
        assert!(
            (share - 1.0 / 3.0).abs() < 0.01,
            "a tp=3 shard holds {share:.4} of the weights"
        );
    }
    let model = FlexModel::build(checkpoint, layout(3, 3, 1)).unwrap();
    let bytes = model.shard_weight_bytes();
    for b in &bytes {
        assert!(
            (*b as f64) < 0.2 * total,
            "a tp=3 pp=3 shard holds {b} bytes"
        );
    }
}

#[test]
fn layouts_that_cannot_split_smollm2_are_refused_with_the_reason() {
    let (checkpoint, _) = smollm2();
    let err = FlexModel::build(checkpoint, layout(2, 1, 1))
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        err,
        "bad layout: tp=2 does not divide num_attention_heads = 9"
    );
    let err = FlexModel::build(checkpoint, layout(1, 31, 1))
        .err()
        .unwrap()
        .to_string();
    assert_eq!(err, "bad layout: pp=31 exceeds the model's 30 layers");
    let two = FlexModel::build(checkpoint, layout(1, 1, 2)).unwrap();
    let mut two = two;
    let err = two.forward(batch(&[&[1, 2, 3]])).unwrap_err().to_string();
    assert!(
        err.contains("a batch of 1 sequences cannot be split over 2 data-parallel replicas"),
        "{err}"
    );
    let _ = Device::Cpu;
}

#[test]
fn every_layout_gives_the_single_shard_gradients_at_every_point() {
    let (checkpoint, _) = smollm2();
    let run = |layout: Layout| {
        let mut model = FlexModel::build(checkpoint, layout).unwrap();
        register_smollm2_edits(&mut model);
        model
            .hooks_mut()
            .register(HookFunction::backward("*"))
            .unwrap();
        let (_, loss) = model.forward_backward(smollm2_tokens()).unwrap();
        let grads: BTreeMap<String, Tensor> = take_last_calls(&mut model);
        (loss, grads)
    };
    let (loss, single) = run(Layout::SINGLE);
    assert_eq!(
        single.keys().filter(|n| n.ends_with("_grad")).count(),
        common::gradient_points(30)
    );
    for (tp, pp, dp) in [(3, 1, 1), (1, 3, 1), (1, 1, 2), (3, 2, 2), (3, 3, 2)] {
        let (sharded_loss, grads) = run(layout(tp, pp, dp));
        assert!(
            (sharded_loss - loss).abs() < 1e-5 * loss,
            "loss {sharded_loss} vs {loss}"
        );
        let label = format!("smollm2 gradients tp={tp} pp={pp} dp={dp} (edited)");
        assert_matches_single(&label, &single, &grads, GRADIENT_TOLERANCE, tp == 1);
    }
}

#[test]
fn tied_embedding_gradients_sum_both_uses_across_pipeline_stages() {
    let (checkpoint, _) = smollm2();
    let grads = |layout: Layout| {
        let mut model = FlexModel::build(checkpoint, layout).unwrap();
        model.forward_backward(smollm2_tokens()).unwrap();
        [
            "model.embed_tokens.weight",
            "model.layers.29.mlp.down_proj.weight",
            "model.norm.weight",
        ]
        .map(|name| model.parameter_grad(name).unwrap())
    };
    let single = grads(Layout::SINGLE);
    for (tp, pp, dp) in [(1, 3, 1), (3, 2, 2)] {
        for (sharded, expected) in grads(layout(tp, pp, dp)).iter().zip(&single) {
            let err = rel_error(sharded, expected);
            assert!(err < 1e-4, "tp={tp} pp={pp} dp={dp}: {err:.3e}");
        }
    }
}
