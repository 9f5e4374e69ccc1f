//! The norm of the residual stream at every layer, read through the hook layer.
//!
//! ```sh
//! cargo run --release --example residual_norms -- smollm2 "The capital of France is"
//! ```

use candle_core::{D, Device, Tensor};
use flexmodel::{BlockSite, Checkpoint, HookPoint};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_name = args.next().unwrap_or_else(|| "smollm2".to_string());
    let prompt = args
        .next()
        .unwrap_or_else(|| "The capital of France is".to_string());

    let checkpoint = Checkpoint::open(&model_name)?;
    let model = checkpoint.load_model()?;
    let ids = checkpoint.tokenizer.encode(&prompt)?;
    let tokens = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;

    // A closure is a hook layer: record the last position's residual norm before each block.
    let mut norms = Vec::new();
    model.forward(&tokens, &mut |point: HookPoint, x: Tensor| {
        if let HookPoint::Block {
            layer,
            site: BlockSite::RESID_PRE,
        } = point
        {
            let last = x.get(0)?.get(ids.len() - 1)?;
            let norm = last.sqr()?.sum(D::Minus1)?.sqrt()?.to_scalar::<f32>()?;
            norms.push((layer, norm));
        }
        Ok(x)
    })?;

    let widest = norms.iter().map(|(_, n)| *n).fold(0.0, f32::max);
    println!("‖resid_pre‖ at the last token of {prompt:?}:");
    for (layer, norm) in norms {
        let bar = "#".repeat((40.0 * norm / widest).round() as usize);
        println!("layer {layer:>2}  {norm:>9.2}  {bar}");
    }
    Ok(())
}
