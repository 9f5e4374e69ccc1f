//! Every name a hook can target in one model: TransformerLens hook points, and the
//! Hugging Face module paths whose output (forward) or input (forward-pre) is one.

use std::collections::HashMap;

use flexmodel_actors::{Logits, PassScope};

use crate::hooks::pattern::{glob_match, is_glob, nearest};
use crate::hooks::point::{HookPoint, ModelPoints};
use crate::hooks::site::BlockSite;
use crate::{Error, Result};

/// When a hook runs relative to the module or point it targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookKind {
    /// On a hook point, or on a module's output.
    Forward,
    /// On a module's input (module names only).
    ForwardPre,
    /// On the gradient of the loss with respect to a hook point (or a module's output).
    Backward,
}

impl HookKind {
    fn describe(self) -> &'static str {
        match self {
            HookKind::Forward => "forward",
            HookKind::ForwardPre => "forward-pre",
            HookKind::Backward => "backward",
        }
    }
}

/// The names a hook can target in a model, and the hook point each one means.
#[derive(Debug, Clone)]
pub struct HookCatalog {
    points: ModelPoints,
    /// `(name, kind, point)` in forward order: hook points first, then aliases.
    names: Vec<(String, HookKind, HookPoint)>,
    lookup: HashMap<(String, HookKind), HookPoint>,
}

impl HookCatalog {
    /// The catalog of a model with `points`: their names, the block modules its family
    /// declares, and the modules every Hugging Face causal LM has (`model.embed_tokens`,
    /// `model.norm`'s input, `lm_head`).
    pub fn new(points: ModelPoints) -> Self {
        let n = points.n_layers();
        let mut names: Vec<(String, HookKind, HookPoint)> = points
            .all()
            .into_iter()
            .map(|p| (p.to_string(), HookKind::Forward, p))
            .collect();
        names.push((
            "model.embed_tokens".into(),
            HookKind::Forward,
            HookPoint::Embed,
        ));
        for layer in 0..n {
            for module in points.modules() {
                let point = HookPoint::Block {
                    layer,
                    site: module.site,
                };
                names.push((
                    format!("model.layers.{layer}{}", module.path),
                    module.kind,
                    point,
                ));
            }
        }
        if n > 0 {
            let last = HookPoint::Block {
                layer: n - 1,
                site: BlockSite::RESID_POST,
            };
            names.push(("model.norm".into(), HookKind::ForwardPre, last));
        }
        names.push(("lm_head".into(), HookKind::Forward, HookPoint::UnembedOut));
        let lookup = names
            .iter()
            .map(|(name, kind, point)| ((name.clone(), *kind), *point))
            .collect();
        Self {
            points,
            names,
            lookup,
        }
    }

    /// The number of blocks of the model.
    pub fn n_layers(&self) -> usize {
        self.points.n_layers()
    }

    /// The model's hook points.
    pub fn points(&self) -> &ModelPoints {
        &self.points
    }

    /// The hook points `target` (an exact name or a glob) means for hooks of `kind`, in
    /// forward order without repeats; an error suggesting the nearest names if none.
    ///
    /// An opt-in point ([`HookPoint::is_opt_in`]) is matched by a glob only if the glob's
    /// last dotted part ends with the point's own, spelled out (`blocks.*.attn.hook_result`
    /// and `*hook_q_input` do; `*`, `blocks.3.*` and `hook_?_input` do not); backward hooks skip points without a gradient (`hook_tokens`).
    pub fn resolve(&self, target: &str, kind: HookKind) -> Result<Vec<HookPoint>> {
        let backward = kind == HookKind::Backward;
        // A backward hook targets the same names as a forward hook.
        let kind = match kind {
            HookKind::Backward => HookKind::Forward,
            kind => kind,
        };
        let last_part = |name: &str| name.rsplit('.').next().unwrap_or(name).to_string();
        let spelled = last_part(target);
        let spells = |name: &str| spelled.ends_with(&last_part(name));
        let mut points: Vec<HookPoint> = if is_glob(target) {
            self.names
                .iter()
                .filter(|(name, k, _)| *k == kind && glob_match(target, name))
                .filter(|(name, _, p)| !p.is_opt_in() || spells(name))
                .filter(|(_, _, p)| !backward || p.has_gradient())
                .map(|(_, _, p)| *p)
                .collect()
        } else {
            self.lookup
                .get(&(target.to_string(), kind))
                .copied()
                .into_iter()
                .collect()
        };
        if backward && points.iter().any(|p| !p.has_gradient()) {
            return Err(Error::NoGradientAt {
                hook: target.to_string(),
            });
        }
        if points.is_empty() {
            let candidates = self
                .names
                .iter()
                .filter(|(_, k, _)| *k == kind)
                .map(|(n, _, _)| n.as_str());
            return Err(Error::UnknownHookPoint {
                name: target.to_string(),
                kind: kind.describe(),
                suggestions: nearest(target, candidates, 3),
            });
        }
        points.sort_by_key(|&p| self.points.index(p));
        points.dedup();
        Ok(points)
    }

    /// Checks that a pass of `scope` computes the points `target` names exactly (a
    /// pattern may match points it does not compute: it skips them); else the error a
    /// pass with that hook would raise, before any weight is read.
    pub fn check_in_scope(&self, target: &str, kind: HookKind, scope: PassScope) -> Result<()> {
        let Some((computed, why)) = scope_limits(scope, self.n_layers()) else {
            return Ok(());
        };
        if is_glob(target) {
            return Ok(());
        }
        match self
            .resolve(target, kind)?
            .into_iter()
            .find(|&p| !computed(p))
        {
            Some(point) => Err(Error::PointNotInPass {
                point: point.to_string(),
                why,
            }),
            None => Ok(()),
        }
    }

    /// The module aliases of `point`, with their kinds.
    pub fn aliases_of(&self, point: HookPoint) -> impl Iterator<Item = (&str, HookKind)> {
        let own = point.to_string();
        self.names
            .iter()
            .filter(move |(name, _, p)| *p == point && *name != own)
            .map(|(name, kind, _)| (name.as_str(), *kind))
    }
}

/// Which points a pass of `scope` computes, and why it lacks the others; `None` when
/// it computes every point.
#[allow(clippy::type_complexity)]
pub(crate) fn scope_limits(
    scope: PassScope,
    n_layers: usize,
) -> Option<(Box<dyn Fn(HookPoint) -> bool>, String)> {
    let before = |n: usize| {
        move |p: HookPoint| match p {
            HookPoint::Tokens | HookPoint::Embed => true,
            HookPoint::Block { layer, .. } | HookPoint::Sae { layer, .. } => layer < n,
            _ => false,
        }
    };
    match (scope.stop_at_layer, scope.logits) {
        (Some(n), _) => Some((
            Box::new(before(n)),
            format!("the pass stops at layer {n} of {n_layers} (--stop-at-layer)"),
        )),
        (None, Logits::All) => None,
        (None, logits) => Some((
            Box::new(|p| p != HookPoint::UnembedOut),
            match logits {
                Logits::Last => "the pass gathers only the last position's logits (--logits last)",
                _ => "the pass gathers no logits (--logits none)",
            }
            .to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::point::tests::points;

    fn catalog() -> HookCatalog {
        HookCatalog::new(points(4))
    }

    #[test]
    fn globs_match_in_forward_order_without_repeats() {
        let resolved = catalog()
            .resolve("blocks.*.hook_resid_post", HookKind::Forward)
            .unwrap();
        let names: Vec<String> = resolved.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            names,
            (0..4)
                .map(|i| format!("blocks.{i}.hook_resid_post"))
                .collect::<Vec<_>>()
        );
        let everything = catalog().resolve("*", HookKind::Forward).unwrap();
        assert_eq!(
            everything.len(),
            points(4).count() - 4 * 4,
            "all but the opt-in"
        );
    }

    #[test]
    fn opt_in_points_are_matched_only_by_patterns_that_spell_them() {
        let c = catalog();
        let count = |pattern| c.resolve(pattern, HookKind::Forward).map(|p| p.len());
        assert_eq!(count("blocks.*.attn.hook_result").unwrap(), 4);
        assert!(
            count("blocks.1.hook_?_input").is_err(),
            "? does not spell q"
        );
        assert_eq!(count("*hook_q_input").unwrap(), 4);
        assert_eq!(count("blocks.3.*").unwrap(), 21);
        assert!(
            count("blocks.3.attn.hook_re*").is_err(),
            "hook_re* does not spell it"
        );
        assert_eq!(count("blocks.0.attn.hook_result").unwrap(), 1);
    }

    #[test]
    fn backward_hooks_skip_the_token_ids_and_refuse_them_by_name() {
        let c = catalog();
        let grads = c.resolve("*", HookKind::Backward).unwrap();
        assert_eq!(grads.len(), points(4).count() - 4 * 4 - 1);
        let err = c.resolve("hook_tokens", HookKind::Backward).unwrap_err();
        assert!(matches!(err, Error::NoGradientAt { .. }), "{err:?}");
    }

    #[test]
    fn unknown_names_suggest_the_nearest() {
        let err = catalog()
            .resolve("blocks.1.hook_resid_pots", HookKind::Forward)
            .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("blocks.1.hook_resid_post"), "{message}");
    }

    #[test]
    fn forward_pre_targets_modules_not_hook_points() {
        assert!(
            catalog()
                .resolve("blocks.1.hook_resid_pre", HookKind::ForwardPre)
                .is_err()
        );
    }

    #[test]
    fn a_glob_that_matches_nothing_is_an_error() {
        assert!(
            catalog()
                .resolve("blocks.*.hook_nothing", HookKind::Forward)
                .is_err()
        );
    }
}
