//! A shard that errs or panics mid-pass: the pass fails quickly with an error naming
//! the rank and the hook, and the model serves the next pass.

mod common;

use std::time::{Duration, Instant};

use common::{batch, rel_error};
use flexmodel::tiny::tiny_checkpoint;
use flexmodel::{BlockSite, FlexModel, HookFunction, HookPoint, edits};
use flexmodel_actors::Fault;
use flexmodel_cluster::Layout;

#[test]
fn a_failing_shard_is_named_and_the_model_stays_usable() {
    let checkpoint = tiny_checkpoint(8).unwrap();
    // tp=2 pp=2 dp=2: rank 5 is dp 0, pp 1, tp 1.
    let mut model = FlexModel::build(&checkpoint, Layout::new(2, 2, 2).unwrap()).unwrap();
    // An edit makes every shard of its stage wait on the coordinator mid-pass.
    let edit = HookFunction::new("blocks.3.attn.hook_z").with_edit(edits::scale(1.0));
    model.hooks_mut().register(edit.without_capture()).unwrap();
    model
        .hooks_mut()
        .register(HookFunction::new("unembed.hook_out"))
        .unwrap();
    let tokens = batch(&[&[1, 2, 3, 4], &[5, 6, 7, 8], &[9, 10, 11, 12]]);
    let expected = model.forward(&tokens).unwrap();
    model.store_mut().clear();

    let point = HookPoint::Block {
        layer: 2,
        site: BlockSite::RESID_MID,
    };
    for fault in [Fault::Error, Fault::Panic] {
        model.inject_fault(5, point, fault).unwrap();
        let start = Instant::now();
        let err = model.forward(&tokens).unwrap_err().to_string();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "took {:?}",
            start.elapsed()
        );
        assert!(
            err.starts_with("rank 5 (dp 0 pp 1 tp 1) failed at hook blocks.2.hook_resid_mid: "),
            "{fault:?}: {err}"
        );
        assert!(err.contains("injected fault"), "{err}");
        assert!(model.store().is_empty(), "a failed pass stores nothing");
        // The next pass works and gives the same result.
        let logits = model.forward(&tokens).unwrap();
        assert!(rel_error(&logits, &expected) < 1e-6);
        model.store_mut().clear();
    }
}

#[test]
fn bad_tokens_are_refused_before_any_shard_runs() {
    let checkpoint = tiny_checkpoint(8).unwrap();
    let mut model = FlexModel::build(&checkpoint, Layout::new(1, 2, 2).unwrap()).unwrap();
    let err = model.forward(batch(&[&[1, 256]])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "token id 256 is outside the vocabulary (size 256)"
    );
    assert!(model.forward(batch(&[&[1, 255]])).is_ok());
}
