//! Errors of layouts and collectives.

/// An error from a layout, a shard split or a collective.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A dimension cannot be split evenly across the tensor-parallel ranks.
    #[error("{what} = {size} cannot be split across {parts} tensor-parallel ranks")]
    UnevenSplit {
        /// What is being split, e.g. `n_heads`.
        what: String,
        /// Its size.
        size: usize,
        /// The number of ranks.
        parts: usize,
    },
    /// A layout with no ranks along an axis.
    #[error("bad layout: {axis} must be at least 1")]
    ZeroRanks {
        /// `dp`, `pp` or `tp`.
        axis: &'static str,
    },
    /// FSDP asked for without data-parallel replicas to shard across.
    #[error(
        "bad layout: --fsdp shards parameters across data-parallel replicas, but dp={dp}; give --dp 2 or more"
    )]
    FsdpWithoutReplicas {
        /// The data-parallel replicas.
        dp: usize,
    },
    /// A `--model-dtype` that is not one of those the weights can be held in.
    #[error("unknown model dtype {0:?} (known: f32, bf16, f16)")]
    UnknownModelDtype(String),
    /// A `--device` that names no device.
    #[error("unknown device {0:?} (known: cpu, cuda, cuda:N)")]
    UnknownDevice(String),
    /// A GPU asked of a build without CUDA.
    #[error(
        "this build of flexmodel is built without the `cuda` feature and computes on the \
         CPU only; build it with scripts/build-cuda (or `cargo build --features cuda`) for GPUs"
    )]
    CudaNotBuilt,
    /// The CUDA driver failed or has no such GPU.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A layout with more ranks than [`Layout::MAX_RANKS`](crate::Layout::MAX_RANKS).
    #[error("bad layout: dp={dp} pp={pp} tp={tp} is more than {max} ranks")]
    TooManyRanks {
        /// Data-parallel replicas asked for.
        dp: usize,
        /// Pipeline stages asked for.
        pp: usize,
        /// Tensor-parallel ranks asked for.
        tp: usize,
        /// The most ranks a layout may have.
        max: usize,
    },
    /// A collective was abandoned because another rank failed.
    #[error("collective aborted: another rank failed")]
    Aborted,
    /// The hook coordinator is gone (the driver's runtime is shutting down).
    #[error("the hook coordinator is gone")]
    CoordinatorGone,
    /// A member of the group is gone (its thread or process ended, or its connection
    /// closed); the member's place in its group.
    #[error("member {0} of the group is gone")]
    PeerGone(usize),
    /// A rank outside its group.
    #[error("rank {rank} is outside a group of {size}")]
    RankOutOfRange {
        /// The rank.
        rank: usize,
        /// The group size.
        size: usize,
    },
    /// A connection to another process could not be made.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: std::net::SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A socket could not listen.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A connection did not open as the protocol says.
    #[error("handshake with {peer} failed: {reason}")]
    Handshake {
        /// The other end.
        peer: std::net::SocketAddr,
        /// What was wrong.
        reason: String,
    },
    /// The other end of a connection holds another token than this job's.
    #[error("authentication failed with {peer}: it holds another token than this job's")]
    AuthenticationFailed {
        /// The other end.
        peer: std::net::SocketAddr,
    },
    /// A job's token file cannot be used.
    #[error("the token file {}: {reason}", .path.display())]
    BadToken {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A member of a group never connected.
    #[error("member {member} of {group} did not connect in time")]
    NotConnected {
        /// The group.
        group: String,
        /// The member.
        member: usize,
    },
    /// A frame on a connection failed its authentication check (here or at the other
    /// end): the connection is closed, and nothing of that frame was acted on.
    #[error("the connection to {peer} was tampered with: {how}")]
    Tampered {
        /// The other end.
        peer: std::net::SocketAddr,
        /// Which side saw it.
        how: crate::transport::Tampering,
    },
    /// A connection closed.
    #[error("the connection to {0} is closed")]
    ConnectionClosed(std::net::SocketAddr),
    /// A frame could not be encoded.
    #[error(transparent)]
    Frame(#[from] crate::transport::FrameError),
    /// No etcd endpoint answered.
    #[error("cannot reach etcd at {endpoints} within {seconds} s: {reason}")]
    EtcdUnreachable {
        /// The endpoints tried.
        endpoints: String,
        /// How long they were tried.
        seconds: u64,
        /// The last failure.
        reason: String,
    },
    /// An etcd request failed, after retrying.
    #[error("etcd, {what}: {reason}")]
    Etcd {
        /// What the request was for.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// A cluster URL that cannot be used.
    #[error("bad cluster URL {url:?}: {reason} (expected etcd://HOST:PORT[,HOST:PORT...]/JOB)")]
    BadClusterUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Another driver holds the job.
    #[error("job {job} is busy: {holder} is using its workers")]
    JobBusy {
        /// The job.
        job: String,
        /// Who holds it.
        holder: String,
    },
    /// A record in etcd that is not what this version writes.
    #[error("a malformed record at {key} in etcd: {reason}")]
    BadRecord {
        /// Its key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// This driver's hold on its job expired (etcd was out of reach for too long).
    #[error(
        "this driver lost its claim on job {job}: etcd was out of reach for longer than its {} s lease, so another driver may hold the job now",
        crate::membership::LEASE_TTL_SECONDS
    )]
    LostClaim {
        /// The job.
        job: String,
    },
    /// A broken invariant of this crate.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// A tensor operation inside a collective failed.
    #[error("{}", tensor_error_message(.0))]
    Tensor(#[from] candle_core::Error),
}

/// The message of a candle error without the backtrace candle attaches when
/// `RUST_BACKTRACE` is set: error messages are for people, not for debugging candle.
fn tensor_error_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => tensor_error_message(inner),
        e => e.to_string(),
    }
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
