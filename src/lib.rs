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

pub mod analysis;
pub mod api;
mod checkpoint;
#[cfg(feature = "client")]
pub mod client;
pub mod dataset;
mod error;
pub mod hooks;
pub mod models;
#[cfg(feature = "plot")]
pub mod plot;
mod progress;
pub mod runtime;
pub mod sae;
pub mod telemetry;
pub mod text;
pub mod tiny;
pub mod weights;

pub use checkpoint::Checkpoint;
pub use error::{Error, Result};
pub use flexmodel_actors::{Fault, Logits, PassScope};
pub use flexmodel_cluster::{Layout, ModelDtype, RankCoords};
pub use hooks::{
    ALL, ActivationStore, BlockSite, EditFn, Groups, HookCatalog, HookCtx, HookFunction,
    HookHandle, HookKind, HookLayer, HookPoint, HookRegistry, HookSelector, ModelPoints, NoHooks,
    SaveContext, edits, glob_match,
};
pub use models::{masked_next_token_loss, next_token_loss, next_token_loss_by_position};
pub use progress::progress_bar;
pub use runtime::FlexModel;
pub use text::{
    GenerateOptions, Generation, TokenBatch, Tokenizer, chunk_tokens, read_tokens_file,
};
