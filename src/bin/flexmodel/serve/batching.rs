//! Many forward requests as one pass: their sequences side by side in one ragged batch,
//! each request's edits confined to its own sequences, and each answer cut from the
//! pass's captures as if the request had run alone.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use flexmodel::api::{ForwardRequest, GradMetric, NamedPositions, Positions, Reduce};
use flexmodel::edits::EditSpec;
use flexmodel::hooks::Size;
use flexmodel::text::PAD_TOKEN;
use flexmodel::{
    FlexModel, Groups, HookCatalog, HookFunction, HookKind, HookPoint, Logits, PassScope,
    TokenBatch, masked_next_token_loss, next_token_loss,
};

use super::passes::Failure;

/// A forward request, checked and ready to join a batch.
pub struct Prepared {
    /// Its sequences' token ids.
    rows: Vec<Vec<u32>>,
    /// The length its sequences are left-padded to (its longest).
    len: usize,
    /// Its edits, persistent ones first.
    edits: Vec<EditSpec>,
    /// The points it captures, in the order of the model's points.
    captures: Vec<HookPoint>,
    scope: PassScope,
    /// The metric whose gradients it captures, if any (such a request runs alone).
    grad: Option<GradMetric>,
    /// The positions of each capture to answer, and their reduction.
    positions: Positions,
    reduce: Reduce,
}

/// What a pass's requests must share to run in it: the same scope, and with the last
/// position's logits only, the same length (the last position is the batch's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchKey {
    stop_at_layer: Option<usize>,
    logits: Logits,
    len: Option<usize>,
}

impl Prepared {
    /// Checks `request` against the model and tokenizes it: every mistake is a 400
    /// before the request joins a batch, so no request fails another's pass.
    pub fn new(
        request: &ForwardRequest,
        rows: Vec<Vec<u32>>,
        catalog: &HookCatalog,
        vocab_size: usize,
        context: usize,
    ) -> Result<Self, Failure> {
        if rows.is_empty() {
            return Err(Failure::bad("the batch has no sequence"));
        }
        if let Some(i) = rows.iter().position(Vec::is_empty) {
            return Err(Failure::bad(format!("sequence {i} has no token")));
        }
        for (i, row) in rows.iter().enumerate() {
            if let Some(&id) = row.iter().find(|&&id| id as usize >= vocab_size) {
                return Err(Failure::bad(format!(
                    "sequence {i}: token id {id} is outside the vocabulary of {vocab_size}"
                )));
            }
        }
        let len = rows.iter().map(Vec::len).max().unwrap_or(0);
        if len > context {
            return Err(Failure::bad(format!(
                "a sequence of {len} tokens is longer than the model's context of {context}"
            )));
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
        let edits = parse_edits(&request.edits, &request.tensors)?;
        for edit in &edits {
            catalog.check_in_scope(&edit.target, HookKind::Forward, scope)?;
            catalog.resolve(&edit.target, HookKind::Forward)?;
        }
        let mut captures = Vec::new();
        for pattern in &request.hooks {
            catalog.check_in_scope(pattern, HookKind::Forward, scope)?;
            captures.extend(catalog.resolve(pattern, HookKind::Forward)?);
        }
        if let Some(metric) = request.grad {
            check_grad(metric, &rows, scope, vocab_size)?;
            for pattern in &request.hooks {
                catalog.resolve(pattern, HookKind::Backward)?;
            }
        }
        let points = catalog.points();
        captures.sort_by_key(|&p| points.index(p));
        captures.dedup();
        Ok(Self {
            rows,
            len,
            edits,
            captures,
            scope,
            grad: request.grad,
            positions: checked_positions(request.positions.clone(), len)?,
            reduce: request.reduce.unwrap_or(Reduce::None),
        })
    }

    /// Whether it runs in a pass of its own (a backward pass is the request's alone).
    pub fn alone(&self) -> bool {
        self.grad.is_some()
    }

    /// Its number of sequences.
    pub fn sequences(&self) -> usize {
        self.rows.len()
    }

    /// The batch it can join.
    pub fn key(&self) -> BatchKey {
        BatchKey {
            stop_at_layer: self.scope.stop_at_layer,
            logits: self.scope.logits,
            len: (self.scope.logits == Logits::Last).then_some(self.len),
        }
    }

    /// The length of its longest sequence.
    pub fn len(&self) -> usize {
        self.len
    }
}

/// `positions` (all by default), checked against the request's length `len`.
fn checked_positions(positions: Option<Positions>, len: usize) -> Result<Positions, Failure> {
    match positions {
        None => Ok(Positions::Named(NamedPositions::All)),
        Some(Positions::List(list)) if list.is_empty() => {
            Err(Failure::bad("positions: an empty list chooses nothing"))
        }
        Some(Positions::List(list)) => match list.iter().find(|&&i| i >= len) {
            Some(i) => Err(Failure::bad(format!(
                "positions: {i} is beyond the request's {len} positions"
            ))),
            None => Ok(Positions::List(list)),
        },
        Some(named) => Ok(named),
    }
}

/// Checks that a pass of `rows` can take the gradient of `metric`.
fn check_grad(
    metric: GradMetric,
    rows: &[Vec<u32>],
    scope: PassScope,
    vocab_size: usize,
) -> Result<(), Failure> {
    if scope.stop_at_layer.is_some() || scope.logits != Logits::All {
        return Err(Failure::bad(
            "grad needs every position's logits: no stop_at_layer, and logits all",
        ));
    }
    match metric {
        GradMetric::Loss if rows.iter().all(|r| r.len() < 2) => Err(Failure::bad(
            "grad \"loss\" needs a sequence of two tokens or more (the loss predicts the next token)",
        )),
        GradMetric::LogitDiff { answer, wrong } => {
            match [answer, wrong]
                .into_iter()
                .find(|&t| t as usize >= vocab_size)
            {
                Some(id) => Err(Failure::bad(format!(
                    "grad logit_diff: token id {id} is outside the vocabulary of {vocab_size}"
                ))),
                None => Ok(()),
            }
        }
        GradMetric::Loss => Ok(()),
    }
}

/// One pass over `requests` (of one [`BatchKey`]): each answer is the safetensors file
/// `flexmodel capture --out` writes for that request alone. Sequences are left-padded
/// to their request's longest and then right-padded to the batch's: a request's
/// positions are where they are when it runs alone, and the causal mask keeps the
/// padding after them from reaching them.
pub fn run(model: &mut FlexModel, requests: &[&Prepared]) -> Result<Vec<Vec<u8>>, Failure> {
    let (Some(first), Some(len)) = (requests.first(), requests.iter().map(|r| r.len).max()) else {
        return Ok(Vec::new());
    };
    let scope = first.scope;
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    let mut spans: Vec<Range<usize>> = Vec::with_capacity(requests.len());
    for request in requests {
        let start = spans.last().map_or(0, |s| s.end);
        spans.push(start..start + request.rows.len());
        for row in &request.rows {
            let (left, right) = (request.len - row.len(), len - request.len);
            ids.extend(std::iter::repeat_n(PAD_TOKEN, left));
            ids.extend(row);
            ids.extend(std::iter::repeat_n(PAD_TOKEN, right));
            mask.extend(std::iter::repeat_n(0f32, left));
            mask.extend(std::iter::repeat_n(1f32, row.len()));
            mask.extend(std::iter::repeat_n(0f32, right));
        }
    }
    let rows = mask.len() / len;
    let tokens = Tensor::from_vec(ids, (rows, len), &Device::Cpu)?;
    let batch = TokenBatch::with_mask(tokens, Tensor::from_vec(mask, (rows, len), &Device::Cpu)?)?;
    // Every edit first, each on its own request's sequences; then every capture, so
    // that a capture sees the edits of the request that asked for it.
    for (request, span) in requests.iter().zip(&spans) {
        for edit in &request.edits {
            let hook = edit.hook_function().on_sequences(span.clone(), request.len);
            model.hooks_mut().register(hook)?;
        }
    }
    let mut captured: Vec<HookPoint> = requests.iter().flat_map(|r| r.captures.clone()).collect();
    captured.sort_by_key(|p| p.to_string());
    captured.dedup();
    for point in &captured {
        model
            .hooks_mut()
            .register(HookFunction::new(point.to_string()))?;
    }
    let (output, metric) = match (first.grad, requests.len()) {
        (None, _) => (model.forward_scoped(&batch, scope)?, None),
        (Some(grad), 1) => {
            for point in &first.captures {
                model
                    .hooks_mut()
                    .register(HookFunction::backward(point.to_string()))?;
            }
            let (logits, value) = match grad {
                GradMetric::Loss => model.forward_backward(&batch)?,
                GradMetric::LogitDiff { answer, wrong } => {
                    model.forward_backward_with_loss(&batch, &Groups::All, |logits| {
                        logit_difference(logits, answer, wrong)
                    })?
                }
            };
            (Some(logits), Some(value))
        }
        (Some(_), _) => {
            return Err(Failure {
                status: 500,
                message: "a request with grad was batched with others".into(),
            });
        }
    };
    let full = scope.stop_at_layer.is_none() && scope.logits == Logits::All;
    let mut answers = Vec::with_capacity(requests.len());
    for (request, span) in requests.iter().zip(spans) {
        let mut out: HashMap<String, Tensor> = HashMap::new();
        let own_mask = request_mask(request)?;
        for &point in &request.captures {
            let name = point.to_string();
            for key in [name.clone(), format!("{name}_grad")] {
                let Some(value) = model.store().get(&key).and_then(|calls| calls.last()) else {
                    continue;
                };
                let own = own_part(value, point, &span, request.len)?;
                let own = chosen(own, point, request, own_mask.as_ref())?;
                out.insert(key, own.to_dtype(DType::F32)?.contiguous()?);
            }
        }
        if let Some(value) = metric {
            out.insert("loss".to_string(), Tensor::new(&[value], &Device::Cpu)?);
        } else if let (Some(logits), true, true) = (&output, full, request.len > 1) {
            let logits = logits
                .narrow(0, span.start, span.len())?
                .narrow(1, 0, request.len)?;
            let tokens =
                batch
                    .tokens()
                    .narrow(0, span.start, span.len())?
                    .narrow(1, 0, request.len)?;
            let loss = match &own_mask {
                Some(mask) => masked_next_token_loss(&logits, &tokens, mask)?,
                None => next_token_loss(&logits, &tokens)?,
            };
            out.insert("loss".to_string(), loss.reshape(1)?);
        }
        if let Some(mask) = own_mask {
            out.insert("attention_mask".to_string(), mask);
        }
        answers.push(safetensors_bytes(&out)?);
    }
    Ok(answers)
}

/// The mean over sequences of the last position's logit of `answer` minus that of
/// `wrong` (sequences are left-padded: the last position is every sequence's last token).
fn logit_difference(logits: &Tensor, answer: u32, wrong: u32) -> flexmodel::Result<Tensor> {
    let (_, t, _) = logits.dims3()?;
    let last = logits.narrow(1, t - 1, 1)?.squeeze(1)?;
    let answer = last.narrow(1, answer as usize, 1)?;
    let wrong = last.narrow(1, wrong as usize, 1)?;
    Ok((answer - wrong)?.mean_all()?)
}

/// The part of a capture of `point` that belongs to the sequences `rows`, `len` long.
fn own_part(
    value: &Tensor,
    point: HookPoint,
    rows: &Range<usize>,
    len: usize,
) -> Result<Tensor, Failure> {
    let mut part = value.clone();
    for (dim, size) in point.shape_spec().iter().enumerate() {
        part = match size {
            Size::Batch => part.narrow(dim, rows.start, rows.len())?,
            Size::Seq => part.narrow(dim, 0, len.min(part.dim(dim)?))?,
            _ => part,
        };
    }
    Ok(part)
}

/// `request`'s chosen positions of `value` (its capture of `point`, or that capture's
/// gradient), reduced as it asks; `mask` is its attention mask (`None`: no padding).
/// A point without positions is answered whole.
fn chosen(
    value: Tensor,
    point: HookPoint,
    request: &Prepared,
    mask: Option<&Tensor>,
) -> Result<Tensor, Failure> {
    let Some(dim) = point.shape_spec().iter().position(|&s| s == Size::Seq) else {
        return Ok(value);
    };
    let mask = match mask {
        Some(mask) => mask.clone(),
        None => Tensor::ones((request.rows.len(), request.len), DType::F32, &Device::Cpu)?,
    };
    let (value, mask) = match &request.positions {
        Positions::Named(NamedPositions::All) => (value, mask),
        Positions::Named(NamedPositions::Last) => (
            value.narrow(dim, request.len - 1, 1)?,
            mask.narrow(1, request.len - 1, 1)?,
        ),
        Positions::List(list) => {
            let list: Vec<u32> = list.iter().map(|&i| i as u32).collect();
            let list = Tensor::new(list.as_slice(), &Device::Cpu)?;
            (
                value.index_select(&list, dim)?,
                mask.index_select(&list, 1)?,
            )
        }
    };
    match request.reduce {
        Reduce::None => Ok(value),
        Reduce::Mean => {
            // The mask as [b, 1, …, n, …, 1], n at the positions' dimension.
            let mut shape = vec![1; value.rank()];
            shape[0] = mask.dim(0)?;
            shape[dim] = mask.dim(1)?;
            let weights = mask.reshape(shape)?.to_dtype(value.dtype())?;
            let sum = value.broadcast_mul(&weights)?.sum(dim)?;
            let mut count_shape = vec![1; sum.rank()];
            count_shape[0] = mask.dim(0)?;
            let count = mask.sum(1)?.clamp(1f32, f32::MAX)?.reshape(count_shape)?;
            Ok(sum.broadcast_div(&count.to_dtype(value.dtype())?)?)
        }
    }
}

/// The attention mask of `request`'s sequences alone, `None` if none is padded.
fn request_mask(request: &Prepared) -> Result<Option<Tensor>, Failure> {
    if request.rows.iter().all(|r| r.len() == request.len) {
        return Ok(None);
    }
    Ok(TokenBatch::left_padded(&request.rows)?
        .attention_mask()
        .cloned())
}

/// A request's `edits` (the command line's `--edit` strings), their `add:@KEY` tensors
/// from `tensors`.
pub fn parse_edits(
    edits: &[String],
    tensors: &BTreeMap<String, String>,
) -> Result<Vec<EditSpec>, Failure> {
    let inline = inline_tensors(tensors)?;
    let parsed = edits
        .iter()
        .map(|spec| EditSpec::parse_with(spec, &inline))
        .collect::<flexmodel::Result<Vec<_>>>()?;
    Ok(parsed)
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
pub fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>, Failure> {
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
