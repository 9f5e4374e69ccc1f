//! Find SmolLM2's induction heads: on random tokens repeated twice, an induction head
//! attends from each token of the second copy to the token after its first occurrence,
//! and the model predicts the second copy almost perfectly. The model runs
//! tensor-parallel over three shards; the hook API hands each attention pattern over
//! whole.
//!
//! ```sh
//! cargo run --release --example induction_heads [-- OUT_DIR]
//! ```

use std::path::PathBuf;

use flexmodel::analysis::induction::{measure, repeated_random_tokens, top_heads};
use flexmodel::{Checkpoint, FlexModel, Layout};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "induction".into()),
    );
    let checkpoint = Checkpoint::open("smollm2")?;
    let tokens = repeated_random_tokens(4, 48, checkpoint.config.vocab_size(), 0)?;
    let mut model = FlexModel::build(&checkpoint, Layout::new(1, 1, 3)?)?;
    let induction = measure(&mut model, &tokens)?;

    let loss = &induction.loss_by_position;
    let mean = |xs: &[f32]| xs.iter().sum::<f32>() / xs.len() as f32;
    println!(
        "next-token loss: {:.2} nats on the first copy, {:.2} on the second",
        mean(&loss[..47]),
        mean(&loss[48..])
    );
    println!("top induction heads:");
    for (layer, head, score) in top_heads(&induction.scores, 5)? {
        println!("  layer {layer:>2} head {head}: {score:.3}");
    }
    for path in induction.save(&out)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}
