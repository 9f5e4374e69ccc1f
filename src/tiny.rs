//! Random LLaMA models for tests and benchmarks: the tiny one for fast tests (4 layers,
//! d_model 64, 8 heads, 4 key/value heads, a 256-token byte-level vocabulary; head,
//! hidden and vocabulary counts split evenly over 2 and 4 tensor-parallel ranks), any
//! configuration in memory, and checkpoints of any size written to disk in the Hugging
//! Face layout ([`write_random_hf_dir`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

use crate::Checkpoint;
use crate::models::{Architecture, Gemma3Config, LlamaConfig, ModelConfig, ModelSpec};
use crate::text::tokenizer::Tokenizer;
use crate::weights::TensorMap;
use crate::{Error, Result};

/// The tiny configuration.
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        architecture: Architecture::Llama,
        vocab_size: 256,
        d_model: 64,
        n_layers: 4,
        n_heads: 8,
        n_kv_heads: 4,
        d_head: 8,
        d_mlp: 192,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        sliding_window: None,
        tie_word_embeddings: false,
        attention_bias: false,
        max_position_embeddings: 512,
        bos_token_id: None,
        eos_token_ids: vec![],
        dtype: DType::F32,
    }
}

/// The shapes of SmolLM2-135M (30 layers, d_model 576, 9 heads, 3 key/value heads,
/// d_mlp 1536, a 49 152-token vocabulary, tied embeddings), for random models as big as
/// the real one.
pub fn smollm2_shaped_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 49_152,
        d_model: 576,
        n_layers: 30,
        n_heads: 9,
        n_kv_heads: 3,
        d_head: 64,
        d_mlp: 1536,
        rope_theta: 100_000.0,
        tie_word_embeddings: true,
        max_position_embeddings: 8192,
        ..tiny_config()
    }
}

/// A tiny Gemma 3: the tiny model's sizes, 6 layers (the last global), a window of 4
/// tokens, 2 key/value heads.
pub fn tiny_gemma3_config() -> Gemma3Config {
    let llama = tiny_config();
    Gemma3Config {
        vocab_size: llama.vocab_size,
        d_model: llama.d_model,
        n_layers: 6,
        n_heads: 4,
        n_kv_heads: 2,
        d_head: 16,
        d_mlp: llama.d_mlp,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_local_base_freq: 10_000.0,
        rope_scaling: None,
        sliding_window: 4,
        layer_types: Gemma3Config::default_layer_types(6),
        query_pre_attn_scalar: 16.0,
        tie_word_embeddings: true,
        max_position_embeddings: 512,
        bos_token_id: Some(2),
        eos_token_ids: vec![1],
        dtype: DType::F32,
    }
}

/// The tiny model with weights drawn from `seed`: the same seed gives the same model.
pub fn tiny_checkpoint(seed: u64) -> Result<Checkpoint> {
    random_checkpoint(tiny_config(), seed)
}

/// A model of any configuration with random weights drawn from `seed` and the
/// byte-level tokenizer (the vocabulary must have at least 256 tokens).
pub fn random_checkpoint(config: impl Into<ModelConfig>, seed: u64) -> Result<Checkpoint> {
    let config = config.into();
    if config.vocab_size() < 256 {
        return Err(crate::Error::InvalidArgument {
            argument: "config",
            problem: format!(
                "a random model needs a vocabulary of at least 256 byte tokens, got {}",
                config.vocab_size()
            ),
        });
    }
    let weights = random_weights(&config, seed)?;
    Ok(Checkpoint {
        config,
        weights: Box::new(weights),
        tokenizer: byte_tokenizer()?,
    })
}

/// One tensor of a random model and how its values are drawn.
struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    mean: f32,
    std: f32,
}

impl TensorSpec {
    fn new(name: String, (shape, mean, std): Drawn) -> Self {
        Self {
            name,
            shape,
            mean,
            std,
        }
    }

    fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Every tensor of a model of `config` (an LM head also where it is tied), in the order
/// their values are drawn, with the mean and standard deviation of those values:
/// linears with std 1/√fan_in, norms around 1, unit embeddings.
fn tensor_specs(config: &ModelConfig) -> Vec<TensorSpec> {
    let (d, v) = (config.d_model(), config.vocab_size());
    let global = [
        ("model.embed_tokens.weight", (vec![v, d], 0.0, 1.0)),
        ("model.norm.weight", norm(config, d)),
        ("lm_head.weight", (vec![v, d], 0.0, 1.0 / (d as f32).sqrt())),
    ];
    let mut specs: Vec<_> = global
        .into_iter()
        .map(|(name, drawn)| TensorSpec::new(name.to_string(), drawn))
        .collect();
    for layer in 0..config.n_layers() {
        let p = format!("model.layers.{layer}");
        specs.extend(
            block_specs(config)
                .into_iter()
                .map(|(name, drawn)| TensorSpec::new(format!("{p}.{name}"), drawn)),
        );
    }
    specs
}

/// A tensor's shape, and the mean and standard deviation its values are drawn with.
type Drawn = (Vec<usize>, f32, f32);

/// How a norm's `[n]` weight is drawn: around 1 as the model multiplies by it (a
/// Gemma norm holds its difference from one).
fn norm(config: &ModelConfig, n: usize) -> Drawn {
    match config {
        ModelConfig::Gemma3(_) => (vec![n], 0.0, 0.1),
        _ => (vec![n], 1.0, 0.1),
    }
}

/// The tensors of one block of `config`'s family, after `model.layers.{i}.`.
fn block_specs(config: &ModelConfig) -> Vec<(&'static str, Drawn)> {
    let linear = |out: usize, inp: usize| (vec![out, inp], 0.0, 1.0 / (inp as f32).sqrt());
    let sizes = config.sizes();
    let (d, q, kv, h) = (
        sizes.d_model,
        sizes.n_heads * sizes.d_head,
        sizes.n_kv_heads * sizes.d_head,
        sizes.d_mlp,
    );
    let mut block = vec![
        ("self_attn.q_proj.weight", linear(q, d)),
        ("self_attn.k_proj.weight", linear(kv, d)),
        ("self_attn.v_proj.weight", linear(kv, d)),
        ("self_attn.o_proj.weight", linear(d, q)),
        ("mlp.gate_proj.weight", linear(h, d)),
        ("mlp.up_proj.weight", linear(h, d)),
        ("mlp.down_proj.weight", linear(d, h)),
    ];
    match config {
        ModelConfig::Llama(c) => {
            if c.attention_bias {
                block.push(("self_attn.q_proj.bias", (vec![q], 0.0, 0.1)));
                block.push(("self_attn.k_proj.bias", (vec![kv], 0.0, 0.1)));
                block.push(("self_attn.v_proj.bias", (vec![kv], 0.0, 0.1)));
            }
            block.push(("input_layernorm.weight", norm(config, d)));
            block.push(("post_attention_layernorm.weight", norm(config, d)));
        }
        ModelConfig::Gemma3(c) => {
            block.push(("self_attn.q_norm.weight", norm(config, c.d_head)));
            block.push(("self_attn.k_norm.weight", norm(config, c.d_head)));
            for name in [
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "pre_feedforward_layernorm.weight",
                "post_feedforward_layernorm.weight",
            ] {
                block.push((name, norm(config, d)));
            }
        }
    }
    block
}

/// Gaussian weights drawn from `seed` (see [`tensor_specs`]).
fn random_weights(c: &ModelConfig, seed: u64) -> Result<TensorMap> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = BTreeMap::new();
    for spec in tensor_specs(c) {
        let normal =
            Normal::new(spec.mean, spec.std).map_err(|e| crate::Error::InvalidArgument {
                argument: "config",
                problem: format!("weights with std {}: {e}", spec.std),
            })?;
        let values: Vec<f32> = (0..spec.elements())
            .map(|_| normal.sample(&mut rng))
            .collect();
        // Random weights are drawn on the host, like weights read from disk.
        let tensor = Tensor::from_vec(values, spec.shape, &Device::Cpu)?;
        tensors.insert(spec.name, tensor);
    }
    Ok(TensorMap::new("<tiny random model>", tensors))
}

/// Values a chunk of a random tensor is written in, at most.
const WRITE_CHUNK: usize = 1 << 20;

/// Writes a random model of `config` to `dir` in the Hugging Face layout: `config.json`,
/// the byte-level `tokenizer.json`, and the weights in bf16 over `files` safetensors
/// files (`model-0000i-of-0000n.safetensors`, each about the same size) with a
/// `model.safetensors.index.json`. Each tensor's values are uniform with its mean and
/// standard deviation (see [`tensor_specs`]), a function of `seed` and their place alone,
/// and are written a chunk at a time: memory stays a few MB whatever the model's size.
/// Returns the bytes of weights written.
pub fn write_random_hf_dir(
    dir: &Path,
    config: &LlamaConfig,
    files: usize,
    seed: u64,
) -> Result<u64> {
    if files == 0 || config.vocab_size < 256 {
        return Err(Error::InvalidArgument {
            argument: "random checkpoint",
            problem: format!(
                "needs at least one file and 256 byte tokens, not {files} files and a vocabulary of {}",
                config.vocab_size
            ),
        });
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut specs = tensor_specs(&config.clone().into());
    if config.tie_word_embeddings {
        specs.retain(|spec| spec.name != "lm_head.weight");
    }
    let bytes_of = |spec: &TensorSpec| 2 * spec.elements() as u64;
    let total: u64 = specs.iter().map(bytes_of).sum();
    // Consecutive tensors to each file, a new file once the last has its share.
    let mut groups: Vec<Vec<TensorSpec>> = vec![Vec::new()];
    let mut filled = 0;
    for spec in specs {
        let full = filled >= total * groups.len() as u64 / files as u64;
        if full && groups.len() < files && !groups.last().is_some_and(Vec::is_empty) {
            groups.push(Vec::new());
        }
        filled += bytes_of(&spec);
        if let Some(group) = groups.last_mut() {
            group.push(spec);
        }
    }
    let n = groups.len();
    let mut weight_map = serde_json::Map::new();
    let mut start = 0u64;
    for (i, group) in groups.iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        for spec in group {
            weight_map.insert(spec.name.clone(), name.clone().into());
        }
        start = write_random_safetensors(&dir.join(&name), group, seed, start)?;
    }
    let index = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    };
    write("model.safetensors.index.json", index.to_string())?;
    write("config.json", config.to_hf_json())?;
    byte_tokenizer()?.save(&dir.join("tokenizer.json"))?;
    Ok(total)
}

/// Writes the tensors `specs` in bf16 to the safetensors file `path`, their values
/// numbered from `start` on (see [`random_values`]); returns the number after the last.
fn write_random_safetensors(
    path: &Path,
    specs: &[TensorSpec],
    seed: u64,
    mut start: u64,
) -> Result<u64> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0u64;
    for spec in specs {
        let end = offset + 2 * spec.elements() as u64;
        let entry = serde_json::json!({"dtype": "BF16", "shape": spec.shape, "data_offsets": [offset, end]});
        header.insert(spec.name.clone(), entry);
        offset = end;
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    // Data aligned to 8 bytes, as the safetensors library writes it.
    header.resize(header.len().next_multiple_of(8), b' ');
    let io = |e| Error::io(path, e);
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    file.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    file.write_all(&header).map_err(io)?;
    for spec in specs {
        let mut left = spec.elements();
        while left > 0 {
            let n = left.min(WRITE_CHUNK);
            let values = random_values(seed, start, n, spec.mean, spec.std)?;
            file.write_all(bytemuck::cast_slice(&values)).map_err(io)?;
            (start, left) = (start + n as u64, left - n);
        }
    }
    file.into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)?;
    Ok(start)
}

/// Values `start..start + n` of the random sequence of `seed`, uniform with mean `mean`
/// and standard deviation `std`, in bf16: `fract(sin(12.9898·i + 78.233·seed) · 43758.5453)`,
/// a classic hash, computed by candle's vectorized ops in f64.
fn random_values(seed: u64, start: u64, n: usize, mean: f32, std: f32) -> Result<Vec<half::bf16>> {
    let i = Tensor::arange(start as f64, (start + n as u64) as f64, &Device::Cpu)?;
    let x = (((i * 12.9898)? + (seed % 1_000_003) as f64 * 78.233)?.sin()? * 43758.5453)?;
    let uniform = ((&x - x.floor()?)? - 0.5)?;
    let values = ((uniform * (f64::from(std) * 12f64.sqrt()))? + f64::from(mean))?;
    Ok(values.to_dtype(DType::BF16)?.to_vec1()?)
}

/// GPT-2's printable stand-in for byte `b` in byte-level BPE vocabularies.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).unwrap_or('?')
}

/// Byte-level BPE with no merges: token id = byte value.
fn byte_tokenizer() -> Result<Tokenizer> {
    let tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    Tokenizer::byte_level_bpe(&tokens, &[], &[], "gpt2")
}

/// Writes a random SAE to `dir` as SAELens saves one (`cfg.json`,
/// `sae_weights.safetensors`): `architecture` `standard`, `topk` (with `k`) or `jumprelu`,
/// `d_in` wide with `d_sae` latents, for `hook_name`. Its weights are drawn from `seed` at
/// scales that leave a good part of the latents active on inputs of unit scale: the
/// encoder and decoder `N(0, 1/d_in)`, the encoder bias `N(0, 0.1²)`, thresholds 0.05.
pub fn write_random_sae(
    dir: &Path,
    architecture: &str,
    (d_in, d_sae): (usize, usize),
    k: usize,
    hook_name: &str,
    seed: u64,
) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut draw = |shape: &[usize], std: f32| -> Result<Tensor> {
        let normal = Normal::new(0.0, std).map_err(|e| Error::InvalidArgument {
            argument: "d_in",
            problem: e.to_string(),
        })?;
        let values: Vec<f32> = (0..shape.iter().product())
            .map(|_| normal.sample(&mut rng))
            .collect();
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    };
    let scale = (d_in as f32).sqrt().recip();
    let mut tensors = std::collections::HashMap::from([
        ("W_enc".to_string(), draw(&[d_in, d_sae], scale)?),
        ("b_enc".to_string(), draw(&[d_sae], 0.1)?),
        ("W_dec".to_string(), draw(&[d_sae, d_in], scale)?),
        ("b_dec".to_string(), draw(&[d_in], 0.1)?),
    ]);
    if architecture == "jumprelu" {
        let threshold = Tensor::full(0.05f32, d_sae, &Device::Cpu)?;
        tensors.insert("threshold".to_string(), threshold);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config = serde_json::json!({
        "architecture": architecture, "d_in": d_in, "d_sae": d_sae, "k": k,
        "apply_b_dec_to_input": true, "normalize_activations": "none",
        "dtype": "float32", "device": "cpu",
        "metadata": {"hook_name": hook_name},
    });
    let path = dir.join(crate::sae::CONFIG_FILE);
    std::fs::write(&path, config.to_string()).map_err(|e| Error::io(&path, e))?;
    crate::weights::write_safetensors(&tensors, &dir.join(crate::sae::WEIGHTS_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_maps_bytes_to_their_values() {
        let tok = byte_tokenizer().unwrap();
        let text = "Hi there, ünïcode!";
        let ids = tok.encode(text).unwrap();
        let expected: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(ids, expected);
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }

    #[test]
    fn same_seed_same_weights() {
        let a = tiny_checkpoint(7).unwrap();
        let b = tiny_checkpoint(7).unwrap();
        let name = "model.layers.2.mlp.up_proj.weight";
        let diff = (a.weights.tensor(name).unwrap() - b.weights.tensor(name).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn a_random_directory_reads_back_as_its_config_with_the_drawn_statistics() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = tiny_config();
        config.tie_word_embeddings = true;
        let bytes = write_random_hf_dir(dir.path(), &config, 3, 5).unwrap();
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(
            files,
            3 + 3,
            "three weight files, the index, config and tokenizer"
        );
        assert_eq!(bytes, 2 * config.parameter_count());
        let checkpoint = Checkpoint::open_hf_dir(dir.path()).unwrap();
        assert_eq!(checkpoint.config.n_layers(), 4);
        let names = checkpoint.weights.names();
        assert!(!names.contains(&"lm_head.weight".to_string()), "tied");
        assert_eq!(names.len(), 2 + 9 * config.n_layers);
        // Uniform values: mean and standard deviation as drawn (bf16, 16 384 values).
        let up = checkpoint
            .weights
            .tensor("model.layers.1.mlp.up_proj.weight")
            .unwrap();
        let mean = up.mean_all().unwrap().to_scalar::<f32>().unwrap();
        let std = up
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        let expected = 1.0 / 64f32.sqrt();
        assert!(mean.abs() < 0.03 * expected, "mean {mean}");
        assert!(
            (std / expected - 1.0).abs() < 0.03,
            "std {std} of {expected}"
        );
        let norm = checkpoint.weights.tensor("model.norm.weight").unwrap();
        let mean = norm.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((mean - 1.0).abs() < 0.05, "norm mean {mean}");
        // Another seed, other weights and another fingerprint; the same seed, the same.
        let again = tempfile::tempdir().unwrap();
        write_random_hf_dir(again.path(), &config, 3, 5).unwrap();
        let other = tempfile::tempdir().unwrap();
        write_random_hf_dir(other.path(), &config, 3, 6).unwrap();
        let fingerprint = |d: &Path| {
            let c = Checkpoint::open_hf_dir(d).unwrap();
            c.weights.fingerprint().unwrap()
        };
        assert_eq!(fingerprint(dir.path()), fingerprint(again.path()));
        assert_ne!(fingerprint(dir.path()), fingerprint(other.path()));
    }
}
