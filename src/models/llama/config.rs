//! The configuration of a LLaMA-family model and its Hugging Face `config.json` form.

use std::path::Path;

use std::sync::Arc;

use candle_core::{DType, Device};
use flexmodel_cluster::{Collective, TpRank};
use serde::{Deserialize, Serialize};

use super::block::Block;
use super::hook_points;
use crate::hooks::{ModelPoints, Sizes};
use crate::models::decoder;
use crate::models::hf_json::{
    TokenIds, check_sizes, read_json, rope_scaling_json, rope_scaling_of,
};
use crate::models::{
    AttentionSpec, DecoderConfig, ModelShard, ModelSpec, PositionSpec, RopeScaling, Stage,
};
use crate::weights::HeldWeights;
use crate::weights::WeightSource;
use crate::{Error, Result};

/// The member of the LLaMA family, which decides the details that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// LLaMA 2/3, SmolLM2 (`model_type: llama`).
    Llama,
    /// Mistral (`model_type: mistral`): attention within a sliding window.
    Mistral,
    /// Qwen2 (`model_type: qwen2`): biases on the q/k/v projections.
    Qwen2,
}

/// The shape and constants of a LLaMA-family transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Which member of the family.
    pub architecture: Architecture,
    /// Number of tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads (grouped-query attention).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub d_head: usize,
    /// Width of the MLP's hidden layer.
    pub d_mlp: usize,
    /// The ε inside RMSNorm.
    pub rms_norm_eps: f64,
    /// The RoPE base frequency.
    pub rope_theta: f64,
    /// How RoPE's frequencies are scaled for long contexts (`rope_scaling`), if at all.
    pub rope_scaling: Option<RopeScaling>,
    /// Mistral's sliding window: a query attends to itself and the `w − 1` keys before
    /// it at most. `None` for full causal attention.
    pub sliding_window: Option<usize>,
    /// Whether the LM head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Whether the q/k/v projections have biases.
    pub attention_bias: bool,
    /// The longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// The beginning-of-sequence token, if any.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
    /// The dtype the weights are held in: f32 unless the layout asks for bf16 or f16
    /// (`--model-dtype`), whatever dtype the checkpoint stores.
    pub dtype: DType,
}

impl LlamaConfig {
    /// The shape of every block's attention: scores scaled by `1/√d_head`, no query or
    /// key norms.
    pub fn attention(&self) -> AttentionSpec {
        AttentionSpec {
            d_model: self.d_model,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            d_head: self.d_head,
            bias: self.attention_bias,
            scale: 1.0 / (self.d_head as f64).sqrt(),
            qk_norm: None,
        }
    }

    /// Where every layer's queries and keys sit: one RoPE and one window for all.
    pub fn positions(&self) -> PositionSpec {
        PositionSpec {
            d_head: self.d_head,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone(),
            max_position_embeddings: self.max_position_embeddings,
            sliding_window: self.sliding_window,
            dtype: self.dtype,
        }
    }

    /// Checks that the numbers describe a buildable model; `source` names where they came from.
    pub fn validate(&self, source: &Path) -> Result<()> {
        let fail = |message: String| {
            Err(Error::BadConfig {
                path: source.to_path_buf(),
                message,
            })
        };
        check_sizes(self.sizes(), self.n_layers, source)?;
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return fail("rms_norm_eps and rope_theta must be positive".into());
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let bad = |message: String| Error::BadConfig {
            path: path.to_path_buf(),
            message,
        };
        let hf: HfConfig = read_json(path)?;
        let architecture = match hf.model_type.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(bad(format!(
                    "unsupported architecture {other:?} (supported: llama, mistral, qwen2, gemma3_text)"
                )));
            }
        };
        let n_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        let d_head = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1));
        let max_position_embeddings = hf.max_position_embeddings.unwrap_or(4096);
        // Qwen2's window covers only some layers (`max_window_layers`): not implemented.
        if architecture == Architecture::Qwen2 && hf.use_sliding_window == Some(true) {
            Unimplemented {
                sliding_window: hf.sliding_window,
                ..Unimplemented::default()
            }
            .check_window(max_position_embeddings, path)?;
        }
        let sliding_window = hf
            .sliding_window
            .filter(|&w| architecture == Architecture::Mistral && w < max_position_embeddings);
        let config = LlamaConfig {
            architecture,
            vocab_size: hf.vocab_size,
            d_model: hf.hidden_size,
            n_layers: hf.num_hidden_layers,
            n_heads: hf.num_attention_heads,
            n_kv_heads,
            d_head,
            d_mlp: hf.intermediate_size,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rope_scaling: rope_scaling_of(hf.rope_scaling.as_ref()).map_err(bad)?,
            sliding_window,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            attention_bias: architecture == Architecture::Qwen2
                || hf.attention_bias.unwrap_or(false),
            max_position_embeddings,
            bos_token_id: hf.bos_token_id,
            eos_token_ids: hf.eos_token_id.map_or(vec![], TokenIds::into_vec),
            dtype: DType::F32,
        };
        config.validate(path)?;
        Ok(config)
    }
}

impl DecoderConfig for LlamaConfig {
    type Block = Block;

    fn load_block(&self, weights: &HeldWeights<'_>, layer: usize, tp: TpRank) -> Result<Block> {
        Block::load(weights, layer, self, tp)
    }

    fn layer_positions(&self, _layer: usize) -> PositionSpec {
        self.positions()
    }
}

impl ModelSpec for LlamaConfig {
    fn model_type(&self) -> &'static str {
        match self.architecture {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }

    fn n_layers(&self) -> usize {
        self.n_layers
    }

    fn sizes(&self) -> Sizes {
        Sizes {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            d_head: self.d_head,
            d_model: self.d_model,
            d_mlp: self.d_mlp,
            vocab_size: self.vocab_size,
        }
    }

    fn points(&self) -> ModelPoints {
        hook_points::points(self.n_layers, self.sizes())
    }

    /// `max_position_embeddings`, or that times the factor under dynamic NTK scaling
    /// (which exists to run beyond it).
    fn context(&self) -> usize {
        match self.rope_scaling {
            Some(RopeScaling::Dynamic { factor }) if factor > 1.0 => {
                (self.max_position_embeddings as f64 * factor) as usize
            }
            _ => self.max_position_embeddings,
        }
    }

    fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn rms_norm_eps(&self) -> f64 {
        self.rms_norm_eps
    }

    fn tied_embeddings(&self) -> bool {
        self.tie_word_embeddings
    }

    /// Each block's slices (biases included; with more ranks than key/value heads, one
    /// of them whole) and its two norms.
    fn stage_parameter_count(&self, stage: &Stage, tp: usize) -> u64 {
        let [d, mlp] = [self.d_model, self.d_mlp].map(|n| n as u64);
        let per_layer = self.attention().parameter_count(tp) + 3 * d * mlp / tp as u64 + 2 * d;
        decoder::stage_parameter_count(self, stage, tp, per_layer)
    }

    fn load(
        &self,
        weights: &dyn WeightSource,
        collective: Arc<dyn Collective>,
        stage: Stage,
        device: &Device,
        replicas: Option<Arc<dyn Collective>>,
    ) -> Result<Arc<dyn ModelShard>> {
        decoder::load_shard(self, weights, collective, stage, device, replicas)
    }

    /// The Hugging Face `config.json` text of this configuration.
    fn to_hf_json(&self) -> String {
        let (model_type, class) = match self.architecture {
            Architecture::Llama => ("llama", "LlamaForCausalLM"),
            Architecture::Mistral => ("mistral", "MistralForCausalLM"),
            Architecture::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        };
        let hf = HfConfig {
            architectures: vec![class.to_string()],
            model_type: model_type.to_string(),
            vocab_size: self.vocab_size,
            hidden_size: self.d_model,
            intermediate_size: self.d_mlp,
            num_hidden_layers: self.n_layers,
            num_attention_heads: self.n_heads,
            num_key_value_heads: Some(self.n_kv_heads),
            head_dim: Some(self.d_head),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: Some(self.rope_theta),
            rope_scaling: self.rope_scaling.as_ref().map(rope_scaling_json),
            sliding_window: self.sliding_window,
            use_sliding_window: None,
            tie_word_embeddings: Some(self.tie_word_embeddings),
            attention_bias: Some(self.attention_bias),
            max_position_embeddings: Some(self.max_position_embeddings),
            bos_token_id: self.bos_token_id,
            eos_token_id: TokenIds::of(&self.eos_token_ids),
            hidden_act: "silu".to_string(),
            torch_dtype: "float32".to_string(),
        };
        // Serializing a struct of plain fields cannot fail.
        serde_json::to_string_pretty(&hf).unwrap_or_default()
    }
}

/// What a checkpoint's configuration asks for that the model does not implement; the
/// Hugging Face and the GGUF readers refuse the same things with the same words (a
/// Hugging Face checkpoint's RoPE scalings and Mistral's window are implemented, see
/// [`RopeScaling`] and [`LlamaConfig::sliding_window`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Unimplemented {
    /// A RoPE scaling scheme (linear, dynamic, YaRN, LLaMA 3's frequency factors), as
    /// the checkpoint describes it.
    pub rope_scaling: Option<String>,
    /// The sliding window of the attention, in tokens.
    pub sliding_window: Option<usize>,
    /// The dimensions of each head that RoPE rotates.
    pub rope_dimensions: Option<usize>,
}

impl Unimplemented {
    /// An error naming `source` if `config`'s model would compute something else than
    /// plain causal attention with full RoPE: any RoPE scaling, a sliding window shorter
    /// than the context, or RoPE on part of each head.
    pub fn check(&self, config: &LlamaConfig, source: &Path) -> Result<()> {
        let refuse = |message: String| {
            Err(Error::BadConfig {
                path: source.to_path_buf(),
                message,
            })
        };
        if let Some(scaling) = &self.rope_scaling {
            return refuse(format!(
                "RoPE scaling ({scaling}) is not supported: only plain RoPE is implemented"
            ));
        }
        self.check_window(config.max_position_embeddings, source)?;
        if let Some(dims) = self.rope_dimensions.filter(|&d| d != config.d_head) {
            return refuse(format!(
                "RoPE on {dims} of the {} dimensions of each head is not supported",
                config.d_head
            ));
        }
        Ok(())
    }

    /// An error naming `source` if a sliding window shorter than a context of `context`
    /// tokens is asked for where it is not implemented.
    fn check_window(&self, context: usize, source: &Path) -> Result<()> {
        match self.sliding_window.filter(|&w| w < context) {
            Some(window) => Err(Error::BadConfig {
                path: source.to_path_buf(),
                message: format!(
                    "sliding-window attention (a window of {window} tokens in a context of {context}) \
                     is not supported: only full causal attention is implemented"
                ),
            }),
            None => Ok(()),
        }
    }
}

/// The fields of a Hugging Face `config.json` that a LLaMA-family model uses.
#[derive(Serialize, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    use_sliding_window: Option<bool>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    max_position_embeddings: Option<usize>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
    #[serde(default = "silu")]
    hidden_act: String,
    #[serde(default)]
    torch_dtype: String,
}

fn silu() -> String {
    "silu".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(json: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), json).unwrap();
        file
    }

    #[test]
    fn hf_json_round_trips() {
        let config = crate::tiny::tiny_config();
        let file = write(&config.to_hf_json());
        assert_eq!(LlamaConfig::from_hf_json(file.path()).unwrap(), config);
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let json = config_json("\"gpt2\"");
        let err = LlamaConfig::from_hf_json(write(&json).path()).unwrap_err();
        assert!(
            err.to_string()
                .contains("unsupported architecture \"gpt2\""),
            "{err}"
        );
    }

    #[test]
    fn heads_must_be_a_multiple_of_kv_heads() {
        let json = config_json("\"llama\"")
            .replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3");
        let err = LlamaConfig::from_hf_json(write(&json).path()).unwrap_err();
        assert!(
            err.to_string()
                .contains("not a multiple of num_key_value_heads = 3"),
            "{err}"
        );
    }

    #[test]
    fn rope_scalings_and_windows_are_read_and_what_is_not_implemented_refused() {
        let with = |model_type: &str, extra: &str| {
            let json = config_json(model_type)
                .replace("\"rms_norm_eps\"", &format!("{extra}, \"rms_norm_eps\""));
            LlamaConfig::from_hf_json(write(&json).path())
        };
        let linear = with(
            "\"llama\"",
            r#""rope_scaling": {"type": "linear", "factor": 2.0}"#,
        );
        let expected = Some(RopeScaling::Linear { factor: 2.0 });
        assert_eq!(linear.unwrap().rope_scaling, expected);
        let err = with("\"llama\"", r#""rope_scaling": {"rope_type": "longrope"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is not supported: implemented are linear"),
            "{err}"
        );
        let window = r#""sliding_window": 16, "max_position_embeddings": 64"#;
        assert_eq!(
            with("\"mistral\"", window).unwrap().sliding_window,
            Some(16)
        );
        let qwen = format!("{window}, \"use_sliding_window\": true");
        let err = with("\"qwen2\"", &qwen).unwrap_err().to_string();
        assert!(
            err.contains("sliding-window attention (a window of 16 tokens in a context of 64) is not supported"),
            "{err}"
        );
        let whole = r#""sliding_window": 64, "max_position_embeddings": 64"#;
        assert_eq!(with("\"mistral\"", whole).unwrap().sliding_window, None);
        let none = with(
            "\"mistral\"",
            r#""rope_scaling": null, "sliding_window": null"#,
        );
        assert_eq!(none.unwrap().rope_scaling, None);
    }

    #[test]
    fn scalings_and_windows_round_trip_through_hf_json() {
        let config = LlamaConfig {
            architecture: Architecture::Mistral,
            sliding_window: Some(7),
            rope_scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 128,
            }),
            ..crate::tiny::tiny_config()
        };
        let file = write(&config.to_hf_json());
        assert_eq!(LlamaConfig::from_hf_json(file.path()).unwrap(), config);
        let dynamic = LlamaConfig {
            rope_scaling: Some(RopeScaling::Dynamic { factor: 2.0 }),
            ..crate::tiny::tiny_config()
        };
        assert_eq!(dynamic.context(), 2 * dynamic.max_position_embeddings);
    }

    fn config_json(model_type: &str) -> String {
        format!(
            r#"{{"model_type": {model_type}, "vocab_size": 32, "hidden_size": 16,
                "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                "num_key_value_heads": 2, "rms_norm_eps": 1e-5}}"#
        )
    }
}
