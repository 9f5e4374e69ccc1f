//! `flexmodel capture`: run one pass with capture hooks and edits, write a safetensors file.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::{DType, Tensor};
use clap::Args;
use flexmodel::weights::write_safetensors;
use flexmodel::{Checkpoint, HookFunction, masked_next_token_loss, next_token_loss};

use crate::hook_args::Hooks;
use crate::input::InputArgs;
use crate::layout::{LayoutArgs, Plan};
use crate::pass_args::PassArgs;

/// Options of `flexmodel capture`.
#[derive(Args, Debug)]
pub struct CaptureArgs {
    /// `smollm2`, `gemma3-270m`, a .gguf file or a Hugging Face model directory.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    input: InputArgs,
    /// Hook points to capture: exact names or globs (`blocks.*.hook_resid_post`, `*`).
    #[arg(long = "hook", required = true, num_args = 1..)]
    hooks: Vec<String>,
    /// `NAME=zero-head:H`, `NAME=scale:F` or `NAME=add:FILE.safetensors` (repeatable).
    #[arg(long = "edit")]
    edits: Vec<String>,
    /// Also capture the gradient of the loss at each point (`NAME_grad`).
    #[arg(long)]
    grad: bool,
    /// The safetensors file to write.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    pass: PassArgs,
    #[command(flatten)]
    layout: LayoutArgs,
}

/// Captures the hooked points (the last call of each) and the loss into `--out`.
pub fn run(args: CaptureArgs) -> anyhow::Result<()> {
    let hooks = Hooks::parse(&args.hooks, &args.edits)?;
    let checkpoint = Checkpoint::open(&args.model)?;
    let batch = args.input.tokens(&checkpoint)?;
    let tokens = batch.tokens().clone();
    if args.grad && !args.pass.full() {
        bail!(
            "--grad needs the loss, from every position's logits: it takes no --stop-at-layer and only --logits all"
        );
    }
    let scope = args.pass.scope();
    let plan = Plan {
        batches: std::slice::from_ref(&tokens),
        targets: hooks.targets(),
        scope,
    };
    let mut model = args.layout.build(&checkpoint, &args.model, plan)?;
    hooks.register(&mut model)?;
    if args.grad {
        for pattern in &args.hooks {
            model
                .hooks_mut()
                .register(HookFunction::backward(pattern.clone()))?;
        }
    }
    let seq = batch.sequences()?.iter().map(Vec::len).max().unwrap_or(0);
    if args.grad && seq < 2 {
        bail!("--grad needs sequences of at least two tokens (the loss predicts the next token)");
    }
    let (output, loss) = match args.grad {
        true => {
            let (logits, loss) = model.forward_backward(&batch)?;
            (Some(logits), Some(loss))
        }
        false => (model.forward_scoped(&batch, scope)?, None),
    };
    // The loss needs every position's logits.
    let logits = output.filter(|_| args.pass.full());

    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (name, calls) in model.store().iter() {
        if let Some(last) = calls.last() {
            out.insert(name.to_string(), last.to_dtype(DType::F32)?.contiguous()?);
        }
    }
    if let Some(logits) = logits.filter(|_| seq > 1) {
        let loss = match loss {
            Some(loss) => Tensor::new(&[loss], logits.device())?,
            None => match batch.attention_mask() {
                Some(mask) => masked_next_token_loss(&logits, &tokens, mask)?.reshape(1)?,
                None => next_token_loss(&logits, &tokens)?.reshape(1)?,
            },
        };
        eprintln!(
            "loss (mean next-token cross-entropy): {:.4}",
            loss.to_vec1::<f32>()?[0]
        );
        out.insert("loss".to_string(), loss);
    }
    if let Some(mask) = batch.attention_mask() {
        out.insert("attention_mask".to_string(), mask.clone());
    }
    write_safetensors(&out, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {} hook points ({:.1} MB) to {}",
        model.store().len(),
        model.store().bytes() as f64 / 1e6,
        args.out.display()
    );
    Ok(())
}
