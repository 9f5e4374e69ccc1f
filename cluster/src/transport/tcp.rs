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
//! disconnects, which is how the synchronous side learns that its peer is gone. A write
//! that fails does not end the reading at once: what the peer sent before it went (an
//! abort saying why) is still read, for up to [`ABORT_GRACE`].
//!
//! A sealed frame that fails its authentication check (altered, injected, replayed or
//! out of order) closes its connection too: nothing of it is delivered, the peer is sent
//! an abort saying why (and given [`ABORT_GRACE`], 1 s, to get it), and
//! [`Connection::tampering`] tells the synchronous side what happened.
//!
//! Deadlines: each step of a handshake has [`HELLO_TIMEOUT`] (10 s); a dial has the
//! caller's timeout; an authenticated connection that nobody claims is closed after
//! [`UNCLAIMED_FOR`] (120 s).
//!
//! # Shutdown
//!
//! Dropping a [`Connection`] lets its writer send what is queued and close the socket;
//! [`Connection::close`] closes it at once. Dropping a [`Hub`] stops accepting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use super::auth::{self, Handshake, Role, Token};
use super::frame::{Frame, FrameCodec, FrameError, FrameKind};
use super::seal::{Seal, Unsealed};
use crate::{Error, Result};

/// How long each step of a new connection's handshake may take.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The most connections a hub keeps waiting for someone to claim them.
const MAX_UNCLAIMED: usize = 4096;
/// How long an authenticated connection waits to be claimed before it is closed: longer
/// than any join's deadline (a minute), so that only connections nobody wants expire.
pub const UNCLAIMED_FOR: Duration = Duration::from_secs(120);

/// Who a connection's dialer is: which group it joins, as which member.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hello {
    /// The group (or role) the connection belongs to.
    pub group: String,
    /// The dialer's place in it.
    pub member: usize,
}

/// How long a connection that received a tampered frame waits for its abort to reach
/// the peer before it closes the socket.
pub const ABORT_GRACE: Duration = Duration::from_secs(1);

/// How a connection was tampered with, once it was; the connection is closed then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tampering {
    /// A frame from the peer failed its check here (its frame number among those received).
    Received(Unsealed),
    /// The peer closed the connection because a frame from this side failed its check there.
    ReportedByPeer,
}

impl std::fmt::Display for Tampering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tampering::Received(unsealed) => write!(
                f,
                "frame {} it sent failed its authentication check (altered, injected, replayed or out of order)",
                unsealed.sequence
            ),
            Tampering::ReportedByPeer => {
                f.write_str("a frame sent to it failed its authentication check there")
            }
        }
    }
}

/// Closes `closed` after [`ABORT_GRACE`] (on the current runtime).
fn close_after_grace(closed: &CancellationToken) {
    let closed = closed.clone();
    tokio::spawn(async move {
        tokio::time::sleep(ABORT_GRACE).await;
        closed.cancel();
    });
}

/// One framed TCP connection. Frames sent are queued to its writer task (a send never
/// blocks); frames received arrive in [`inbox`](Self::inbox). The inbox disconnects
/// when the connection ends: the peer closed it, it failed, a frame was malformed
/// (logged), or it was [tampered with](Self::tampering).
pub struct Connection {
    /// Messages to write: each one's frames go out back to back.
    outbox: mpsc::UnboundedSender<Vec<Frame>>,
    inbox: Receiver<Frame>,
    peer: SocketAddr,
    closed: CancellationToken,
    tampering: Arc<OnceLock<Tampering>>,
}

impl Connection {
    /// Starts the reader and writer tasks of `framed` (connected to `peer`) on `runtime`.
    fn start(framed: Framed<TcpStream, FrameCodec>, peer: SocketAddr, runtime: &Handle) -> Self {
        let (mut sink, mut stream) = framed.split();
        let (outbox, mut queued) = mpsc::unbounded_channel::<Vec<Frame>>();
        let (deliver, inbox): (Sender<Frame>, Receiver<Frame>) = unbounded();
        let closed = CancellationToken::new();
        let tampering = Arc::new(OnceLock::new());
        let (reader_closed, reader_tampering) = (closed.clone(), tampering.clone());
        // Weak, so that dropping the connection still ends its writer.
        let abort = outbox.downgrade();
        runtime.spawn(async move {
            loop {
                tokio::select! {
                    _ = reader_closed.cancelled() => break,
                    next = stream.next() => match next {
                        Some(Ok(frame)) if frame.kind == FrameKind::Abort => {
                            let _ = reader_tampering.set(Tampering::ReportedByPeer);
                            tracing::error!(%peer, "the connection was tampered with: {}", Tampering::ReportedByPeer);
                            break;
                        }
                        Some(Ok(frame)) => {
                            if deliver.send(frame).is_err() {
                                break;
                            }
                        }
                        Some(Err(FrameError::Tampered(unsealed))) => {
                            let tampered = Tampering::Received(unsealed);
                            let _ = reader_tampering.set(tampered);
                            tracing::error!(%peer, "the connection was tampered with: {tampered}; closing it, nothing of that frame was acted on");
                            // Tell the peer why, then close, whether or not it reads.
                            if let Some(outbox) = abort.upgrade() {
                                let _ = outbox.send(vec![Frame::abort()]);
                            }
                            close_after_grace(&reader_closed);
                            return;
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
                let message = tokio::select! {
                    _ = writer_closed.cancelled() => break,
                    message = queued.recv() => message,
                };
                let Some(message) = message else { break };
                // Queue what else is waiting, then write it all at once.
                let mut result = Ok(());
                let mut aborting = false;
                let mut next = Some(message);
                while let Some(frames) = next.take() {
                    for frame in frames {
                        aborting |= frame.kind == FrameKind::Abort;
                        if result.is_ok() {
                            result = sink.feed(frame).await;
                        }
                    }
                    next = queued.try_recv().ok().filter(|_| result.is_ok());
                }
                if let Err(e) = result.and(sink.flush().await) {
                    tracing::warn!(%peer, error = %e, "closing the connection");
                    // The peer is gone, but what it sent before may still be unread
                    // (an abort saying why): the reader drains it and ends at the
                    // socket's end, or within the grace at the latest.
                    close_after_grace(&writer_closed);
                    return;
                }
                if aborting {
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
            tampering,
        }
    }

    /// Queues `frame` to be sent; an error once the connection is closed.
    pub fn send(&self, frame: Frame) -> Result<()> {
        self.send_all(vec![frame])
    }

    /// Queues `frames` to be sent back to back, with no frame another thread sends in
    /// between (a message and the tensors attached to it); an error once the
    /// connection is closed.
    pub fn send_all(&self, frames: Vec<Frame>) -> Result<()> {
        if !self.is_open() {
            return Err(self.ended());
        }
        self.outbox.send(frames).map_err(|_| self.ended())
    }

    /// The error that says why the connection ended: tampered with, or closed.
    pub fn ended(&self) -> Error {
        match self.tampering() {
            Some(how) => Error::Tampered {
                peer: self.peer,
                how,
            },
            None => Error::ConnectionClosed(self.peer),
        }
    }

    /// How the connection was tampered with, if it was (it is closed then).
    pub fn tampering(&self) -> Option<Tampering> {
        self.tampering.get().copied()
    }

    /// The frames received, in order; disconnected once the connection has ended.
    pub fn inbox(&self) -> &Receiver<Frame> {
        &self.inbox
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        !self.closed.is_cancelled() && self.tampering.get().is_none()
    }

    /// The address of the other end.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Closes the connection (queued frames may be dropped). A connection that received
    /// a tampered frame is already closing: it sends its abort first, so that the peer
    /// learns why, and closes within [`ABORT_GRACE`].
    pub fn close(&self) {
        if matches!(self.tampering(), Some(Tampering::Received(_))) {
            return;
        }
        self.closed.cancel();
    }
}

/// Connections that arrived and said who they are, with when they did, until someone
/// claims them or they expire ([`UNCLAIMED_FOR`]).
#[derive(Default)]
struct Arrivals {
    waiting: Mutex<HashMap<Hello, (Connection, Instant)>>,
    changed: Condvar,
}

/// A listening socket whose connections are claimed by the hello they open with.
pub struct Hub {
    addr: SocketAddr,
    arrivals: Arc<Arrivals>,
    stop: CancellationToken,
    token: Arc<Token>,
    runtime: Handle,
}

impl Hub {
    /// Listens on `addr` (port 0: any free port) and starts accepting on `runtime`
    /// the connections that prove they hold `token`; [`dial`](Self::dial) proves it too.
    pub fn bind(addr: SocketAddr, token: Token, runtime: &Handle) -> Result<Hub> {
        let token = Arc::new(token);
        let listener = runtime
            .block_on(TcpListener::bind(addr))
            .map_err(|source| Error::Listen { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Listen { addr, source })?;
        let arrivals = Arc::new(Arrivals::default());
        let stop = CancellationToken::new();
        let (accepting, stopped, secret) = (arrivals.clone(), stop.clone(), token.clone());
        let handle = runtime.clone();
        runtime.spawn(async move {
            let mut sweep = tokio::time::interval(UNCLAIMED_FOR / 4);
            loop {
                let (stream, peer) = tokio::select! {
                    _ = stopped.cancelled() => break,
                    _ = sweep.tick() => {
                        accepting.expire();
                        continue;
                    }
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            tracing::warn!(error = %e, "accepting a connection");
                            continue;
                        }
                    },
                };
                let (arrivals, handle, token) = (accepting.clone(), handle.clone(), secret.clone());
                tokio::spawn(async move {
                    match greet(stream, peer, &token).await {
                        Ok((hello, framed)) => {
                            let connection = Connection::start(framed, peer, &handle);
                            arrivals.arrive(hello, connection);
                        }
                        Err(reason) => {
                            tracing::warn!(%peer, %reason, "refused a connection; nothing it sent was acted on");
                        }
                    }
                });
            }
        });
        Ok(Hub {
            addr,
            arrivals,
            stop,
            token,
            runtime: runtime.clone(),
        })
    }

    /// Connects to the hub at `addr`, as `hello` says, proving that this hub's token is
    /// the job's; [`Error::AuthenticationFailed`] if the other side holds another.
    pub fn dial(&self, addr: SocketAddr, hello: &Hello, timeout: Duration) -> Result<Connection> {
        self.runtime.block_on(async {
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
            let mut framed = Framed::new(stream, FrameCodec::with_max_payload(4096));
            let seal = match introduce(&mut framed, hello, &self.token).await {
                Ok(seal) => seal,
                Err(HandshakeFailure::Refused) => {
                    return Err(Error::AuthenticationFailed { peer: addr });
                }
                Err(HandshakeFailure::Broken(reason)) => {
                    return Err(Error::Handshake { peer: addr, reason });
                }
            };
            Ok(Connection::start(sealed(framed, seal), addr, &self.runtime))
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

    /// The next connection that opened with a hello of `group`, from any member,
    /// waiting for one until `deadline`.
    pub fn accept_any(&self, group: &str, deadline: Instant) -> Result<(Hello, Connection)> {
        self.claim(deadline, || true, |h| h.group == group)
            .ok_or_else(|| Error::NotConnected {
                group: group.to_string(),
                member: 0,
            })
    }

    /// Like [`accept`](Self::accept), giving up early once `alive` returns false.
    pub fn accept_while(
        &self,
        hello: &Hello,
        deadline: Instant,
        alive: impl FnMut() -> bool,
    ) -> Result<Connection> {
        self.claim(deadline, alive, |h| h == hello)
            .map(|(_, connection)| connection)
            .ok_or_else(|| Error::NotConnected {
                group: hello.group.clone(),
                member: hello.member,
            })
    }

    /// The first connection whose hello `wanted` accepts, waiting until `deadline` or
    /// until `alive` returns false.
    fn claim(
        &self,
        deadline: Instant,
        mut alive: impl FnMut() -> bool,
        wanted: impl Fn(&Hello) -> bool,
    ) -> Option<(Hello, Connection)> {
        let mut waiting = self.arrivals.lock();
        loop {
            let arrived = waiting.keys().find(|h| wanted(h)).cloned();
            if let Some(hello) = arrived {
                let (connection, _) = waiting.remove(&hello)?;
                return Some((hello, connection));
            }
            let now = Instant::now();
            if now >= deadline || !alive() {
                return None;
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
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Hello, (Connection, Instant)>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the connections that waited longer than [`UNCLAIMED_FOR`].
    fn expire(&self) {
        // Dropping a connection closes it.
        self.lock().retain(|hello, (connection, arrived)| {
            let fresh = arrived.elapsed() < UNCLAIMED_FOR;
            if !fresh {
                tracing::warn!(peer = %connection.peer(), group = %hello.group, member = hello.member, "closing a connection nobody claimed within {} s", UNCLAIMED_FOR.as_secs());
            }
            fresh
        });
    }

    fn arrive(&self, hello: Hello, connection: Connection) {
        self.expire();
        let mut waiting = self.lock();
        if waiting.len() >= MAX_UNCLAIMED {
            tracing::warn!(peer = %connection.peer(), "too many unclaimed connections; refused");
            return;
        }
        // A second connection with the same hello replaces the first (a peer that
        // reconnected); the first one closes.
        waiting.insert(hello, (connection, Instant::now()));
        self.changed.notify_all();
    }
}

/// The next handshake message on `framed`, within [`HELLO_TIMEOUT`].
async fn next_handshake(
    framed: &mut Framed<TcpStream, FrameCodec>,
) -> std::result::Result<Handshake, String> {
    let next = tokio::time::timeout(HELLO_TIMEOUT, framed.next())
        .await
        .map_err(|_| format!("no handshake within {} s", HELLO_TIMEOUT.as_secs()))?;
    let frame = match next {
        Some(Ok(frame)) => frame,
        Some(Err(e)) => return Err(e.to_string()),
        None => return Err("closed during the handshake".into()),
    };
    match (frame.kind, frame.bytes()) {
        (FrameKind::Control, Some(bytes)) => {
            serde_json::from_slice(bytes).map_err(|e| format!("a malformed handshake: {e}"))
        }
        _ => Err(format!("a {:?} frame during the handshake", frame.kind)),
    }
}

/// Sends a handshake message.
async fn send_handshake(
    framed: &mut Framed<TcpStream, FrameCodec>,
    message: &Handshake,
) -> std::result::Result<(), String> {
    let bytes = serde_json::to_vec(message).map_err(|e| e.to_string())?;
    framed
        .send(Frame::control(bytes))
        .await
        .map_err(|e| e.to_string())
}

/// The acceptor's side of the handshake: who the dialer is, once it proved it holds
/// the token.
async fn greet(
    stream: TcpStream,
    peer: SocketAddr,
    token: &Token,
) -> std::result::Result<(Hello, Framed<TcpStream, FrameCodec>), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    // Handshake messages are small: refuse anything longer before reading it.
    let mut framed = Framed::new(stream, FrameCodec::with_max_payload(4096));
    let Handshake::Hello {
        group,
        member,
        nonce: theirs,
    } = next_handshake(&mut framed).await?
    else {
        return Err("the first message is not a hello".into());
    };
    let mine = auth::nonce();
    let proof = token.prove(Role::Acceptor, &theirs, &mine, &group, member);
    let challenge = Handshake::Challenge {
        nonce: mine.clone(),
        proof,
    };
    send_handshake(&mut framed, &challenge).await?;
    let Handshake::Proof { proof } = next_handshake(&mut framed).await? else {
        return Err("the answer to the challenge is not a proof".into());
    };
    if !token.verify(Role::Dialer, &proof, &mine, &theirs, &group, member) {
        return Err("authentication failed (a different token)".into());
    }
    send_handshake(&mut framed, &Handshake::Welcome).await?;
    tracing::debug!(%peer, %group, member, "connected");
    let seal = Seal::new(token, Role::Acceptor, &theirs, &mine, &group, member);
    Ok((Hello { group, member }, sealed(framed, seal)))
}

/// `framed` past its handshake: every later frame sealed, and as long as any tensor.
fn sealed(framed: Framed<TcpStream, FrameCodec>, seal: Seal) -> Framed<TcpStream, FrameCodec> {
    let mut parts = framed.into_parts();
    parts.codec = FrameCodec::sealed(seal);
    Framed::from_parts(parts)
}

/// The dialer's side of the handshake: the connection's seal once both sides proved
/// that they hold the token.
async fn introduce(
    framed: &mut Framed<TcpStream, FrameCodec>,
    hello: &Hello,
    token: &Token,
) -> std::result::Result<Seal, HandshakeFailure> {
    let mine = auth::nonce();
    let opening = Handshake::Hello {
        group: hello.group.clone(),
        member: hello.member,
        nonce: mine.clone(),
    };
    send_handshake(framed, &opening)
        .await
        .map_err(HandshakeFailure::Broken)?;
    let Handshake::Challenge {
        nonce: theirs,
        proof,
    } = next_handshake(framed)
        .await
        .map_err(HandshakeFailure::Broken)?
    else {
        return Err(HandshakeFailure::Broken(
            "the answer to the hello is not a challenge".into(),
        ));
    };
    let (group, member) = (&hello.group, hello.member);
    if !token.verify(Role::Acceptor, &proof, &mine, &theirs, group, member) {
        return Err(HandshakeFailure::Refused);
    }
    let proof = token.prove(Role::Dialer, &theirs, &mine, group, member);
    send_handshake(framed, &Handshake::Proof { proof })
        .await
        .map_err(HandshakeFailure::Broken)?;
    match next_handshake(framed).await {
        Ok(Handshake::Welcome) => Ok(Seal::new(
            token,
            Role::Dialer,
            &mine,
            &theirs,
            group,
            member,
        )),
        // The acceptor closes a connection whose proof it does not take.
        Err(_) => Err(HandshakeFailure::Refused),
        Ok(other) => Err(HandshakeFailure::Broken(format!(
            "{other:?} instead of a welcome"
        ))),
    }
}

/// Why a dialer's handshake failed.
enum HandshakeFailure {
    /// The other side holds another token (or refused ours).
    Refused,
    /// The other side does not speak the handshake.
    Broken(String),
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn frames_sent_together_arrive_together_while_another_thread_sends() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let token = Token::random();
        let bind = || {
            Hub::bind(
                "127.0.0.1:0".parse().unwrap(),
                token.clone(),
                runtime.handle(),
            )
        };
        let (server, client) = (bind().unwrap(), bind().unwrap());
        let hello = Hello {
            group: "g".into(),
            member: 0,
        };
        let dialled = client
            .dial(server.local_addr(), &hello, HELLO_TIMEOUT)
            .unwrap();
        let deadline = Instant::now() + HELLO_TIMEOUT;
        let accepted = server.accept(&hello, deadline).unwrap();
        let (messages, beats) = (500, 2000);
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..beats {
                    dialled.send(Frame::control(b"beat".to_vec())).unwrap();
                }
            });
            s.spawn(|| {
                for i in 0..messages {
                    let frames = (0..3).map(|j| Frame::control(format!("{i}.{j}").into_bytes()));
                    dialled.send_all(frames.collect()).unwrap();
                }
            });
        });
        let received: Vec<String> = (0..messages * 3 + beats)
            .map(|_| {
                let frame = accepted.inbox().recv_timeout(HELLO_TIMEOUT).unwrap();
                String::from_utf8(frame.bytes().unwrap().to_vec()).unwrap()
            })
            .collect();
        // Each message's three frames in a row, with no beat between them, in order.
        let starts: Vec<usize> = (0..received.len())
            .filter(|&k| received[k].ends_with(".0"))
            .collect();
        assert_eq!(starts.len(), messages);
        for (i, &k) in starts.iter().enumerate() {
            assert_eq!(received[k..k + 3], [0, 1, 2].map(|j| format!("{i}.{j}")));
        }
    }

    #[test]
    fn garbage_closes_its_connection_and_the_hub_serves_the_next() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let token = Token::random();
        let hub = Hub::bind(
            "127.0.0.1:0".parse().unwrap(),
            token.clone(),
            runtime.handle(),
        )
        .unwrap();
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
        let client = Hub::bind("127.0.0.1:0".parse().unwrap(), token, runtime.handle()).unwrap();
        let dialled = client
            .dial(hub.local_addr(), &hello, HELLO_TIMEOUT)
            .unwrap();
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

    #[test]
    fn a_dialer_with_another_token_is_refused_and_the_hub_serves_the_next() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let token = Token::random();
        let hub = Hub::bind(any, token.clone(), runtime.handle()).unwrap();
        let hello = Hello {
            group: "g".into(),
            member: 1,
        };
        let stranger = Hub::bind(any, Token::random(), runtime.handle()).unwrap();
        let refused = stranger.dial(hub.local_addr(), &hello, HELLO_TIMEOUT);
        assert!(
            matches!(refused, Err(Error::AuthenticationFailed { .. })),
            "{:?}",
            refused.as_ref().err()
        );
        assert_eq!(
            refused.err().unwrap().to_string(),
            format!(
                "authentication failed with {}: it holds another token than this job's",
                hub.local_addr()
            )
        );
        let soon = Instant::now() + Duration::from_millis(300);
        assert!(hub.accept(&hello, soon).is_err(), "nothing was handed out");

        // A dialer that answers the challenge with a forged proof is closed unheard.
        let forged = runtime.block_on(async {
            let stream = TcpStream::connect(hub.local_addr()).await.unwrap();
            let mut framed = Framed::new(stream, FrameCodec::default());
            let opening = Handshake::Hello {
                group: "g".into(),
                member: 1,
                nonce: auth::nonce(),
            };
            send_handshake(&mut framed, &opening).await.unwrap();
            let challenge = next_handshake(&mut framed).await.unwrap();
            assert!(matches!(challenge, Handshake::Challenge { .. }));
            let proof = Handshake::Proof { proof: vec![0; 32] };
            send_handshake(&mut framed, &proof).await.unwrap();
            framed
                .send(Frame::control(b"acted on?".to_vec()))
                .await
                .ok();
            next_handshake(&mut framed).await
        });
        assert!(forged.is_err(), "no welcome: {forged:?}");
        assert!(
            hub.accept(&hello, Instant::now() + Duration::from_millis(300))
                .is_err()
        );

        let friend = Hub::bind(any, token, runtime.handle()).unwrap();
        let dialled = friend
            .dial(hub.local_addr(), &hello, HELLO_TIMEOUT)
            .unwrap();
        let accepted = hub
            .accept(&hello, Instant::now() + Duration::from_secs(5))
            .unwrap();
        dialled.send(Frame::control(b"welcome".to_vec())).unwrap();
        let got = accepted
            .inbox()
            .recv_timeout(Duration::from_secs(5))
            .unwrap();
        assert_eq!(got.bytes().unwrap().as_ref(), b"welcome");
    }

    #[test]
    fn a_connection_nobody_claims_is_closed_once_it_expires() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let token = Token::random();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let hub = Hub::bind(any, token.clone(), runtime.handle()).unwrap();
        let client = Hub::bind(any, token, runtime.handle()).unwrap();
        let hello = |member| Hello {
            group: "g".into(),
            member,
        };
        let (old, fresh) = (
            client
                .dial(hub.local_addr(), &hello(0), HELLO_TIMEOUT)
                .unwrap(),
            client
                .dial(hub.local_addr(), &hello(1), HELLO_TIMEOUT)
                .unwrap(),
        );
        let deadline = Instant::now() + HELLO_TIMEOUT;
        while hub.arrivals.lock().len() < 2 {
            assert!(Instant::now() < deadline, "both arrive");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Member 0 has waited longer than anyone may.
        if let Some((_, arrived)) = hub.arrivals.lock().get_mut(&hello(0)) {
            *arrived = Instant::now() - UNCLAIMED_FOR - Duration::from_secs(1);
        }
        hub.arrivals.expire();
        assert!(old.inbox().recv_timeout(HELLO_TIMEOUT).is_err(), "closed");
        let soon = Instant::now() + Duration::from_millis(100);
        assert!(hub.accept(&hello(0), soon).is_err());
        let claimed = hub.accept(&hello(1), soon).unwrap();
        fresh.send(Frame::control(b"still here".to_vec())).unwrap();
        let got = claimed.inbox().recv_timeout(HELLO_TIMEOUT).unwrap();
        assert_eq!(got.bytes().unwrap().as_ref(), b"still here");
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
