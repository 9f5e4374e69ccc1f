//! One safetensors file, opened by its header alone: tensors (and slices of them) are
//! read by offset when asked for, so a process holds only what it reads.
//!
//! The format: an 8-byte little-endian header length `n`, `n` bytes of JSON mapping each
//! tensor's name to `{"dtype", "shape", "data_offsets": [begin, end]}` (and an optional
//! `"__metadata__"`), then the data, each tensor row-major and little-endian at
//! `8 + n + begin`.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::{Error, Result};

/// The largest header a file may declare (the `safetensors` crate's own limit).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// The most bytes read in one call while converting a tensor: conversion goes through
/// a buffer of this size, never through a second copy of the whole tensor.
const READ_CHUNK_BYTES: usize = 8 << 20;

/// A tensor's dtype on disk, of those the model can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskDtype {
    F64,
    F32,
    F16,
    BF16,
}

impl DiskDtype {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "F64" => Self::F64,
            "F32" => Self::F32,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Self::F64 => 8,
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// Where one tensor lies in its file.
#[derive(Debug, Clone)]
pub(crate) struct TensorEntry {
    dtype: DiskDtype,
    /// The shape.
    pub(crate) shape: Vec<usize>,
    /// The byte range of its data in the file.
    pub(crate) bytes: Range<u64>,
}

/// A safetensors file whose header has been read and checked.
#[derive(Debug)]
pub(crate) struct SafetensorsFile {
    path: PathBuf,
    file: File,
    /// The file's length, in bytes.
    pub(crate) length: u64,
    /// The header's JSON as it is in the file.
    pub(crate) header: Vec<u8>,
    /// The tensors by name.
    pub(crate) tensors: BTreeMap<String, TensorEntry>,
}

impl SafetensorsFile {
    /// Opens `path` and reads its header (and nothing else), checking that every
    /// tensor's data lies inside the file and has the length its shape and dtype need.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let bad = |message: String| Error::BadWeightsFile {
            path: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let length = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut prefix = [0u8; 8];
        if length < 8 {
            return Err(bad(format!(
                "not a safetensors file: {length} bytes, fewer than the 8 of a header length"
            )));
        }
        file.read_exact_at(&mut prefix, 0)
            .map_err(|e| Error::io(path, e))?;
        let header_len = u64::from_le_bytes(prefix);
        if header_len > MAX_HEADER_BYTES || header_len > length - 8 {
            return Err(bad(format!(
                "not a safetensors file: its header would be {header_len} bytes, in a file of {length}"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| Error::io(path, e))?;
        let data_start = 8 + header_len;
        let json: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| {
                bad(format!(
                    "not a safetensors file: its header is not JSON: {e}"
                ))
            })?;
        let mut tensors = BTreeMap::new();
        for (name, value) in json {
            if name == "__metadata__" {
                continue;
            }
            let entry = parse_entry(&value, data_start, length)
                .map_err(|message| bad(format!("tensor {name}: {message}")))?;
            tensors.insert(name, entry);
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            length,
            header,
            tensors,
        })
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Indices `range` along dimension `dim` of tensor `name` (the whole tensor for
    /// `None`), read by offset and converted to `to` (f32, bf16 or f16) piece by piece.
    pub(crate) fn read(
        &self,
        name: &str,
        slice: Option<(usize, Range<usize>)>,
        to: DType,
    ) -> Result<Tensor> {
        let bad = |message: String| Error::BadTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            message,
        };
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| bad("not found".to_string()))?;
        let shape = &entry.shape;
        let (dim, range) = match slice {
            Some((dim, range)) => (dim, range),
            None => (0, 0..shape.first().copied().unwrap_or(1)),
        };
        let size = shape.get(dim).copied().unwrap_or(1);
        if (dim >= shape.len() && !shape.is_empty()) || range.end > size || range.start > range.end
        {
            return Err(bad(format!(
                "cannot take {range:?} of dimension {dim} of shape {shape:?}"
            )));
        }
        let outer: usize = shape.iter().take(dim).product();
        let inner: usize = shape.iter().skip(dim + 1).product();
        let elem = entry.dtype.size() as u64;
        // The contiguous runs of elements to read: one per index of the dimensions
        // before `dim`.
        let run = range.len() * inner;
        let runs = (0..outer).map(|o| {
            let first = (o * size + range.start) * inner;
            entry.bytes.start + first as u64 * elem
        });
        let mut out_shape = shape.clone();
        if let Some(d) = out_shape.get_mut(dim) {
            *d = range.len();
        }
        let total = outer * run;
        let values = match to {
            DType::F32 => Values::F32(self.read_runs(entry.dtype, runs, run, total)?),
            DType::BF16 => Values::BF16(self.read_runs(entry.dtype, runs, run, total)?),
            DType::F16 => Values::F16(self.read_runs(entry.dtype, runs, run, total)?),
            other => return Err(bad(format!("cannot be read as {other:?}"))),
        };
        values.into_tensor(out_shape)
    }

    /// `runs` (file offsets of `run` elements of `from` each), converted, one after the
    /// other: `total` elements.
    fn read_runs<T: Element>(
        &self,
        from: DiskDtype,
        runs: impl Iterator<Item = u64>,
        run: usize,
        total: usize,
    ) -> Result<Vec<T>> {
        let mut out = vec![T::ZERO; total];
        let elem = from.size();
        let per_read = (READ_CHUNK_BYTES / elem).max(1);
        let mut buffer = Buffer::default();
        let mut at = 0;
        for offset in runs {
            let mut done = 0;
            while done < run {
                let n = per_read.min(run - done);
                let position = offset + (done * elem) as u64;
                let target = &mut out[at..at + n];
                if let Some(bytes) = T::same_bytes(from, target) {
                    self.read_at(bytes, position)?;
                } else {
                    buffer.read(self, from, position, n)?;
                    buffer.convert_into(target);
                }
                done += n;
                at += n;
            }
        }
        Ok(out)
    }

    fn read_at(&self, bytes: &mut [u8], position: u64) -> Result<()> {
        self.file
            .read_exact_at(bytes, position)
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// The `{"dtype", "shape", "data_offsets"}` of one tensor, checked against the file.
fn parse_entry(
    value: &serde_json::Value,
    data_start: u64,
    length: u64,
) -> std::result::Result<TensorEntry, String> {
    let dtype_name = value["dtype"].as_str().ok_or("no dtype")?;
    let dtype = DiskDtype::parse(dtype_name).ok_or_else(|| {
        format!("dtype {dtype_name} is not one the model can read (F64, F32, F16, BF16)")
    })?;
    let shape = value["shape"]
        .as_array()
        .ok_or("no shape")?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<Vec<_>>>()
        .ok_or("a shape that is not a list of sizes")?;
    let offsets = value["data_offsets"]
        .as_array()
        .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)))
        .ok_or("no data_offsets [begin, end]")?;
    let elements = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .ok_or("a shape too large")?;
    let needed = elements
        .checked_mul(dtype.size() as u64)
        .ok_or("a shape too large")?;
    let (begin, end) = offsets;
    let bytes = data_start.saturating_add(begin)..data_start.saturating_add(end);
    if begin > end || end - begin != needed || bytes.end > length {
        return Err(format!(
            "data_offsets [{begin}, {end}] do not hold the {needed} bytes of {shape:?} in {dtype_name} inside the file's {length} bytes"
        ));
    }
    Ok(TensorEntry {
        dtype,
        shape,
        bytes,
    })
}

/// A tensor's values in the dtype it is held in.
enum Values {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Values {
    fn into_tensor(self, shape: Vec<usize>) -> Result<Tensor> {
        // Read on the host; `HeldWeights` copies each slice to the rank's device.
        let cpu = &Device::Cpu;
        Ok(match self {
            Values::F32(v) => Tensor::from_vec(v, shape, cpu)?,
            Values::BF16(v) => Tensor::from_vec(v, shape, cpu)?,
            Values::F16(v) => Tensor::from_vec(v, shape, cpu)?,
        })
    }
}

/// A dtype a tensor can be read into.
trait Element: Copy + bytemuck::Pod {
    const ZERO: Self;

    /// The same dtype on disk.
    const ON_DISK: DiskDtype;

    /// `values` converted into `target`.
    fn from_f32s(values: &[f32], target: &mut [Self]);

    /// `target` as bytes, when the file's `from` is this very dtype: read straight in.
    fn same_bytes(from: DiskDtype, target: &mut [Self]) -> Option<&mut [u8]> {
        (from == Self::ON_DISK && cfg!(target_endian = "little"))
            .then(|| bytemuck::cast_slice_mut(target))
    }
}

impl Element for f32 {
    const ZERO: Self = 0.0;
    const ON_DISK: DiskDtype = DiskDtype::F32;

    fn from_f32s(values: &[f32], target: &mut [Self]) {
        target.copy_from_slice(values);
    }
}

impl Element for bf16 {
    const ZERO: Self = bf16::ZERO;
    const ON_DISK: DiskDtype = DiskDtype::BF16;

    fn from_f32s(values: &[f32], target: &mut [Self]) {
        target.convert_from_f32_slice(values);
    }
}

impl Element for f16 {
    const ZERO: Self = f16::ZERO;
    const ON_DISK: DiskDtype = DiskDtype::F16;

    fn from_f32s(values: &[f32], target: &mut [Self]) {
        target.convert_from_f32_slice(values);
    }
}

/// Reused buffers for values that must be converted: the file's bytes (as 16-bit words
/// for half-precision values), then as f32.
#[derive(Default)]
struct Buffer {
    raw: Vec<u8>,
    halves: Vec<u16>,
    f32s: Vec<f32>,
}

impl Buffer {
    /// Reads `n` elements of `from` at `position` and holds them as f32.
    fn read(
        &mut self,
        file: &SafetensorsFile,
        from: DiskDtype,
        position: u64,
        n: usize,
    ) -> Result<()> {
        self.f32s.resize(n, 0.0);
        if let DiskDtype::BF16 | DiskDtype::F16 = from {
            self.halves.resize(n, 0);
            file.read_at(bytemuck::cast_slice_mut(&mut self.halves), position)?;
            if cfg!(target_endian = "big") {
                self.halves.iter_mut().for_each(|h| *h = u16::from_le(*h));
            }
            match from {
                DiskDtype::BF16 => bytemuck::cast_slice::<u16, bf16>(&self.halves)
                    .convert_to_f32_slice(&mut self.f32s),
                _ => bytemuck::cast_slice::<u16, f16>(&self.halves)
                    .convert_to_f32_slice(&mut self.f32s),
            }
            return Ok(());
        }
        self.raw.resize(n * from.size(), 0);
        file.read_at(&mut self.raw, position)?;
        let raw = &self.raw;
        if from == DiskDtype::F64 {
            for (v, b) in self.f32s.iter_mut().zip(raw.chunks_exact(8)) {
                let mut le = [0u8; 8];
                le.copy_from_slice(b);
                *v = f64::from_le_bytes(le) as f32;
            }
        } else {
            for (v, b) in self.f32s.iter_mut().zip(raw.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Ok(())
    }

    fn convert_into<T: Element>(&self, target: &mut [T]) {
        T::from_f32s(&self.f32s, target);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn written(tensors: &[(&str, Tensor)]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, &path).unwrap();
        (dir, path)
    }

    fn grid(rows: usize, cols: usize) -> Tensor {
        let v: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.25 - 3.0).collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn slices_along_each_dimension_equal_the_whole_tensor_narrowed_in_every_dtype() {
        let w = grid(6, 10);
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            let (_dir, path) = written(&[("w", w.to_dtype(dtype).unwrap())]);
            let file = SafetensorsFile::open(&path).unwrap();
            for to in [DType::F32, DType::BF16, DType::F16] {
                let expected = w.to_dtype(dtype).unwrap().to_dtype(to).unwrap();
                let whole = file.read("w", None, to).unwrap();
                assert_eq!(whole.dtype(), to);
                let diff = |a: &Tensor, b: &Tensor| {
                    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
                        .unwrap();
                    d.abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                };
                // Every value of the grid is exact in every dtype.
                assert_eq!(diff(&whole, &expected), 0.0, "{dtype:?} -> {to:?}");
                for (dim, range) in [(0, 2..5), (1, 3..7), (1, 0..10), (0, 5..6)] {
                    let part = file.read("w", Some((dim, range.clone())), to).unwrap();
                    let narrowed = expected.narrow(dim, range.start, range.len()).unwrap();
                    assert_eq!(part.dims(), narrowed.dims());
                    assert_eq!(diff(&part, &narrowed), 0.0, "{dtype:?} {dim} {range:?}");
                }
            }
        }
    }

    #[test]
    fn a_header_promising_more_than_the_file_holds_is_refused_by_name() {
        let (_dir, path) = written(&[("w", grid(4, 4))]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let err = SafetensorsFile::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("tensor w") && err.contains("data_offsets"),
            "{err}"
        );
        std::fs::write(&path, [255u8; 16]).unwrap();
        let err = SafetensorsFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("header would be"), "{err}");
        std::fs::write(&path, [1u8, 2]).unwrap();
        let err = SafetensorsFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("fewer than the 8"), "{err}");
    }

    #[test]
    fn out_of_range_slices_and_unknown_tensors_are_errors() {
        let (_dir, path) = written(&[("w", grid(4, 4))]);
        let file = SafetensorsFile::open(&path).unwrap();
        let err = file.read("w", Some((1, 2..5)), DType::F32).unwrap_err();
        assert!(err.to_string().contains("cannot take 2..5"), "{err}");
        let err = file.read("v", None, DType::F32).unwrap_err();
        assert!(err.to_string().contains("tensor v: not found"), "{err}");
    }
}
