//! The protocol's messages as frames: control messages serialized, tensors raw in
//! frames of their own (a piece, an edited piece, or a tensor attached to the control
//! message before it).

use std::time::{Duration, Instant};

use candle_core::Tensor;
use crossbeam_channel::RecvTimeoutError;
use flexmodel_cluster::transport::{Connection, Frame, FrameKind};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// How long the tensors attached to a control message may take to follow it.
const ATTACHED_TIMEOUT: Duration = Duration::from_secs(60);

/// The role name under which a worker connects to its driver's hub.
pub(crate) const DRIVER_GROUP: &str = "driver";

/// Why a message could not be sent or read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    /// The connection is closed.
    #[error("the connection is closed")]
    Closed,
    /// A message that is not what the protocol allows here.
    #[error("{0}")]
    Unexpected(String),
    /// Attached tensors did not follow in time.
    #[error("the tensors of a message did not follow within {} s", ATTACHED_TIMEOUT.as_secs())]
    TimedOut,
}

/// Sends control message `message` with `attached` tensors after it.
pub(crate) fn send<T: Serialize>(
    connection: &Connection,
    message: &T,
    attached: &[&Tensor],
) -> Result<(), WireError> {
    let bytes = serde_json::to_vec(message).map_err(|e| WireError::Unexpected(e.to_string()))?;
    let mut frames = vec![Frame::control(bytes)];
    for tensor in attached {
        let frame = Frame::tensor(FrameKind::Attached, 0, 0, 0, tensor)
            .map_err(|e| WireError::Unexpected(e.to_string()))?;
        frames.push(frame);
    }
    // As one: a heartbeat sent meanwhile must not come between a message and its tensors.
    connection.send_all(frames).map_err(|_| WireError::Closed)
}

/// The control message a control frame carries.
pub(crate) fn parse<T: DeserializeOwned>(frame: &Frame) -> Result<T, WireError> {
    match (frame.kind, frame.bytes()) {
        (FrameKind::Control, Some(bytes)) => serde_json::from_slice(bytes)
            .map_err(|e| WireError::Unexpected(format!("a malformed control message: {e}"))),
        (kind, _) => Err(WireError::Unexpected(format!(
            "a {kind:?} frame where a control message belongs"
        ))),
    }
}

/// The next `n` tensors attached to the message just read.
pub(crate) fn attached(connection: &Connection, n: usize) -> Result<Vec<Tensor>, WireError> {
    let deadline = Instant::now() + ATTACHED_TIMEOUT;
    (0..n)
        .map(|_| {
            let wait = deadline.saturating_duration_since(Instant::now());
            let frame = connection.inbox().recv_timeout(wait).map_err(|e| match e {
                RecvTimeoutError::Timeout => WireError::TimedOut,
                RecvTimeoutError::Disconnected => WireError::Closed,
            })?;
            if frame.kind != FrameKind::Attached {
                return Err(WireError::Unexpected(format!(
                    "a {:?} frame where an attached tensor belongs",
                    frame.kind
                )));
            }
            frame
                .to_tensor()
                .map_err(|e| WireError::Unexpected(e.to_string()))
        })
        .collect()
}

/// The next control message, waiting at most `timeout`.
pub(crate) fn next_control<T: DeserializeOwned>(
    connection: &Connection,
    timeout: Duration,
) -> Result<T, WireError> {
    match connection.inbox().recv_timeout(timeout) {
        Ok(frame) => parse(&frame),
        Err(RecvTimeoutError::Timeout) => Err(WireError::TimedOut),
        Err(RecvTimeoutError::Disconnected) => Err(WireError::Closed),
    }
}

/// How long resolving a host name may take.
pub(crate) const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket address of `address` (`HOST:PORT`, the host a name or an address);
/// `None` if it does not resolve within [`RESOLVE_TIMEOUT`]. The system's resolver
/// has no deadline of its own, so it runs on a thread of its own, left behind if it hangs.
pub(crate) fn resolve(address: &str) -> Option<std::net::SocketAddr> {
    if let Ok(literal) = address.parse() {
        return Some(literal);
    }
    let (answer, resolved) = crossbeam_channel::bounded(1);
    let name = address.to_string();
    std::thread::Builder::new()
        .name("flexmodel-resolve".into())
        .spawn(move || {
            let first = std::net::ToSocketAddrs::to_socket_addrs(&name)
                .ok()
                .and_then(|mut addresses| addresses.next());
            let _ = answer.send(first);
        })
        .ok()?;
    resolved.recv_timeout(RESOLVE_TIMEOUT).ok().flatten()
}
