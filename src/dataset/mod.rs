//! Activation datasets: a corpus's activations streamed to disk as a Hugging Face
//! `datasets` dataset (the layout SAELens reads as cached activations), resumable and in
//! bounded memory.
//!
//! One row per sequence of the corpus: `token_ids` and a column per hook point, named by
//! the hook. [`DatasetPlan::new`] works out the columns, rows and shards before any
//! pass; [`FlexModel::cache_activations`] runs the passes and writes the shards.
//!
//! ```no_run
//! use std::path::Path;
//! use flexmodel::dataset::{Corpus, DatasetPlan, DatasetSpec};
//! use flexmodel::{Checkpoint, FlexModel, Layout};
//!
//! # fn main() -> flexmodel::Result<()> {
//! let checkpoint = Checkpoint::open("smollm2")?;
//! let corpus = Corpus::from_text(Path::new("corpus.txt"), &checkpoint.tokenizer)?;
//! let spec = DatasetSpec::new(checkpoint.weights.fingerprint()?, ["blocks.*.hook_resid_post"]);
//! let plan = DatasetPlan::new(&checkpoint.config, corpus, spec)?;
//! let mut model = FlexModel::build(&checkpoint, Layout::SINGLE)?;
//! let summary = model.cache_activations(&plan, Path::new("activations"))?;
//! println!("{} rows in {} shards", summary.rows, summary.shards);
//! # Ok(())
//! # }
//! ```
//!
//! # Resuming
//!
//! Shards are written whole and listed only when complete (see [`directory`]), and a
//! run started on a directory with a shorter dataset of the same plan continues after
//! its last complete shard: the finished dataset is the one an uninterrupted run writes,
//! bit for bit. A directory of another plan is refused, naming what differs.
//!
//! # Memory
//!
//! Each pass's captures go to a writer thread, which appends them to the open shard's
//! file while the next pass computes. At most three batches of captures are alive (one
//! computing, one waiting, one being written), whatever the corpus's length.

mod corpus;
pub mod directory;
mod format;
mod plan;
mod spec;
mod writer;

use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use flexmodel_actors::Window;

pub use corpus::Corpus;
pub use directory::{DatasetStatus, MANIFEST_FILE};
pub use plan::{Column, DatasetPlan};
pub use spec::{DatasetSpec, Positions, StoredDType};

use crate::dataset::writer::{RowBatch, write_shards};
use crate::{Error, FlexModel, Groups, HookFunction, Result, progress_bar};

/// What a run of [`FlexModel::cache_activations`] did.
#[derive(Debug, Clone, Copy)]
pub struct CacheSummary {
    /// The rows (sequences) of the finished dataset.
    pub rows: usize,
    /// Its shards.
    pub shards: usize,
    /// The rows this run wrote (none if the dataset was complete already).
    pub rows_written: usize,
    /// The shards this run wrote.
    pub shards_written: usize,
    /// The bytes this run wrote.
    pub bytes_written: u64,
    /// How long this run took.
    pub elapsed: Duration,
    /// How long of that the writer thread was busy converting and writing (while the
    /// passes went on): the bytes over it are the writer's own speed.
    pub write_time: Duration,
}

impl FlexModel {
    /// Writes the dataset of `plan` into `dir`, running every enabled hook (edits
    /// included) and capturing the plan's columns, or goes on with a dataset of the same
    /// plan that a run before left unfinished. A complete dataset is left untouched.
    ///
    /// A failed write (a full disk, an unwritable directory) is an
    /// [`Error::DatasetWrite`] that leaves the complete shards intact and listed; a
    /// failed pass leaves them so too.
    pub fn cache_activations(&mut self, plan: &DatasetPlan, dir: &Path) -> Result<CacheSummary> {
        let started = Instant::now();
        let status = plan.status(dir)?;
        let first_shard = match status {
            DatasetStatus::New => 0,
            DatasetStatus::Partial { complete } => complete,
            DatasetStatus::Complete => plan.shards(),
        };
        let mut summary = CacheSummary {
            rows: plan.rows(),
            shards: plan.shards(),
            rows_written: 0,
            shards_written: 0,
            bytes_written: 0,
            elapsed: Duration::ZERO,
            write_time: Duration::ZERO,
        };
        if status == DatasetStatus::Complete {
            return Ok(summary);
        }
        let failed = |complete: usize, source: Error| Error::DatasetWrite {
            dir: dir.to_path_buf(),
            complete,
            shards: plan.shards(),
            source: Box::new(source),
        };
        plan.prepare(dir, status)
            .map_err(|e| failed(first_shard, e))?;
        if first_shard > 0 {
            tracing::info!(
                complete = first_shard,
                shards = plan.shards(),
                "resuming after the complete shards"
            );
        }
        let progress = progress_bar(plan.rows() as u64, "cache");
        progress.set_position(plan.shard_rows(first_shard).start as u64);
        let (written, passes, writing) = std::thread::scope(|scope| {
            let (sender, receiver) = sync_channel(1);
            let progress = &progress;
            let writer =
                scope.spawn(move || write_shards(plan, dir, first_shard, receiver, progress));
            let passes = self.run_passes(plan, first_shard, |batch| sender.send(batch).is_ok());
            drop(sender);
            let (written, writing) = writer.join().unwrap_or((
                Default::default(),
                Err(Error::Internal("the dataset writer panicked")),
            ));
            (written, passes, writing)
        });
        progress.finish();
        writing.map_err(|e| failed(first_shard + written.shards, e))?;
        passes?;
        summary.rows_written = written.rows;
        summary.shards_written = written.shards;
        summary.bytes_written = written.bytes;
        summary.write_time = written.busy;
        summary.elapsed = started.elapsed();
        Ok(summary)
    }

    /// Runs the passes of shards `first_shard..` of `plan`, capturing its columns, and
    /// hands each batch's rows to `write` until it returns `false` (the writer stopped).
    /// The capture hooks are removed afterwards, also on error.
    fn run_passes(
        &mut self,
        plan: &DatasetPlan,
        first_shard: usize,
        mut write: impl FnMut(RowBatch) -> bool,
    ) -> Result<()> {
        let mut handles = Vec::new();
        for column in plan.columns() {
            match self.hooks_mut().register(HookFunction::new(column.name())) {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    self.remove_hooks(handles);
                    return Err(e);
                }
            }
        }
        let result = (|| {
            let seq_len = plan.spec().seq_len;
            let mut ids = plan
                .corpus
                .ids_from(plan.shard_rows(first_shard).start * seq_len)?;
            for shard in first_shard..plan.shards() {
                for rows in plan.batches(shard) {
                    let tokens = (&mut ids)
                        .take(rows.len() * seq_len)
                        .collect::<Result<Vec<u32>>>()?;
                    if tokens.len() < rows.len() * seq_len {
                        return Err(Error::InvalidArgument {
                            argument: "corpus",
                            problem: "it ended before the tokens it was planned with".into(),
                        });
                    }
                    let columns = self.capture_rows(plan, &tokens)?;
                    if !write(RowBatch { tokens, columns }) {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })();
        self.remove_hooks(handles);
        result
    }

    /// Each column's values for the sequences of `tokens` (`[rows, ...]` in the column's
    /// row shape) after one pass. A batch smaller than the data-parallel replicas is
    /// padded with copies of its last sequence, whose captures are dropped.
    fn capture_rows(&mut self, plan: &DatasetPlan, tokens: &[u32]) -> Result<Vec<Tensor>> {
        let seq_len = plan.spec().seq_len;
        let rows = tokens.len() / seq_len;
        let padded = rows.max(self.layout().dp());
        let mut ids = tokens.to_vec();
        let last = ids[ids.len() - seq_len..].to_vec();
        for _ in rows..padded {
            ids.extend_from_slice(&last);
        }
        // Inputs are made on the host; the ranks bring them to their devices.
        let batch = Tensor::from_vec(ids, (padded, seq_len), &Device::Cpu)?;
        let window = Window {
            scope: plan.scope(),
            ..Window::DENSE
        };
        let (_, mut captures) = self.pass(&batch, &window, &Groups::All)?;
        plan.columns()
            .iter()
            .map(|column| {
                let value = captures
                    .take(column.name())
                    .and_then(|mut calls| calls.pop())
                    .ok_or(Error::Internal(
                        "a dataset column's hook point was not called",
                    ))?;
                let value = value.narrow(0, 0, rows)?;
                let position = column.point().position_dim();
                let kept = match plan.spec().positions {
                    Positions::All => value,
                    Positions::Last => value.narrow(position, seq_len - 1, 1)?,
                };
                let mut shape = vec![rows];
                shape.extend_from_slice(column.shape());
                Ok(kept.reshape(shape)?)
            })
            .collect()
    }

    fn remove_hooks(&mut self, handles: Vec<crate::HookHandle>) {
        for handle in handles {
            let _ = self.hooks_mut().remove(handle);
        }
    }
}
