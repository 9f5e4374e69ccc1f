//! The latents of an SAE that fire most on one prompt: SmolLM2 with the SAE spliced at
//! its hook point (latents split over three tensor-parallel ranks), the prompt's
//! `HOOK.hook_sae_acts_post` captured, and the latents with the largest activations (after
//! the first token) drawn per token as a heatmap.
//!
//! ```sh
//! cargo run --release --example sae_top_latents -- SAE_DIR@blocks.6.hook_resid_post out/sae_top_latents.png
//! ```

use anyhow::Context;
use candle_core::{Device, Tensor};
use flexmodel::plot::Heatmap;
use flexmodel::runtime::Placement;
use flexmodel::sae::SaeAttachment;
use flexmodel::{Checkpoint, FlexModel, HookFunction, Layout};

/// The latents drawn.
const TOP: usize = 16;
const PROMPT: &str = "To be, or not to be, that is the question: whether 'tis nobler in the mind";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: sae_top_latents SAE_DIR@HOOK OUT.png";
    let sae: SaeAttachment = args.next().context(usage)?.parse()?;
    let out = args.next().context(usage)?;
    let checkpoint = Checkpoint::open("smollm2")?;
    let layout = Layout::new(1, 1, 3)?;
    let mut model = FlexModel::build_with_saes(
        &checkpoint,
        layout,
        &Placement::Threads,
        std::slice::from_ref(&sae),
    )?;
    let latents = format!("{}.hook_sae_acts_post", sae.hook);
    model.hooks_mut().register(HookFunction::new(&latents))?;
    let tokenizer = &checkpoint.tokenizer;
    let ids = tokenizer.encode(PROMPT)?;
    model.forward(Tensor::new(&ids[..], &Device::Cpu)?.unsqueeze(0)?)?;
    // [t, d_sae]: each position's latents.
    let acts = model
        .store()
        .last(&latents)
        .context("no latents captured")?
        .get(0)?;
    let by_latent: Vec<Vec<f32>> = acts.t()?.contiguous()?.to_vec2()?;
    // The first position's latents are the model's attention sink, whatever the text:
    // the ranking leaves it out (the figure draws it).
    let peak = |row: &Vec<f32>| row[1..].iter().copied().fold(0f32, f32::max);
    let mut order: Vec<usize> = (0..by_latent.len()).collect();
    order.sort_by(|&a, &b| peak(&by_latent[b]).total_cmp(&peak(&by_latent[a])));
    order.truncate(TOP);
    let rows: Vec<Vec<f32>> = order.iter().map(|&l| by_latent[l].clone()).collect();
    let row_names: Vec<String> = order.iter().map(|l| format!("latent {l}")).collect();
    let tokens: Vec<String> = ids
        .iter()
        .map(|&id| tokenizer.decode(&[id]).map(|t| t.trim().to_string()))
        .collect::<flexmodel::Result<_>>()?;
    for (&latent, row) in order.iter().zip(&rows) {
        let (at, value) =
            row.iter().enumerate().fold(
                (0, 0f32),
                |best, (i, &v)| if v > best.1 { (i, v) } else { best },
            );
        println!("latent {latent:>5}: peak {value:.2} at {:?}", tokens[at]);
    }
    let title = format!("The {TOP} strongest latents of the SAE at {}", sae.hook);
    Heatmap {
        title: &title,
        x_label: "token",
        y_label: "",
        value_label: "activation",
        rows: &rows,
        column_names: Some(&tokens),
        row_names: Some(&row_names),
    }
    .save(std::path::Path::new(&out))?;
    println!("wrote {out}");
    Ok(())
}
