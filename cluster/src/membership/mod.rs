//! Who takes part in a job across machines: workers register in etcd under the job,
//! and a driver holds the job and assigns the workers their ranks.
//!
//! (Under `--procs` a driver starts its own workers and needs no membership: it knows
//! them as its children.)

mod etcd;
mod placement;
mod records;
mod url;

pub use etcd::{
    CONNECT_TIMEOUT, Claim, EtcdJob, LEASE_TTL_SECONDS, PROBE_EVERY, RETRY_FOR, Registration,
};
pub use placement::place_ranks;
pub use records::{AssignmentRecord, DriverRecord, LoadedSlice, MemberRecord, MemberState};
pub use url::ClusterUrl;
