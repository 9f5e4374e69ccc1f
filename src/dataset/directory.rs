//! A dataset's directory on disk, and every change made to it.
//!
//! Every file reaches its name complete: it is written under a temporary name
//! (`NAME.tmp`), flushed to the disk and renamed, and the directory is flushed too. A
//! shard is listed in `state.json` only once it is renamed, so the dataset is valid at
//! any moment: a run killed at any point leaves complete, listed shards, perhaps an
//! unlisted one and a temporary file, which the next run removes before it goes on.
//! `flexmodel_cache.json` (the [manifest](super::plan)) is written first, once.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::dataset::format::{dataset_info_json, listed_files, pretty, state_json};
use crate::dataset::plan::{DatasetPlan, Manifest};
use crate::{Error, Result};

/// The file of the manifest.
pub const MANIFEST_FILE: &str = "flexmodel_cache.json";
const STATE_FILE: &str = "state.json";
const INFO_FILE: &str = "dataset_info.json";
const TEMPORARY: &str = ".tmp";

/// How far a dataset's directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetStatus {
    /// No dataset yet: the directory is missing or empty.
    New,
    /// The first `complete` shards are written (perhaps none, if the run stopped before
    /// its first shard).
    Partial {
        /// The complete shards.
        complete: usize,
    },
    /// Every shard is written.
    Complete,
}

impl DatasetPlan {
    /// How far the dataset in `dir` is, reading only: an error if `dir` holds anything
    /// but a dataset of this plan (another plan's, naming what differs; files that are
    /// not a dataset; a `state.json` that lists other files).
    pub fn status(&self, dir: &Path) -> Result<DatasetStatus> {
        let not_a_dataset = |problem: String| Error::NotADataset {
            dir: dir.to_path_buf(),
            problem,
        };
        if !dir.exists() {
            return Ok(DatasetStatus::New);
        }
        if !dir.is_dir() {
            return Err(not_a_dataset("not a directory".into()));
        }
        let manifest_path = dir.join(MANIFEST_FILE);
        if !manifest_path.exists() {
            let mut entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            return match entries.next() {
                None => Ok(DatasetStatus::New),
                Some(_) => Err(not_a_dataset(format!(
                    "not empty, and not a dataset of `flexmodel cache` (it has no {MANIFEST_FILE}): give an empty or new directory"
                ))),
            };
        }
        let text = read(&manifest_path)?;
        let there: Manifest = serde_json::from_str(&text)
            .map_err(|e| not_a_dataset(format!("{MANIFEST_FILE} is unreadable: {e}")))?;
        if there != self.manifest {
            return Err(Error::DatasetMismatch {
                dir: dir.to_path_buf(),
                differences: there.differences(&self.manifest).join("; "),
            });
        }
        let state_path = dir.join(STATE_FILE);
        if !state_path.exists() {
            return Ok(DatasetStatus::Partial { complete: 0 });
        }
        let listed = listed_files(&read(&state_path)?)
            .ok_or_else(|| not_a_dataset(format!("{STATE_FILE} lists no data files")))?;
        for (shard, name) in listed.iter().enumerate() {
            if shard >= self.shards() || *name != self.file_name(shard) {
                return Err(not_a_dataset(format!(
                    "{STATE_FILE} lists {name} as shard {shard}, not a file of this dataset"
                )));
            }
            if !dir.join(name).is_file() {
                return Err(not_a_dataset(format!(
                    "{STATE_FILE} lists {name}, which is missing"
                )));
            }
        }
        Ok(match listed.len() == self.shards() {
            true => DatasetStatus::Complete,
            false => DatasetStatus::Partial {
                complete: listed.len(),
            },
        })
    }

    /// Readies `dir` for writing the shards after `complete`: a new directory gets its
    /// manifest; a partial one loses what a killed run left unfinished (temporary files,
    /// a shard renamed but not listed). Nothing else is touched.
    pub(crate) fn prepare(&self, dir: &Path, status: DatasetStatus) -> Result<()> {
        let complete = match status {
            DatasetStatus::New => {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                return write_atomically(dir, MANIFEST_FILE, pretty(&self.manifest).as_bytes());
            }
            DatasetStatus::Partial { complete } => complete,
            DatasetStatus::Complete => return Ok(()),
        };
        let ours: Vec<String> = [MANIFEST_FILE, STATE_FILE, INFO_FILE]
            .into_iter()
            .map(String::from)
            .chain((0..self.shards()).map(|s| self.file_name(s)))
            .collect();
        let unfinished = |name: &str| match name.strip_suffix(TEMPORARY) {
            Some(file) => ours.iter().any(|o| o == file),
            None => (complete..self.shards()).any(|s| self.file_name(s) == name),
        };
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if unfinished(&name) {
                tracing::info!(file = %name, "removing what an interrupted run left unfinished");
                std::fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
            }
        }
        sync_dir(dir)
    }

    /// Lists the first `complete` shards, all renamed already, as the dataset's: writes
    /// `dataset_info.json`, then `state.json`.
    pub(crate) fn commit(&self, dir: &Path, complete: usize) -> Result<()> {
        write_atomically(dir, INFO_FILE, dataset_info_json(self).as_bytes())?;
        write_atomically(dir, STATE_FILE, state_json(self, complete).as_bytes())
    }
}

/// A shard being written under its temporary name; removed unless finished.
pub(crate) struct ShardFile {
    dir: PathBuf,
    name: String,
    temporary: PathBuf,
    file: Option<BufWriter<File>>,
    bytes: u64,
    renamed: bool,
}

impl ShardFile {
    /// Creates shard `shard`'s temporary file in `dir`.
    pub(crate) fn create(dir: &Path, plan: &DatasetPlan, shard: usize) -> Result<Self> {
        let name = plan.file_name(shard);
        let temporary = dir.join(format!("{name}{TEMPORARY}"));
        let file = File::create(&temporary).map_err(|e| Error::io(&temporary, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            name,
            temporary,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            bytes: 0,
            renamed: false,
        })
    }

    /// The temporary file's path, for errors.
    pub(crate) fn path(&self) -> &Path {
        &self.temporary
    }

    /// The bytes written so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Flushes the file to the disk and gives it its name.
    pub(crate) fn finish(mut self) -> Result<()> {
        let file = self
            .file
            .take()
            .ok_or(Error::Internal("a shard finished twice"))?;
        let file = file
            .into_inner()
            .map_err(|e| Error::io(&self.temporary, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.temporary, e))?;
        let path = self.dir.join(&self.name);
        std::fs::rename(&self.temporary, &path).map_err(|e| Error::io(&path, e))?;
        self.renamed = true;
        sync_dir(&self.dir)
    }
}

impl Write for ShardFile {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match &mut self.file {
            Some(file) => {
                let n = file.write(bytes)?;
                self.bytes += n as u64;
                Ok(n)
            }
            None => Err(std::io::Error::other("the shard is finished")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.file {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for ShardFile {
    fn drop(&mut self) {
        if !self.renamed {
            self.file = None;
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

/// Writes `bytes` to `dir/name` so that the name only ever holds a complete file.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let temporary = dir.join(format!("{name}{TEMPORARY}"));
    let written = (|| {
        let mut file = File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(Error::io(&temporary, e));
    }
    let path = dir.join(name);
    std::fs::rename(&temporary, &path).map_err(|e| Error::io(&path, e))?;
    sync_dir(dir)
}

/// Flushes `dir`'s entries (a rename) to the disk.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}
