//! Gemma 3 models in GGUF files: the configuration in llama.cpp's `gemma3.*` metadata,
//! the tensor names, and the norms' weights brought back to Hugging Face's.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::Gemma3Config;
use crate::Result;
use crate::error::tensor_message;
use crate::weights::{GgufFile, GgufNames, NameTable};

/// Gemma 3's tensors, as Hugging Face and llama.cpp name them.
const NAMES: NameTable = NameTable {
    global: &[
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ],
    block: &[
        ("input_layernorm.weight", "attn_norm.weight"),
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("self_attn.q_norm.weight", "attn_q_norm.weight"),
        ("self_attn.k_norm.weight", "attn_k_norm.weight"),
        (
            "post_attention_layernorm.weight",
            "post_attention_norm.weight",
        ),
        ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
        ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"),
    ],
};

/// How a Gemma 3 GGUF names its tensors. llama.cpp's conversion stores every norm's
/// weight with Gemma's `+ 1` added (the query and key norms' too); Hugging Face's
/// weight is that minus one.
#[derive(Debug)]
struct Gemma3Gguf;

impl GgufNames for Gemma3Gguf {
    fn table(&self) -> &NameTable {
        &NAMES
    }

    fn convert(&self, hf: &str, tensor: Tensor) -> std::result::Result<Tensor, String> {
        match hf.ends_with("norm.weight") {
            true => {
                (tensor.to_dtype(DType::F32).and_then(|t| t - 1.0)).map_err(|e| tensor_message(&e))
            }
            false => Ok(tensor),
        }
    }
}

impl Gemma3Config {
    /// The configuration in `gguf`'s `gemma3.*` metadata, and how the file names its
    /// tensors. What llama.cpp does not record it fixes for Gemma 3, and so does this:
    /// every sixth layer global, a local RoPE base of 10 000, and scores scaled by
    /// `head_dim^−½` (`d_model / n_heads` for the 62-layer 27B model).
    pub fn from_gguf(gguf: &GgufFile) -> Result<(Self, Arc<dyn GgufNames>)> {
        let key = |k: &str| format!("gemma3.{k}");
        let n_heads = gguf.usize(&key("attention.head_count"))?;
        let d_model = gguf.usize(&key("embedding_length"))?;
        let n_layers = gguf.usize(&key("block_count"))?;
        let d_head = gguf
            .optional_usize(&key("attention.key_length"))?
            .unwrap_or(d_model / n_heads.max(1));
        let vocab_size = match gguf.optional_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => gguf.array("tokenizer.ggml.tokens")?.len(),
        };
        let scaling = gguf
            .optional_string(&key("rope.scaling.type"))?
            .filter(|t| t != "none");
        let factor = gguf.optional_f64(&key("rope.scaling.factor"))?;
        let rope_scaling = match (scaling.as_deref(), factor) {
            (None, _) => None,
            (Some("linear"), Some(factor)) => Some(crate::models::RopeScaling::Linear { factor }),
            (Some(other), _) => {
                return Err(gguf.bad_config(format!(
                    "RoPE scaling {other:?} (factor {factor:?}) is not supported for Gemma 3: \
                     only linear scaling is"
                )));
            }
        };
        let query_pre_attn_scalar = match n_layers {
            62 => d_model / n_heads.max(1),
            _ => d_head,
        } as f64;
        let config = Self {
            vocab_size,
            d_model,
            n_layers,
            n_heads,
            n_kv_heads: gguf
                .optional_usize(&key("attention.head_count_kv"))?
                .unwrap_or(n_heads),
            d_head,
            d_mlp: gguf.usize(&key("feed_forward_length"))?,
            rms_norm_eps: gguf.f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: gguf
                .optional_f64(&key("rope.freq_base"))?
                .unwrap_or(1_000_000.0),
            rope_local_base_freq: 10_000.0,
            rope_scaling,
            sliding_window: gguf.usize(&key("attention.sliding_window"))?,
            layer_types: Self::default_layer_types(n_layers),
            query_pre_attn_scalar,
            tie_word_embeddings: !gguf.has_tensor("output.weight"),
            max_position_embeddings: gguf.usize(&key("context_length"))?,
            bos_token_id: gguf.optional_u32("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: gguf
                .optional_u32("tokenizer.ggml.eos_token_id")?
                .into_iter()
                .collect(),
            dtype: DType::F32,
        };
        config.validate(gguf.path())?;
        Ok((config, Arc::new(Gemma3Gguf)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn names_map_both_ways() {
        for (hf, gguf) in [
            (
                "model.layers.4.pre_feedforward_layernorm.weight",
                "blk.4.ffn_norm.weight",
            ),
            (
                "model.layers.0.self_attn.k_norm.weight",
                "blk.0.attn_k_norm.weight",
            ),
            ("model.norm.weight", "output_norm.weight"),
        ] {
            assert_eq!(NAMES.gguf_name(hf).as_deref(), Some(gguf));
            assert_eq!(NAMES.hf_name(gguf).as_deref(), Some(hf));
        }
    }

    #[test]
    fn norm_weights_lose_the_one_llama_cpp_added() {
        let stored = Tensor::new(&[1.5f32, 0.25], &Device::Cpu).unwrap();
        let norm = Gemma3Gguf
            .convert("model.layers.0.self_attn.q_norm.weight", stored.clone())
            .unwrap();
        assert_eq!(norm.to_vec1::<f32>().unwrap(), [0.5, -0.75]);
        let linear = Gemma3Gguf
            .convert("model.layers.0.mlp.up_proj.weight", stored)
            .unwrap();
        assert_eq!(linear.to_vec1::<f32>().unwrap(), [1.5, 0.25]);
    }
}
