//! How processes exchange tensors and messages: frames over TCP, on connections that
//! prove they belong to the job.

mod auth;
mod frame;
mod tcp;

pub use auth::Token;

pub use frame::{Body, DEFAULT_MAX_PAYLOAD, Frame, FrameCodec, FrameError, FrameKind, MAX_DIMS};
pub use tcp::{Connection, HELLO_TIMEOUT, Hello, Hub};
