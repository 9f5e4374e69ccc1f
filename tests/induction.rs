//! Induction scores: the definition, and equality across layouts on SmolLM2.

mod common;

use common::{rel_error, smollm2};
use flexmodel::analysis::induction::{measure, repeated_random_tokens, top_heads};
use flexmodel::tiny::tiny_checkpoint;
use flexmodel::{FlexModel, HookFunction, Layout};

#[test]
fn scores_are_the_mean_attention_to_the_token_after_the_first_occurrence() {
    let checkpoint = tiny_checkpoint(40).unwrap();
    let tokens = repeated_random_tokens(2, 5, 256, 7).unwrap();
    let mut model = FlexModel::build(&checkpoint, Layout::SINGLE).unwrap();
    let scores = measure(&mut model, &tokens)
        .unwrap()
        .scores
        .to_vec2::<f32>()
        .unwrap();
    model
        .hooks_mut()
        .register(HookFunction::new("blocks.2.attn.hook_pattern"))
        .unwrap();
    model.forward(&tokens).unwrap();
    let captured = model.store().last("blocks.2.attn.hook_pattern").unwrap();
    let pattern: Vec<Vec<Vec<Vec<f32>>>> = (0..2)
        .map(|b| captured.get(b).unwrap().to_vec3::<f32>().unwrap())
        .collect();
    for head in 0..8 {
        let mut sum = 0.0;
        for seq in &pattern {
            for i in 0..5 {
                sum += seq[head][5 + i][i + 1];
            }
        }
        assert!((scores[2][head] - sum / 10.0).abs() < 1e-6, "head {head}");
    }
}

#[test]
fn smollm2_scores_under_tp3_equal_tp1_and_it_has_induction_heads() {
    let (checkpoint, _) = smollm2();
    let tokens = repeated_random_tokens(2, 24, 49152, 0).unwrap();
    let mut single = FlexModel::build(checkpoint, Layout::SINGLE).unwrap();
    let expected = measure(&mut single, &tokens).unwrap();
    let mut sharded = FlexModel::build(checkpoint, Layout::new(1, 1, 3).unwrap()).unwrap();
    let measured = measure(&mut sharded, &tokens).unwrap();
    let scores = &measured.scores;
    assert_eq!(scores.dims(), [30, 9]);
    assert!(rel_error(scores, &expected.scores) < 1e-4);
    let top = top_heads(scores, 5).unwrap();
    eprintln!("top induction heads (layer, head, score): {top:?}");
    assert!(top[0].2 > 0.3, "the best head scores {}", top[0].2);

    // Copying makes the second copy far easier to predict than the random first one.
    let loss = &measured.loss_by_position;
    assert_eq!(loss.len(), 47);
    for (a, b) in loss.iter().zip(&expected.loss_by_position) {
        assert!((a - b).abs() < 1e-3 * b.abs().max(1.0), "{a} vs {b}");
    }
    let mean = |xs: &[f32]| xs.iter().sum::<f32>() / xs.len() as f32;
    let (first, second) = (mean(&loss[..23]), mean(&loss[24..]));
    assert!(
        second < first / 2.0,
        "first copy {first}, second copy {second}"
    );
}

#[test]
fn sizes_that_overflow_or_are_too_small_are_refused() {
    let error = repeated_random_tokens(usize::MAX, 4, 256, 0)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("more than this machine can count"),
        "{error}"
    );
    let error = repeated_random_tokens(2, 1, 256, 0)
        .unwrap_err()
        .to_string();
    assert!(error.contains("at least 2 tokens"), "{error}");
}
