//! The configuration of a Gemma 3 model and its Hugging Face `config.json` form
//! (`model_type: gemma3_text`, `Gemma3ForCausalLM`).

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
use crate::weights::{HeldWeights, WeightSource};
use crate::{Error, Result};

/// How a layer attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerType {
    /// Within the sliding window, with the local RoPE base.
    #[serde(rename = "sliding_attention")]
    Sliding,
    /// To every key before it, with the global RoPE base (and scaling).
    #[serde(rename = "full_attention")]
    Full,
}

/// The shape and constants of a Gemma 3 text model.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Config {
    /// Number of tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub d_head: usize,
    /// Width of the MLP's hidden layer.
    pub d_mlp: usize,
    /// The ε inside every RMSNorm.
    pub rms_norm_eps: f64,
    /// The RoPE base of the global layers.
    pub rope_theta: f64,
    /// The RoPE base of the sliding-window layers.
    pub rope_local_base_freq: f64,
    /// How the global layers' RoPE is scaled, if at all (the local layers' never is).
    pub rope_scaling: Option<RopeScaling>,
    /// The sliding window of the local layers: a query attends to itself and the `w − 1`
    /// keys before it at most.
    pub sliding_window: usize,
    /// How each layer attends.
    pub layer_types: Vec<LayerType>,
    /// Attention scores are `q·k / √query_pre_attn_scalar`.
    pub query_pre_attn_scalar: f64,
    /// Whether the LM head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// The longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// The beginning-of-sequence token, if any.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
    /// The dtype the weights are held in.
    pub dtype: DType,
}

impl Gemma3Config {
    /// Every sixth layer global, the others local: Gemma 3's pattern, which its GGUF
    /// files do not record.
    pub fn default_layer_types(n_layers: usize) -> Vec<LayerType> {
        (0..n_layers)
            .map(|i| match (i + 1) % 6 {
                0 => LayerType::Full,
                _ => LayerType::Sliding,
            })
            .collect()
    }

    /// The shape of every block's attention: scores scaled by
    /// `query_pre_attn_scalar^−½`, queries and keys normed per head (`1 + w`).
    pub fn attention(&self) -> AttentionSpec {
        AttentionSpec {
            d_model: self.d_model,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            d_head: self.d_head,
            bias: false,
            scale: 1.0 / self.query_pre_attn_scalar.sqrt(),
            qk_norm: Some((self.rms_norm_eps, 1.0)),
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
        if self.sliding_window == 0 {
            return fail("sliding_window must be positive".into());
        }
        if self.layer_types.len() != self.n_layers {
            return fail(format!(
                "layer_types lists {} layers, but num_hidden_layers = {}",
                self.layer_types.len(),
                self.n_layers
            ));
        }
        let positive = [
            self.rms_norm_eps,
            self.rope_theta,
            self.rope_local_base_freq,
            self.query_pre_attn_scalar,
        ];
        if !positive.iter().all(|&x| x > 0.0) {
            return fail(
                "rms_norm_eps, rope_theta, rope_local_base_freq and query_pre_attn_scalar \
                 must be positive"
                    .into(),
            );
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json` of a Gemma 3 text model.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let bad = |message: String| Error::BadConfig {
            path: path.to_path_buf(),
            message,
        };
        let hf: HfConfig = read_json(path)?;
        let refuse = |field: &str, value: &dyn std::fmt::Debug, why: &str| {
            Err(bad(format!("{field} = {value:?} is not supported: {why}")))
        };
        if hf.hidden_activation != "gelu_pytorch_tanh" {
            return refuse(
                "hidden_activation",
                &hf.hidden_activation,
                "Gemma 3's MLP is implemented with gelu_pytorch_tanh",
            );
        }
        for (field, value) in [
            ("final_logit_softcapping", hf.final_logit_softcapping),
            ("attn_logit_softcapping", hf.attn_logit_softcapping),
        ] {
            if let Some(cap) = value {
                return refuse(field, &cap, "Gemma 3 caps no logits");
            }
        }
        if hf.use_bidirectional_attention == Some(true) {
            return refuse(
                "use_bidirectional_attention",
                &true,
                "only causal attention is implemented",
            );
        }
        let layer_types = match hf.layer_types {
            Some(types) => types,
            None => match hf.sliding_window_pattern {
                None | Some(6) => Self::default_layer_types(hf.num_hidden_layers),
                Some(n) => {
                    return refuse("sliding_window_pattern", &n, "Gemma 3's pattern is 6");
                }
            },
        };
        let config = Self {
            vocab_size: hf.vocab_size,
            d_model: hf.hidden_size,
            n_layers: hf.num_hidden_layers,
            n_heads: hf.num_attention_heads,
            n_kv_heads: hf.num_key_value_heads,
            d_head: hf.head_dim,
            d_mlp: hf.intermediate_size,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta,
            rope_local_base_freq: hf.rope_local_base_freq,
            rope_scaling: rope_scaling_of(hf.rope_scaling.as_ref()).map_err(bad)?,
            sliding_window: hf.sliding_window,
            layer_types,
            query_pre_attn_scalar: hf.query_pre_attn_scalar,
            tie_word_embeddings: hf.tie_word_embeddings,
            max_position_embeddings: hf.max_position_embeddings,
            bos_token_id: hf.bos_token_id,
            eos_token_ids: hf.eos_token_id.map_or(vec![], TokenIds::into_vec),
            dtype: DType::F32,
        };
        config.validate(path)?;
        Ok(config)
    }
}

impl DecoderConfig for Gemma3Config {
    type Block = Block;

    fn load_block(&self, weights: &HeldWeights<'_>, layer: usize, tp: TpRank) -> Result<Block> {
        Block::load(weights, layer, self, tp)
    }

    /// Local layers: the sliding window and the local base, unscaled; global layers:
    /// every key, the global base and scaling.
    fn layer_positions(&self, layer: usize) -> PositionSpec {
        let global = PositionSpec {
            d_head: self.d_head,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone(),
            max_position_embeddings: self.max_position_embeddings,
            sliding_window: None,
            dtype: self.dtype,
        };
        match self.layer_types.get(layer) {
            Some(LayerType::Sliding) => PositionSpec {
                rope_theta: self.rope_local_base_freq,
                rope_scaling: None,
                sliding_window: Some(self.sliding_window),
                ..global
            },
            _ => global,
        }
    }

    /// `√d_model` (rounded to the weights' dtype as the embedding is multiplied).
    fn embed_scale(&self) -> Option<f64> {
        Some((self.d_model as f64).sqrt())
    }
}

impl ModelSpec for Gemma3Config {
    fn model_type(&self) -> &'static str {
        "gemma3_text"
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

    fn context(&self) -> usize {
        self.max_position_embeddings
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

    fn norm_offset(&self) -> f64 {
        1.0
    }

    /// Each block's slices (with more ranks than key/value heads, one of them whole)
    /// and its four norms.
    fn stage_parameter_count(&self, stage: &Stage, tp: usize) -> u64 {
        let [d, mlp] = [self.d_model, self.d_mlp].map(|n| n as u64);
        let per_layer = self.attention().parameter_count(tp) + 3 * d * mlp / tp as u64 + 4 * d;
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

    fn to_hf_json(&self) -> String {
        let hf = HfConfig {
            architectures: vec!["Gemma3ForCausalLM".to_string()],
            model_type: "gemma3_text".to_string(),
            vocab_size: self.vocab_size,
            hidden_size: self.d_model,
            intermediate_size: self.d_mlp,
            num_hidden_layers: self.n_layers,
            num_attention_heads: self.n_heads,
            num_key_value_heads: self.n_kv_heads,
            head_dim: self.d_head,
            hidden_activation: "gelu_pytorch_tanh".to_string(),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_local_base_freq: self.rope_local_base_freq,
            rope_scaling: self.rope_scaling.as_ref().map(rope_scaling_json),
            sliding_window: self.sliding_window,
            sliding_window_pattern: None,
            layer_types: Some(self.layer_types.clone()),
            query_pre_attn_scalar: self.query_pre_attn_scalar,
            final_logit_softcapping: None,
            attn_logit_softcapping: None,
            use_bidirectional_attention: None,
            tie_word_embeddings: self.tie_word_embeddings,
            max_position_embeddings: self.max_position_embeddings,
            bos_token_id: self.bos_token_id,
            eos_token_id: TokenIds::of(&self.eos_token_ids),
            torch_dtype: "float32".to_string(),
        };
        // Serializing a struct of plain fields cannot fail.
        serde_json::to_string_pretty(&hf).unwrap_or_default()
    }
}

/// The fields of a Hugging Face `config.json` that a Gemma 3 text model uses, with
/// `Gemma3TextConfig`'s defaults.
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
    num_key_value_heads: usize,
    #[serde(default = "defaults::head_dim")]
    head_dim: usize,
    #[serde(default = "defaults::activation")]
    hidden_activation: String,
    #[serde(default = "defaults::eps")]
    rms_norm_eps: f64,
    #[serde(default = "defaults::rope_theta")]
    rope_theta: f64,
    #[serde(default = "defaults::rope_local_base_freq")]
    rope_local_base_freq: f64,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "defaults::sliding_window")]
    sliding_window: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sliding_window_pattern: Option<usize>,
    #[serde(default)]
    layer_types: Option<Vec<LayerType>>,
    #[serde(default = "defaults::query_pre_attn_scalar")]
    query_pre_attn_scalar: f64,
    #[serde(default)]
    final_logit_softcapping: Option<f64>,
    #[serde(default)]
    attn_logit_softcapping: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    use_bidirectional_attention: Option<bool>,
    #[serde(default = "defaults::yes")]
    tie_word_embeddings: bool,
    #[serde(default = "defaults::max_position_embeddings")]
    max_position_embeddings: usize,
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<TokenIds>,
    #[serde(default)]
    torch_dtype: String,
}

/// `Gemma3TextConfig`'s defaults.
mod defaults {
    pub fn head_dim() -> usize {
        256
    }
    pub fn activation() -> String {
        "gelu_pytorch_tanh".to_string()
    }
    pub fn eps() -> f64 {
        1e-6
    }
    pub fn rope_theta() -> f64 {
        1_000_000.0
    }
    pub fn rope_local_base_freq() -> f64 {
        10_000.0
    }
    pub fn sliding_window() -> usize {
        4096
    }
    pub fn query_pre_attn_scalar() -> f64 {
        256.0
    }
    pub fn yes() -> bool {
        true
    }
    pub fn max_position_embeddings() -> usize {
        131_072
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_json_round_trips() {
        let config = crate::tiny::tiny_gemma3_config();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), config.to_hf_json()).unwrap();
        assert_eq!(Gemma3Config::from_hf_json(file.path()).unwrap(), config);
    }

    #[test]
    fn every_sixth_layer_is_global() {
        let types = Gemma3Config::default_layer_types(18);
        let global: Vec<usize> = (0..18).filter(|&i| types[i] == LayerType::Full).collect();
        assert_eq!(global, [5, 11, 17]);
    }

    #[test]
    fn logit_softcapping_is_refused_by_name() {
        let config = crate::tiny::tiny_gemma3_config();
        let mut json: serde_json::Value = serde_json::from_str(&config.to_hf_json()).unwrap();
        json["final_logit_softcapping"] = 30.0.into();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), json.to_string()).unwrap();
        let err = Gemma3Config::from_hf_json(file.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("final_logit_softcapping = 30.0"), "{err}");
    }
}
