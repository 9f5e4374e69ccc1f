//! `flexmodel generate`: continuation of one or more prompts (one left-padded batch),
//! greedy or sampled, through the key/value cache, with hooks and edits at every step.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Tensor};
use clap::Args;
use flexmodel::text::{Decoding, Stop};
use flexmodel::weights::write_safetensors;
use flexmodel::{Checkpoint, GenerateOptions, Generation, progress_bar};

use crate::hook_args::Hooks;
use crate::input::prompt_batch;
use crate::layout::{LayoutArgs, Plan};

/// Options of `flexmodel generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// `smollm2`, `gemma3-270m`, a .gguf file or a Hugging Face model directory.
    #[arg(long)]
    model: String,
    /// The text to continue; repeat for a batch (prompts of unequal length are padded).
    #[arg(long = "prompt", required = true, num_args = 1..)]
    prompts: Vec<String>,
    /// The most tokens to generate per prompt.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Hook points to capture over the whole generation: exact names or globs.
    #[arg(long = "hook", num_args = 1..)]
    hooks: Vec<String>,
    /// `NAME=zero-head:H`, `NAME=scale:F` or `NAME=add:FILE.safetensors`, applied at
    /// every position of every step (repeatable).
    #[arg(long = "edit")]
    edits: Vec<String>,
    /// The safetensors file for the captures, joined along positions, and
    /// `attention_mask`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Recompute the whole sequence at every step instead of using the key/value cache.
    #[arg(long)]
    no_kv_cache: bool,
    /// Print the completions as one JSON object (the last line).
    #[arg(long)]
    json: bool,
    /// Sample each token at this temperature (above 0) instead of taking the most
    /// likely one.
    #[arg(long)]
    temperature: Option<f64>,
    /// With `--temperature`: sample among the most likely tokens whose probabilities
    /// reach this together (in (0, 1]).
    #[arg(long, default_value_t = 1.0, requires = "temperature")]
    top_p: f64,
    /// With `--temperature`: the seed of the sampler (the same seed, the same tokens).
    #[arg(long, default_value_t = 0, requires = "temperature")]
    seed: u64,
    #[command(flatten)]
    layout: LayoutArgs,
}

/// Prints the continuations (without the prompts), or with `--json` the completions.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.max_new_tokens > 0,
        "--max-new-tokens must be at least 1"
    );
    let hooks = Hooks::parse(&args.hooks, &args.edits)?;
    let checkpoint = Checkpoint::open(&args.model)?;
    let batch = prompt_batch(&checkpoint, &args.prompts)?;
    let prompts = batch.sequences()?;
    let plan = Plan {
        batches: std::slice::from_ref(batch.tokens()),
        targets: hooks.targets(),
        ..Plan::default()
    };
    let mut model = args.layout.build(&checkpoint, &args.model, plan)?;
    hooks.register(&mut model)?;
    let decoding = match args.temperature {
        Some(temperature) => Decoding::Sample {
            temperature,
            top_p: args.top_p,
            seed: args.seed,
        },
        None => Decoding::Greedy,
    };
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        kv_cache: !args.no_kv_cache,
        decoding,
        ..GenerateOptions::default()
    };
    // One prompt streams its continuation; a batch shows a progress bar.
    let stream = prompts.len() == 1 && !args.json;
    let bar = progress_bar(args.max_new_tokens as u64, "generating");
    if stream {
        bar.finish_and_clear();
    }
    let mut printer = Printer::default();
    let generation = model
        .generate_with(&prompts, &options, |tokens| {
            bar.inc(1);
            if stream && let Some(token) = tokens[0] {
                printer.push(&checkpoint, token)?;
            }
            Ok(())
        })
        .context("generation failed")?;
    bar.finish_and_clear();
    if generation.stop == Stop::Context {
        eprintln!(
            "stopped at the model's context of {} tokens",
            checkpoint.config.context()
        );
    }
    if let Some(out) = &args.out {
        write_captures(&mut model, &generation, out)?;
    }
    let texts = (0..prompts.len())
        .map(|i| text_of(&checkpoint, generated_text_ids(&checkpoint, &generation, i)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let completions: Vec<_> = (0..prompts.len())
            .map(|i| {
                serde_json::json!({
                    "prompt": args.prompts[i],
                    "tokens": generation.sequences[i],
                    "text": texts[i],
                })
            })
            .collect();
        let json = serde_json::json!({
            "completions": completions,
            "prefill_ms": generation.prefill.as_secs_f64() * 1e3,
            "decode_ms": generation.decode_time().as_secs_f64() * 1e3,
            "kv_cache": options.kv_cache,
        });
        writeln!(stdout, "{json}").context("writing to stdout")?;
    } else if stream {
        writeln!(stdout).context("writing to stdout")?;
    } else {
        for text in &texts {
            writeln!(stdout, "{text}").context("writing to stdout")?;
        }
    }
    Ok(())
}

/// The ids of sequence `i`'s generated text: its new tokens but a final end-of-sequence.
fn generated_text_ids<'a>(
    checkpoint: &Checkpoint,
    generation: &'a Generation,
    i: usize,
) -> &'a [u32] {
    let generated = generation.generated(i);
    match generated.split_last() {
        Some((last, rest)) if checkpoint.config.eos_token_ids().contains(last) => rest,
        _ => generated,
    }
}

fn text_of(checkpoint: &Checkpoint, ids: &[u32]) -> anyhow::Result<String> {
    Ok(checkpoint.tokenizer.decode(ids)?)
}

/// Prints a continuation as it grows, whole characters at a time.
#[derive(Default)]
struct Printer {
    generated: Vec<u32>,
    printed: String,
}

impl Printer {
    fn push(&mut self, checkpoint: &Checkpoint, token: u32) -> flexmodel::Result<()> {
        if checkpoint.config.eos_token_ids().contains(&token) {
            return Ok(());
        }
        // Decode the whole continuation so multi-token characters print whole.
        self.generated.push(token);
        let text = checkpoint.tokenizer.decode(&self.generated)?;
        if let Some(new) = text.strip_prefix(self.printed.as_str()) {
            let mut stdout = std::io::stdout().lock();
            let _ = write!(stdout, "{new}").and_then(|_| stdout.flush());
        }
        self.printed = text;
        Ok(())
    }
}

/// Writes every capture of the generation (joined along positions) and the attention
/// mask over the same positions to `out`.
fn write_captures(
    model: &mut flexmodel::FlexModel,
    generation: &Generation,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, mut calls) in model.store_mut().take_all() {
        if let Some(joined) = calls.pop() {
            tensors.insert(name, joined.to_dtype(DType::F32)?.contiguous()?);
        }
    }
    let points = tensors.len();
    tensors.insert("attention_mask".into(), generation.captured_mask()?);
    write_safetensors(&tensors, out).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {points} hook points to {}", out.display());
    Ok(())
}
