//! Backward passes: the loss, gradients at every hook point against finite differences,
//! and every layout against the single shard.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use common::{assert_matches_single, batch, rel_error, take_last_calls};

/// Relative error allowed between a layout's gradients and the single shard's: the
/// tiny model's worst measured is 2.0e-6 (tp=8).
const GRADIENT_TOLERANCE: f64 = 1e-5;
use flexmodel::tiny::tiny_checkpoint;
use flexmodel::{Checkpoint, FlexModel, HookFunction, Layout, edits, next_token_loss};

fn tokens() -> Tensor {
    batch(&[
        &[5, 17, 200, 3, 99, 1],
        &[1, 2, 3, 4, 5, 6],
        &[250, 0, 7, 7, 7, 9],
    ])
}

/// Loss and the gradient at every hook point under `layout`.
fn gradients(checkpoint: &Checkpoint, layout: Layout) -> (f32, BTreeMap<String, Tensor>) {
    let mut model = FlexModel::build(checkpoint, layout).unwrap();
    model
        .hooks_mut()
        .register(HookFunction::backward("*"))
        .unwrap();
    let (_, loss) = model.forward_backward(tokens()).unwrap();
    let grads = take_last_calls(&mut model);
    (loss, grads)
}

/// The next-token loss of `tokens()` from `logits`, in f64.
fn loss_of(logits: &Tensor) -> f64 {
    let logits = logits.to_dtype(DType::F64).unwrap();
    next_token_loss(&logits, &tokens())
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Checks `grad` against a central finite difference along its own direction:
/// `loss_at(delta)` is the loss with `delta` added to what `grad` is the gradient of.
fn check_against_finite_difference(what: &str, grad: &Tensor, loss_at: impl Fn(&Tensor) -> f64) {
    let norm = grad
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let direction = (grad / norm as f64).unwrap();
    let eps = 1e-2;
    let numeric = (loss_at(&(&direction * eps).unwrap()) - loss_at(&(&direction * -eps).unwrap()))
        / (2.0 * eps);
    let analytic = (grad * &direction)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let err = (numeric - analytic).abs() / analytic.abs();
    eprintln!(
        "{what}: directional derivative {analytic:.5} vs finite difference {numeric:.5} ({err:.1e})"
    );
    // Measured: at most 1.6e-5 (f32 model, f64 loss, step 1e-2).
    assert!(err < 1e-4, "{what}: {analytic} vs {numeric}");
}

#[test]
fn the_loss_is_the_mean_next_token_cross_entropy() {
    let checkpoint = tiny_checkpoint(31).unwrap();
    let mut model = FlexModel::build(&checkpoint, Layout::SINGLE).unwrap();
    let logits = model.forward(tokens()).unwrap();
    let expected = next_token_loss(&logits, &tokens())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let (_, loss) = model.forward_backward(tokens()).unwrap();
    assert!(
        (loss - expected).abs() < 1e-5 * expected,
        "{loss} vs {expected}"
    );
}

#[test]
fn gradients_at_hook_points_match_finite_differences() {
    let checkpoint = tiny_checkpoint(32).unwrap();
    let (_, grads) = gradients(&checkpoint, Layout::SINGLE);
    assert_eq!(grads.len(), common::gradient_points(4));
    for point in [
        "blocks.1.hook_resid_mid",
        "blocks.2.attn.hook_z",
        "blocks.0.mlp.hook_post",
        "ln_final.hook_normalized",
    ] {
        check_against_finite_difference(point, &grads[&format!("{point}_grad")], |delta| {
            let mut model = FlexModel::build(&checkpoint, Layout::SINGLE).unwrap();
            let add = HookFunction::new(point).with_edit(edits::add(delta.clone()));
            model.hooks_mut().register(add).unwrap();
            loss_of(&model.forward(tokens()).unwrap())
        });
    }
}

#[test]
fn every_layout_gives_the_single_shard_gradients() {
    let checkpoint = tiny_checkpoint(33).unwrap();
    let (loss, single) = gradients(&checkpoint, Layout::SINGLE);
    for (tp, pp, dp) in [
        (2, 1, 1),
        (4, 1, 1),
        (1, 3, 1),
        (1, 1, 2),
        (2, 2, 2),
        (8, 1, 1),
    ] {
        let (sharded_loss, grads) = gradients(&checkpoint, Layout::new(dp, pp, tp).unwrap());
        assert!(
            (sharded_loss - loss).abs() < 1e-5 * loss,
            "tp={tp} pp={pp} dp={dp}: loss {sharded_loss} vs {loss}"
        );
        let label = format!("tiny gradients tp={tp} pp={pp} dp={dp}");
        assert_matches_single(&label, &single, &grads, GRADIENT_TOLERANCE, tp * dp == 1);
    }
}

/// Edits, one on a head-sharded point, one nonlinear, one on replicated-able kv heads.
fn register_edits(model: &mut FlexModel) {
    let hooks = model.hooks_mut();
    let z = HookFunction::new("blocks.1.attn.hook_z").with_edit(edits::zero_head(3));
    hooks.register(z.without_capture()).unwrap();
    let nonlinear =
        HookFunction::new("blocks.2.hook_resid_mid").with_edit(|_, x| Ok((&x * &x.tanh()?)?));
    hooks.register(nonlinear.without_capture()).unwrap();
    let k = HookFunction::new("blocks.2.attn.hook_k").with_edit(edits::scale(1.5));
    hooks.register(k.without_capture()).unwrap();
}

/// Loss and the gradient at every hook point of the edited pass.
fn edited_gradients(checkpoint: &Checkpoint, layout: Layout) -> (f32, BTreeMap<String, Tensor>) {
    let mut model = FlexModel::build(checkpoint, layout).unwrap();
    register_edits(&mut model);
    model
        .hooks_mut()
        .register(HookFunction::backward("*"))
        .unwrap();
    let (_, loss) = model.forward_backward(tokens()).unwrap();
    let grads = take_last_calls(&mut model);
    (loss, grads)
}

#[test]
fn gradients_flow_through_edits_exactly_in_every_layout() {
    let checkpoint = tiny_checkpoint(34).unwrap();
    let (single_loss, single) = edited_gradients(&checkpoint, Layout::SINGLE);
    // Upstream of the edits: against finite differences of the edited loss.
    let point = "blocks.0.hook_resid_post";
    check_against_finite_difference(
        "through the edits",
        &single[&format!("{point}_grad")],
        |delta| {
            let mut model = FlexModel::build(&checkpoint, Layout::SINGLE).unwrap();
            register_edits(&mut model);
            let add = HookFunction::new(point).with_edit(edits::add(delta.clone()));
            model.hooks_mut().register(add).unwrap();
            loss_of(&model.forward(tokens()).unwrap())
        },
    );
    // The edits change the upstream gradient.
    let (_, unedited) = gradients(&checkpoint, Layout::SINGLE);
    let name = format!("{point}_grad");
    assert!(rel_error(&single[&name], &unedited[&name]) > 1e-3);
    for (tp, pp, dp) in [(2, 1, 1), (4, 2, 1), (1, 1, 2), (2, 2, 2), (8, 1, 1)] {
        let (loss, grads) = edited_gradients(&checkpoint, Layout::new(dp, pp, tp).unwrap());
        assert!((loss - single_loss).abs() < 1e-5 * single_loss);
        let label = format!("edited gradients tp={tp} pp={pp} dp={dp}");
        assert_matches_single(&label, &single, &grads, GRADIENT_TOLERANCE, tp * dp == 1);
    }
}

/// Gradients at every point with the gradient of head 3 of `blocks.2.attn.hook_z`
/// zeroed by a backward hook.
fn gradients_with_head_blocked(
    checkpoint: &Checkpoint,
    layout: Layout,
) -> BTreeMap<String, Tensor> {
    let mut model = FlexModel::build(checkpoint, layout).unwrap();
    let block = HookFunction::backward("blocks.2.attn.hook_z").with_edit(edits::zero_head(3));
    model.hooks_mut().register(block.without_capture()).unwrap();
    model
        .hooks_mut()
        .register(HookFunction::backward("*"))
        .unwrap();
    model.forward_backward(tokens()).unwrap();
    take_last_calls(&mut model)
}

#[test]
fn a_backward_edit_blocks_one_heads_gradient_exactly_in_every_layout() {
    let checkpoint = tiny_checkpoint(35).unwrap();
    let blocked = gradients_with_head_blocked(&checkpoint, Layout::SINGLE);
    // The same gradient from a forward edit that keeps the value and stops head 3's gradient.
    let mut model = FlexModel::build(&checkpoint, Layout::SINGLE).unwrap();
    let stop = HookFunction::new("blocks.2.attn.hook_z")
        .without_capture()
        .with_edit(|_, x| {
            let keep = Tensor::from_vec(
                (0..8).map(|h| if h == 3 { 0f32 } else { 1.0 }).collect(),
                (1, 1, 8, 1),
                x.device(),
            )?;
            let stopped = x.broadcast_mul(&(1.0 - &keep)?)?.detach();
            Ok((x.broadcast_mul(&keep)? + stopped)?)
        });
    model.hooks_mut().register(stop).unwrap();
    model
        .hooks_mut()
        .register(HookFunction::backward("*"))
        .unwrap();
    model.forward_backward(tokens()).unwrap();
    let stopped: BTreeMap<String, Tensor> = take_last_calls(&mut model);
    for (name, expected) in &stopped {
        assert!(rel_error(&blocked[name], expected) < 1e-5, "{name}");
    }
    let (_, free) = gradients(&checkpoint, Layout::SINGLE);
    assert!(
        rel_error(
            &blocked["blocks.0.hook_resid_post_grad"],
            &free["blocks.0.hook_resid_post_grad"]
        ) > 1e-4
    );
    for (tp, pp, dp) in [(2, 1, 1), (2, 2, 2), (8, 1, 1), (1, 3, 1)] {
        let sharded = gradients_with_head_blocked(&checkpoint, Layout::new(dp, pp, tp).unwrap());
        let worst = blocked
            .iter()
            .map(|(n, e)| rel_error(&sharded[n], e))
            .fold(0.0, f64::max);
        eprintln!("head-blocked tp={tp} pp={pp} dp={dp}: worst gradient error {worst:.2e}");
        assert!(worst < GRADIENT_TOLERANCE);
    }
}

/// The gradient of a steering vector added at `blocks.1.hook_resid_pre`, and the
/// gradient at that point.
fn steering_gradient(checkpoint: &Checkpoint, layout: Layout) -> (Tensor, Tensor) {
    let mut model = FlexModel::build(checkpoint, layout).unwrap();
    let start = Tensor::arange(0f32, 64.0, &Device::Cpu)
        .unwrap()
        .sin()
        .unwrap();
    let steer = candle_core::Var::from_tensor(&(start * 0.1).unwrap()).unwrap();
    let v = steer.as_tensor().clone();
    model.register_trainable("steer", &steer).unwrap();
    let add = HookFunction::new("blocks.1.hook_resid_pre")
        .without_capture()
        .with_edit(move |_, x| Ok(x.broadcast_add(&v)?));
    model.hooks_mut().register(add).unwrap();
    model
        .hooks_mut()
        .register(HookFunction::backward("blocks.1.hook_resid_pre"))
        .unwrap();
    model.forward_backward(tokens()).unwrap();
    let at_point = model
        .store()
        .last("blocks.1.hook_resid_pre_grad")
        .unwrap()
        .clone();
    (model.trainable_grad("steer").unwrap(), at_point)
}

#[test]
fn a_trainable_steering_vector_gets_the_same_gradient_in_every_layout() {
    let checkpoint = tiny_checkpoint(36).unwrap();
    let (single, at_point) = steering_gradient(&checkpoint, Layout::SINGLE);
    // d loss / d v = the gradient at the edited point, summed over sequences and positions.
    let expected = at_point.sum((0, 1)).unwrap();
    assert!(rel_error(&single, &expected) < 1e-5);
    for (tp, pp, dp) in [(2, 1, 1), (2, 2, 2), (1, 1, 2), (4, 1, 1)] {
        let (grad, _) = steering_gradient(&checkpoint, Layout::new(dp, pp, tp).unwrap());
        let err = rel_error(&grad, &single);
        eprintln!("steering vector tp={tp} pp={pp} dp={dp}: gradient error {err:.2e}");
        assert!(err < GRADIENT_TOLERANCE);
    }
}

/// Every parameter and its gradient under `layout`.
fn parameter_gradients(
    checkpoint: &Checkpoint,
    layout: Layout,
) -> BTreeMap<String, (Tensor, Tensor)> {
    let mut model = FlexModel::build(checkpoint, layout).unwrap();
    model.forward_backward(tokens()).unwrap();
    model
        .parameter_names()
        .unwrap()
        .into_iter()
        .map(|name| {
            let value = model.parameter(&name).unwrap();
            let grad = model.parameter_grad(&name).unwrap();
            (name, (value, grad))
        })
        .collect()
}

#[test]
fn parameter_gradients_match_finite_differences_of_the_weights() {
    let checkpoint = tiny_checkpoint(37).unwrap();
    let params = parameter_gradients(&checkpoint, Layout::SINGLE);
    assert_eq!(
        params.len(),
        3 + 4 * 9,
        "embedding, head, final norm; nine per block"
    );
    let weights = flexmodel::weights::TensorMap::read_all(checkpoint.weights.as_ref()).unwrap();
    for name in [
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        let (value, grad) = &params[name];
        assert_eq!(value.dims(), weights.tensors()[name].dims());
        check_against_finite_difference(name, grad, |delta| {
            let mut tensors = weights.tensors().clone();
            tensors.insert(name.to_string(), (value + delta).unwrap());
            let perturbed = Checkpoint {
                config: checkpoint.config.clone(),
                weights: Box::new(flexmodel::weights::TensorMap::new("perturbed", tensors)),
                tokenizer: checkpoint.tokenizer.clone(),
            };
            let model = perturbed.load_model().unwrap();
            loss_of(&model.forward(&tokens(), &mut flexmodel::NoHooks).unwrap())
        });
    }
}

#[test]
fn every_layout_gives_the_single_shard_parameters_and_their_gradients() {
    let checkpoint = tiny_checkpoint(38).unwrap();
    let single = parameter_gradients(&checkpoint, Layout::SINGLE);
    for (tp, pp, dp) in [(2, 1, 1), (2, 2, 2), (8, 1, 1), (1, 3, 1), (4, 2, 2)] {
        let sharded = parameter_gradients(&checkpoint, Layout::new(dp, pp, tp).unwrap());
        assert_eq!(
            sharded.keys().collect::<Vec<_>>(),
            single.keys().collect::<Vec<_>>()
        );
        let mut worst = 0.0f64;
        for (name, (value, grad)) in &single {
            assert_eq!(rel_error(&sharded[name].0, value), 0.0, "{name} value");
            let err = rel_error(&sharded[name].1, grad);
            assert!(
                err < GRADIENT_TOLERANCE,
                "tp={tp} pp={pp} dp={dp} {name}: {err:.3e}"
            );
            worst = worst.max(err);
        }
        eprintln!("parameters tp={tp} pp={pp} dp={dp}: worst gradient error {worst:.2e}");
    }
    let model = FlexModel::build(&checkpoint, Layout::new(1, 1, 2).unwrap()).unwrap();
    let err = model
        .parameter("model.layers.1.mlp.up_proj.weigth")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nearest: model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );
    assert!(
        model.parameter_grad("model.norm.weight").is_err(),
        "no backward pass yet"
    );
}

/// Gradients at every point with a loss computed from the gathered logits.
fn user_loss_gradients(checkpoint: &Checkpoint, layout: Layout) -> (f32, BTreeMap<String, Tensor>) {
    let mut model = FlexModel::build(checkpoint, layout).unwrap();
    model
        .hooks_mut()
        .register(HookFunction::backward("*"))
        .unwrap();
    // The log-probability of token 42 at the last position of every sequence, negated.
    let (_, loss) = model
        .forward_backward_with_loss(tokens(), &flexmodel::Groups::All, |logits| {
            let last = logits.narrow(1, logits.dim(1)? - 1, 1)?.squeeze(1)?;
            let log_probs = candle_nn::ops::log_softmax(&last, candle_core::D::Minus1)?;
            Ok(log_probs.narrow(1, 42, 1)?.mean_all()?.neg()?)
        })
        .unwrap();
    let grads = take_last_calls(&mut model);
    (loss, grads)
}

#[test]
fn a_loss_of_your_own_on_the_gathered_logits_back_propagates_in_every_layout() {
    let checkpoint = tiny_checkpoint(39).unwrap();
    // With the next-token loss as the user loss, the default pass is reproduced.
    let (default_loss, default) = gradients(&checkpoint, Layout::SINGLE);
    let mut model = FlexModel::build(&checkpoint, Layout::new(1, 2, 2).unwrap()).unwrap();
    model
        .hooks_mut()
        .register(HookFunction::backward("*"))
        .unwrap();
    let (_, loss) = model
        .forward_backward_with_loss(tokens(), &flexmodel::Groups::All, |logits| {
            next_token_loss(logits, &tokens())
        })
        .unwrap();
    assert!((loss - default_loss).abs() < 1e-5 * default_loss);
    for (name, mut calls) in model.store_mut().take_all() {
        assert!(
            rel_error(&calls.pop().unwrap(), &default[&name]) < GRADIENT_TOLERANCE,
            "{name}"
        );
    }
    let (loss, single) = user_loss_gradients(&checkpoint, Layout::SINGLE);
    for (tp, pp, dp) in [(2, 1, 1), (2, 2, 2), (4, 1, 1)] {
        let (sharded_loss, grads) =
            user_loss_gradients(&checkpoint, Layout::new(dp, pp, tp).unwrap());
        assert!((sharded_loss - loss).abs() < 1e-5 * loss.abs());
        for (name, expected) in &single {
            assert!(
                rel_error(&grads[name], expected) < GRADIENT_TOLERANCE,
                "tp={tp} pp={pp} dp={dp} {name}"
            );
        }
    }
}
