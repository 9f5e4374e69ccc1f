//! Writes a random LLaMA checkpoint of about the given size in the Hugging Face layout
//! (`config.json`, the byte-level `tokenizer.json`, bf16 safetensors files with an
//! index), for trying big-model paths without downloading one.
//!
//! ```sh
//! cargo run --release --example random_checkpoint -- /tmp/random-2gb 2
//! cargo run --release --example random_checkpoint -- /tmp/random-6gb 6 --files 6 --seed 1
//! ```
//!
//! Up to 3 GB the blocks are TinyLlama-sized (d_model 2048, 16 heads, 8 key/value
//! heads, d_mlp 5632); above, LLaMA-7B-sized (d_model 4096, 32 heads, 8 key/value heads,
//! d_mlp 11008). Either way the vocabulary has 32 000 tokens and the number of layers
//! is what reaches the size.

use anyhow::{Context, bail};
use flexmodel::models::{LlamaConfig, ModelSpec};
use flexmodel::tiny::{tiny_config, write_random_hf_dir};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: random_checkpoint OUT_DIR SIZE_GB [--files N] [--seed S]";
    let (Some(out), Some(gb)) = (args.first(), args.get(1)) else {
        bail!(usage);
    };
    let gb: f64 = gb.parse().context(usage)?;
    let option = |name: &str, default: u64| -> anyhow::Result<u64> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(args.get(i + 1).context(usage)?.parse().context(usage)?),
            None => Ok(default),
        }
    };
    let (files, seed) = (option("--files", 4)?, option("--seed", 0)?);
    let config = config_of_size(gb * 1e9);
    let bytes = write_random_hf_dir(out.as_ref(), &config, files as usize, seed)?;
    println!(
        "wrote {out}: {} layers of d_model {}, {:.3} G parameters, {:.2} GB in bf16",
        config.n_layers,
        config.d_model,
        config.parameter_count() as f64 / 1e9,
        bytes as f64 / 1e9
    );
    Ok(())
}

/// A configuration whose bf16 weights take about `bytes`.
fn config_of_size(bytes: f64) -> LlamaConfig {
    let (d_model, n_heads, d_mlp) = match bytes <= 3e9 {
        true => (2048, 16, 5632),
        false => (4096, 32, 11008),
    };
    let one_layer = LlamaConfig {
        vocab_size: 32_000,
        d_model,
        n_layers: 1,
        n_heads,
        n_kv_heads: 8,
        d_head: 128,
        d_mlp,
        max_position_embeddings: 4096,
        ..tiny_config()
    };
    let outside = 2.0 * (2 * 32_000 * d_model + d_model) as f64;
    let per_layer = 2.0 * one_layer.parameter_count() as f64 - outside;
    let n_layers = ((bytes - outside) / per_layer).round().max(1.0) as usize;
    LlamaConfig {
        n_layers,
        ..one_layer
    }
}
