//! Asking only for what is needed (`FlexModel::forward_scoped`, `--stop-at-layer`,
//! `--logits`): a pass stopped at layer N returns the residual stream there and runs no
//! later stage; `--logits last` returns the last position's logits and `none` none; in
//! every layout and in worker processes the results are the whole pass's; hooks by exact
//! name at points such a pass does not compute are refused, patterns skip them.

mod common;

use candle_core::Tensor;
use common::cli::{flexmodel, succeeded, tiny_dir};
use common::parity::{parity_tokens, tiny_on_disk};
use common::rel_error;
use flexmodel::runtime::Placement;
use flexmodel::text::TokenBatch;
use flexmodel::{
    BlockSite, Error, Fault, FlexModel, HookFunction, HookPoint, Layout, Logits, PassScope,
};

/// As in `sharded_parity.rs`: the layouts' worst relative error against the single
/// shard on the tiny model is below 1e-6.
const TOLERANCE: f64 = 5e-6;

fn processes() -> Placement {
    common::parity::worker_processes()
}

fn layouts() -> Vec<(Layout, Placement)> {
    let layout = |dp, pp, tp| Layout::new(dp, pp, tp).unwrap();
    vec![
        (Layout::SINGLE, Placement::Threads),
        (layout(1, 1, 2), Placement::Threads),
        (layout(1, 2, 1), Placement::Threads),
        (layout(2, 2, 2), Placement::Threads),
        (layout(1, 2, 2), processes()),
    ]
}

fn stop_at(n: usize) -> PassScope {
    PassScope {
        stop_at_layer: Some(n),
        ..PassScope::FULL
    }
}

fn logits(logits: Logits) -> PassScope {
    PassScope {
        logits,
        ..PassScope::FULL
    }
}

#[test]
fn a_pass_stopped_at_a_layer_returns_the_residual_stream_there_in_every_layout() {
    let (_dir, checkpoint) = tiny_on_disk(71);
    let tokens = parity_tokens();
    let mut whole = FlexModel::build(&checkpoint, Layout::SINGLE).unwrap();
    whole.hooks_mut().register(HookFunction::new("*")).unwrap();
    whole.forward(&tokens).unwrap();
    let store = whole.store();
    for (layout, placement) in layouts() {
        let mut model = FlexModel::build_on(&checkpoint, layout, &placement).unwrap();
        // Layer 1 ends the first of two stages, layer 2 starts the second; 0 is the
        // embedding and 4 the last block's output.
        for n in [0, 2, 3, 4] {
            let expected = match n {
                0 => store.last("hook_embed").unwrap(),
                n => store
                    .last(&format!("blocks.{}.hook_resid_post", n - 1))
                    .unwrap(),
            };
            model.hooks_mut().clear();
            model.store_mut().clear();
            model.hooks_mut().register(HookFunction::new("*")).unwrap();
            let out = model.forward_scoped(&tokens, stop_at(n)).unwrap().unwrap();
            let error = rel_error(&out, expected);
            assert!(error < TOLERANCE, "{layout} stop at {n}: {error:.2e}");
            // `*` captured the points before the stop only: tokens, the embedding and
            // 21 per block.
            assert_eq!(model.store().len(), 2 + 21 * n, "{layout} stop at {n}");
        }
        let late = "blocks.2.hook_resid_pre";
        model.hooks_mut().register(HookFunction::new(late)).unwrap();
        let err = model.forward_scoped(&tokens, stop_at(2)).unwrap_err();
        assert!(matches!(err, Error::PointNotInPass { .. }), "{err:?}");
        assert!(
            err.to_string().contains(
                "blocks.2.hook_resid_pre is not computed by this pass: the pass stops at layer 2"
            ),
            "{err}"
        );
        let err = model.forward_scoped(&tokens, stop_at(5)).unwrap_err();
        assert!(
            err.to_string().contains("beyond the model's 4 layers"),
            "{err}"
        );
    }
}

#[test]
fn the_stages_after_the_stop_do_not_run() {
    let (_dir, checkpoint) = tiny_on_disk(72);
    let mut model = FlexModel::build(&checkpoint, Layout::new(1, 2, 1).unwrap()).unwrap();
    let late = HookPoint::Block {
        layer: 3,
        site: BlockSite::RESID_POST,
    };
    // Rank 1 (the second stage) would fail at layer 3 in the next pass, had it run.
    model.inject_fault(1, late, Fault::Error).unwrap();
    let tokens = parity_tokens();
    assert!(model.forward_scoped(&tokens, stop_at(2)).is_ok());
    model.inject_fault(1, late, Fault::Error).unwrap();
    let err = model.forward(&tokens).unwrap_err().to_string();
    assert!(err.contains("rank 1"), "{err}");
}

#[test]
fn the_last_positions_logits_or_none_in_every_layout_with_ragged_batches() {
    let (_dir, checkpoint) = tiny_on_disk(73);
    let ragged =
        TokenBatch::left_padded(&[vec![5u32, 17, 200, 3, 99], vec![1, 2], vec![9, 8, 7]]).unwrap();
    let mut whole = FlexModel::build(&checkpoint, Layout::SINGLE).unwrap();
    for batch in [TokenBatch::from(parity_tokens()), ragged] {
        let all = whole.forward(batch.clone()).unwrap();
        let t = all.dim(1).unwrap();
        let last = all.narrow(1, t - 1, 1).unwrap();
        for (layout, placement) in layouts() {
            let mut model = FlexModel::build_on(&checkpoint, layout, &placement).unwrap();
            model.hooks_mut().register(HookFunction::new("*")).unwrap();
            let out = model.forward_scoped(batch.clone(), logits(Logits::Last));
            let out: Tensor = out.unwrap().unwrap();
            assert_eq!(out.dims(), [all.dim(0).unwrap(), 1, 256]);
            assert!(rel_error(&out, &last) < TOLERANCE, "{layout}");
            // Every point but the logits was captured.
            assert!(model.store().last("ln_final.hook_normalized").is_some());
            assert!(model.store().last("unembed.hook_out").is_none());
            model.store_mut().clear();
            let none = model.forward_scoped(batch.clone(), logits(Logits::None));
            assert!(none.unwrap().is_none(), "{layout}");
            assert!(model.store().last("ln_final.hook_scale").is_some());
            model
                .hooks_mut()
                .register(HookFunction::new("unembed.hook_out"))
                .unwrap();
            let err = model
                .forward_scoped(batch.clone(), logits(Logits::None))
                .unwrap_err();
            assert!(err.to_string().contains("(--logits none)"), "{err}");
        }
    }
}

#[test]
fn capture_stopped_at_a_layer_writes_only_what_the_pass_computed() {
    let model = tiny_dir(74);
    let model = model.path().to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("stopped.safetensors");
    let path = path.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["capture", "--model", model, "--prompt", "Hello there"];
        args.extend(["--hook", "blocks.*.hook_resid_post", "--out", path]);
        args.extend(extra);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let args = run(&["--stop-at-layer", "2", "--procs", "--pp", "2"]);
    succeeded(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let written = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    let mut names: Vec<&String> = written.keys().collect();
    names.sort();
    assert_eq!(
        names,
        ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
        "no later point and no loss"
    );
    let args = run(&["--logits", "none", "--grad"]);
    let failed = flexmodel(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("--grad needs the loss"), "{stderr}");
    let mut args = run(&["--stop-at-layer", "1"]);
    args[6] = "blocks.3.hook_resid_post".into();
    let failed = flexmodel(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("blocks.3.hook_resid_post is not computed by this pass"),
        "{stderr}"
    );
}
