//! `FlexModel`: a model with registered hooks, an activation store and a save context.

use candle_core::Tensor;

use crate::hook_catalog::HookCatalog;
use crate::hook_dispatch::PassHooks;
use crate::hook_registry::{Groups, HookRegistry};
use crate::models::{Llama, LlamaConfig};
use crate::{ActivationStore, NoHooks, Result, SaveContext};

/// A model whose hook points can be read and edited by registered [`HookFunction`]s.
///
/// ```no_run
/// use flexmodel::{Checkpoint, FlexModel, HookFunction, edits};
///
/// # fn main() -> flexmodel::Result<()> {
/// let checkpoint = Checkpoint::open("smollm2")?;
/// let mut model = FlexModel::new(checkpoint.load_model()?);
/// model.hooks_mut().register(HookFunction::new("blocks.*.hook_resid_post"))?;
/// model.hooks_mut().register(HookFunction::new("blocks.3.attn.hook_z").with_edit(edits::zero_head(1)))?;
/// let tokens = checkpoint.tokenizer.encode_batch(&["The capital of France is"])?;
/// let logits = model.forward(&tokens)?;
/// let resid = model.store().last("blocks.29.hook_resid_post").unwrap();
/// # let _ = (logits, resid);
/// # Ok(())
/// # }
/// ```
///
/// [`HookFunction`]: crate::HookFunction
pub struct FlexModel {
    model: Llama,
    registry: HookRegistry,
    store: ActivationStore,
    save: SaveContext,
}

impl FlexModel {
    /// Wraps `model` with no hooks registered.
    pub fn new(model: Llama) -> Self {
        let registry = HookRegistry::new(HookCatalog::new(model.config()));
        Self {
            model,
            registry,
            store: ActivationStore::default(),
            save: SaveContext::default(),
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        self.model.config()
    }

    /// The registered hooks.
    pub fn hooks(&self) -> &HookRegistry {
        &self.registry
    }

    /// The registered hooks, to register, remove, tag, enable or disable.
    pub fn hooks_mut(&mut self) -> &mut HookRegistry {
        &mut self.registry
    }

    /// Logits `[b, t, vocab]` of `tokens` (`[b, t]`, u32), running every enabled hook.
    pub fn forward(&mut self, tokens: &Tensor) -> Result<Tensor> {
        self.forward_groups(tokens, &Groups::All)
    }

    /// Logits of `tokens`, running the enabled hooks that `groups` selects.
    ///
    /// If the pass fails (an edit errs, panics or changes the shape), the store is left
    /// as it was before the pass and the model stays usable.
    pub fn forward_groups(&mut self, tokens: &Tensor, groups: &Groups) -> Result<Tensor> {
        if self.registry.is_empty() {
            return self.model.forward(tokens, &mut NoHooks);
        }
        let plan = self.registry.plan(groups)?;
        let n_layers = self.config().n_layers;
        let mut hooks = PassHooks::new(plan, self.registry.entries(), &mut self.save, n_layers);
        let logits = self.model.forward(tokens, &mut hooks)?;
        self.store.append(hooks.captures);
        Ok(logits)
    }

    /// The captured activations.
    pub fn store(&self) -> &ActivationStore {
        &self.store
    }

    /// The captured activations, to take or clear.
    pub fn store_mut(&mut self) -> &mut ActivationStore {
        &mut self.store
    }

    /// The save context shared by all hooks.
    pub fn save_ctx(&mut self) -> &mut SaveContext {
        &mut self.save
    }
}
