//! The thread that holds the model and runs the requests' passes, one after another.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use candle_core::{DType, Device, Tensor};
use flexmodel::api::ForwardRequest;
use flexmodel::edits::EditSpec;
use flexmodel::{
    Checkpoint, FlexModel, HookFunction, Logits, PassScope, TokenBatch, masked_next_token_loss,
    next_token_loss,
};
use tokio::sync::oneshot;

/// Why a request failed: the HTTP status and what to tell the client.
#[derive(Debug)]
pub struct Failure {
    /// 400 for what the request got wrong, 503 when a rank was lost, 500 otherwise.
    pub status: u16,
    /// The message.
    pub message: String,
}

impl Failure {
    /// A request the server cannot run as it is.
    pub fn bad(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }
}

impl From<flexmodel::Error> for Failure {
    fn from(e: flexmodel::Error) -> Self {
        let status = match &e {
            flexmodel::Error::Sharded(_) => 503,
            flexmodel::Error::Internal(_) => 500,
            _ => 400,
        };
        Self {
            status,
            message: e.to_string(),
        }
    }
}

impl From<candle_core::Error> for Failure {
    fn from(e: candle_core::Error) -> Self {
        flexmodel::Error::from(e).into()
    }
}

/// A request for the model's thread, with where its answer goes.
pub enum Job {
    /// One forward pass; the answer is a safetensors file.
    Forward {
        request: ForwardRequest,
        reply: oneshot::Sender<Result<Vec<u8>, Failure>>,
    },
}

/// The sending side of the model's queue, with its depth.
#[derive(Clone)]
pub struct Queue {
    jobs: mpsc::Sender<Job>,
    depth: Arc<AtomicUsize>,
}

impl Queue {
    /// Queues `job`; false if the model's thread is gone.
    pub fn submit(&self, job: Job) -> bool {
        self.depth.fetch_add(1, Ordering::SeqCst);
        let sent = self.jobs.send(job).is_ok();
        if !sent {
            self.depth.fetch_sub(1, Ordering::SeqCst);
        }
        sent
    }

    /// The requests waiting for the model.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }
}

/// Starts the model's thread: it builds the model with `build` (the model stays on that
/// thread), says so, then runs the queue's requests one after another. Returns the
/// queue once the model is built, or why it could not be.
pub fn start<B>(build: B) -> anyhow::Result<Queue>
where
    B: FnOnce() -> anyhow::Result<(FlexModel, Checkpoint)> + Send + 'static,
{
    let (jobs, received) = mpsc::channel::<Job>();
    let depth = Arc::new(AtomicUsize::new(0));
    let queue = Queue {
        jobs,
        depth: depth.clone(),
    };
    let (ready, built) = mpsc::channel();
    std::thread::Builder::new()
        .name("flexmodel-model".into())
        .spawn(move || {
            let (mut model, checkpoint) = match build() {
                Ok(built) => built,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let _ = ready.send(Ok(()));
            for job in received {
                depth.fetch_sub(1, Ordering::SeqCst);
                match job {
                    Job::Forward { request, reply } => {
                        let answer = forward(&mut model, &checkpoint, &request);
                        // What a pass leaves behind is not the next request's.
                        model.hooks_mut().clear();
                        model.store_mut().clear();
                        // A client that left no longer waits for its answer.
                        let _ = reply.send(answer);
                    }
                }
            }
        })?;
    built
        .recv()
        .map_err(|_| anyhow::anyhow!("the model's thread ended while building the model"))??;
    Ok(queue)
}

/// The pass of `request` (its persistent edits already among its own): its captures,
/// the loss and the attention mask, as `flexmodel capture --out` writes them, in a
/// safetensors file.
fn forward(
    model: &mut FlexModel,
    checkpoint: &Checkpoint,
    request: &ForwardRequest,
) -> Result<Vec<u8>, Failure> {
    let batch = batch_of(checkpoint, request)?;
    let inline = inline_tensors(&request.tensors)?;
    for spec in &request.edits {
        let edit = EditSpec::parse_with(spec, &inline)?;
        model.hooks_mut().register(edit.hook_function())?;
    }
    for pattern in &request.hooks {
        model
            .hooks_mut()
            .register(HookFunction::new(pattern.clone()))?;
    }
    let logits = match request.logits.as_deref() {
        None | Some("all") => Logits::All,
        Some("last") => Logits::Last,
        Some("none") => Logits::None,
        Some(other) => {
            return Err(Failure::bad(format!(
                "logits is all, last or none, not {other:?}"
            )));
        }
    };
    let scope = PassScope {
        stop_at_layer: request.stop_at_layer,
        logits,
    };
    let output = model.forward_scoped(&batch, scope)?;
    let full = request.stop_at_layer.is_none() && logits == Logits::All;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (name, calls) in model.store().iter() {
        if let Some(last) = calls.last() {
            out.insert(name.to_string(), last.to_dtype(DType::F32)?.contiguous()?);
        }
    }
    let seq = batch.dims()?.1;
    if let (Some(logits), true, true) = (output, full, seq > 1) {
        let tokens = batch.tokens();
        let loss = match batch.attention_mask() {
            Some(mask) => masked_next_token_loss(&logits, tokens, mask)?,
            None => next_token_loss(&logits, tokens)?,
        };
        out.insert("loss".to_string(), loss.reshape(1)?);
    }
    if let Some(mask) = batch.attention_mask() {
        out.insert("attention_mask".to_string(), mask.clone());
    }
    safetensors_bytes(&out)
}

/// The request's batch: its token rows or its prompts, left-padded.
fn batch_of(checkpoint: &Checkpoint, request: &ForwardRequest) -> Result<TokenBatch, Failure> {
    let rows = match (&request.tokens, &request.prompts) {
        (Some(rows), None) => rows.clone(),
        (None, Some(prompts)) => prompts
            .iter()
            .map(|text| checkpoint.tokenizer.encode(text))
            .collect::<flexmodel::Result<_>>()?,
        _ => return Err(Failure::bad("give either tokens or prompts")),
    };
    if rows.is_empty() {
        return Err(Failure::bad("the batch has no sequence"));
    }
    Ok(TokenBatch::left_padded(&rows)?)
}

/// The tensors a request sent along, by key: each a base64-encoded safetensors file
/// holding a tensor under its key.
pub fn inline_tensors(
    sent: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Tensor>, Failure> {
    use base64::Engine as _;
    let mut tensors = BTreeMap::new();
    for (key, encoded) in sent {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| Failure::bad(format!("tensors.{key}: not base64: {e}")))?;
        let mut file = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| Failure::bad(format!("tensors.{key}: not a safetensors file: {e}")))?;
        let tensor = file.remove(key).ok_or_else(|| {
            Failure::bad(format!("tensors.{key}: no tensor under the key {key:?}"))
        })?;
        tensors.insert(key.clone(), tensor);
    }
    Ok(tensors)
}

/// `tensors` as the bytes of a safetensors file.
fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>, Failure> {
    let file = tempfile::NamedTempFile::new().map_err(|e| Failure {
        status: 500,
        message: format!("a temporary file for the answer: {e}"),
    })?;
    flexmodel::weights::write_safetensors(tensors, file.path())?;
    std::fs::read(file.path()).map_err(|e| Failure {
        status: 500,
        message: format!("reading the answer back: {e}"),
    })
}
