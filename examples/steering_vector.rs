//! Trains a steering vector on SmolLM2 split over three tensor-parallel ranks, so that
//! "The capital of France is" continues with a chosen word.
//!
//! The vector is added to the residual stream before one block at every position (an
//! edit at `blocks.L.hook_resid_pre`); Adam follows its gradient through the sharded
//! model and the edit.
//!
//! ```sh
//! cargo run --release --example steering_vector -- " Rome"
//! ```

use anyhow::Context;
use candle_core::{D, DType, Tensor, Var};
use flexmodel::{Checkpoint, FlexModel, HookFunction, Layout, generate_greedy};

const LAYER: usize = 12;
const STEPS: usize = 20;
const LEARNING_RATE: f64 = 0.5;

fn main() -> anyhow::Result<()> {
    let word = std::env::args()
        .nth(1)
        .unwrap_or_else(|| " Rome".to_string());
    let checkpoint = Checkpoint::open("smollm2")?;
    let tokenizer = &checkpoint.tokenizer;
    let prompt = "The capital of France is";
    let prompt_ids = tokenizer.encode(prompt)?;
    let target_ids = tokenizer.encode(&word)?;
    let target = *target_ids.first().context("the word has no tokens")?;

    let mut model = FlexModel::build(&checkpoint, Layout::new(1, 1, 3)?)?;
    let steer = Var::zeros(
        model.config().d_model,
        DType::F32,
        &candle_core::Device::Cpu,
    )?;
    model.register_trainable("steer", &steer)?;
    let v = steer.as_tensor().clone();
    let add = HookFunction::new(format!("blocks.{LAYER}.hook_resid_pre"))
        .without_capture()
        .with_edit(move |_, x| Ok(x.broadcast_add(&v)?));
    model.hooks_mut().register(add)?;

    let before = continuation(&mut model, &prompt_ids, tokenizer)?;
    println!("before: {prompt}{before}");
    // Train on the prompt followed by the word: the loss is the mean next-token loss.
    let mut ids = prompt_ids.clone();
    ids.extend(&target_ids);
    let tokens = Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)?.unsqueeze(0)?;
    let mut adam = Adam::new(&steer)?;
    for step in 0..STEPS {
        let (logits, loss) = model.forward_backward(&tokens)?;
        let p = word_probability(&logits, prompt_ids.len() - 1, target)?;
        if step % 5 == 0 || step + 1 == STEPS {
            println!("step {step:>2}: loss {loss:.3}, p({word:?} | prompt) = {p:.3}");
        }
        adam.step(&steer, &model.trainable_grad("steer")?)?;
    }
    let after = continuation(&mut model, &prompt_ids, tokenizer)?;
    println!("after:  {prompt}{after}");
    println!(
        "steering vector norm {:.2}",
        steer
            .as_tensor()
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f32>()?
    );
    Ok(())
}

/// The greedy continuation of `prompt` (four tokens).
fn continuation(
    model: &mut FlexModel,
    prompt: &[u32],
    tokenizer: &flexmodel::Tokenizer,
) -> anyhow::Result<String> {
    let new = generate_greedy(model, prompt, 4, |_| Ok(()))?;
    Ok(tokenizer.decode(&new)?)
}

/// The probability of `token` after position `at`.
fn word_probability(logits: &Tensor, at: usize, token: u32) -> anyhow::Result<f32> {
    let probs = candle_nn::ops::softmax(&logits.get(0)?.get(at)?, D::Minus1)?;
    Ok(probs.get(token as usize)?.to_scalar::<f32>()?)
}

/// Adam with the usual constants, for one variable.
struct Adam {
    m: Tensor,
    v: Tensor,
    t: i32,
}

impl Adam {
    fn new(var: &Var) -> anyhow::Result<Self> {
        Ok(Self {
            m: var.as_tensor().zeros_like()?,
            v: var.as_tensor().zeros_like()?,
            t: 0,
        })
    }

    fn step(&mut self, var: &Var, grad: &Tensor) -> anyhow::Result<()> {
        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
        self.t += 1;
        self.m = ((&self.m * b1)? + (grad * (1.0 - b1))?)?;
        self.v = ((&self.v * b2)? + (grad.sqr()? * (1.0 - b2))?)?;
        let m_hat = (&self.m / (1.0 - b1.powi(self.t)))?;
        let v_hat = (&self.v / (1.0 - b2.powi(self.t)))?;
        let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
        var.set(&(var.as_tensor() - (update * LEARNING_RATE)?)?)?;
        Ok(())
    }
}
