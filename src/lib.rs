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

mod activation_store;
pub mod analysis;
mod checkpoint;
pub mod edits;
mod error;
mod flex_model;
mod generate;
mod hook_catalog;
mod hook_dispatch;
mod hook_function;
pub mod hook_point;
mod hook_registry;
mod hooks;
mod loss;
pub mod models;
mod parameters;
mod pattern;
pub mod plot;
pub mod pretrained;
mod progress;
mod save_context;
pub mod sharding;
pub mod telemetry;
pub mod tiny;
mod token_batch;
mod tokenizer;
pub mod weights;

pub use activation_store::ActivationStore;
pub use checkpoint::Checkpoint;
pub use error::{Error, Result};
pub use flex_model::FlexModel;
pub use flexmodel_actors::Fault;
pub use flexmodel_cluster::{Layout, RankCoords};
pub use generate::generate_greedy;
pub use hook_catalog::{HookCatalog, HookKind};
pub use hook_function::{EditFn, HookCtx, HookFunction};
pub use hook_point::{BlockSite, HookPoint};
pub use hook_registry::{ALL, Groups, HookHandle, HookRegistry, HookSelector};
pub use hooks::{HookLayer, NoHooks};
pub use loss::{next_token_loss, next_token_loss_by_position};
pub use pattern::glob_match;
pub use progress::progress_bar;
pub use save_context::SaveContext;
pub use token_batch::{chunk_tokens, read_tokens_file};
pub use tokenizer::Tokenizer;
