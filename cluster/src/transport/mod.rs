//! How processes exchange tensors and messages: frames over TCP.

mod frame;
mod tcp;

pub use frame::{Body, DEFAULT_MAX_PAYLOAD, Frame, FrameCodec, FrameError, FrameKind, MAX_DIMS};
pub use tcp::{Connection, HELLO_TIMEOUT, Hello, Hub, dial};
