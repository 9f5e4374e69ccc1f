//! Fingerprints of weights: SHA-256 digests, equal for equal weights, so that the
//! processes of a job can tell that they all read the same model.

use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The SHA-256 of the file at `path`, in hex.
pub(crate) fn sha256_of(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    hash_file(&mut hasher, path)?;
    Ok(hex(hasher))
}

/// The bytes a sampled fingerprint reads at each end of every tensor's data.
const SAMPLE_BYTES: u64 = 4 << 10;

/// A weights file as a sampled fingerprint reads it.
pub(crate) struct SampledFile<'a> {
    /// The file.
    pub path: &'a Path,
    /// Its length in bytes.
    pub length: u64,
    /// Its header (tensor names, dtypes, shapes and offsets), as in the file.
    pub header: &'a [u8],
    /// The byte range of each tensor's data.
    pub tensors: Vec<Range<u64>>,
}

/// The SHA-256 of `files`, in order: each file's name, length and header, and the first
/// and last [`SAMPLE_BYTES`] of every tensor's data. It reads a few KiB per tensor
/// however large the weights, and tells apart checkpoints that differ in a name, shape,
/// dtype or size, or in the values at either end of any tensor (two trainings, or a
/// fine-tune and its base, differ there); it cannot see a change confined to the
/// middle of a tensor.
pub(crate) fn of_sampled_files<'a>(
    files: impl IntoIterator<Item = SampledFile<'a>>,
) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = Vec::new();
    for file in files {
        let path = file.path;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        hasher.update(name.unwrap_or_default().as_bytes());
        hasher.update([0]);
        hasher.update(file.length.to_le_bytes());
        hasher.update((file.header.len() as u64).to_le_bytes());
        hasher.update(file.header);
        let opened = File::open(path).map_err(|e| Error::io(path, e))?;
        for data in file.tensors {
            let len = data.end.saturating_sub(data.start);
            let head = data.start..data.start + len.min(SAMPLE_BYTES);
            let tail = data.end - len.min(SAMPLE_BYTES)..data.end;
            for range in [head, tail] {
                buffer.resize((range.end - range.start) as usize, 0);
                opened
                    .read_exact_at(&mut buffer, range.start)
                    .map_err(|e| Error::io(path, e))?;
                hasher.update(&buffer);
            }
        }
    }
    Ok(hex(hasher))
}

/// The SHA-256 of named tensors, in order: each name, shape and f32 little-endian values.
pub(crate) fn of_tensors<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
) -> Result<String> {
    let mut hasher = Sha256::new();
    for (name, tensor) in tensors {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        for &d in tensor.dims() {
            hasher.update((d as u64).to_le_bytes());
        }
        let values = tensor
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        hasher.update(le_bytes(&values));
    }
    Ok(hex(hasher))
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Adds the bytes of the file at `path` to `hasher`.
fn hash_file(hasher: &mut Sha256, path: &Path) -> Result<()> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

/// The hex digits of `hasher`'s digest.
pub(crate) fn hex(hasher: Sha256) -> String {
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampled(path: &Path, header: &[u8], tensors: Vec<Range<u64>>) -> String {
        let length = std::fs::metadata(path).unwrap().len();
        of_sampled_files([SampledFile {
            path,
            length,
            header,
            tensors,
        }])
        .unwrap()
    }

    #[test]
    fn a_sampled_fingerprint_sees_both_ends_of_every_tensor_and_not_its_middle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights");
        let bytes: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let tensors = vec![0..20_000, 20_000..40_000];
        let base = sampled(&path, b"h", tensors.clone());
        assert_ne!(sampled(&path, b"H", tensors.clone()), base, "the header");
        let whole = std::iter::once(0..40_000).collect();
        assert_ne!(sampled(&path, b"h", whole), base, "the ranges");
        for (at, seen) in [(0, true), (19_999, true), (20_000, true), (30_000, false)] {
            let mut changed = bytes.clone();
            changed[at] ^= 1;
            std::fs::write(&path, &changed).unwrap();
            assert_eq!(
                sampled(&path, b"h", tensors.clone()) != base,
                seen,
                "byte {at}"
            );
        }
    }

    #[test]
    fn the_sha256_of_a_file_is_that_of_its_bytes_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        // FIPS 180-2's first example.
        assert_eq!(
            sha256_of(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
