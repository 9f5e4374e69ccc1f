//! Every layout gives the single-shard results: every hook point, edited runs, and the
//! number of edit calls.

mod common;

use std::collections::BTreeMap;

use candle_core::Tensor;
use common::{batch, rel_error, take_last_calls};
use flexmodel::tiny::tiny_checkpoint;
use flexmodel::{Checkpoint, FlexModel, HookFunction, edits};
use flexmodel_cluster::Layout;

const TOLERANCE: f64 = 1e-4;

/// `(tp, pp, dp)` as in the issue; [`Layout::new`] takes `(dp, pp, tp)`.
fn layout(tp: usize, pp: usize, dp: usize) -> Layout {
    Layout::new(dp, pp, tp).unwrap()
}

/// Logits and every hook point's capture of one pass, with `setup` registering edits.
fn run(
    checkpoint: &Checkpoint,
    layout: Layout,
    tokens: &Tensor,
    setup: impl Fn(&mut FlexModel),
) -> (Tensor, BTreeMap<String, Tensor>, FlexModel) {
    let mut model = FlexModel::build(checkpoint, layout).unwrap();
    setup(&mut model);
    model.hooks_mut().register(HookFunction::new("*")).unwrap();
    let logits = model.forward(tokens).unwrap();
    let captured = take_last_calls(&mut model);
    (logits, captured, model)
}

/// The worst relative error over every point of a sharded run against the single run.
fn worst_error(
    single: &(Tensor, BTreeMap<String, Tensor>),
    sharded: &(Tensor, BTreeMap<String, Tensor>),
) -> f64 {
    assert_eq!(single.1.len(), sharded.1.len(), "every point captured");
    let mut worst = rel_error(&sharded.0, &single.0);
    for (name, expected) in &single.1 {
        let err = rel_error(&sharded.1[name], expected);
        assert!(err <= TOLERANCE, "{name}: relative error {err:.3e}");
        worst = worst.max(err);
    }
    worst
}

fn tiny_tokens() -> Tensor {
    batch(&[
        &[5, 17, 200, 3, 99, 1],
        &[1, 2, 3, 4, 5, 6],
        &[250, 0, 7, 7, 7, 9],
    ])
}

#[test]
fn tiny_model_every_layout_matches_the_single_shard() {
    let checkpoint = tiny_checkpoint(21).unwrap();
    let tokens = tiny_tokens();
    let (l, c, _) = run(&checkpoint, Layout::SINGLE, &tokens, |_| {});
    let single = (l, c);
    for (tp, pp, dp) in [
        (2, 1, 1),
        (4, 1, 1),
        (2, 2, 2),
        (1, 3, 1),
        (1, 1, 2),
        (8, 1, 1),
        (2, 4, 3),
    ] {
        let (l, c, _) = run(&checkpoint, layout(tp, pp, dp), &tokens, |_| {});
        let worst = worst_error(&single, &(l, c));
        eprintln!("tiny tp={tp} pp={pp} dp={dp}: worst relative error {worst:.2e}");
    }
}

#[test]
fn edits_run_once_per_call_on_the_full_tensor_in_every_layout() {
    let checkpoint = tiny_checkpoint(22).unwrap();
    let tokens = tiny_tokens();
    let edit = |model: &mut FlexModel| {
        let hooks = model.hooks_mut();
        hooks
            .register(
                HookFunction::new("blocks.1.attn.hook_z")
                    .with_edit(edits::zero_head(5))
                    .without_capture(),
            )
            .unwrap();
        hooks
            .register(
                HookFunction::new("blocks.2.attn.hook_k")
                    .with_edit(edits::zero_head(1))
                    .without_capture(),
            )
            .unwrap();
        let counting = HookFunction::new("blocks.3.hook_mlp_out")
            .without_capture()
            .with_edit(|ctx, x| {
                let shapes = ctx
                    .save()
                    .get_or_insert_with("calls", Vec::<Vec<usize>>::new)?;
                shapes.push(x.dims().to_vec());
                Ok((x * 0.5)?)
            });
        hooks.register(counting).unwrap();
    };
    let (l, c, mut model) = run(&checkpoint, Layout::SINGLE, &tokens, edit);
    assert_eq!(
        model
            .save_ctx()
            .get::<Vec<Vec<usize>>>("calls")
            .unwrap()
            .unwrap(),
        &[vec![3, 6, 64]]
    );
    let single = (l, c);
    for (tp, pp, dp) in [(2, 1, 1), (4, 1, 1), (2, 2, 2), (1, 1, 2), (8, 2, 1)] {
        let (l, c, mut model) = run(&checkpoint, layout(tp, pp, dp), &tokens, edit);
        let calls = model
            .save_ctx()
            .get::<Vec<Vec<usize>>>("calls")
            .unwrap()
            .unwrap()
            .clone();
        assert_eq!(
            calls,
            [vec![3, 6, 64]],
            "tp={tp} pp={pp} dp={dp}: once, on the full batch"
        );
        let worst = worst_error(&single, &(l, c));
        eprintln!("tiny edited tp={tp} pp={pp} dp={dp}: worst relative error {worst:.2e}");
    }
}
