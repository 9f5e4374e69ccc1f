//! Where the ranks run, as the driver's pass loop sees them: one implementation per
//! transport (threads of this process, worker processes), one protocol.

use crate::protocol::{EditedPiece, RunPass};
use crate::{PointId, Result, ShardParameters};

/// Why a rank is gone, and where it was last seen.
#[derive(Debug, Clone)]
pub(crate) struct Lost {
    /// The hook point it was last known to be at in the pass, and whether in backward.
    pub(crate) at: Option<(PointId, bool)>,
    /// What happened.
    pub(crate) reason: String,
}

/// The ranks of a layout, wherever they run. Their events (pieces, done, failed) arrive
/// on the channel the runtime was started with.
pub(crate) trait Ranks: Send {
    /// Replaces the ranks that are gone, where their transport can (a job's workers),
    /// before the next pass.
    fn recover(&mut self) -> Result<()> {
        Ok(())
    }

    /// Starts pass `pass`: messages of earlier passes are dropped from now on.
    fn begin(&self, pass: u64);

    /// Starts `run` on `rank`.
    fn run(&self, rank: usize, run: RunPass) -> Result<()>;

    /// Sends an edited piece (or a gradient) back to `rank`.
    fn reply(&self, rank: usize, piece: EditedPiece);

    /// Aborts pass `pass` on every rank, so that none stays blocked.
    fn abort(&self, pass: u64);

    /// Why `rank` is gone, if it is.
    fn lost(&self, rank: usize) -> Option<Lost>;

    /// The machine `rank` runs on, when it runs in another process.
    fn host(&self, rank: usize) -> Option<String>;

    /// `rank`'s parameter slices with their gradients from the last backward pass.
    fn parameters(&self, rank: usize) -> Result<ShardParameters>;

    /// Each worker process's parameter bytes and peak resident memory, in rank order,
    /// when the ranks are processes.
    fn worker_stats(&self) -> Option<Vec<(u64, Option<u64>)>> {
        None
    }

    /// The process id of each rank's worker, when the ranks are processes.
    fn worker_pids(&self) -> Option<Vec<u32>> {
        None
    }

    /// Whether each rank's worker kept the shard it held, when the ranks are processes.
    fn workers_reused(&self) -> Option<Vec<bool>> {
        None
    }
}
