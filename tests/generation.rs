//! Ragged batches and generation: a padded batch equals each sequence alone, a cached
//! generation captures what one pass over its final sequence does, and the cache changes
//! nothing that recomputing would give — under every layout.

mod common;

use std::collections::BTreeMap;

use candle_core::{Device, IndexOp, Tensor};
use common::parity::{tiny_for_tp3_on_disk, tiny_on_disk};
use common::{max_abs_diff, numpy_reference, rel_error, smollm2_path};
use flexmodel::text::Stop;
use flexmodel::{
    Checkpoint, FlexModel, GenerateOptions, Generation, HookFunction, HookPoint, Layout,
    ModelPoints, TokenBatch, edits,
};

/// Every hook point, the opt-in ones included.
const EVERY_POINT: [&str; 5] = [
    "*",
    "blocks.*.attn.hook_result",
    "blocks.*.hook_q_input",
    "blocks.*.hook_k_input",
    "blocks.*.hook_v_input",
];

fn capture_every_point(model: &mut FlexModel) {
    for pattern in EVERY_POINT {
        model
            .hooks_mut()
            .register(HookFunction::new(pattern))
            .unwrap();
    }
}

/// The single capture of every point in the store (which is emptied).
fn captures(model: &mut FlexModel) -> BTreeMap<String, Tensor> {
    let all = model.store_mut().take_all();
    all.into_iter()
        .map(|(name, mut calls)| {
            assert_eq!(calls.len(), 1, "{name}: one capture");
            (name, calls.pop().unwrap())
        })
        .collect()
}

/// Sequence `i`'s real positions `pad..pad + len` of a batched capture (both position
/// dimensions of scores and patterns), as a batch of one.
fn real_part(value: &Tensor, point: HookPoint, i: usize, pad: usize, len: usize) -> Tensor {
    let row = value.narrow(0, i, 1).unwrap();
    let row = row.narrow(point.position_dim(), pad, len).unwrap();
    match point.attends() {
        true => row.narrow(3, pad, len).unwrap(),
        false => row,
    }
}

/// Checks a padded capture against each sequence's own capture (`alone[i]`) at its real
/// positions, and that its padded positions are zero (and padded keys hidden); returns
/// the worst relative error.
fn assert_each_sequence_alone(
    points: &ModelPoints,
    padded: &BTreeMap<String, Tensor>,
    rows: &[&[u32]],
    alone: &[BTreeMap<String, Tensor>],
    tolerance: f64,
) -> f64 {
    let t = rows.iter().map(|r| r.len()).max().unwrap();
    let mut worst = (0.0, String::new());
    for (name, value) in padded {
        let point = points.parse(name).unwrap();
        for (i, row) in rows.iter().enumerate() {
            let (pad, len) = (t - row.len(), row.len());
            let expected = alone[i]
                .get(name)
                .unwrap_or_else(|| panic!("sequence {i} alone has no {name}"));
            let err = rel_error(&real_part(value, point, i, pad, len), expected);
            assert!(
                err <= tolerance,
                "{name}, sequence {i}: relative error {err:.2e}"
            );
            if err > worst.0 {
                worst = (err, format!("{name}, sequence {i}"));
            }
            if pad == 0 {
                continue;
            }
            let padding = value.narrow(0, i, 1).unwrap();
            let padding = padding.narrow(point.position_dim(), 0, pad).unwrap();
            let zeros = padding
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(
                zeros, 0.0,
                "{name}, sequence {i}: padded positions are zero"
            );
            if point.attends() {
                // Real queries see no padded key: −∞ scores, zero attention.
                let hidden = value
                    .i((i, .., pad.., ..pad))
                    .unwrap()
                    .flatten_all()
                    .unwrap();
                let hidden = hidden.to_vec1::<f32>().unwrap();
                let want = match name.ends_with("hook_pattern") {
                    true => 0.0,
                    false => f32::NEG_INFINITY,
                };
                assert!(
                    hidden.iter().all(|&x| x == want),
                    "{name}: padded keys are {want}"
                );
            }
        }
    }
    eprintln!("worst relative error {:.2e} at {}", worst.0, worst.1);
    worst.0
}

#[test]
fn a_ragged_smollm2_batch_equals_each_prompt_alone_in_the_numpy_reference_at_every_point() {
    let rows: &[&[u32]] = &[
        &[504, 3575, 282, 4649, 314, 7042],
        &[1, 9690, 198],
        &[19556, 2087, 260, 2463, 30, 2, 198, 504, 3575],
    ];
    let alone: Vec<_> = rows
        .iter()
        .map(|row| numpy_reference(&smollm2_path(), &[row]))
        .collect();
    let mut model = FlexModel::new(common::smollm2().1.clone());
    capture_every_point(&mut model);
    let batch = TokenBatch::left_padded(rows).unwrap();
    model.forward(&batch).unwrap();
    let padded = captures(&mut model);
    assert_eq!(padded.len(), model.points().count(), "every hook point");
    // The numpy reference in float64 against f32: as the unpadded SmolLM2 parity test.
    let worst = assert_each_sequence_alone(model.points(), &padded, rows, &alone, 3e-5);
    assert!(worst > 0.0, "f32 against float64 is never exact");
}

#[test]
fn a_ragged_batch_equals_each_sequence_alone_and_its_loss_counts_real_pairs_only() {
    let (_dir, checkpoint) = tiny_on_disk(3);
    let rows: &[&[u32]] = &[&[3, 200, 17, 99, 255, 0, 42], &[7, 7], &[5, 1, 2, 3]];
    let alone: Vec<_> = rows
        .iter()
        .map(|row| numpy_reference(checkpoint.weights.origin(), &[row]))
        .collect();
    let mut model = FlexModel::new(checkpoint.load_model().unwrap());
    capture_every_point(&mut model);
    let batch = TokenBatch::left_padded(rows).unwrap();
    model.forward(&batch).unwrap();
    let padded = captures(&mut model);
    assert_each_sequence_alone(model.points(), &padded, rows, &alone, 5e-6);

    // The loss over the batch is the mean over every real next-token pair.
    let (_, loss) = model.forward_backward(&batch).unwrap();
    let mut sum = 0.0;
    for row in rows {
        let (_, alone) = model.forward_backward(common::batch(&[row])).unwrap();
        sum += alone as f64 * (row.len() - 1) as f64;
    }
    let pairs: usize = rows.iter().map(|r| r.len() - 1).sum();
    let expected = sum / pairs as f64;
    assert!(
        (loss as f64 - expected).abs() <= 1e-6 * expected,
        "loss {loss} vs {expected}"
    );
}

/// Registers a steering vector on the residual stream and a head ablation.
fn steer(model: &mut FlexModel, d_model: usize) {
    let start = Tensor::arange(0f32, d_model as f32, &Device::Cpu).unwrap();
    let vector = (start.cos().unwrap() * 0.5).unwrap();
    let hooks = model.hooks_mut();
    let add = HookFunction::new("blocks.1.hook_resid_post")
        .with_edit(move |_, x| Ok(x.broadcast_add(&vector)?));
    hooks.register(add).unwrap();
    let ablate = HookFunction::new("blocks.2.attn.hook_pattern").with_edit(edits::zero_head(3));
    hooks.register(ablate).unwrap();
}

/// Generates from `prompts` with every point captured and the steering edits.
fn steered_generation(
    checkpoint: &Checkpoint,
    layout: Layout,
    prompts: &[&[u32]],
    kv_cache: bool,
) -> (Generation, BTreeMap<String, Tensor>) {
    let mut model = FlexModel::build(checkpoint, layout).unwrap();
    steer(&mut model, checkpoint.config.d_model());
    capture_every_point(&mut model);
    let options = GenerateOptions {
        max_new_tokens: 6,
        kv_cache,
        ..GenerateOptions::default()
    };
    let generation = model.generate(prompts, &options).unwrap();
    (generation, captures(&mut model))
}

const PROMPTS: [&[u32]; 3] = [&[3, 200, 17, 99, 255], &[7, 7], &[5, 1, 2, 3]];

#[test]
fn a_cached_generation_captures_what_one_pass_over_its_final_sequence_does() {
    let (_dir, checkpoint) = tiny_on_disk(5);
    let (generation, captured) = steered_generation(&checkpoint, Layout::SINGLE, &PROMPTS, true);
    assert_eq!(generation.stop, Stop::MaxNewTokens);
    let t = generation.batch.dims().unwrap().1;
    assert_eq!(t, 5 + 6);

    // One pass with the same hooks over the final batch without its last position.
    let mut model = FlexModel::new(checkpoint.load_model().unwrap());
    steer(&mut model, checkpoint.config.d_model());
    capture_every_point(&mut model);
    let tokens = generation.batch.tokens().narrow(1, 0, t - 1).unwrap();
    let mask = generation.captured_mask().unwrap();
    model
        .forward(TokenBatch::with_mask(tokens, mask).unwrap())
        .unwrap();
    let one_pass = captures(&mut model);
    assert_eq!(captured.len(), one_pass.len());
    let mut worst = 0f32;
    for (name, expected) in &one_pass {
        let actual = &captured[name];
        assert_eq!(actual.dims(), expected.dims(), "{name}");
        // −∞ entries of the scores compare as equal.
        let (a, e) = (finite(actual), finite(expected));
        let diff = max_abs_diff(&a, &e);
        assert!(diff <= 2e-5, "{name}: max difference {diff:.2e}");
        worst = worst.max(diff);
    }
    eprintln!("worst absolute difference from one pass: {worst:.2e}");

    // And each final sequence alone in the numpy reference (which has no edits: the
    // unsteered generation's own tokens).
    let mut plain = FlexModel::new(checkpoint.load_model().unwrap());
    capture_every_point(&mut plain);
    let options = GenerateOptions {
        max_new_tokens: 6,
        ..GenerateOptions::default()
    };
    let generation = plain.generate(&PROMPTS, &options).unwrap();
    let captured = captures(&mut plain);
    let finals: Vec<Vec<u32>> = generation.sequences.clone();
    let without_last: Vec<&[u32]> = finals.iter().map(|s| &s[..s.len() - 1]).collect();
    let alone: Vec<_> = without_last
        .iter()
        .map(|row| numpy_reference(checkpoint.weights.origin(), &[row]))
        .collect();
    assert_each_sequence_alone(plain.points(), &captured, &without_last, &alone, 5e-6);
}

/// `x` with −∞ replaced by a large finite number, for differences.
fn finite(x: &Tensor) -> Tensor {
    x.clamp(-1e30f32, 1e30f32).unwrap()
}

/// Checks that two generations made the same tokens and captures.
fn assert_same_generation(
    label: &str,
    (a, a_captures): &(Generation, BTreeMap<String, Tensor>),
    (b, b_captures): &(Generation, BTreeMap<String, Tensor>),
    tolerance: f64,
) {
    assert_eq!(a.sequences, b.sequences, "{label}: the same tokens");
    assert_eq!(a_captures.len(), b_captures.len(), "{label}: every point");
    let mut worst = 0f64;
    for (name, expected) in a_captures {
        let err = rel_error(&finite(&b_captures[name]), &finite(expected));
        assert!(err <= tolerance, "{label} {name}: relative error {err:.2e}");
        worst = worst.max(err);
    }
    eprintln!("{label}: worst relative error {worst:.2e}");
}

#[test]
fn steered_generation_through_the_cache_equals_recomputing_under_every_layout() {
    let (_dir, checkpoint) = tiny_for_tp3_on_disk(7);
    let single = steered_generation(&checkpoint, Layout::SINGLE, &PROMPTS, true);
    let recomputed = steered_generation(&checkpoint, Layout::SINGLE, &PROMPTS, false);
    assert_same_generation("single, no cache", &single, &recomputed, 5e-6);
    let fsdp = Layout::new(2, 1, 3).unwrap().with_fsdp(true).unwrap();
    for layout in [
        Layout::new(1, 2, 3).unwrap(),
        Layout::new(2, 1, 1).unwrap(),
        fsdp,
    ] {
        let cached = steered_generation(&checkpoint, layout, &PROMPTS, true);
        assert_same_generation(&format!("{layout}"), &single, &cached, 5e-6);
        let recomputed = steered_generation(&checkpoint, layout, &PROMPTS, false);
        assert_same_generation(&format!("{layout}, no cache"), &single, &recomputed, 5e-6);
    }
}

#[test]
fn generation_refuses_bad_input_and_stops_at_the_context() {
    let (_dir, checkpoint) = tiny_on_disk(1);
    let mut model = FlexModel::new(checkpoint.load_model().unwrap());
    let options = GenerateOptions::default();
    let empty: [&[u32]; 2] = [&[1, 2], &[]];
    let err = model.generate(&empty, &options).unwrap_err().to_string();
    assert!(err.contains("sequence 1 of the batch is empty"), "{err}");
    let none = GenerateOptions {
        max_new_tokens: 0,
        ..options.clone()
    };
    let err = model.generate(&[[1u32, 2]], &none).unwrap_err().to_string();
    assert!(
        err.contains("max_new_tokens") && err.contains("at least 1"),
        "{err}"
    );
    let context = checkpoint.config.context();
    let long = vec![1u32; context + 1];
    let err = model.generate(&[long], &options).unwrap_err().to_string();
    assert!(
        err.contains(&format!("longer than the model's context of {context}")),
        "{err}"
    );
    // A prompt three short of the context gets three tokens, then a clear stop.
    let near = vec![1u32; context - 3];
    let far = GenerateOptions {
        max_new_tokens: 10,
        stop_at_eos: false,
        ..options
    };
    let generation = model.generate(&[near], &far).unwrap();
    assert_eq!(generation.stop, Stop::Context);
    assert_eq!(generation.generated(0).len(), 3);
}

#[test]
fn each_decoding_step_calls_every_point_once_with_one_position_and_tells_where() {
    let (_dir, checkpoint) = tiny_on_disk(2);
    for layout in [Layout::SINGLE, Layout::new(2, 2, 2).unwrap()] {
        let mut model = FlexModel::build(&checkpoint, layout).unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let hook = HookFunction::new("blocks.1.hook_resid_mid").with_edit(move |ctx, x| {
            let mask = ctx.attention_mask().map(|m| m.dims().to_vec());
            record
                .lock()
                .unwrap()
                .push((ctx.positions(), x.dims().to_vec(), mask));
            Ok(x)
        });
        model.hooks_mut().register(hook.without_capture()).unwrap();
        let options = GenerateOptions {
            max_new_tokens: 3,
            ..GenerateOptions::default()
        };
        model.generate(&PROMPTS, &options).unwrap();
        let d = checkpoint.config.d_model();
        let expected = vec![
            (0..5, vec![3, 5, d], Some(vec![3, 5])),
            (5..6, vec![3, 1, d], Some(vec![3, 6])),
            (6..7, vec![3, 1, d], Some(vec![3, 7])),
        ];
        assert_eq!(*seen.lock().unwrap(), expected, "{layout}");
    }
}

#[test]
fn a_sequence_stops_at_its_end_of_sequence_token_and_is_padded_while_the_others_go_on() {
    let (_dir, mut checkpoint) = tiny_on_disk(5);
    let options = GenerateOptions {
        max_new_tokens: 6,
        ..GenerateOptions::default()
    };
    // The token the first prompt gets at its second step becomes end-of-sequence.
    let free = FlexModel::build(&checkpoint, Layout::SINGLE)
        .unwrap()
        .generate(&PROMPTS, &options)
        .unwrap();
    let eos = free.generated(0)[1];
    assert!(
        (1..3).all(|i| !free.generated(i)[..2].contains(&eos)),
        "pick a seed where only the first prompt meets the token early"
    );
    checkpoint.config.as_llama_mut().unwrap().eos_token_ids = vec![eos];
    for layout in [Layout::SINGLE, Layout::new(2, 1, 2).unwrap()] {
        let mut model = FlexModel::build(&checkpoint, layout).unwrap();
        capture_every_point(&mut model);
        let generation = model.generate(&PROMPTS, &options).unwrap();
        assert_eq!(generation.generated(0), &free.generated(0)[..2], "{layout}");
        for i in 1..3 {
            let until = free.generated(i).iter().position(|&t| t == eos);
            let expected = match until {
                Some(at) => &free.generated(i)[..=at],
                None => free.generated(i),
            };
            assert_eq!(generation.generated(i), expected, "{layout}: sequence {i}");
        }
        // The first sequence is padded after its end-of-sequence token.
        let mask = generation
            .batch
            .mask_or_ones()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(mask[0][PROMPTS[0].len()..], [1., 1., 0., 0., 0., 0.]);
        // Its captures still equal one pass over the final batch without the last position.
        let captured = captures(&mut model);
        let t = generation.batch.dims().unwrap().1;
        let tokens = generation.batch.tokens().narrow(1, 0, t - 1).unwrap();
        let one = TokenBatch::with_mask(tokens, generation.captured_mask().unwrap()).unwrap();
        let mut plain = FlexModel::build(&checkpoint, layout).unwrap();
        capture_every_point(&mut plain);
        plain.forward(one).unwrap();
        for (name, expected) in captures(&mut plain) {
            let diff = max_abs_diff(&finite(&captured[&name]), &finite(&expected));
            assert!(diff <= 2e-5, "{layout} {name}: {diff:.2e}");
        }
    }
}
