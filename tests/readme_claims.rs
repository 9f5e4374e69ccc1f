//! The README's qualitative claims about SmolLM2, checked on its own configurations:
//! the induction heads it names, the steering example's " Rome", and where activation
//! patching restores the answer. (The tuned lens at the default budget is checked in
//! `cli_analysis.rs`, through the command the README runs.)

mod common;

use common::smollm2;
use flexmodel::analysis::induction::{measure, repeated_random_tokens, top_heads};
use flexmodel::analysis::patching::patch_residual_stream;
use flexmodel::analysis::steering::{Steering, train_steering_vector};
use flexmodel::{FlexModel, GenerateOptions, Layout};
use indicatif::ProgressBar;

#[test]
fn the_induction_heads_are_those_the_readme_names() {
    let (checkpoint, _) = smollm2();
    // The README's command: --seq-len 48 --batch 4 --seed 0.
    let tokens = repeated_random_tokens(4, 48, 49152, 0).unwrap();
    let mut model = FlexModel::build(checkpoint, Layout::SINGLE).unwrap();
    let measured = measure(&mut model, &tokens).unwrap();
    let top = top_heads(&measured.scores, 10).unwrap();
    eprintln!("top induction heads: {top:?}");
    let readme = [
        (18, 6, 0.909),
        (17, 3, 0.770),
        (17, 4, 0.762),
        (18, 7, 0.616),
        (17, 5, 0.612),
        (23, 2, 0.561),
    ];
    for (&(layer, head, score), (l, h, s)) in readme.iter().zip(&top) {
        assert_eq!((layer, head), (*l, *h), "ranking: {top:?}");
        assert!((score - s).abs() < 5e-4, "L{layer}H{head}: {s} vs {score}");
    }
    // "about 14 nats on the random first copy, about 2 on the second".
    let loss = &measured.loss_by_position;
    let mean = |xs: &[f32]| xs.iter().sum::<f32>() / xs.len() as f32;
    let (first, second) = (mean(&loss[..47]), mean(&loss[48..]));
    eprintln!("loss: first copy {first:.2}, second copy {second:.2} nats");
    assert!((13.5..15.0).contains(&first) && (1.5..3.0).contains(&second));
}

#[test]
fn the_steering_vector_makes_smollm2_say_rome_under_tp3() {
    let (checkpoint, _) = smollm2();
    let tokenizer = &checkpoint.tokenizer;
    let prompt = tokenizer.encode("The capital of France is").unwrap();
    let rome = tokenizer.encode(" Rome").unwrap()[0];
    let mut model = FlexModel::build(checkpoint, Layout::new(1, 1, 3).unwrap()).unwrap();
    let greedy = |model: &mut FlexModel, n| {
        let options = GenerateOptions {
            max_new_tokens: n,
            ..GenerateOptions::default()
        };
        let generation = model.generate(&[&prompt], &options).unwrap();
        generation.generated(0).to_vec()
    };
    let before = greedy(&mut model, 1);
    assert_ne!(before, [rome], "unsteered, it does not say Rome");
    // The example's settings.
    let steering = Steering {
        layer: 12,
        steps: 20,
        learning_rate: 0.5,
    };
    let trained = train_steering_vector(&mut model, &prompt, rome, steering).unwrap();
    let p = &trained.probabilities;
    eprintln!(
        "p(\" Rome\"): {:.3} before, {:.3} after",
        p[0],
        p[p.len() - 1]
    );
    assert!(p[p.len() - 1] > 0.5 && p[0] < 0.01, "{p:?}");
    let after = greedy(&mut model, 4);
    let text = tokenizer.decode(&after).unwrap();
    assert!(text.starts_with(" Rome"), "{text:?}");
}

#[test]
fn patching_restores_paris_at_the_subject_until_layer_23_then_at_the_last_position() {
    let (checkpoint, _) = smollm2();
    let tokenizer = &checkpoint.tokenizer;
    let clean = tokenizer
        .encode("The Eiffel Tower is in the city of")
        .unwrap();
    let corrupted = tokenizer.encode("The Colosseum is in the city of").unwrap();
    let (paris, rome) = (
        tokenizer.encode(" Paris").unwrap()[0],
        tokenizer.encode(" Rome").unwrap()[0],
    );
    let mut model = FlexModel::build(checkpoint, Layout::SINGLE).unwrap();
    let progress = ProgressBar::hidden();
    let patching =
        patch_residual_stream(&mut model, &clean, &corrupted, paris, rome, &progress).unwrap();
    eprintln!(
        "clean {:.2}, corrupted {:.2}",
        patching.clean_diff, patching.corrupted_diff
    );
    let subject: Vec<usize> = (0..clean.len())
        .filter(|&i| clean[i] != corrupted[i])
        .collect();
    let last = clean.len() - 1;
    let by_layer: Vec<(f32, f32)> = patching
        .restored
        .iter()
        .map(|row| {
            let at_subject = subject.iter().map(|&i| row[i]).fold(f32::MIN, f32::max);
            (at_subject, row[last])
        })
        .collect();
    for (layer, (at_subject, at_last)) in by_layer.iter().enumerate() {
        eprintln!("layer {layer:>2}: subject {at_subject:.2}, last position {at_last:.2}");
    }
    for (layer, &(at_subject, at_last)) in by_layer.iter().enumerate() {
        match layer {
            0..=23 => assert!(at_subject >= 0.75, "layer {layer}: {at_subject}"),
            _ => assert!(
                (0.7..=0.9).contains(&at_last) && at_subject < 0.5,
                "layer {layer}: subject {at_subject}, last {at_last}"
            ),
        }
    }
}
