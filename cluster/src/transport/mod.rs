//! How processes exchange tensors and messages: frames over TCP, on connections that
//! prove they belong to the job, every frame sealed with the connection's own keys.

mod auth;
mod frame;
mod seal;
mod tcp;

pub use auth::Token;

pub use frame::{Body, DEFAULT_MAX_PAYLOAD, Frame, FrameCodec, FrameError, FrameKind, MAX_DIMS};
pub use seal::Unsealed;
pub use tcp::{ABORT_GRACE, Connection, HELLO_TIMEOUT, Hello, Hub, Tampering, UNCLAIMED_FOR};
