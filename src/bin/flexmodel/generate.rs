//! `flexmodel generate`: greedy continuation of a prompt, printed as it is produced.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use flexmodel::{Checkpoint, generate_greedy};

use crate::layout::{LayoutArgs, Plan};

/// Options of `flexmodel generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// `smollm2`, a .gguf file or a Hugging Face model directory.
    #[arg(long)]
    model: String,
    /// The text to continue.
    #[arg(long)]
    prompt: String,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    #[command(flatten)]
    layout: LayoutArgs,
}

/// Prints the continuation of the prompt (without the prompt) on stdout.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let checkpoint = Checkpoint::open(&args.model)?;
    let prompt = checkpoint.tokenizer.encode(&args.prompt)?;
    anyhow::ensure!(
        !prompt.is_empty(),
        "the prompt {:?} has no tokens",
        args.prompt
    );
    let tokens =
        candle_core::Tensor::new(prompt.as_slice(), &candle_core::Device::Cpu)?.unsqueeze(0)?;
    let plan = Plan {
        batches: std::slice::from_ref(&tokens),
        ..Plan::default()
    };
    let mut model = args.layout.build(&checkpoint, &args.model, plan)?;
    let mut printed = String::new();
    let mut generated = Vec::new();
    let mut stdout = std::io::stdout().lock();
    generate_greedy(&mut model, &prompt, args.max_new_tokens, |token| {
        // Decode the whole continuation so multi-token characters print whole.
        generated.push(token);
        let text = checkpoint.tokenizer.decode(&generated)?;
        if let Some(new) = text.strip_prefix(printed.as_str()) {
            let _ = write!(stdout, "{new}").and_then(|_| stdout.flush());
        }
        printed = text;
        Ok(())
    })
    .context("generation failed")?;
    writeln!(stdout).context("writing to stdout")?;
    Ok(())
}
