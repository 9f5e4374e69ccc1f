//! LLaMA-family models in GGUF files: the configuration in llama.cpp's metadata, the
//! tensor names, and llama.cpp's permutation of the query and key rows undone.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::{Architecture, LlamaConfig, Unimplemented};
use crate::Result;
use crate::error::tensor_message;
use crate::weights::{GgufFile, GgufNames, NameTable};

/// LLaMA's tensors, as Hugging Face and llama.cpp name them.
const NAMES: NameTable = NameTable {
    global: &[
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ],
    block: &[
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
    ],
};

/// How a LLaMA-family GGUF names its tensors; `permuted` holds the query and key/value
/// head counts where llama.cpp permuted the q/k rows for interleaved RoPE (its `llama`
/// architecture; not `qwen2`).
#[derive(Debug)]
struct LlamaGguf {
    permuted: Option<(usize, usize)>,
}

impl GgufNames for LlamaGguf {
    fn table(&self) -> &NameTable {
        &NAMES
    }

    fn convert(&self, hf: &str, tensor: Tensor) -> std::result::Result<Tensor, String> {
        let Some((q_heads, kv_heads)) = self.permuted else {
            return Ok(tensor);
        };
        let heads = if hf.contains("self_attn.q_proj.") {
            q_heads
        } else if hf.contains("self_attn.k_proj.") {
            kv_heads
        } else {
            return Ok(tensor);
        };
        let rows = tensor.dims().first().copied().unwrap_or(0);
        if heads == 0 || rows % (2 * heads) != 0 {
            return Err(format!("{rows} rows cannot be split into {heads} heads"));
        }
        unpermute_rows(&tensor, heads).map_err(|e| tensor_message(&e))
    }
}

/// Undoes llama.cpp's row permutation of q/k: GGUF row `(h, i, half)` is Hugging Face row
/// `(h, half, i)` for head `h`, `i < d_head/2`, `half ∈ {0, 1}`.
fn unpermute_rows(w: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = w.dim(0)?;
    let cols = w.elem_count() / rows.max(1);
    let per_head = rows / n_heads;
    w.reshape((n_heads, per_head / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

impl LlamaConfig {
    /// The configuration in `gguf`'s `{architecture}.*` metadata (`llama` or `qwen2`),
    /// and how the file names its tensors.
    pub fn from_gguf(gguf: &GgufFile, architecture: &str) -> Result<(Self, Arc<dyn GgufNames>)> {
        let (family, arch) = match architecture {
            "qwen2" => (Architecture::Qwen2, "qwen2"),
            _ => (Architecture::Llama, "llama"),
        };
        let key = |k: &str| format!("{arch}.{k}");
        let n_heads = gguf.usize(&key("attention.head_count"))?;
        let d_model = gguf.usize(&key("embedding_length"))?;
        let vocab_size = match gguf.optional_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => gguf.array("tokenizer.ggml.tokens")?.len(),
        };
        let n_kv_heads = gguf
            .optional_usize(&key("attention.head_count_kv"))?
            .unwrap_or(n_heads);
        let config = LlamaConfig {
            architecture: family,
            vocab_size,
            d_model,
            n_layers: gguf.usize(&key("block_count"))?,
            n_heads,
            n_kv_heads,
            d_head: gguf
                .optional_usize(&key("attention.key_length"))?
                .unwrap_or(d_model / n_heads.max(1)),
            d_mlp: gguf.usize(&key("feed_forward_length"))?,
            rms_norm_eps: gguf.f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: gguf
                .optional_f64(&key("rope.freq_base"))?
                .unwrap_or(10_000.0),
            rope_scaling: None,
            sliding_window: None,
            tie_word_embeddings: !gguf.has_tensor("output.weight"),
            attention_bias: gguf.has_tensor("blk.0.attn_q.bias"),
            max_position_embeddings: gguf.optional_usize(&key("context_length"))?.unwrap_or(4096),
            bos_token_id: gguf.optional_u32("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: gguf
                .optional_u32("tokenizer.ggml.eos_token_id")?
                .into_iter()
                .collect(),
            dtype: DType::F32,
        };
        let scaling_type = gguf
            .optional_string(&key("rope.scaling.type"))?
            .filter(|t| t != "none");
        let scaling_factor = gguf
            .optional_f64(&key("rope.scaling.factor"))?
            .filter(|&f| f != 0.0 && f != 1.0);
        let rope_scaling = match (scaling_type, scaling_factor) {
            (None, None) if gguf.has_tensor("rope_freqs.weight") => {
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
            sliding_window: gguf.optional_usize(&key("attention.sliding_window"))?,
            rope_dimensions: gguf.optional_usize(&key("rope.dimension_count"))?,
        }
        .check(&config, gguf.path())?;
        config.validate(gguf.path())?;
        let permuted = (family == Architecture::Llama).then_some((n_heads, n_kv_heads));
        Ok((config, Arc::new(LlamaGguf { permuted })))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn names_map_both_ways() {
        for hf in [
            "model.embed_tokens.weight",
            "model.layers.12.mlp.down_proj.weight",
        ] {
            assert_eq!(
                NAMES.hf_name(&NAMES.gguf_name(hf).unwrap()).as_deref(),
                Some(hf)
            );
        }
        assert_eq!(
            NAMES
                .gguf_name("model.layers.3.self_attn.q_proj.weight")
                .unwrap(),
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
