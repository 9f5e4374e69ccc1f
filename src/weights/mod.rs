//! Where a model's weights come from: GGUF files, Hugging Face safetensors
//! checkpoints, or tensors in memory. Every source serves f32 tensors on the CPU under
//! their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`), a GGUF file as
//! its family names them ([`GgufNames`]); [`pretrained`] fetches the packaged ones into
//! the cache.

pub(crate) mod fingerprint;
mod gguf;
pub mod pretrained;
mod safetensors_dir;
mod safetensors_file;
mod safetensors_header;
mod tensor_map;

use std::ops::Range;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

pub use gguf::{GgufFile, GgufNames, NameTable};
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

    /// A digest of the weights (a SHA-256, in hex): equal for equal weights, and
    /// different for checkpoints that differ in any tensor's name, shape or dtype, or in
    /// the values that the source samples (see each source).
    fn fingerprint(&self) -> Result<String>;

    /// Indices `range` along dimension `dim` of the tensor `name` (the whole tensor for
    /// `None`), which must have shape `shape`, in `dtype` on the CPU in storage of its
    /// own.
    ///
    /// By default the whole tensor is read as f32, narrowed and converted; a source that
    /// [`reads_slices`](Self::reads_slices) reads the slice alone.
    fn tensor_slice(
        &self,
        name: &str,
        shape: &[usize],
        slice: Option<(usize, Range<usize>)>,
        dtype: DType,
    ) -> Result<Tensor> {
        let t = self.tensor_with_shape(name, shape)?;
        let t = match slice {
            Some((dim, range)) if shape.get(dim) != Some(&range.len()) => t
                .narrow(dim, range.start, range.len())?
                .force_contiguous()?,
            _ => t,
        };
        Ok(t.to_dtype(dtype)?)
    }

    /// Whether [`tensor_slice`](Self::tensor_slice) reads only the slice; if not, a
    /// caller that cuts one tensor many ways should read the source into memory first
    /// ([`TensorMap::read_all`]).
    fn reads_slices(&self) -> bool {
        false
    }

    /// The tensor `name`, checked to have shape `shape`.
    fn tensor_with_shape(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensor(name)?;
        check_shape(self.origin(), name, shape, t.dims())?;
        Ok(t)
    }
}

/// Weights as a rank holds them: read from `source`, a slice at a time, in `dtype`, onto
/// `device`; with `pieces`, only a replica's piece of each slice (FSDP).
#[derive(Clone, Copy)]
pub struct HeldWeights<'a> {
    /// Where the tensors come from.
    pub source: &'a dyn WeightSource,
    /// The dtype they are held in.
    pub dtype: DType,
    /// The device they are held on: each slice is read on the host and copied there
    /// before the next is read.
    pub device: &'a Device,
    /// Under FSDP, the replica whose piece of each slice is read, and what was read.
    pub pieces: Option<&'a PieceReads>,
}

impl<'a> HeldWeights<'a> {
    /// The tensors of `source` held in f32 on the CPU, whole slices.
    pub fn f32(source: &'a dyn WeightSource) -> Self {
        Self {
            source,
            dtype: DType::F32,
            device: &Device::Cpu,
            pieces: None,
        }
    }

    /// Indices `range` along dimension `dim` of the tensor `name` of shape `shape` (the
    /// whole tensor for `None`, which FSDP cuts along dimension 0), in this dtype; with
    /// `pieces`, only the replica's piece of those indices.
    pub fn slice(
        &self,
        name: &str,
        shape: &[usize],
        slice: Option<(usize, Range<usize>)>,
    ) -> Result<Tensor> {
        let slice = match self.pieces {
            None => slice,
            Some(pieces) => {
                let (dim, range) = slice.unwrap_or((0, 0..shape.first().copied().unwrap_or(1)));
                let piece = pieces.read(name, dim, range.len());
                Some((dim, range.start + piece.start..range.start + piece.end))
            }
        };
        let host = self.source.tensor_slice(name, shape, slice, self.dtype)?;
        Ok(host.to_device(self.device)?)
    }
}

/// What a replica reads under FSDP: piece `r` of `n` (as [`split_evenly`] cuts) of every
/// slice it is asked for, and, by tensor name, which piece of how long a slice that
/// was.
///
/// [`split_evenly`]: flexmodel_cluster::split_evenly
pub struct PieceReads {
    member: flexmodel_cluster::TpRank,
    read: std::sync::Mutex<std::collections::HashMap<String, PieceRead>>,
}

/// One tensor's piece: cut along source dimension `dim`, indices `range` of a slice of
/// `len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceRead {
    /// The tensor's dimension (as stored) the piece is cut along.
    pub dim: usize,
    /// The piece's indices within the slice.
    pub range: Range<usize>,
    /// The slice's length along `dim`.
    pub len: usize,
}

impl PieceReads {
    /// Reads for `member` of its replicas.
    pub fn new(member: flexmodel_cluster::TpRank) -> Self {
        Self {
            member,
            read: Default::default(),
        }
    }

    /// The piece of a slice of `len` along `dim` of `name`, recorded.
    fn read(&self, name: &str, dim: usize, len: usize) -> Range<usize> {
        let range =
            flexmodel_cluster::split_evenly(len, self.member.size())[self.member.rank()].clone();
        let piece = PieceRead {
            dim,
            range: range.clone(),
            len,
        };
        self.lock().insert(name.to_string(), piece);
        range
    }

    /// The piece read of `name`, if any.
    pub fn of(&self, name: &str) -> Option<PieceRead> {
        self.lock().get(name).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, PieceRead>> {
        self.read.lock().unwrap_or_else(|p| p.into_inner())
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

/// An error naming `name` of `origin` unless its shape `found` is `expected`.
fn check_shape(origin: &Path, name: &str, expected: &[usize], found: &[usize]) -> Result<()> {
    if found != expected {
        return Err(Error::ShapeMismatch {
            path: origin.to_path_buf(),
            tensor: name.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        });
    }
    Ok(())
}
