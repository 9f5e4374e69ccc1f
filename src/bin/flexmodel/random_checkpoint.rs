//! `flexmodel random-checkpoint` (hidden): writes a random LLaMA in the Hugging Face
//! layout, for checks on machines that have no weights and no network
//! (`scripts/gpu-check` makes its model this way).

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use flexmodel::tiny::{smollm2_shaped_config, tiny_config, write_random_hf_dir};

/// What `random-checkpoint` takes.
#[derive(Args, Debug)]
pub struct RandomCheckpointArgs {
    /// The directory to write (`config.json`, `tokenizer.json`, bf16 safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Whose shapes the model has.
    #[arg(long, value_enum, default_value_t = Shapes::Smollm2)]
    like: Shapes,
    /// The seed the weights are drawn from: the same seed writes the same model.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The shapes a random checkpoint can have.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Shapes {
    /// SmolLM2-135M's.
    Smollm2,
    /// The tests' tiny model's.
    Tiny,
}

pub fn run(args: RandomCheckpointArgs) -> anyhow::Result<()> {
    let config = match args.like {
        Shapes::Smollm2 => smollm2_shaped_config(),
        Shapes::Tiny => tiny_config(),
    };
    let bytes = write_random_hf_dir(&args.out, &config, 1, args.seed)?;
    println!(
        "wrote {}: {} layers of d_model {}, {:.1} MB of bf16 weights",
        args.out.display(),
        config.n_layers,
        config.d_model,
        bytes as f64 / 1e6
    );
    Ok(())
}
