//! Helpers shared by the integration tests: the SmolLM2 model loaded once, hook
//! capture, relative errors, the numpy reference and a GGUF writer.
#![allow(dead_code)] // each test binary uses its own part of these helpers

pub mod child;
pub mod cli;
pub mod dataset;
pub mod etcd;
pub mod netns;
pub mod parity;
pub mod processes;
pub mod relay;
pub mod serve;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use child::{OutputWithin, RUN_DEADLINE};
use flexmodel::models::ModelShard;
use flexmodel::{BlockSite, Checkpoint, HookLayer, HookPoint};

/// SmolLM2-135M-Instruct (fetched into the cache on first use) and its model, loaded
/// once per test binary.
pub fn smollm2() -> &'static (Checkpoint, Arc<dyn ModelShard>) {
    static MODEL: OnceLock<(Checkpoint, Arc<dyn ModelShard>)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let checkpoint = Checkpoint::open("smollm2").expect("open smollm2");
        let model = checkpoint.load_model().expect("build smollm2");
        (checkpoint, model)
    })
}

/// Three SmolLM2 sequences of six tokens: the batch of the sharded SmolLM2 tests.
pub fn smollm2_tokens() -> Tensor {
    batch(&[
        &[504, 3575, 282, 4649, 314, 7042],
        &[1, 9690, 198, 2683, 359, 30],
        &[19556, 2087, 260, 2463, 30, 2],
    ])
}

/// The edits of the sharded SmolLM2 tests: zero-head on a z and on a pattern, a scale.
pub fn register_smollm2_edits(model: &mut flexmodel::FlexModel) {
    use flexmodel::{HookFunction, edits};
    let hooks = model.hooks_mut();
    hooks
        .register(HookFunction::new("blocks.3.attn.hook_z").with_edit(edits::zero_head(4)))
        .unwrap();
    hooks
        .register(HookFunction::new("blocks.12.attn.hook_pattern").with_edit(edits::zero_head(7)))
        .unwrap();
    hooks
        .register(HookFunction::new("blocks.20.hook_mlp_out").with_edit(edits::scale(0.5)))
        .unwrap();
}

/// Every point of a plain pass, of an edited pass, and every gradient (and the loss) of
/// an edited forward and backward pass of SmolLM2's batch, each with the logits.
pub fn smollm2_passes(model: &mut flexmodel::FlexModel) -> [BTreeMap<String, Tensor>; 3] {
    use flexmodel::HookFunction;
    model.hooks_mut().register(HookFunction::new("*")).unwrap();
    let forward = |model: &mut flexmodel::FlexModel| {
        let logits = model.forward(smollm2_tokens()).unwrap();
        let mut all = take_last_calls(model);
        all.insert("logits".into(), logits);
        all
    };
    let plain = forward(model);
    register_smollm2_edits(model);
    let edited = forward(model);
    model.hooks_mut().clear();
    register_smollm2_edits(model);
    model
        .hooks_mut()
        .register(HookFunction::backward("*"))
        .unwrap();
    let (_, loss) = model.forward_backward(smollm2_tokens()).unwrap();
    let mut grads = take_last_calls(model);
    grads.insert("loss".into(), Tensor::new(&[loss], &Device::Cpu).unwrap());
    [plain, edited, grads]
}

/// The Python interpreter with TransformerLens and Hugging Face transformers installed
/// (`target/transformer-lens`, which `scripts/test` makes, or the Python named by
/// `FLEXMODEL_TRANSFORMER_LENS_PYTHON`).
pub fn transformer_lens_python() -> PathBuf {
    match std::env::var_os("FLEXMODEL_TRANSFORMER_LENS_PYTHON") {
        Some(python) => PathBuf::from(python),
        None => {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/transformer-lens/bin/python")
        }
    }
}

/// The path of the cached SmolLM2 GGUF.
pub fn smollm2_path() -> PathBuf {
    smollm2();
    flexmodel::weights::pretrained::SMOLLM2
        .path()
        .expect("smollm2 path")
}

/// The path of the cached Gemma 3 270M GGUF (fetched and joined on first use).
pub fn gemma3_path() -> PathBuf {
    flexmodel::weights::pretrained::GEMMA3_270M
        .path()
        .expect("gemma3-270m path")
}

/// The path of the cached Tiny Shakespeare text (fetched on first use).
pub fn shakespeare_path() -> PathBuf {
    flexmodel::weights::pretrained::TINY_SHAKESPEARE
        .path()
        .expect("tiny shakespeare path")
}

/// A `[b, t]` u32 batch.
pub fn batch(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
}

/// A hook layer that records the value of every point it wants.
struct Recorder {
    opt_in: bool,
    captured: BTreeMap<String, Tensor>,
}

impl HookLayer for Recorder {
    fn hook(&mut self, point: HookPoint, value: Tensor) -> flexmodel::Result<Tensor> {
        self.captured.insert(point.to_string(), value.clone());
        Ok(value)
    }

    fn wants(&self, point: HookPoint) -> bool {
        self.opt_in || !point.is_opt_in()
    }
}

/// The logits and every default hook point's value of one forward pass (what `*`
/// captures: no opt-in point).
pub fn capture_all(
    model: &Arc<dyn ModelShard>,
    tokens: &Tensor,
) -> (Tensor, BTreeMap<String, Tensor>) {
    capture(model, tokens, false)
}

/// The logits and every hook point's value, the opt-in ones included (each head's
/// result and the per-head q/k/v inputs, which the model then computes).
pub fn capture_with_opt_in(
    model: &Arc<dyn ModelShard>,
    tokens: &Tensor,
) -> (Tensor, BTreeMap<String, Tensor>) {
    capture(model, tokens, true)
}

fn capture(
    model: &Arc<dyn ModelShard>,
    tokens: &Tensor,
    opt_in: bool,
) -> (Tensor, BTreeMap<String, Tensor>) {
    let mut recorder = Recorder {
        opt_in,
        captured: BTreeMap::new(),
    };
    let logits = model.forward(tokens, &mut recorder).expect("forward");
    (logits, recorder.captured)
}

/// The number of default (not opt-in) hook points of a model with `n_layers` blocks.
pub fn default_points(n_layers: usize) -> usize {
    let per_block = BlockSite::TRANSFORMER_LENS
        .iter()
        .filter(|s| !s.is_opt_in())
        .count();
    // hook_tokens and hook_embed before the blocks, the final norm's two and the logits
    // after.
    2 + n_layers * per_block + 3
}

/// The number of default hook points with a gradient (all but `hook_tokens`).
pub fn gradient_points(n_layers: usize) -> usize {
    default_points(n_layers) - 1
}

/// The last call's capture of every point in `model`'s store, which is emptied.
pub fn take_last_calls(model: &mut flexmodel::FlexModel) -> BTreeMap<String, Tensor> {
    let all = model.store_mut().take_all();
    all.into_iter()
        .filter_map(|(name, mut calls)| Some((name, calls.pop()?)))
        .collect()
}

/// How many latents are active (non-zero) at each position of `latents` (`[b, t, d_sae]`).
pub fn active_per_position(latents: &Tensor) -> Vec<f32> {
    let active = latents.ne(0f32).unwrap().to_dtype(DType::F32).unwrap();
    active
        .sum(2)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// `‖actual − expected‖ / ‖expected‖` over the whole tensor, in f64. Entries that are
/// −∞ in `expected` (masked attention scores) must be −∞ in `actual` and are left out.
pub fn rel_error(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.dims(), expected.dims(), "shapes differ");
    let values = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, e) = (values(actual), values(expected));
    let (mut diff, mut norm) = (0.0, 0.0);
    for (x, y) in a.iter().zip(&e) {
        if y.is_infinite() {
            assert_eq!(x, y, "an infinite entry differs");
            continue;
        }
        diff += (x - y) * (x - y);
        norm += y * y;
    }
    (diff / norm).sqrt()
}

/// Runs the numpy reference (`tests/reference/llama_ref.py hooks`) on `model` (a .gguf
/// file or a Hugging Face directory) and returns every hook point it computed.
pub fn numpy_reference(model: &Path, rows: &[&[u32]]) -> BTreeMap<String, Tensor> {
    numpy_reference_with_edits(model, rows, &[])
}

/// [`numpy_reference`] of a run with `--edit` specs applied (`NAME=scale:F`, ...).
pub fn numpy_reference_with_edits(
    model: &Path,
    rows: &[&[u32]],
    edits: &[String],
) -> BTreeMap<String, Tensor> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/llama_ref.py");
    let out = tempfile::NamedTempFile::new().unwrap();
    let tokens: Vec<String> = rows
        .iter()
        .map(|r| r.iter().map(u32::to_string).collect::<Vec<_>>().join(" "))
        .collect();
    let output = Command::new("python3")
        .arg(&script)
        .arg("hooks")
        .arg(model)
        .arg(tokens.join(";"))
        .arg(out.path())
        .args(edits.iter().flat_map(|e| ["--edit", e.as_str()]))
        .output_within(RUN_DEADLINE);
    assert!(
        output.status.success(),
        "numpy reference failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    candle_core::safetensors::load(out.path(), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// Writes `checkpoint` as a llama.cpp-style GGUF: q/k rows permuted for interleaved
/// RoPE, each tensor stored as `dtype_of(hf_name)`, byte-level BPE tokenizer metadata.
pub fn write_gguf(checkpoint: &Checkpoint, path: &Path, dtype_of: impl Fn(&str) -> GgmlDType) {
    write_gguf_with_metadata(checkpoint, path, dtype_of, Vec::new());
}

/// [`write_gguf`] with `extra` metadata entries.
pub fn write_gguf_with_metadata(
    checkpoint: &Checkpoint,
    path: &Path,
    dtype_of: impl Fn(&str) -> GgmlDType,
    extra: Vec<(&str, Value)>,
) {
    let c = checkpoint.config.as_llama().expect("a LLaMA-family model");
    let mut tensors = Vec::new();
    for name in checkpoint.weights.names() {
        let mut t = checkpoint.weights.tensor(&name).unwrap();
        let heads = if name.contains("q_proj") {
            Some(c.n_heads)
        } else if name.contains("k_proj") {
            Some(c.n_kv_heads)
        } else {
            None
        };
        if let Some(h) = heads {
            // llama.cpp: reshape(h, 2, rows/h/2, ..).swapaxes(1, 2)
            let dims = t.dims().to_vec();
            let cols = t.elem_count() / dims[0];
            t = t
                .reshape((h, 2, dims[0] / h / 2, cols))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape(dims)
                .unwrap();
        }
        let dtype = if t.rank() == 1 {
            GgmlDType::F32
        } else {
            dtype_of(&name)
        };
        tensors.push((gguf_name(&name), QTensor::quantize(&t, dtype).unwrap()));
    }
    let tokens: Vec<Value> = (0..c.vocab_size as u32)
        .map(|i| Value::String(checkpoint.tokenizer.id_to_token(i).unwrap()))
        .collect();
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(c.n_layers as u32)),
        ("llama.embedding_length", Value::U32(c.d_model as u32)),
        ("llama.feed_forward_length", Value::U32(c.d_mlp as u32)),
        ("llama.attention.head_count", Value::U32(c.n_heads as u32)),
        (
            "llama.attention.head_count_kv",
            Value::U32(c.n_kv_heads as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(c.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", Value::F32(c.rope_theta as f32)),
        (
            "llama.context_length",
            Value::U32(c.max_position_embeddings as u32),
        ),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.merges", Value::Array(vec![])),
    ];
    let metadata: Vec<(&str, Value)> = metadata.into_iter().chain(extra).collect();
    let mut file = std::fs::File::create(path).unwrap();
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}

/// llama.cpp's name of a Hugging Face tensor name.
fn gguf_name(hf: &str) -> String {
    let global = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = global.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let module = match rest.rsplit_once('.').unwrap().0 {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("no GGUF name for {other}"),
    };
    let kind = rest.rsplit_once('.').unwrap().1;
    format!("blk.{layer}.{module}.{kind}")
}

/// Checks a sharded run's tensors against the single shard's: every name of `single` is
/// in `sharded` within `tolerance` (relative), and exactly equal when `exact` (layouts
/// that only cut the model into stages compute the same floats in the same order).
/// Prints and returns the worst relative error.
pub fn assert_matches_single(
    label: &str,
    single: &BTreeMap<String, Tensor>,
    sharded: &BTreeMap<String, Tensor>,
    tolerance: f64,
    exact: bool,
) -> f64 {
    assert_eq!(single.len(), sharded.len(), "{label}: every point captured");
    let mut worst = 0.0f64;
    for (name, expected) in single {
        let err = rel_error(&sharded[name], expected);
        assert!(err <= tolerance, "{label} {name}: relative error {err:.3e}");
        assert!(
            !exact || err == 0.0,
            "{label} {name}: {err:.3e}, not bit-identical"
        );
        worst = worst.max(err);
    }
    eprintln!("{label}: worst relative error {worst:.2e}");
    worst
}

/// The `flexmodel` binary the tests run: `FLEXMODEL_BIN` when set (to run the CPU tests
/// with the CUDA build, say), else the one Cargo built.
pub fn flexmodel_binary() -> PathBuf {
    std::env::var_os("FLEXMODEL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_flexmodel").into())
}

/// Gemma 3 270M (fetched and joined into the cache on first use) and its model, loaded
/// once per test binary.
pub fn gemma3() -> &'static (Checkpoint, Arc<dyn ModelShard>) {
    static MODEL: OnceLock<(Checkpoint, Arc<dyn ModelShard>)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let checkpoint = Checkpoint::open("gemma3-270m").expect("open gemma3-270m");
        let model = checkpoint.load_model().expect("build gemma3-270m");
        (checkpoint, model)
    })
}
