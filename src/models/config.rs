//! The families FlexModel-rs runs, and the configuration of a model of any of them:
//! the one place that names them all. Adding a family is a folder under `models/` and
//! a variant here.

use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use candle_core::DType;

use crate::models::hf_json::read_json;
use crate::models::{Gemma3Config, LlamaConfig, ModelSpec};
use crate::weights::{GgufFile, GgufNames};
use crate::{Error, Result};

/// A model's configuration, whatever its family.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// LLaMA 2/3, Mistral, Qwen2, SmolLM2.
    Llama(LlamaConfig),
    /// Gemma 3 (text).
    Gemma3(Gemma3Config),
}

impl ModelConfig {
    /// The family's own configuration, as what every family declares.
    pub fn spec(&self) -> &(dyn ModelSpec + 'static) {
        match self {
            ModelConfig::Llama(c) => c,
            ModelConfig::Gemma3(c) => c,
        }
    }

    /// The LLaMA-family configuration, if the model is one.
    pub fn as_llama(&self) -> Option<&LlamaConfig> {
        match self {
            ModelConfig::Llama(c) => Some(c),
            _ => None,
        }
    }

    /// The LLaMA-family configuration to change, if the model is one.
    pub fn as_llama_mut(&mut self) -> Option<&mut LlamaConfig> {
        match self {
            ModelConfig::Llama(c) => Some(c),
            _ => None,
        }
    }

    /// This configuration with its weights held in `dtype`.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        match &mut self {
            ModelConfig::Llama(c) => c.dtype = dtype,
            ModelConfig::Gemma3(c) => c.dtype = dtype,
        }
        self
    }

    /// Reads a Hugging Face `config.json`, of the family its `model_type` names.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Family {
            model_type: String,
        }
        let family: Family = read_json(path)?;
        match family.model_type.as_str() {
            "gemma3_text" => Ok(ModelConfig::Gemma3(Gemma3Config::from_hf_json(path)?)),
            "gemma3" => Err(Error::BadConfig {
                path: path.to_path_buf(),
                message: "model_type \"gemma3\" is Gemma 3 with its vision tower, which is not \
                          supported: only the text model (gemma3_text, Gemma3ForCausalLM) is"
                    .into(),
            }),
            _ => Ok(ModelConfig::Llama(LlamaConfig::from_hf_json(path)?)),
        }
    }

    /// The configuration in a GGUF file's metadata, of the family its
    /// `general.architecture` names, and how that family names its tensors there.
    pub fn from_gguf(gguf: &GgufFile) -> Result<(Self, Arc<dyn GgufNames>)> {
        let architecture = gguf.string("general.architecture")?;
        match architecture.as_str() {
            "llama" | "qwen2" => {
                let (config, names) = LlamaConfig::from_gguf(gguf, &architecture)?;
                Ok((ModelConfig::Llama(config), names))
            }
            "gemma3" => {
                let (config, names) = Gemma3Config::from_gguf(gguf)?;
                Ok((ModelConfig::Gemma3(config), names))
            }
            other => Err(Error::BadConfig {
                path: gguf.path().to_path_buf(),
                message: format!(
                    "unsupported architecture {other:?} (supported: llama, qwen2, gemma3)"
                ),
            }),
        }
    }
}

impl From<LlamaConfig> for ModelConfig {
    fn from(config: LlamaConfig) -> Self {
        ModelConfig::Llama(config)
    }
}

impl From<Gemma3Config> for ModelConfig {
    fn from(config: Gemma3Config) -> Self {
        ModelConfig::Gemma3(config)
    }
}

/// A configuration is its family's: `config.n_layers()`, `config.points()`, … are the
/// family's answers.
impl Deref for ModelConfig {
    type Target = dyn ModelSpec;

    fn deref(&self) -> &Self::Target {
        self.spec()
    }
}
