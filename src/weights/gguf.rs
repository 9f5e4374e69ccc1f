//! GGUF files (llama.cpp): metadata, tensors dequantized to f32, and the tokenizer.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use super::{WeightSource, missing};
use crate::error::tensor_message;
use crate::models::{Architecture, LlamaConfig, Unimplemented};
use crate::text::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Hugging Face names of the tensors outside the blocks, with their GGUF names.
const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Names inside block `i` (after `model.layers.i.` / `blk.i.`).
const BLOCK_NAMES: [(&str, &str); 12] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

/// The GGUF name of a Hugging Face tensor name.
fn gguf_name(hf: &str) -> Option<String> {
    if let Some((_, g)) = GLOBAL_NAMES.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let (layer, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let (_, g) = BLOCK_NAMES.iter().find(|(h, _)| *h == rest)?;
    Some(format!("blk.{layer}.{g}"))
}

/// The Hugging Face name of a GGUF tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    if let Some((h, _)) = GLOBAL_NAMES.iter().find(|(_, g)| *g == gguf) {
        return Some(h.to_string());
    }
    let (layer, rest) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let (h, _) = BLOCK_NAMES.iter().find(|(_, g)| *g == rest)?;
    Some(format!("model.layers.{layer}.{h}"))
}

/// A GGUF model file: its header is parsed at open, tensors are read on demand.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    architecture: Architecture,
}

impl GgufFile {
    /// Opens `path` and parses its header, metadata and tensor table.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let content =
            Content::read(&mut BufReader::new(file)).map_err(|e| Error::BadWeightsFile {
                path: path.to_path_buf(),
                message: format!(
                    "not a readable GGUF file ({}); supported tensor types: F32, F16, BF16, \
                 Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K to Q6_K",
                    tensor_message(&e)
                ),
            })?;
        let mut gguf = Self {
            path: path.to_path_buf(),
            content,
            architecture: Architecture::Llama,
        };
        gguf.architecture = match gguf.string("general.architecture")?.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(gguf.bad_config(format!(
                    "unsupported architecture {other:?} (supported: llama, qwen2)"
                )));
            }
        };
        Ok(gguf)
    }

    /// The model configuration from the `{arch}.*` metadata.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = match self.architecture {
            Architecture::Qwen2 => "qwen2",
            _ => "llama",
        };
        let key = |k: &str| format!("{arch}.{k}");
        let n_heads = self.usize(&key("attention.head_count"))?;
        let d_model = self.usize(&key("embedding_length"))?;
        let vocab_size = match self.optional_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => self.array("tokenizer.ggml.tokens")?.len(),
        };
        let config = LlamaConfig {
            architecture: self.architecture,
            vocab_size,
            d_model,
            n_layers: self.usize(&key("block_count"))?,
            n_heads,
            n_kv_heads: self
                .optional_usize(&key("attention.head_count_kv"))?
                .unwrap_or(n_heads),
            d_head: self
                .optional_usize(&key("attention.key_length"))?
                .unwrap_or(d_model / n_heads.max(1)),
            d_mlp: self.usize(&key("feed_forward_length"))?,
            rms_norm_eps: self.f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: self
                .optional_f64(&key("rope.freq_base"))?
                .unwrap_or(10_000.0),
            rope_scaling: None,
            sliding_window: None,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            max_position_embeddings: self.optional_usize(&key("context_length"))?.unwrap_or(4096),
            bos_token_id: self.optional_u32("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: self
                .optional_u32("tokenizer.ggml.eos_token_id")?
                .into_iter()
                .collect(),
            dtype: candle_core::DType::F32,
        };
        let scaling_type = self
            .optional_string(&key("rope.scaling.type"))?
            .filter(|t| t != "none");
        let scaling_factor = self
            .optional_f64(&key("rope.scaling.factor"))?
            .filter(|&f| f != 0.0 && f != 1.0);
        let rope_scaling = match (scaling_type, scaling_factor) {
            (None, None) if self.content.tensor_infos.contains_key("rope_freqs.weight") => {
                Some("frequency factors in rope_freqs.weight".to_string())
            }
            (None, None) => None,
            (kind, factor) => Some(format!(
                "{} by {}",
                kind.as_deref().unwrap_or("scaling"),
                factor.map_or("an unstated factor".into(), |f| f.to_string())
            )),
        };
        Unimplemented {
            rope_scaling,
            sliding_window: self.optional_usize(&key("attention.sliding_window"))?,
            rope_dimensions: self.optional_usize(&key("rope.dimension_count"))?,
        }
        .check(&config, &self.path)?;
        config.validate(&self.path)?;
        Ok(config)
    }

    /// The byte-level BPE tokenizer stored in the `tokenizer.ggml.*` metadata.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let model = self.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "{}: tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\"); \
                 use a Hugging Face directory with tokenizer.json instead",
                self.path.display()
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            self.array(key)?
                .iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|e| self.bad_config(format!("{key}: {e}")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types = match self.content.metadata.get("tokenizer.ggml.token_type") {
            Some(_) => self
                .array("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| {
                    v.to_i32()
                        .map_err(|e| self.bad_config(format!("token_type: {e}")))
                })
                .collect::<Result<Vec<_>>>()?,
            None => vec![],
        };
        // Token type 3 is a control token (`<|im_start|>`): matched whole, never split.
        let special: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| types.get(i as usize) == Some(&3))
            .collect();
        let pre = self
            .optional_string("tokenizer.ggml.pre")?
            .unwrap_or_else(|| "default".to_string());
        Tokenizer::byte_level_bpe(&tokens, &merges, &special, &pre)
    }

    fn bad_config(&self, message: String) -> Error {
        Error::BadConfig {
            path: self.path.clone(),
            message,
        }
    }

    fn value(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.bad_config(format!("metadata key {key} is missing")))
    }

    fn string(&self, key: &str) -> Result<String> {
        let v = self.value(key)?;
        v.to_string()
            .cloned()
            .map_err(|e| self.bad_config(format!("{key}: {e}")))
    }

    fn optional_string(&self, key: &str) -> Result<Option<String>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(_) => self.string(key).map(Some),
        }
    }

    fn array(&self, key: &str) -> Result<&Vec<Value>> {
        self.value(key)?
            .to_vec()
            .map_err(|e| self.bad_config(format!("{key}: {e}")))
    }

    fn optional_u64(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.content.metadata.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.map(Some).ok_or_else(|| {
            self.bad_config(format!("{key} must be a non-negative integer, got {v:?}"))
        })
    }

    fn optional_usize(&self, key: &str) -> Result<Option<usize>> {
        Ok(self.optional_u64(key)?.map(|n| n as usize))
    }

    fn optional_u32(&self, key: &str) -> Result<Option<u32>> {
        self.optional_u64(key)?
            .map(|n| {
                u32::try_from(n).map_err(|_| self.bad_config(format!("{key} = {n} is too large")))
            })
            .transpose()
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.optional_usize(key)?
            .ok_or_else(|| self.bad_config(format!("metadata key {key} is missing")))
    }

    fn optional_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.bad_config(format!("{key} must be a float, got {v:?}"))),
        }
    }

    fn f64(&self, key: &str) -> Result<f64> {
        self.optional_f64(key)?
            .ok_or_else(|| self.bad_config(format!("metadata key {key} is missing")))
    }

    /// Heads of a q/k projection that llama.cpp permuted for interleaved RoPE.
    fn permuted_heads(&self, hf: &str) -> Option<usize> {
        if self.architecture != Architecture::Llama {
            return None;
        }
        let key = |k: &str| self.optional_usize(&format!("llama.{k}")).ok().flatten();
        if hf.contains("self_attn.q_proj.") {
            key("attention.head_count")
        } else if hf.contains("self_attn.k_proj.") {
            key("attention.head_count_kv").or_else(|| key("attention.head_count"))
        } else {
            None
        }
    }
}

/// Undoes llama.cpp's row permutation of q/k: GGUF row `(h, i, half)` is Hugging Face row
/// `(h, half, i)` for head `h`, `i < d_head/2`, `half ∈ {0, 1}`.
fn unpermute_rows(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = w.dim(0)?;
    let cols = w.elem_count() / rows.max(1);
    let per_head = rows / n_heads;
    Ok(w.reshape((n_heads, per_head / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

impl WeightSource for GgufFile {
    fn origin(&self) -> &Path {
        &self.path
    }

    /// The file's name, length and header (metadata and tensor table), and the first
    /// and last few KiB of every tensor.
    fn fingerprint(&self) -> Result<String> {
        use std::os::unix::fs::FileExt;
        let path = self.path.as_path();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let length = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let data = self.content.tensor_data_offset;
        let mut header = vec![0u8; data.min(length) as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| Error::io(path, e))?;
        let mut infos: Vec<_> = self.content.tensor_infos.iter().collect();
        infos.sort_by_key(|(name, _)| name.as_str());
        let tensors = infos
            .into_iter()
            .map(|(_, info)| {
                let dtype = info.ggml_dtype;
                let bytes = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
                let start = (data + info.offset).min(length);
                start..(start + bytes as u64).min(length)
            })
            .collect();
        super::fingerprint::of_sampled_files([super::fingerprint::SampledFile {
            path,
            length,
            header: &header,
            tensors,
        }])
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .content
            .tensor_infos
            .keys()
            .filter_map(|g| hf_name(g))
            .collect();
        names.sort();
        names
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let gguf = gguf_name(name).ok_or_else(|| missing(&self.path, name))?;
        if !self.content.tensor_infos.contains_key(&gguf) {
            return Err(missing(&self.path, &gguf));
        }
        let bad = |message: String| Error::BadTensor {
            path: self.path.clone(),
            tensor: gguf.clone(),
            message,
        };
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        // Dequantized on the host; `HeldWeights` copies each slice to the rank's device.
        let qtensor = self
            .content
            .tensor(&mut BufReader::new(file), &gguf, &Device::Cpu)
            .map_err(|e| bad(tensor_message(&e)))?;
        let t = qtensor
            .dequantize(&Device::Cpu)
            .map_err(|e| bad(tensor_message(&e)))?;
        match self.permuted_heads(name) {
            Some(heads) if heads > 0 && t.rank() > 0 && t.dim(0)? % (2 * heads) == 0 => {
                unpermute_rows(&t, heads)
            }
            Some(heads) => Err(bad(format!(
                "{} rows cannot be split into {heads} heads",
                t.dim(0)?
            ))),
            None => Ok(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for hf in [
            "model.embed_tokens.weight",
            "model.layers.12.mlp.down_proj.weight",
        ] {
            assert_eq!(hf_name(&gguf_name(hf).unwrap()).as_deref(), Some(hf));
        }
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.weight").unwrap(),
            "blk.3.attn_q.weight"
        );
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // Two heads of d_head 4, one column: HF rows 0..8.
        let hf = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        // llama.cpp: reshape(h, 2, d/2, ..).swapaxes(1, 2)
        let permuted = hf
            .reshape((2, 2, 2, 1))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let back = unpermute_rows(&permuted, 2).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (0..8).map(|i| i as f32).collect::<Vec<_>>()
        );
    }
}
