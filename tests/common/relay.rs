//! A man in the middle on loopback: a TCP relay that forwards FlexModel frames between a
//! dialer and the address it meant to reach, and tampers with them when told to: flips
//! a byte of a frame, injects a frame of its own, or replays an earlier one. It never
//! holds the job's token: it forwards the handshake as it is.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Bytes of a frame header before the shape (see `cluster/src/transport/frame.rs`).
const HEADER_BYTES: usize = 32;
/// Bytes of the tag after each sealed frame.
const TAG_BYTES: usize = 16;
/// Frames of each direction that belong to the handshake (unsealed).
const HANDSHAKE_FRAMES: usize = 2;

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the dialer (the driver) to the address it dialed (the worker).
    Down,
    /// Back.
    Up,
}

/// What the relay does to the next sealed frame of `kind` (the wire code: 0 control,
/// 1 attached, 2 piece, 3 edited) going `direction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// Flips one bit of its payload.
    Flip { direction: Direction, kind: u8 },
    /// Sends a control frame of its own (`"Shutdown"`, with a made-up tag) before it.
    Inject { direction: Direction, kind: u8 },
    /// Sends the previous sealed frame of that kind again before it.
    Replay { direction: Direction, kind: u8 },
}

impl Tamper {
    fn direction(self) -> Direction {
        match self {
            Tamper::Flip { direction, .. }
            | Tamper::Inject { direction, .. }
            | Tamper::Replay { direction, .. } => direction,
        }
    }

    fn kind(self) -> u8 {
        match self {
            Tamper::Flip { kind, .. }
            | Tamper::Inject { kind, .. }
            | Tamper::Replay { kind, .. } => kind,
        }
    }
}

/// What the relay was told to do and what it did.
#[derive(Default)]
struct Plan {
    armed: Option<Tamper>,
    done: Vec<Tamper>,
    /// The last sealed frame of each direction and kind, as it went by.
    last: std::collections::HashMap<(bool, u8), Vec<u8>>,
}

/// A relay listening on loopback, forwarding every connection to `target`.
pub struct Relay {
    addr: SocketAddr,
    plan: Arc<Mutex<Plan>>,
    _accepting: JoinHandle<()>,
}

impl Relay {
    /// Starts a relay to `target`.
    pub fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let plan = Arc::new(Mutex::new(Plan::default()));
        let shared = plan.clone();
        let accepting = std::thread::spawn(move || {
            for dialer in listener.incoming() {
                let Ok(dialer) = dialer else { return };
                let Ok(worker) = TcpStream::connect(target) else {
                    continue;
                };
                for (from, to, direction) in [
                    (&dialer, &worker, Direction::Down),
                    (&worker, &dialer, Direction::Up),
                ] {
                    let (from, to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    let plan = shared.clone();
                    std::thread::spawn(move || pump(from, to, direction, &plan));
                }
            }
        });
        Relay {
            addr,
            plan,
            _accepting: accepting,
        }
    }

    /// Where dialers reach it.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Tampers with the next frame that `tamper` names (once).
    pub fn arm(&self, tamper: Tamper) {
        self.plan.lock().unwrap().armed = Some(tamper);
    }

    /// Whether the armed tampering was done.
    pub fn done(&self, tamper: Tamper) -> bool {
        self.plan.lock().unwrap().done.contains(&tamper)
    }
}

/// Forwards frames from `from` to `to` until `from` ends (then ends `to`'s writing) or
/// `to` fails.
fn pump(mut from: TcpStream, mut to: TcpStream, direction: Direction, plan: &Mutex<Plan>) {
    let mut frames = 0usize;
    while let Some(mut frame) = read_frame(&mut from, frames >= HANDSHAKE_FRAMES) {
        let sealed = frames >= HANDSHAKE_FRAMES;
        frames += 1;
        let kind = frame[4];
        let mut before = Vec::new();
        if sealed {
            let mut plan = plan.lock().unwrap();
            let key = (direction == Direction::Down, kind);
            match plan.armed {
                Some(t) if t.direction() == direction && t.kind() == kind => {
                    plan.armed = None;
                    plan.done.push(t);
                    match t {
                        Tamper::Flip { .. } => {
                            let at = frame.len() - TAG_BYTES - 1;
                            frame[at] ^= 0x01;
                        }
                        Tamper::Inject { .. } => before = injected(),
                        Tamper::Replay { .. } => {
                            before = plan.last.get(&key).cloned().unwrap_or_default();
                            assert!(!before.is_empty(), "nothing to replay yet");
                        }
                    }
                }
                _ => {}
            }
            plan.last.insert(key, frame.clone());
        }
        if to.write_all(&before).is_err() || to.write_all(&frame).is_err() {
            // `to` is gone; the other direction still forwards what it sent before.
            let _ = from.shutdown(Shutdown::Read);
            return;
        }
    }
    // Like TCP itself: the end of one direction is passed on, the other goes on.
    let _ = to.shutdown(Shutdown::Write);
}

/// The next whole frame on `from` (with its tag if `sealed`), or `None` at its end.
fn read_frame(from: &mut TcpStream, sealed: bool) -> Option<Vec<u8>> {
    let mut frame = vec![0u8; HEADER_BYTES];
    from.read_exact(&mut frame).ok()?;
    let dims = frame[6] as usize;
    let len = u64::from_le_bytes(frame[24..32].try_into().unwrap()) as usize;
    let rest = 8 * dims + len + if sealed { TAG_BYTES } else { 0 };
    frame.resize(HEADER_BYTES + rest, 0);
    from.read_exact(&mut frame[HEADER_BYTES..]).ok()?;
    Some(frame)
}

/// A sealed-looking control frame telling a worker to shut down, with a made-up tag:
/// what someone without the token can send.
fn injected() -> Vec<u8> {
    let message = br#""Shutdown""#;
    let mut frame = Vec::new();
    frame.extend_from_slice(b"FMR1");
    frame.extend_from_slice(&[0, 0, 1, 0]);
    frame.extend_from_slice(&0u64.to_le_bytes());
    frame.extend_from_slice(&[0; 8]);
    frame.extend_from_slice(&(message.len() as u64).to_le_bytes());
    frame.extend_from_slice(&(message.len() as u64).to_le_bytes());
    frame.extend_from_slice(message);
    frame.extend_from_slice(&[0xA5; TAG_BYTES]);
    frame
}
