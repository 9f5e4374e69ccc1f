//! `flexmodel hooks`: every hook point with its shape, shard spec and module aliases.

use std::io::Write;

use clap::Args;
use flexmodel::{Checkpoint, HookCatalog, HookKind, ModelPoints};

use crate::layout::LayoutArgs;

/// Options of `flexmodel hooks`.
#[derive(Args, Debug)]
pub struct HooksArgs {
    /// `smollm2`, `gemma3-270m`, a .gguf file or a Hugging Face model directory.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    layout: LayoutArgs,
}

/// Prints one line per hook point: name, shape, TP shard spec, module aliases (and
/// whether the point is opt-in).
pub fn run(args: HooksArgs) -> anyhow::Result<()> {
    let checkpoint = Checkpoint::open(&args.model)?;
    let config = &checkpoint.config;
    flexmodel::runtime::sharding::check_layout(config, &args.layout.layout()?)?;
    let (points, _) = flexmodel::sae::splice_all(config.points(), &args.layout.saes)?;
    std::io::stdout()
        .lock()
        .write_all(table(&points).as_bytes())?;
    Ok(())
}

/// The table `flexmodel hooks` prints: a header, then a line per point.
pub fn table(points: &ModelPoints) -> String {
    let catalog = HookCatalog::new(points.clone());
    let rows: Vec<[String; 4]> = points
        .all()
        .into_iter()
        .map(|point| {
            let dims: Vec<String> = points.dims(point).iter().map(|d| d.to_string()).collect();
            let mut aliases: Vec<String> = catalog
                .aliases_of(point)
                .map(|(name, kind)| match kind {
                    HookKind::Forward | HookKind::Backward => name.to_string(),
                    HookKind::ForwardPre => format!("{name} (input)"),
                })
                .collect();
            if point.is_opt_in() {
                aliases.insert(0, "(opt-in: hooked only when named)".to_string());
            }
            [
                point.to_string(),
                format!("[{}]", dims.join(", ")),
                point.shard_spec().to_string(),
                aliases.join(", "),
            ]
        })
        .collect();
    let width = |i: usize| rows.iter().map(|r| r[i].len()).max().unwrap_or(0);
    let (w0, w1, w2) = (width(0), width(1), width(2));
    let mut out = format!(
        "{:w0$}  {:w1$}  {:w2$}  module aliases\n",
        "hook point", "shape", "tp shard"
    );
    for [name, shape, spec, aliases] in rows {
        let line = format!("{name:w0$}  {shape:w1$}  {spec:w2$}  {aliases}");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
