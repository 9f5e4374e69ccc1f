//! The hook API: the named points of the forward pass, what can target them, the hooks
//! registered on a model, and what one pass does with them.
//!
//! - [`point`], [`site`]: TransformerLens names, and what a model family declares of its
//!   points (their shapes, from which tensor-parallel shard specs follow);
//! - [`catalog`](HookCatalog): every targetable name (hook points and Hugging Face
//!   module aliases) and glob resolution ([`glob_match`]);
//! - [`HookFunction`], [`HookRegistry`]: hooks with edits, handles, tags and groups;
//! - [`HookLayer`]: what the model calls at every point;
//! - the dispatch of one pass, which captures into the [`ActivationStore`] and runs the
//!   edits ([`edits`]) with a [`SaveContext`] shared across passes.
//!
//! Registrations last until they are removed: hooks are state of the model, as in
//! TransformerLens. Remove what you add ([`HookRegistry::remove`]) or clear the registry
//! between experiments.
//!
//! Nothing here knows about threads, ranks or transports: sharded runs hand the hooks
//! the gathered, full tensors.

pub(crate) mod catalog;
pub(crate) mod dispatch;
pub mod edits;
pub(crate) mod function;
mod layer;
mod pattern;
pub mod point;
pub(crate) mod registry;
mod save_context;
pub mod site;
pub(crate) mod store;

pub use catalog::{HookCatalog, HookKind};
pub use function::{EditFn, HookCtx, HookFunction};
pub use layer::{HookLayer, NoHooks};
pub use pattern::glob_match;
pub(crate) use pattern::nearest;
pub use point::{BlockModule, HookPoint, ModelPoints, Sizes};
pub use registry::{ALL, Groups, HookHandle, HookRegistry, HookSelector};
pub use save_context::SaveContext;
pub use site::{BlockSite, SaeSite, SiteSpec, Size};
pub use store::ActivationStore;
