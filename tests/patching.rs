//! Activation patching: exact properties on a random model, and equality across layouts.

use candle_core::IndexOp;
use flexmodel::analysis::patching::{Patching, patch_residual_stream};
use flexmodel::tiny::tiny_checkpoint;
use flexmodel::{FlexModel, Layout};
use indicatif::ProgressBar;

const CLEAN: [u32; 6] = [5, 17, 200, 3, 99, 42];
const CORRUPTED: [u32; 6] = [5, 17, 61, 3, 99, 42];

#[test]
fn patching_is_exact_where_the_runs_agree_and_at_the_changed_embedding() {
    let patching = patch_under(Layout::SINGLE);
    assert_ne!(patching.clean_diff, patching.corrupted_diff);
    assert_eq!(patching.restored.len(), 4);
    for (layer, row) in patching.restored.iter().enumerate() {
        assert_eq!(row.len(), 6);
        // Before the changed token both runs are identical (causal attention).
        for (position, &fraction) in row.iter().enumerate().take(2) {
            assert!(
                fraction.abs() < 1e-4,
                "layer {layer} position {position}: {fraction}"
            );
        }
    }
    // At layer 0 the residual stream is the embedding: patching the changed token turns
    // the corrupted run into the clean one, patching any other token changes nothing.
    let first = &patching.restored[0];
    assert!((first[2] - 1.0).abs() < 1e-4, "{first:?}");
    for position in [0, 1, 3, 4, 5] {
        assert!(first[position].abs() < 1e-4, "{first:?}");
    }
    // Once every layer has mixed the positions, only the last one matters at the end.
    let last = patching.restored.last().unwrap();
    assert!(last[5].abs() > 1e-3, "{last:?}");
}

/// Patches `CORRUPTED` with `CLEAN` on the tiny model split over `layout`.
fn patch_under(layout: Layout) -> Patching {
    let checkpoint = tiny_checkpoint(11).unwrap();
    let mut model = FlexModel::build(&checkpoint, layout).unwrap();
    patch_residual_stream(&mut model, &CLEAN, &CORRUPTED, 7, 8, &ProgressBar::hidden()).unwrap()
}

#[test]
fn patching_under_tp2_pp2_equals_the_single_shard() {
    let expected = patch_under(Layout::SINGLE);
    let patching = patch_under(Layout::new(1, 2, 2).unwrap());
    for (row, expected_row) in patching.restored.iter().zip(&expected.restored) {
        for (a, b) in row.iter().zip(expected_row) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}

#[test]
fn prompts_of_unequal_length_are_aligned_at_their_ends() {
    let checkpoint = tiny_checkpoint(11).unwrap();
    let mut model = FlexModel::build(&checkpoint, Layout::SINGLE).unwrap();
    // A clean prompt one token longer: the last six positions are patched.
    let clean = [9, 5, 17, 200, 3, 99, 42];
    let hidden = ProgressBar::hidden();
    let patching = patch_residual_stream(&mut model, &clean, &CORRUPTED, 7, 8, &hidden).unwrap();
    assert!(patching.restored.iter().all(|row| row.len() == 6));
    // Each logit difference is that of the prompt run alone.
    let diff = |model: &mut FlexModel, tokens: &[u32]| {
        let logits = model.forward(common_batch(tokens)).unwrap();
        let last = logits
            .i((0, tokens.len() - 1))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        last[7] - last[8]
    };
    let clean_diff = diff(&mut model, &clean);
    let corrupted_diff = diff(&mut model, &CORRUPTED);
    assert!(
        (patching.clean_diff - clean_diff).abs() < 1e-4,
        "{patching:?}"
    );
    assert!((patching.corrupted_diff - corrupted_diff).abs() < 1e-4);
    // At layer 0 the residual stream is the embedding: patching the aligned token 200
    // over 61 is the corrupted prompt with that token, run alone; where the aligned
    // tokens agree nothing changes.
    let swapped = diff(&mut model, &[5, 17, 200, 3, 99, 42]);
    let expected = (swapped - corrupted_diff) / (clean_diff - corrupted_diff);
    let first = &patching.restored[0];
    assert!(
        (first[2] - expected).abs() < 1e-4,
        "{first:?} vs {expected}"
    );
    for position in [0, 1, 3, 4, 5] {
        assert!(first[position].abs() < 1e-4, "{first:?}");
    }
}

fn common_batch(tokens: &[u32]) -> candle_core::Tensor {
    candle_core::Tensor::new(tokens, &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

#[test]
fn empty_prompts_and_prompts_that_agree_are_refused() {
    let checkpoint = tiny_checkpoint(11).unwrap();
    let mut model = FlexModel::build(&checkpoint, Layout::SINGLE).unwrap();
    let hidden = ProgressBar::hidden();
    let error = patch_residual_stream(&mut model, &CLEAN, &[], 7, 8, &hidden)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("at least one token; they have 6 and 0"),
        "{error}"
    );
    let error = patch_residual_stream(&mut model, &CLEAN, &CLEAN, 7, 8, &hidden)
        .unwrap_err()
        .to_string();
    assert!(error.contains("nothing to restore"), "{error}");
}
