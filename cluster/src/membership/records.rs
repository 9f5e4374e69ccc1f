//! What a job keeps in etcd, under `/flexmodel/v1/jobs/JOB/`:
//!
//! ```text
//! members/ID   a MemberRecord, on its worker's lease: gone when the worker is
//! driver       the DriverRecord of the driver using the workers, on its lease
//! epoch        the number of the latest assignment (a decimal integer)
//! assignment   the AssignmentRecord of that epoch: which member holds which rank
//! ```
//!
//! Every record is JSON.

use serde::{Deserialize, Serialize};

use crate::Layout;

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// No driver and no slice loaded.
    Idle,
    /// Loading a slice for a driver.
    Loading,
    /// A slice loaded and no driver: ready for the next one.
    Ready,
    /// Serving a driver.
    Serving,
}

impl MemberState {
    /// The state's name, as `flexmodel workers` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Loading => "loading",
            Self::Ready => "ready",
            Self::Serving => "serving",
        }
    }
}

/// The slice of a model a worker holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadedSlice {
    /// The model's name, as the driver gave it.
    pub model: String,
    /// The layout.
    pub layout: Layout,
    /// The rank whose slice it is.
    pub rank: usize,
    /// The fingerprint of the weights the worker read the slice from.
    pub fingerprint: String,
}

/// A worker registered in a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Unique among the job's members: `HOST-PID-XXXX`.
    pub id: String,
    /// The machine it runs on.
    pub host: String,
    /// The address (`HOST:PORT`) drivers and other workers reach it at.
    pub address: String,
    /// The device it computes on (`cpu`, `cuda:0`).
    pub device: String,
    /// Its process id on its machine.
    pub pid: u32,
    /// What it is doing.
    pub state: MemberState,
    /// The slice it holds, if any.
    pub slice: Option<LoadedSlice>,
}

/// The driver using a job's workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverRecord {
    /// The machine it runs on.
    pub host: String,
    /// Its process id on that machine.
    pub pid: u32,
    /// A random id of this hold on the job, so that a retried claim knows itself.
    pub claim: String,
}

impl std::fmt::Display for DriverRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the driver with pid {} on {}", self.pid, self.host)
    }
}

/// Which member holds which rank, from one epoch on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentRecord {
    /// The assignment's number; every assignment has a larger one than the last.
    pub epoch: u64,
    /// The layout.
    pub layout: Layout,
    /// The model, as the driver names it.
    pub model: String,
    /// The id of each rank's member, in rank order.
    pub members: Vec<String>,
    /// The claim of the driver that wrote it.
    pub claim: String,
}
