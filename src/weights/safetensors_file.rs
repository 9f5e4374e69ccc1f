//! Writing a safetensors file whole or not at all.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::{Error, Result};

/// Writes `tensors` to the safetensors file `path` through a temporary file in the same
/// directory, so that `path` is either complete or left as it was.
pub fn write_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    // Like any new file (mode 0666 less the umask), not a private temporary one (0600).
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let partial = builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    candle_core::safetensors::save(tensors, partial.path())?;
    partial
        .persist(path)
        .map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn written_tensors_read_back_and_a_bad_directory_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let t = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        write_safetensors(&HashMap::from([("x".to_string(), t)]), &path).unwrap();
        let back = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert_eq!(back["x"].to_vec1::<f32>().unwrap(), [1.0, 2.0, 3.0]);
        let missing = dir.path().join("no/such/dir/t.safetensors");
        assert!(write_safetensors(&HashMap::new(), &missing).is_err());
        assert!(!missing.exists());
    }
}
