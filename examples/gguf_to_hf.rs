//! Converts a model (`smollm2`, a .gguf file or a Hugging Face directory) into a
//! Hugging Face directory: `config.json`, f32 `model.safetensors`, `tokenizer.json`.
//!
//! ```sh
//! cargo run --release --example gguf_to_hf -- smollm2 /tmp/smollm2-hf
//! ```

use anyhow::bail;
use flexmodel::Checkpoint;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, out] = args.as_slice() else {
        bail!("usage: gguf_to_hf MODEL OUT_DIR");
    };
    let checkpoint = Checkpoint::open(model)?;
    checkpoint.save_hf_dir(std::path::Path::new(out))?;
    println!(
        "wrote {} tensors to {out}",
        checkpoint.weights.names().len()
    );
    Ok(())
}
