//! Framed TCP connections: a writer and a reader task per connection on a tokio runtime,
//! bridged to the synchronous code of the ranks by channels; a hub that accepts
//! connections and hands each to whoever expects it, by the hello it opens with.
//!
//! # Capacity
//!
//! Both channels of a connection are unbounded, on purpose: the hook protocol's sends
//! must never wait (captures are asynchronous, and a ring step sends before it
//! receives), and what can queue is bounded by the protocol itself — at most one pass's
//! pieces, which the receiver drains as they come.
//!
//! # Failure
//!
//! A frame that does not decode closes its connection with a log line, before any
//! memory is reserved for it; the process stays up. The inbox of a closed connection
//! disconnects, which is how the synchronous side learns that its peer is gone.
//!
//! # Shutdown
//!
//! Dropping a [`Connection`] lets its writer send what is queued and close the socket;
//! [`Connection::close`] closes it at once. Dropping a [`Hub`] stops accepting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use super::frame::{Frame, FrameCodec, FrameError, FrameKind};
use crate::{Error, Result};

/// How long a new connection may take to say who it is.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The most connections a hub keeps waiting for someone to claim them.
const MAX_UNCLAIMED: usize = 4096;

/// The first message on every connection: which group the dialer joins, as which member.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hello {
    /// The group (or role) the connection belongs to.
    pub group: String,
    /// The dialer's place in it.
    pub member: usize,
}

/// One framed TCP connection. Frames sent are queued to its writer task (a send never
/// blocks); frames received arrive in [`inbox`](Self::inbox). The inbox disconnects
/// when the connection ends: the peer closed it, it failed, or a frame was malformed (logged).
pub struct Connection {
    outbox: mpsc::UnboundedSender<Frame>,
    inbox: Receiver<Frame>,
    peer: SocketAddr,
    closed: CancellationToken,
}

impl Connection {
    /// Starts the reader and writer tasks of `framed` (connected to `peer`) on `runtime`.
    fn start(framed: Framed<TcpStream, FrameCodec>, peer: SocketAddr, runtime: &Handle) -> Self {
        let (mut sink, mut stream) = framed.split();
        let (outbox, mut queued) = mpsc::unbounded_channel::<Frame>();
        let (deliver, inbox): (Sender<Frame>, Receiver<Frame>) = unbounded();
        let closed = CancellationToken::new();
        let reader_closed = closed.clone();
        runtime.spawn(async move {
            loop {
                tokio::select! {
                    _ = reader_closed.cancelled() => break,
                    next = stream.next() => match next {
                        Some(Ok(frame)) => {
                            if deliver.send(frame).is_err() {
                                break;
                            }
                        }
                        // A peer that went away is the liveness checks' business.
                        Some(Err(FrameError::Io(e))) => {
                            tracing::debug!(%peer, error = %e, "the connection ended");
                            break;
                        }
                        Some(Err(e)) => {
                            tracing::warn!(%peer, error = %e, "closing the connection");
                            break;
                        }
                        None => break,
                    },
                }
            }
            reader_closed.cancel();
        });
        let writer_closed = closed.clone();
        runtime.spawn(async move {
            loop {
                let frame = tokio::select! {
                    _ = writer_closed.cancelled() => break,
                    frame = queued.recv() => frame,
                };
                let Some(frame) = frame else { break };
                // Queue what else is waiting, then write it all at once.
                let mut result = sink.feed(frame).await;
                while result.is_ok()
                    && let Ok(more) = queued.try_recv()
                {
                    result = sink.feed(more).await;
                }
                if let Err(e) = result.and(sink.flush().await) {
                    tracing::warn!(%peer, error = %e, "closing the connection");
                    break;
                }
            }
            writer_closed.cancel();
            let _ = sink.close().await;
        });
        Self {
            outbox,
            inbox,
            peer,
            closed,
        }
    }

    /// Queues `frame` to be sent; an error once the connection is closed.
    pub fn send(&self, frame: Frame) -> Result<()> {
        if self.closed.is_cancelled() {
            return Err(Error::ConnectionClosed(self.peer));
        }
        self.outbox
            .send(frame)
            .map_err(|_| Error::ConnectionClosed(self.peer))
    }

    /// The frames received, in order; disconnected once the connection has ended.
    pub fn inbox(&self) -> &Receiver<Frame> {
        &self.inbox
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        !self.closed.is_cancelled()
    }

    /// The address of the other end.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Closes the connection (queued frames may be dropped).
    pub fn close(&self) {
        self.closed.cancel();
    }
}

/// Connects to `addr` and opens with `hello`.
pub fn dial(
    addr: SocketAddr,
    hello: &Hello,
    runtime: &Handle,
    timeout: Duration,
) -> Result<Connection> {
    let hello_bytes = serde_json::to_vec(hello).map_err(|e| Error::Handshake {
        peer: addr,
        reason: e.to_string(),
    })?;
    runtime.block_on(async {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| Error::Connect {
                addr,
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| Error::Connect { addr, source })?;
        stream
            .set_nodelay(true)
            .map_err(|source| Error::Connect { addr, source })?;
        let mut framed = Framed::new(stream, FrameCodec::default());
        framed
            .send(Frame::control(hello_bytes))
            .await
            .map_err(|e| Error::Handshake {
                peer: addr,
                reason: e.to_string(),
            })?;
        Ok(Connection::start(framed, addr, runtime))
    })
}

/// Connections that arrived and said who they are, until someone claims them.
#[derive(Default)]
struct Arrivals {
    waiting: Mutex<HashMap<Hello, Connection>>,
    changed: Condvar,
}

/// A listening socket whose connections are claimed by the hello they open with.
pub struct Hub {
    addr: SocketAddr,
    arrivals: Arc<Arrivals>,
    stop: CancellationToken,
}

impl Hub {
    /// Listens on `addr` (port 0: any free port) and starts accepting on `runtime`.
    pub fn bind(addr: SocketAddr, runtime: &Handle) -> Result<Hub> {
        let listener = runtime
            .block_on(TcpListener::bind(addr))
            .map_err(|source| Error::Listen { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Listen { addr, source })?;
        let arrivals = Arc::new(Arrivals::default());
        let stop = CancellationToken::new();
        let (accepting, stopped) = (arrivals.clone(), stop.clone());
        let handle = runtime.clone();
        runtime.spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    _ = stopped.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            tracing::warn!(error = %e, "accepting a connection");
                            continue;
                        }
                    },
                };
                let (arrivals, handle) = (accepting.clone(), handle.clone());
                tokio::spawn(async move {
                    match greet(stream, peer).await {
                        Ok((hello, framed)) => {
                            let connection = Connection::start(framed, peer, &handle);
                            arrivals.arrive(hello, connection);
                        }
                        Err(reason) => {
                            tracing::warn!(%peer, %reason, "refused a connection");
                        }
                    }
                });
            }
        });
        Ok(Hub {
            addr,
            arrivals,
            stop,
        })
    }

    /// The address other processes reach this hub at.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The connection that opened with `hello`, waiting for it until `deadline`.
    pub fn accept(&self, hello: &Hello, deadline: Instant) -> Result<Connection> {
        self.accept_while(hello, deadline, || true)
    }

    /// Like [`accept`](Self::accept), giving up early once `alive` returns false.
    pub fn accept_while(
        &self,
        hello: &Hello,
        deadline: Instant,
        mut alive: impl FnMut() -> bool,
    ) -> Result<Connection> {
        let mut waiting = self.arrivals.lock();
        loop {
            if let Some(connection) = waiting.remove(hello) {
                return Ok(connection);
            }
            let now = Instant::now();
            if now >= deadline || !alive() {
                return Err(Error::NotConnected {
                    group: hello.group.clone(),
                    member: hello.member,
                });
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            waiting = self
                .arrivals
                .changed
                .wait_timeout(waiting, wait)
                .map(|(w, _)| w)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Arrivals {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Hello, Connection>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn arrive(&self, hello: Hello, connection: Connection) {
        let mut waiting = self.lock();
        if waiting.len() >= MAX_UNCLAIMED {
            tracing::warn!(peer = %connection.peer(), "too many unclaimed connections; refused");
            return;
        }
        // A second connection with the same hello replaces the first (a peer that
        // reconnected); the first one closes.
        waiting.insert(hello, connection);
        self.changed.notify_all();
    }
}

/// Reads the hello of a new connection.
async fn greet(
    stream: TcpStream,
    peer: SocketAddr,
) -> std::result::Result<(Hello, Framed<TcpStream, FrameCodec>), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    // A hello is small: refuse anything longer before reading it.
    let mut framed = Framed::new(stream, FrameCodec::with_max_payload(4096));
    let first = tokio::time::timeout(HELLO_TIMEOUT, framed.next())
        .await
        .map_err(|_| format!("no hello within {} s", HELLO_TIMEOUT.as_secs()))?;
    let frame = match first {
        Some(Ok(frame)) => frame,
        Some(Err(e)) => return Err(e.to_string()),
        None => return Err("closed before its hello".into()),
    };
    let hello = match (frame.kind, frame.bytes()) {
        (FrameKind::Control, Some(bytes)) => {
            serde_json::from_slice::<Hello>(bytes).map_err(|e| format!("bad hello: {e}"))?
        }
        _ => return Err(format!("the first frame is {:?}, not a hello", frame.kind)),
    };
    tracing::debug!(%peer, group = %hello.group, member = hello.member, "connected");
    // Later frames may be as long as any tensor.
    let mut parts = framed.into_parts();
    parts.codec = FrameCodec::default();
    Ok((hello, Framed::from_parts(parts)))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn garbage_closes_its_connection_and_the_hub_serves_the_next() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let hub = Hub::bind("127.0.0.1:0".parse().unwrap(), runtime.handle()).unwrap();
        // Not a frame at all, then a frame header claiming an absurd length.
        let mut absurd = MAGIC_HEADER.to_vec();
        absurd[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        for garbage in [b"GET / HTTP/1.1\r\n\r\n".to_vec(), absurd] {
            let mut socket = std::net::TcpStream::connect(hub.local_addr()).unwrap();
            socket.write_all(&garbage).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut rest = Vec::new();
            // The hub closes the connection: the read ends (0 bytes or a reset), never times out.
            match socket.read_to_end(&mut rest) {
                Ok(_) => assert!(rest.is_empty()),
                Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}"),
            }
        }
        let hello = Hello {
            group: "g".into(),
            member: 1,
        };
        let dialled = dial(hub.local_addr(), &hello, runtime.handle(), HELLO_TIMEOUT).unwrap();
        let accepted = hub
            .accept(&hello, Instant::now() + Duration::from_secs(5))
            .unwrap();
        dialled
            .send(Frame::control(b"after the garbage".to_vec()))
            .unwrap();
        let got = accepted
            .inbox()
            .recv_timeout(Duration::from_secs(5))
            .unwrap();
        assert_eq!(got.bytes().unwrap().as_ref(), b"after the garbage");
        drop(dialled);
        // The other end sees the connection end.
        assert!(
            accepted
                .inbox()
                .recv_timeout(Duration::from_secs(5))
                .is_err()
        );
    }

    /// A valid header (magic, control kind, u8, one dimension) with no payload yet.
    const MAGIC_HEADER: [u8; 40] = {
        let mut h = [0u8; 40];
        h[0] = b'F';
        h[1] = b'M';
        h[2] = b'R';
        h[3] = b'1';
        h[6] = 1;
        h
    };
}
