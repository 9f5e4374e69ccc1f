//! The `--hook PAT` and `--edit SPEC` options of the commands that run hooked passes.

use flexmodel::edits::EditSpec;
use flexmodel::{FlexModel, HookFunction, HookKind};

/// The hooks a command registers: patterns to capture and edits, checked when parsed.
pub struct Hooks {
    /// `--hook` patterns: exact names or globs.
    pub patterns: Vec<String>,
    /// `--edit` specifications.
    pub edits: Vec<EditSpec>,
}

impl Hooks {
    /// The hooks of `--hook` `patterns` and `--edit` `edits`; a malformed edit is an error.
    pub fn parse(patterns: &[String], edits: &[String]) -> anyhow::Result<Self> {
        let edits = edits
            .iter()
            .map(|spec| EditSpec::parse(spec))
            .collect::<flexmodel::Result<Vec<_>>>()?;
        Ok(Self {
            patterns: patterns.to_vec(),
            edits,
        })
    }

    /// Whether there is no hook at all.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty() && self.edits.is_empty()
    }

    /// Every target with its kind, for checking against the model before it loads.
    pub fn targets(&self) -> Vec<(&str, HookKind)> {
        let targets = self
            .patterns
            .iter()
            .chain(self.edits.iter().map(|e| &e.target));
        targets.map(|t| (t.as_str(), HookKind::Forward)).collect()
    }

    /// Registers the edits, then a capture on every pattern.
    pub fn register(&self, model: &mut FlexModel) -> flexmodel::Result<()> {
        for edit in &self.edits {
            model.hooks_mut().register(edit.hook_function())?;
        }
        for pattern in &self.patterns {
            model
                .hooks_mut()
                .register(HookFunction::new(pattern.clone()))?;
        }
        Ok(())
    }
}
