//! SmolLM2 with every rank a worker process at (tp, pp, dp) = (3, 2, 2): every hook
//! point, plain and edited, and every gradient of an edited pass equal the single shard.

mod common;

use std::collections::BTreeMap;

use candle_core::Tensor;
use common::{assert_matches_single, batch, smollm2, take_last_calls};
use flexmodel::runtime::{Placement, Processes};
use flexmodel::{FlexModel, HookFunction, edits};
use flexmodel_cluster::Layout;

/// As in `sharded_smollm2.rs`: the worst measured in-process is 3.1e-6 (tp=3).
const TOLERANCE: f64 = 2e-5;
/// As in `sharded_smollm2.rs`: the worst measured in-process is 3.4e-5 (tp=3, edited).
const GRADIENT_TOLERANCE: f64 = 1e-4;

fn tokens() -> Tensor {
    batch(&[
        &[504, 3575, 282, 4649, 314, 7042],
        &[1, 9690, 198, 2683, 359, 30],
        &[19556, 2087, 260, 2463, 30, 2],
    ])
}

fn register_edits(model: &mut FlexModel) {
    let hooks = model.hooks_mut();
    hooks
        .register(HookFunction::new("blocks.3.attn.hook_z").with_edit(edits::zero_head(4)))
        .unwrap();
    hooks
        .register(HookFunction::new("blocks.12.attn.hook_pattern").with_edit(edits::zero_head(7)))
        .unwrap();
    hooks
        .register(HookFunction::new("blocks.20.hook_mlp_out").with_edit(edits::scale(0.5)))
        .unwrap();
}

/// Every point of a plain pass, of an edited pass, and every gradient (and the loss) of
/// an edited forward and backward pass, each with the logits.
fn passes(placement: &Placement, layout: Layout) -> [BTreeMap<String, Tensor>; 3] {
    let (checkpoint, _) = smollm2();
    let mut model = FlexModel::build_on(checkpoint, layout, placement).unwrap();
    model.hooks_mut().register(HookFunction::new("*")).unwrap();
    let forward = |model: &mut FlexModel| {
        let logits = model.forward(&tokens()).unwrap();
        let mut all = take_last_calls(model);
        all.insert("logits".into(), logits);
        all
    };
    let plain = forward(&mut model);
    register_edits(&mut model);
    let edited = forward(&mut model);
    model.hooks_mut().clear();
    register_edits(&mut model);
    model
        .hooks_mut()
        .register(HookFunction::backward("*"))
        .unwrap();
    let (_, loss) = model.forward_backward(&tokens()).unwrap();
    let mut grads = take_last_calls(&mut model);
    grads.insert(
        "loss".into(),
        Tensor::new(&[loss], &candle_core::Device::Cpu).unwrap(),
    );
    [plain, edited, grads]
}

#[test]
fn smollm2_in_twelve_worker_processes_matches_the_single_shard() {
    let single = passes(&Placement::Threads, Layout::SINGLE);
    let processes = Placement::Processes(Processes {
        program: Some(env!("CARGO_BIN_EXE_flexmodel").into()),
        threads: Some(1),
    });
    let layout = Layout::new(2, 2, 3).unwrap();
    let procs = passes(&processes, layout);
    assert_eq!(
        single[2].keys().filter(|n| n.ends_with("_grad")).count(),
        common::gradient_points(30)
    );
    assert_matches_single(
        "smollm2 procs tp=3 pp=2 dp=2",
        &single[0],
        &procs[0],
        TOLERANCE,
        false,
    );
    assert_matches_single(
        "smollm2 procs edited",
        &single[1],
        &procs[1],
        TOLERANCE,
        false,
    );
    assert_matches_single(
        "smollm2 procs gradients (edited)",
        &single[2],
        &procs[2],
        GRADIENT_TOLERANCE,
        false,
    );
}
