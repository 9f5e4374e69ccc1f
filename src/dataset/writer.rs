//! The writer thread: it turns each batch's captures into an Arrow record batch,
//! appends it to the open shard, and closes, renames and lists a shard as soon as its
//! last row is in. The passes go on meanwhile; the channel between them holds one
//! batch, so a slow disk holds the passes back instead of filling memory.

use std::path::Path;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use arrow_ipc::writer::StreamWriter;
use arrow_schema::ArrowError;
use candle_core::Tensor;
use indicatif::ProgressBar;

use crate::dataset::directory::ShardFile;
use crate::dataset::format::{Values, record_batch, schema};
use crate::dataset::plan::DatasetPlan;
use crate::{Error, Result};

/// The rows of one pass: their token ids, row after row, and each hook column's
/// captured values `[rows, ...]`, in the plan's column order.
pub(crate) struct RowBatch {
    pub(crate) tokens: Vec<u32>,
    pub(crate) columns: Vec<Tensor>,
}

/// What a run of the writer wrote.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Written {
    /// Rows handed to shard files.
    pub(crate) rows: usize,
    /// Shards finished, renamed and listed.
    pub(crate) shards: usize,
    /// Bytes handed to shard files.
    pub(crate) bytes: u64,
    /// Time spent converting and writing (not waiting for the passes).
    pub(crate) busy: Duration,
}

/// Writes the batches `batches` brings into shards `first_shard..` of `plan` in `dir`,
/// until the channel closes; an unfinished shard is removed. Returns what it wrote,
/// and the error that stopped it, if one did.
pub(crate) fn write_shards(
    plan: &DatasetPlan,
    dir: &Path,
    first_shard: usize,
    batches: Receiver<RowBatch>,
    progress: &ProgressBar,
) -> (Written, Result<()>) {
    let started = Instant::now();
    let schema = schema(plan);
    let mut written = Written::default();
    let mut finished_bytes = 0;
    let mut open: Option<(StreamWriter<ShardFile>, usize)> = None;
    let result = batches.iter().try_for_each(|batch| {
        let busy = Instant::now();
        let shard = first_shard + written.shards;
        let values = plan
            .columns()
            .iter()
            .zip(&batch.columns)
            .map(|(column, tensor)| Values::of(tensor, plan.spec().dtype, column))
            .collect::<Result<Vec<_>>>()?;
        let record = record_batch(&schema, plan, &batch.tokens, values)?;
        let (stream, rows) = match &mut open {
            Some(open) => open,
            None => {
                let file = ShardFile::create(dir, plan, shard)?;
                let path = file.path().to_path_buf();
                let stream = StreamWriter::try_new(file, &schema).map_err(|e| io(&path, e))?;
                open.insert((stream, 0))
            }
        };
        stream
            .write(&record)
            .map_err(|e| io(stream.get_ref().path(), e))?;
        *rows += record.num_rows();
        written.rows += record.num_rows();
        written.bytes = finished_bytes + stream.get_ref().bytes();
        if *rows == plan.shard_rows(shard).len() {
            if let Some((mut stream, _)) = open.take() {
                stream
                    .finish()
                    .map_err(|e| io(stream.get_ref().path(), e))?;
                let path = stream.get_ref().path().to_path_buf();
                let file = stream.into_inner().map_err(|e| io(&path, e))?;
                finished_bytes += file.bytes();
                file.finish()?;
            }
            plan.commit(dir, shard + 1)?;
            written.shards += 1;
        }
        written.busy += busy.elapsed();
        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        progress.inc(record.num_rows() as u64);
        progress.set_message(format!(
            "{:.0} tokens/s, {:.1} MB/s written",
            (written.rows * plan.spec().seq_len) as f64 / seconds,
            written.bytes as f64 / 1e6 / seconds
        ));
        Ok(())
    });
    (written, result)
}

/// An Arrow error while writing the file at `path`.
fn io(path: &Path, e: ArrowError) -> Error {
    match e {
        ArrowError::IoError(_, e) => Error::io(path, e),
        e => Error::io(path, std::io::Error::other(e.to_string())),
    }
}
