//! FlexModel-rs: run a transformer split across devices and hook any named point of
//! its forward pass as if it were in one piece.
//!
//! This crate holds the public API, the models ([`models`]), weight and tokenizer
//! loading ([`weights`], [`Tokenizer`], [`Checkpoint`]) and the `flexmodel` binary.
//! Hook points are named as in TransformerLens ([`HookPoint`]); every one of them is
//! a call into a [`HookLayer`].
//!
//! ```no_run
//! use candle_core::{Device, Tensor};
//! use flexmodel::{Checkpoint, HookPoint, NoHooks};
//!
//! # fn main() -> flexmodel::Result<()> {
//! let checkpoint = Checkpoint::open("smollm2")?;
//! let model = checkpoint.load_model()?;
//! let ids = checkpoint.tokenizer.encode("The capital of France is")?;
//! let tokens = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
//! let mut seen = Vec::new();
//! let logits = model.forward(&tokens, &mut |point: HookPoint, x| {
//!     seen.push(point.to_string());
//!     Ok(x)
//! })?;
//! # let _ = (logits, NoHooks);
//! # Ok(())
//! # }
//! ```

mod checkpoint;
mod error;
mod generate;
pub mod hook_point;
mod hooks;
pub mod models;
pub mod pretrained;
pub mod tiny;
mod tokenizer;
pub mod weights;

pub use checkpoint::Checkpoint;
pub use error::{Error, Result};
pub use generate::generate_greedy;
pub use hook_point::{BlockSite, HookPoint};
pub use hooks::{HookLayer, NoHooks};
pub use tokenizer::Tokenizer;
