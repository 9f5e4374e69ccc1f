//! A Hugging Face checkpoint's safetensors: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::BufferedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::{WeightSource, missing};
use crate::error::tensor_message;
use crate::{Error, Result};

/// The safetensors files of a model directory, read into memory at open.
pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<(PathBuf, BufferedSafetensors)>,
    /// Tensor name → index into `files`.
    routing: BTreeMap<String, usize>,
}

impl SafetensorsDir {
    /// Opens the single file `model.safetensors` or the shards of the index in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let shards = if index.exists() {
            Self::shards_of_index(&index)?
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut files = Vec::new();
        let mut routing = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let path = dir.join(shard);
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let st = BufferedSafetensors::new(bytes).map_err(|e| Error::BadWeightsFile {
                path: path.clone(),
                message: format!("not a readable safetensors file: {}", tensor_message(&e)),
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, i);
            }
            files.push((path, st));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            routing,
        })
    }

    /// The distinct shard file names of a `model.safetensors.index.json`, in order.
    fn shards_of_index(index: &Path) -> Result<Vec<String>> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let bad = |message: String| Error::BadWeightsFile {
            path: index.to_path_buf(),
            message,
        };
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let index: Index = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut shards: Vec<String> = index.weight_map.into_values().collect();
        shards.sort();
        shards.dedup();
        if let Some(bad_name) = shards.iter().find(|s| s.contains('/') || s.contains("..")) {
            return Err(bad(format!(
                "shard {bad_name:?} is not a file name in the directory"
            )));
        }
        Ok(shards)
    }
}

impl WeightSource for SafetensorsDir {
    fn origin(&self) -> &Path {
        &self.dir
    }

    fn fingerprint(&self) -> Result<String> {
        super::fingerprint::of_files(self.files.iter().map(|(path, _)| path.as_path()))
    }

    fn names(&self) -> Vec<String> {
        self.routing.keys().cloned().collect()
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let &i = self
            .routing
            .get(name)
            .ok_or_else(|| missing(&self.dir, name))?;
        let (path, st) = &self.files[i];
        let t = st.load(name, &Device::Cpu).map_err(|e| Error::BadTensor {
            path: path.clone(),
            tensor: name.to_string(),
            message: tensor_message(&e),
        })?;
        Ok(t.to_dtype(DType::F32)?)
    }
}
