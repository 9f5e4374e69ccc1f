//! Logit lens and tuned lens on SmolLM2, sharded over two pipeline stages: how far is the
//! prediction read off each layer's residual stream from the model's final one? Trains
//! a small tuned lens (a few minutes on two cores), saves it, loads it back and compares
//! both lenses on held-out text.
//!
//! ```sh
//! cargo run --release --example tuned_lens
//! ```

use flexmodel::analysis::lens::{Training, TunedLens, Unembed};
use flexmodel::weights::pretrained::TINY_SHAKESPEARE;
use flexmodel::{Checkpoint, FlexModel, Layout, chunk_tokens, progress_bar};

fn main() -> anyhow::Result<()> {
    let checkpoint = Checkpoint::open("smollm2")?;
    let text = std::fs::read_to_string(TINY_SHAKESPEARE.path()?)?;
    let ids = checkpoint.tokenizer.encode(&text)?;
    // The first tokens train the lens; the last ones, never seen in training, test it.
    let train = chunk_tokens(&ids, 128, 1, 2048)?;
    let held_out = chunk_tokens(&ids[ids.len() - 1024..], 128, 1, 1024)?;

    let mut model = FlexModel::build(&checkpoint, Layout::new(1, 2, 1)?)?;
    let unembed = Unembed::of(&model)?;
    let (n_layers, d_model) = (model.config().n_layers(), model.config().d_model());
    let mut lens = TunedLens::identity(n_layers, d_model)?;
    let progress = progress_bar(train.len() as u64, "training");
    lens.train(&mut model, &unembed, &train, Training::default(), &progress)?;
    progress.finish_and_clear();

    let path = std::env::temp_dir().join("smollm2_tuned_lens.safetensors");
    lens.save(&path)?;
    let lens = TunedLens::load(&path, n_layers, d_model)?;
    let progress = progress_bar(held_out.len() as u64, "evaluating");
    let report = lens.evaluate(&mut model, &unembed, &held_out, &progress)?;
    progress.finish_and_clear();
    println!(
        "KL(final ‖ lens) in bits on {} held-out tokens",
        report.tokens
    );
    println!("layer  logit lens  tuned lens");
    for layer in report.layers.iter().step_by(3) {
        println!(
            "{:>5}  {:>10.2}  {:>10.2}",
            layer.layer, layer.logit_kl_bits, layer.tuned_kl_bits
        );
    }
    println!("translators saved to {}", path.display());
    Ok(())
}
