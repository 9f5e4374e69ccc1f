//! A Hugging Face checkpoint's safetensors: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`; or any one safetensors file.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::safetensors_header::SafetensorsFile;
use super::{WeightSource, check_shape, missing};
use crate::{Error, Result};

/// The safetensors files of a model directory. Opening one reads the files' headers
/// only; a tensor, or a slice of one, is read by offset when asked for.
pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    routing: BTreeMap<String, usize>,
}

impl SafetensorsDir {
    /// Opens the single file `model.safetensors` or the shards of the index in `dir`,
    /// reading their headers.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let shards = if index.exists() {
            Self::shards_of_index(&index)?
        } else {
            vec!["model.safetensors".to_string()]
        };
        Self::of_files(dir, &shards)
    }

    /// Opens the one safetensors file `name` in `dir` (an SAE's `sae_weights.safetensors`),
    /// reading its header.
    pub fn open_file(dir: &Path, name: &str) -> Result<Self> {
        Self::of_files(dir, &[name.to_string()])
    }

    /// Opens the files `shards` of `dir`, no tensor in two of them.
    fn of_files(dir: &Path, shards: &[String]) -> Result<Self> {
        let mut files = Vec::new();
        let mut routing = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = SafetensorsFile::open(&dir.join(shard))?;
            for name in file.tensors.keys() {
                if let Some(other) = routing.insert(name.clone(), i) {
                    return Err(Error::BadWeightsFile {
                        path: file.path().to_path_buf(),
                        message: format!("tensor {name} is also in {}", files_name(&files[other])),
                    });
                }
            }
            files.push(file);
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

    /// The file holding `name`, and the tensor's shape there.
    fn locate(&self, name: &str) -> Result<(&SafetensorsFile, &[usize])> {
        let file = self
            .routing
            .get(name)
            .map(|&i| &self.files[i])
            .ok_or_else(|| missing(&self.dir, name))?;
        let shape = file
            .tensors
            .get(name)
            .map(|entry| entry.shape.as_slice())
            .ok_or_else(|| missing(&self.dir, name))?;
        Ok((file, shape))
    }
}

fn files_name(file: &SafetensorsFile) -> String {
    file.path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl WeightSource for SafetensorsDir {
    fn origin(&self) -> &Path {
        &self.dir
    }

    /// Each file's name, length and header, and the first and last few KiB of every
    /// tensor: a few MB however large the checkpoint.
    fn fingerprint(&self) -> Result<String> {
        super::fingerprint::of_sampled_files(self.files.iter().map(|file| {
            super::fingerprint::SampledFile {
                path: file.path(),
                length: file.length,
                header: &file.header,
                tensors: file.tensors.values().map(|e| e.bytes.clone()).collect(),
            }
        }))
    }

    fn names(&self) -> Vec<String> {
        self.routing.keys().cloned().collect()
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let (file, _) = self.locate(name)?;
        file.read(name, None, DType::F32)
    }

    fn tensor_slice(
        &self,
        name: &str,
        shape: &[usize],
        slice: Option<(usize, Range<usize>)>,
        dtype: DType,
    ) -> Result<Tensor> {
        let (file, found) = self.locate(name)?;
        check_shape(&self.dir, name, shape, found)?;
        file.read(name, slice, dtype)
    }

    fn reads_slices(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::{tiny_config, write_random_hf_dir};

    #[test]
    fn slices_read_alone_equal_the_whole_tensor_narrowed_in_any_file() {
        let dir = tempfile::tempdir().unwrap();
        write_random_hf_dir(dir.path(), &tiny_config(), 2, 1).unwrap();
        let weights = SafetensorsDir::open(dir.path()).unwrap();
        assert_eq!(weights.files.len(), 2);
        for (name, shape, dim, range) in [
            ("model.embed_tokens.weight", [256, 64], 0, 64..128),
            (
                "model.layers.3.self_attn.o_proj.weight",
                [64, 64],
                1,
                16..32,
            ),
            ("lm_head.weight", [256, 64], 0, 192..256),
        ] {
            let slice = weights
                .tensor_slice(name, &shape, Some((dim, range.clone())), DType::F32)
                .unwrap();
            let whole = weights.tensor(name).unwrap();
            let narrowed = whole.narrow(dim, range.start, range.len()).unwrap();
            let diff = (slice - narrowed).unwrap().abs().unwrap();
            assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        }
        let err = weights
            .tensor_slice("lm_head.weight", &[64, 256], None, DType::F32)
            .unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    }
}
