//! Which attention heads make SmolLM2 say " Paris"? Zero each head of a few layers in
//! turn (an edit at `hook_z`) and print how much the logit of " Paris" drops.
//!
//! ```sh
//! cargo run --release --example head_ablation
//! ```

use anyhow::Context;
use candle_core::Tensor;
use flexmodel::{Checkpoint, FlexModel, Groups, HookFunction, edits};

fn main() -> anyhow::Result<()> {
    let checkpoint = Checkpoint::open("smollm2")?;
    let tokenizer = &checkpoint.tokenizer;
    let tokens = tokenizer.encode_batch(&["The capital of France is"])?;
    let paris = *tokenizer
        .encode(" Paris")?
        .first()
        .context("empty encoding")?;
    let mut model = FlexModel::new(checkpoint.load_model()?);
    let n_heads = model.config().sizes().n_heads;

    let paris_logit = |logits: &Tensor| -> anyhow::Result<f32> {
        let last = logits.get(0)?.get(logits.dim(1)? - 1)?;
        Ok(last.get(paris as usize)?.to_scalar::<f32>()?)
    };
    let clean = paris_logit(&model.forward(&tokens)?)?;
    println!("logit of \" Paris\" with every head: {clean:.2}");

    // One group per (layer, head) ablation; each pass runs exactly one of them.
    let layers = [0, 5, 10, 15, 20, 25, 29];
    for &layer in &layers {
        for head in 0..n_heads {
            let ablate = HookFunction::new(format!("blocks.{layer}.attn.hook_z"))
                .with_edit(edits::zero_head(head))
                .without_capture();
            model
                .hooks_mut()
                .create_hook_group(&format!("L{layer}H{head}"), ablate)?;
        }
    }
    println!("drop in the logit when one head is zeroed:");
    println!(
        "layer  {}",
        (0..n_heads)
            .map(|h| format!("{:>6}", format!("H{h}")))
            .collect::<String>()
    );
    for &layer in &layers {
        let mut row = format!("{layer:>5}  ");
        for head in 0..n_heads {
            let logits =
                model.forward_groups(&tokens, &Groups::only([format!("L{layer}H{head}")]))?;
            row += &format!("{:>6.2}", clean - paris_logit(&logits)?);
        }
        println!("{row}");
    }
    Ok(())
}
