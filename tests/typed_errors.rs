//! Every failure has its own error kind, checked where it is raised: layouts, batches,
//! shard failures (forward and backward), edits under every path, arguments of public
//! functions, and validation before any weight is read.

mod common;

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use common::batch;
use flexmodel::analysis::induction::repeated_random_tokens;
use flexmodel::analysis::patching::patch_residual_stream;
use flexmodel::runtime::sharding::LayoutProblem;
use flexmodel::tiny::{tiny_checkpoint, tiny_config};
use flexmodel::{BlockSite, Error, FlexModel, HookFunction, HookPoint, Layout, SaveContext};
use flexmodel_actors::{FailedAt, FailureKind, Fault};

fn tokens() -> Tensor {
    batch(&[&[1, 2, 3, 4], &[5, 6, 7, 8], &[9, 10, 11, 12]])
}

#[test]
fn a_huge_layout_is_refused_at_once_without_starting_anything() {
    let start = Instant::now();
    let err = Layout::new(1_000_000, 1, 1).unwrap_err();
    assert!(
        matches!(err, flexmodel_cluster::Error::TooManyRanks { .. }),
        "{err:?}"
    );
    // Within the rank bound but far beyond this machine: refused before any weight is read.
    let checkpoint = tiny_checkpoint(0).unwrap();
    let mut config = tiny_config();
    config.d_mlp = 1 << 20; // 4 layers × 3 × 64 × 2^20 f32 weights = 3.2 GB a replica
    let big = flexmodel::Checkpoint {
        config: config.into(),
        weights: checkpoint.weights,
        tokenizer: checkpoint.tokenizer,
    };
    let err = FlexModel::build(&big, Layout::new(4096, 1, 1).unwrap())
        .err()
        .unwrap();
    assert!(
        matches!(err, Error::BadLayout(LayoutProblem::DoesNotFit { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("GB of memory is available"),
        "{err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_layout_that_cannot_split_the_model_is_refused_before_the_weights_are_read() {
    let checkpoint = tiny_checkpoint(0).unwrap();
    // The tiny model's weights are in memory, so a missing tensor would only show when
    // they are read: the layout error comes first.
    let broken = flexmodel::Checkpoint {
        config: checkpoint.config.clone(),
        weights: Box::new(flexmodel::weights::TensorMap::default()),
        tokenizer: checkpoint.tokenizer,
    };
    let err = FlexModel::build(&broken, Layout::new(1, 1, 3).unwrap())
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "bad layout: tp=3 does not divide num_attention_heads = 8"
    );
    assert!(matches!(
        err,
        Error::BadLayout(LayoutProblem::NotDivisible { tp: 3, .. })
    ));
}

#[test]
fn a_batch_smaller_than_the_replicas_is_bad_input_not_a_startup_failure() {
    let checkpoint = tiny_checkpoint(0).unwrap();
    let mut model = FlexModel::build(&checkpoint, Layout::new(2, 1, 1).unwrap()).unwrap();
    let err = model.forward(batch(&[&[1, 2, 3]])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::BatchTooSmall {
                batch: 1,
                replicas: 2
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "a batch of 1 sequences cannot be split over 2 data-parallel replicas"
    );
}

#[test]
fn sequences_longer_than_the_context_are_refused() {
    let checkpoint = tiny_checkpoint(0).unwrap();
    let mut model = FlexModel::build(&checkpoint, Layout::new(1, 2, 1).unwrap()).unwrap();
    let long = Tensor::zeros((1, 513), DType::U32, &Device::Cpu).unwrap();
    let err = model.forward(&long).unwrap_err();
    assert!(
        matches!(
            err,
            Error::SequenceTooLong {
                len: 513,
                context: 512
            }
        ),
        "{err:?}"
    );
}

/// The shard failure inside `err`: rank, where, and the cause's kind.
fn shard_failure(err: &Error) -> (usize, Option<FailedAt>, FailureKind) {
    let Error::Sharded(sharded) = err else {
        panic!("expected a shard failure, got {err:?}");
    };
    match sharded.as_ref() {
        flexmodel_actors::Error::ShardFailed {
            rank, at, cause, ..
        } => (*rank, at.clone(), cause.kind),
        other => panic!("expected a shard failure, got {other:?}"),
    }
}

#[test]
fn a_shard_failure_is_typed_with_rank_hook_and_kind_in_forward_and_backward() {
    let checkpoint = tiny_checkpoint(8).unwrap();
    // tp=2 pp=2 dp=2: rank 5 is dp 0, pp 1, tp 1.
    let mut model = FlexModel::build(&checkpoint, Layout::new(2, 2, 2).unwrap()).unwrap();
    let point = HookPoint::Block {
        layer: 2,
        site: BlockSite::RESID_MID,
    };
    let at = |backward| {
        Some(FailedAt {
            hook: "blocks.2.hook_resid_mid".into(),
            backward,
        })
    };
    for (fault, kind) in [
        (Fault::Error, FailureKind::InjectedFault),
        (Fault::Panic, FailureKind::Panicked),
    ] {
        model.inject_fault(5, point, fault).unwrap();
        let err = model.forward(tokens()).unwrap_err();
        assert_eq!(shard_failure(&err), (5, at(false), kind), "{err}");
    }
    for (fault, kind) in [
        (Fault::ErrorInBackward, FailureKind::InjectedFault),
        (Fault::PanicInBackward, FailureKind::Panicked),
    ] {
        model.inject_fault(5, point, fault).unwrap();
        let start = Instant::now();
        let err = model.forward_backward(tokens()).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(shard_failure(&err), (5, at(true), kind), "{err}");
        assert!(
            err.to_string().starts_with(
                "rank 5 (dp 0 pp 1 tp 1) failed in backward at hook blocks.2.hook_resid_mid: "
            ),
            "{err}"
        );
        // The model serves the next pass.
        model.forward_backward(tokens()).unwrap();
    }
}

/// An edit at `blocks.1.attn.hook_z` that returns a tensor of another shape.
fn shape_changing_edit() -> HookFunction {
    HookFunction::new("blocks.1.attn.hook_z")
        .with_edit(|_, x| Ok(x.narrow(0, 0, 1)?))
        .without_capture()
}

/// An edit that fails with an error of the caller's own.
fn failing_edit() -> HookFunction {
    HookFunction::new("blocks.2.hook_mlp_out")
        .with_edit(|_, _| Err(Error::custom("probe not trained")))
        .without_capture()
}

#[test]
fn an_edits_error_keeps_its_type_on_every_path() {
    let checkpoint = tiny_checkpoint(9).unwrap();
    for layout in [Layout::SINGLE, Layout::new(2, 2, 2).unwrap()] {
        for backward in [false, true] {
            let mut model = FlexModel::build(&checkpoint, layout).unwrap();
            let handle = model.hooks_mut().register(shape_changing_edit()).unwrap();
            let run = |model: &mut FlexModel| match backward {
                true => model.forward_backward(tokens()).map(|_| ()),
                false => model.forward(tokens()).map(|_| ()),
            };
            let err = run(&mut model).unwrap_err();
            assert!(
                matches!(&err, Error::EditChangedTensor { hook, .. } if hook == "blocks.1.attn.hook_z"),
                "{layout} backward={backward}: {err:?}"
            );
            model.hooks_mut().remove(handle).unwrap();
            model.hooks_mut().register(failing_edit()).unwrap();
            let err = run(&mut model).unwrap_err();
            let Error::HookFailed { hook, source } = &err else {
                panic!("{layout} backward={backward}: {err:?}");
            };
            assert_eq!(hook, "blocks.2.hook_mlp_out");
            assert!(matches!(**source, Error::Custom(_)), "{source:?}");
        }
    }
}

#[test]
fn public_functions_check_their_arguments() {
    let err = repeated_random_tokens(2, 8, 0, 0).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                argument: "vocab",
                ..
            }
        ),
        "{err:?}"
    );
    let checkpoint = tiny_checkpoint(3).unwrap();
    let mut model = FlexModel::build(&checkpoint, Layout::SINGLE).unwrap();
    let progress = indicatif::ProgressBar::hidden();
    let err =
        patch_residual_stream(&mut model, &[1, 2, 3], &[1, 5, 3], 256, 7, &progress).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TokenOutOfVocabulary {
                id: 256,
                vocab_size: 256
            }
        ),
        "{err:?}"
    );
    let hooks = model.hooks_mut();
    let err = hooks
        .register(HookFunction::new("hook_embed").tagged(""))
        .unwrap_err();
    assert!(matches!(err, Error::EmptyGroupName), "{err:?}");
    let err = hooks
        .register(HookFunction::new("hook_embed").tagged("all"))
        .unwrap_err();
    assert!(matches!(err, Error::ImplicitGroup), "{err:?}");
    assert!(hooks.is_empty(), "nothing was registered");
    let mut save = SaveContext::default();
    save.insert("seen", 1usize);
    let err = save.get_or_insert_with("seen", Vec::<u8>::new).unwrap_err();
    assert!(matches!(err, Error::SaveContextType { .. }), "{err:?}");
    assert_eq!(
        save.get::<usize>("seen").unwrap(),
        Some(&1),
        "not overwritten"
    );
}

#[test]
fn a_second_subscriber_is_a_telemetry_error_not_bad_input() {
    let filter = || tracing_subscriber::EnvFilter::new("off");
    let first = flexmodel::telemetry::init(filter(), None).unwrap();
    let err = flexmodel::telemetry::init(filter(), None).err().unwrap();
    assert!(
        matches!(
            err,
            flexmodel::telemetry::TelemetryError::SubscriberAlreadySet(_)
        ),
        "{err:?}"
    );
    let err: Error = err.into();
    assert!(matches!(err, Error::Telemetry(_)), "{err:?}");
    drop(first);
}
