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
use flexmodel::analysis::steering::{Steering, train_steering_vector};
use flexmodel::{Checkpoint, FlexModel, GenerateOptions, Layout};

fn main() -> anyhow::Result<()> {
    let word = std::env::args()
        .nth(1)
        .unwrap_or_else(|| " Rome".to_string());
    let checkpoint = Checkpoint::open("smollm2")?;
    let tokenizer = &checkpoint.tokenizer;
    let prompt = "The capital of France is";
    let prompt_ids = tokenizer.encode(prompt)?;
    let target = *tokenizer
        .encode(&word)?
        .first()
        .context("the word has no tokens")?;

    let mut model = FlexModel::build(&checkpoint, Layout::new(1, 1, 3)?)?;
    let before = continuation(&mut model, &prompt_ids, tokenizer)?;
    println!("before: {prompt}{before}");
    let steering = Steering {
        layer: 12,
        steps: 20,
        learning_rate: 0.5,
    };
    let trained = train_steering_vector(&mut model, &prompt_ids, target, steering)?;
    for (step, p) in trained.probabilities.iter().enumerate().step_by(5) {
        println!("step {step:>2}: p({word:?} | prompt) = {p:.3}");
    }
    let after = continuation(&mut model, &prompt_ids, tokenizer)?;
    println!("after:  {prompt}{after}");
    let norm = trained.vector.as_tensor().sqr()?.sum_all()?.sqrt()?;
    println!("steering vector norm {:.2}", norm.to_scalar::<f32>()?);
    Ok(())
}

/// The greedy continuation of `prompt` (four tokens).
fn continuation(
    model: &mut FlexModel,
    prompt: &[u32],
    tokenizer: &flexmodel::Tokenizer,
) -> anyhow::Result<String> {
    let options = GenerateOptions {
        max_new_tokens: 4,
        ..GenerateOptions::default()
    };
    let generation = model.generate(&[prompt], &options)?;
    Ok(tokenizer.decode(generation.generated(0))?)
}
