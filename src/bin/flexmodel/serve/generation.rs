//! `POST /v1/generate`: a generation on the model's thread, its tokens sent as they come.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;
use flexmodel::api::GenerateRequest;
use flexmodel::edits::EditSpec;
use flexmodel::text::Decoding;
use flexmodel::{FlexModel, GenerateOptions, HookCatalog, HookFunction, HookKind, Tokenizer};
use tokio::sync::mpsc::UnboundedSender;

use super::batching::{parse_edits, safetensors_bytes};
use super::passes::Failure;

/// What a generation tells its client.
pub enum Event {
    /// Sequence `sequence` got `token` (`text` decoded on its own).
    Token {
        sequence: usize,
        token: u32,
        text: String,
    },
    /// The answer: the JSON of `flexmodel generate --json`.
    Done(serde_json::Value),
    /// Why it failed.
    Failed(Failure),
}

/// A generation request, checked and tokenized.
pub struct Prepared {
    prompts: Vec<String>,
    ids: Vec<Vec<u32>>,
    hooks: Vec<String>,
    edits: Vec<EditSpec>,
    options: GenerateOptions,
    tokenizer: Arc<Tokenizer>,
}

impl Prepared {
    /// Checks `request` (its persistent edits already among its own) against the model:
    /// every mistake is a 400 before it is queued.
    pub fn new(
        request: &GenerateRequest,
        catalog: &HookCatalog,
        tokenizer: Arc<Tokenizer>,
        vocab_size: usize,
    ) -> Result<Self, Failure> {
        if request.prompts.is_empty() {
            return Err(Failure::bad("prompts: give at least one"));
        }
        let max_new_tokens = request.max_new_tokens.unwrap_or(32);
        if max_new_tokens == 0 {
            return Err(Failure::bad("max_new_tokens must be at least 1"));
        }
        let ids = request
            .prompts
            .iter()
            .map(|text| tokenizer.encode(text))
            .collect::<flexmodel::Result<Vec<_>>>()?;
        if let Some(i) = ids.iter().position(Vec::is_empty) {
            return Err(Failure::bad(format!("prompt {i} has no token")));
        }
        if let Some(id) = ids.iter().flatten().find(|&&id| id as usize >= vocab_size) {
            return Err(Failure::bad(format!(
                "token id {id} is outside the vocabulary of {vocab_size}"
            )));
        }
        let edits = parse_edits(&request.edits, &request.tensors)?;
        for target in edits.iter().map(|e| &e.target).chain(&request.hooks) {
            catalog.resolve(target, HookKind::Forward)?;
        }
        let decoding = match request.temperature {
            Some(temperature) => Decoding::Sample {
                temperature,
                top_p: request.top_p.unwrap_or(1.0),
                seed: request.seed.unwrap_or(0),
            },
            None => Decoding::Greedy,
        };
        decoding.check()?;
        Ok(Self {
            prompts: request.prompts.clone(),
            ids,
            hooks: request.hooks.clone(),
            edits,
            options: GenerateOptions {
                max_new_tokens,
                decoding,
                ..GenerateOptions::default()
            },
            tokenizer,
        })
    }
}

/// Runs `request`, sending each token and then the answer (or the failure) to
/// `events`; true if it lost a rank. A client that left does not stop it.
pub fn run(model: &mut FlexModel, request: &Prepared, events: &UnboundedSender<Event>) -> bool {
    match generate(model, request, events) {
        Ok(answer) => {
            let _ = events.send(Event::Done(answer));
            false
        }
        Err(failure) => {
            let lost = failure.status == 503;
            let _ = events.send(Event::Failed(failure));
            lost
        }
    }
}

fn generate(
    model: &mut FlexModel,
    request: &Prepared,
    events: &UnboundedSender<Event>,
) -> Result<serde_json::Value, Failure> {
    for edit in &request.edits {
        model.hooks_mut().register(edit.hook_function())?;
    }
    for pattern in &request.hooks {
        model
            .hooks_mut()
            .register(HookFunction::new(pattern.clone()))?;
    }
    let tokenizer = &request.tokenizer;
    let generation = model.generate_with(&request.ids, &request.options, |tokens| {
        for (sequence, token) in tokens.iter().enumerate() {
            if let Some(token) = *token {
                let text = tokenizer.decode(&[token])?;
                let _ = events.send(Event::Token {
                    sequence,
                    token,
                    text,
                });
            }
        }
        Ok(())
    })?;
    let eos = model.config().eos_token_ids().to_vec();
    let mut completions = Vec::with_capacity(request.prompts.len());
    for (i, prompt) in request.prompts.iter().enumerate() {
        let generated = generation.generated(i);
        let text_ids = match generated.split_last() {
            Some((last, rest)) if eos.contains(last) => rest,
            _ => generated,
        };
        completions.push(serde_json::json!({
            "prompt": prompt,
            "tokens": generation.sequences[i],
            "text": tokenizer.decode(text_ids)?,
        }));
    }
    let mut answer = serde_json::json!({
        "completions": completions,
        "prefill_ms": generation.prefill.as_secs_f64() * 1e3,
        "decode_ms": generation.decode_time().as_secs_f64() * 1e3,
        "kv_cache": request.options.kv_cache,
    });
    if !request.hooks.is_empty() {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (name, mut calls) in model.store_mut().take_all() {
            if let Some(joined) = calls.pop() {
                tensors.insert(
                    name,
                    joined.to_dtype(candle_core::DType::F32)?.contiguous()?,
                );
            }
        }
        tensors.insert("attention_mask".to_string(), generation.captured_mask()?);
        use base64::Engine as _;
        let file = safetensors_bytes(&tensors)?;
        answer["captures"] = base64::engine::general_purpose::STANDARD
            .encode(file)
            .into();
    }
    Ok(answer)
}
