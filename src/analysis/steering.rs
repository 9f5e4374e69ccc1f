//! Steering vectors: a vector added to the residual stream entering one block, at every
//! position, trained by gradient descent through the (possibly sharded) model so that a
//! prompt continues with a chosen token.

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use candle_nn::optim::{AdamW, ParamsAdamW};

use crate::{Error, FlexModel, HookFunction, HookHandle, Result};

/// How a steering vector is trained.
#[derive(Debug, Clone, Copy)]
pub struct Steering {
    /// The block whose `hook_resid_pre` the vector is added to.
    pub layer: usize,
    /// Adam steps.
    pub steps: usize,
    /// Adam's learning rate.
    pub learning_rate: f64,
}

/// A trained steering vector, still added to the model by its hook.
#[derive(Debug)]
pub struct SteeringVector {
    /// The vector, `[d_model]`.
    pub vector: Var,
    /// The hook that adds it; remove it to run the model unsteered.
    pub hook: HookHandle,
    /// The probability of the target after the prompt, before each step and at the end.
    pub probabilities: Vec<f32>,
}

/// Trains a vector added at `blocks.{layer}.hook_resid_pre` so that `prompt` is followed by
/// `target`: Adam on the mean next-token loss of the prompt followed by `target`, the
/// gradient flowing through the model and the edit. The vector is registered as the
/// trainable variable `steering.{layer}`.
pub fn train_steering_vector(
    model: &mut FlexModel,
    prompt: &[u32],
    target: u32,
    steering: Steering,
) -> Result<SteeringVector> {
    let config = model.config().clone();
    if steering.layer >= config.n_layers() {
        return Err(Error::InvalidArgument {
            argument: "layer",
            problem: format!(
                "the model has {} layers, layer {} was asked for",
                config.n_layers(),
                steering.layer
            ),
        });
    }
    if prompt.is_empty() {
        return Err(Error::NoTokens { what: "the prompt" });
    }
    if target as usize >= config.vocab_size() {
        return Err(Error::TokenOutOfVocabulary {
            id: target,
            vocab_size: config.vocab_size(),
        });
    }
    // On the host, with the optimizer; see the edit for its way to the model's device.
    let vector = Var::zeros(config.d_model(), DType::F32, &Device::Cpu)?;
    model.register_trainable(format!("steering.{}", steering.layer), &vector)?;
    let added = vector.as_tensor().clone();
    let hook = model.hooks_mut().register(
        HookFunction::new(format!("blocks.{}.hook_resid_pre", steering.layer))
            .without_capture()
            .with_edit(move |_, x| {
                // The vector is trained on the host; its copy to the value's device
                // passes the gradient back.
                let added = added.to_device(x.device())?.to_dtype(x.dtype())?;
                Ok(x.broadcast_add(&added)?)
            }),
    )?;
    let mut ids = prompt.to_vec();
    ids.push(target);
    // Token ids go from the host to the ranks, which bring them to their devices.
    let tokens = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let params = ParamsAdamW {
        lr: steering.learning_rate,
        weight_decay: 0.0,
        ..ParamsAdamW::default()
    };
    let mut adam = AdamW::new(vec![vector.clone()], params)?;
    let mut probabilities = Vec::with_capacity(steering.steps + 1);
    let name = format!("steering.{}", steering.layer);
    for _ in 0..steering.steps {
        let (logits, _) = model.forward_backward(&tokens)?;
        probabilities.push(probability(&logits, prompt.len() - 1, target)?);
        // The optimizer reads gradients from a store: a surrogate whose gradient is it.
        let grad = model.trainable_grad(&name)?.detach();
        let grads = (vector.as_tensor() * grad)?.sum_all()?.backward()?;
        adam.step(&grads)?;
    }
    let logits = model.forward(&tokens)?;
    probabilities.push(probability(&logits, prompt.len() - 1, target)?);
    Ok(SteeringVector {
        vector,
        hook,
        probabilities,
    })
}

/// The probability of `token` at position `at` of the first sequence of `logits`.
fn probability(logits: &Tensor, at: usize, token: u32) -> Result<f32> {
    let probs = candle_nn::ops::softmax(&logits.get(0)?.get(at)?, D::Minus1)?;
    Ok(probs.get(token as usize)?.to_scalar::<f32>()?)
}
