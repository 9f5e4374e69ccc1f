//! Every layout gives the single-shard results: every hook point, edited runs, and the
//! number of edit calls.

mod common;

use std::collections::BTreeMap;

use candle_core::Tensor;
use common::{assert_matches_single, batch, take_last_calls};
use flexmodel::tiny::tiny_checkpoint;
use flexmodel::{Checkpoint, FlexModel, HookFunction, edits};
use flexmodel_cluster::Layout;

/// Relative error allowed between a layout and the single shard: the worst measured is
/// 7.8e-7 (tiny model, tp=2 pp=2 dp=2, edited).
const TOLERANCE: f64 = 5e-6;

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

/// The worst relative error over every point (and the logits) of a sharded run against
/// the single run; pipeline-only layouts are bit-identical.
fn worst_error(
    label: &str,
    layout: Layout,
    single: &(Tensor, BTreeMap<String, Tensor>),
    sharded: &(Tensor, BTreeMap<String, Tensor>),
) -> f64 {
    let exact = layout.tp() * layout.dp() == 1;
    let with_logits = |(logits, points): &(Tensor, BTreeMap<String, Tensor>)| {
        let mut all = points.clone();
        all.insert("logits".into(), logits.clone());
        all
    };
    let (single, sharded) = (with_logits(single), with_logits(sharded));
    assert_matches_single(label, &single, &sharded, TOLERANCE, exact)
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
        let l = layout(tp, pp, dp);
        let (logits, c, _) = run(&checkpoint, l, &tokens, |_| {});
        worst_error(&format!("tiny {l}"), l, &single, &(logits, c));
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
        let label = format!("tiny edited tp={tp} pp={pp} dp={dp}");
        worst_error(&label, layout(tp, pp, dp), &single, &(l, c));
    }
}
