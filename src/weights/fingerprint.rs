//! Fingerprints of weights: SHA-256 digests, equal for equal weights, so that the
//! processes of a job can tell that they all read the same model.

use std::fs::File;
use std::io::Read;
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

/// The SHA-256 of the files at `paths`, in order, each with its name and length.
pub(crate) fn of_files<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Result<String> {
    let mut hasher = Sha256::new();
    for path in paths {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        hasher.update(name.unwrap_or_default().as_bytes());
        hasher.update([0]);
        let length = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        hasher.update(length.to_le_bytes());
        hash_file(&mut hasher, path)?;
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
        // A fingerprint of files also says their names and lengths.
        assert_ne!(
            of_files([path.as_path()]).unwrap(),
            sha256_of(&path).unwrap()
        );
    }
}
