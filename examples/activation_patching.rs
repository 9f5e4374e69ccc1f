//! Where does SmolLM2 keep "Eiffel Tower → Paris"? Run "The Colosseum is in the city of"
//! (which says " Rome"), and patch the residual stream entering each layer at each
//! position with its value from "The Eiffel Tower is in the city of" (which says
//! " Paris"); plot how much of the clean logit difference " Paris" − " Rome" comes back.
//! The model runs tensor-parallel over three shards. Prompts of unequal length line up
//! at their ends: the last positions, as many as the shorter prompt has, are patched.
//!
//! ```sh
//! cargo run --release --example activation_patching [-- OUT.png]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use flexmodel::analysis::patching::patch_residual_stream;
use flexmodel::{Checkpoint, FlexModel, Layout, progress_bar};

const CLEAN: &str = "The Eiffel Tower is in the city of";
const CORRUPTED: &str = "The Colosseum is in the city of";

fn main() -> anyhow::Result<()> {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("activation_patching.png"));
    let checkpoint = Checkpoint::open("smollm2")?;
    let tokenizer = &checkpoint.tokenizer;
    let (clean, corrupted) = (tokenizer.encode(CLEAN)?, tokenizer.encode(CORRUPTED)?);
    let single_token = |word: &str| -> anyhow::Result<u32> {
        match tokenizer.encode(word)?.as_slice() {
            [id] => Ok(*id),
            ids => anyhow::bail!("{word:?} is {} tokens, not one", ids.len()),
        }
    };
    let (paris, rome) = (single_token(" Paris")?, single_token(" Rome")?);

    let mut model = FlexModel::build(&checkpoint, Layout::new(1, 1, 3)?)?;
    let start = Instant::now();
    let n_layers = model.config().n_layers() as u64;
    let progress = progress_bar(n_layers, "patching layer by layer");
    let patching = patch_residual_stream(&mut model, &clean, &corrupted, paris, rome, &progress)
        .context("patching the residual stream")?;
    progress.finish_and_clear();
    println!(
        "logit(\" Paris\") − logit(\" Rome\"): clean {:.2}, corrupted {:.2}; {} layers × {} \
         positions patched in {:.1} s under TP=3",
        patching.clean_diff,
        patching.corrupted_diff,
        patching.restored.len(),
        clean.len().min(corrupted.len()),
        start.elapsed().as_secs_f64()
    );

    // The aligned last positions of both prompts.
    let n = clean.len().min(corrupted.len());
    let labels = clean[clean.len() - n..]
        .iter()
        .zip(&corrupted[corrupted.len() - n..])
        .map(|(&a, &b)| -> anyhow::Result<String> {
            let (a, b) = (tokenizer.decode(&[a])?, tokenizer.decode(&[b])?);
            let (a, b) = (a.trim().to_string(), b.trim().to_string());
            Ok(match a == b {
                true => a,
                false => format!("{a} / {b}"),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!("fraction of the clean logit difference restored (rows: layers)");
    println!(
        "layer {}",
        labels
            .iter()
            .map(|l| format!("{l:>13}"))
            .collect::<String>()
    );
    for (layer, row) in patching.restored.iter().enumerate() {
        let cells: String = row.iter().map(|f| format!("{f:>13.2}")).collect();
        println!("{layer:>5} {cells}");
    }
    if let Some((layer, position, fraction)) = patching.best() {
        println!(
            "most restored: layer {layer}, position {position} ({:?}): {fraction:.2}",
            labels[position]
        );
    }
    patching.save_heatmap(
        &out,
        "Activation patching: Eiffel Tower → Colosseum (SmolLM2-135M, TP=3)",
        &labels,
    )?;
    println!("wrote {}", out.display());
    Ok(())
}
