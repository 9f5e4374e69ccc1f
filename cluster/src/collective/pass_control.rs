//! The pass a process's ranks are in, and whether it was aborted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::{Error, Result};

/// The pass the ranks of a runtime are in, and whether it was aborted. Shared by every
/// collective of the runtime; the driver starts each pass and aborts a failing one.
#[derive(Debug, Default)]
pub struct PassControl {
    pass: AtomicU64,
    aborted: AtomicBool,
}

impl PassControl {
    /// How often a blocked receive checks whether the pass was aborted.
    pub const ABORT_POLL: Duration = Duration::from_millis(20);

    /// The first message from `from` that `wanted` accepts, dropping the others (stale
    /// messages of earlier passes); [`Error::Aborted`] once the pass is aborted, `gone`
    /// when every sender is gone.
    pub fn receive<T>(
        &self,
        from: &Receiver<T>,
        wanted: impl Fn(&T) -> bool,
        gone: Error,
    ) -> Result<T> {
        loop {
            match from.recv_timeout(Self::ABORT_POLL) {
                Ok(message) if wanted(&message) => return Ok(message),
                Ok(_stale) => continue,
                Err(RecvTimeoutError::Timeout) if self.aborted() => return Err(Error::Aborted),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Err(gone),
            }
        }
    }

    /// Starts pass `pass`: messages of earlier passes are dropped on receipt.
    pub fn begin(&self, pass: u64) {
        self.pass.store(pass, Ordering::SeqCst);
        self.aborted.store(false, Ordering::SeqCst);
    }

    /// Makes every blocked or later receive of this pass fail with [`Error::Aborted`].
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }

    /// The current pass.
    pub fn pass(&self) -> u64 {
        self.pass.load(Ordering::SeqCst)
    }

    /// Whether the current pass was aborted.
    pub fn aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }
}
