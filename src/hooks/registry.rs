//! Registered hooks, their handles and group tags, and which of them run in a pass.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::hooks::catalog::{HookCatalog, HookKind};
use crate::hooks::function::SharedEdit;
use crate::hooks::pattern::{glob_match, is_glob};
use crate::hooks::point::ModelPoints;
use crate::{Error, HookFunction, HookPoint, Result};

/// The group every hook belongs to; it cannot be removed.
pub const ALL: &str = "all";

/// Identifies one registered hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HookHandle(u64);

impl fmt::Display for HookHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hook #{}", self.0)
    }
}

/// Which registered hooks a tag or enable operation applies to.
#[derive(Debug, Clone)]
pub enum HookSelector {
    /// One hook.
    Handle(HookHandle),
    /// Every hook with a hook point whose name matches this glob.
    Pattern(String),
}

impl From<HookHandle> for HookSelector {
    fn from(h: HookHandle) -> Self {
        HookSelector::Handle(h)
    }
}

impl From<&str> for HookSelector {
    fn from(pattern: &str) -> Self {
        HookSelector::Pattern(pattern.to_string())
    }
}

/// Which groups run in a pass.
#[derive(Debug, Clone, Default)]
pub enum Groups {
    /// Every enabled hook (the implicit group `all`).
    #[default]
    All,
    /// Enabled hooks in at least one of these groups.
    Only(Vec<String>),
    /// Enabled hooks in none of these groups (the complement).
    Except(Vec<String>),
}

impl Groups {
    /// Only the hooks of `groups`.
    pub fn only<S: Into<String>>(groups: impl IntoIterator<Item = S>) -> Self {
        Groups::Only(groups.into_iter().map(Into::into).collect())
    }

    /// Every hook outside `groups`.
    pub fn except<S: Into<String>>(groups: impl IntoIterator<Item = S>) -> Self {
        Groups::Except(groups.into_iter().map(Into::into).collect())
    }
}

/// One registration.
pub(crate) struct Entry {
    pub(crate) handle: HookHandle,
    pub(crate) kind: HookKind,
    pub(crate) points: Vec<HookPoint>,
    pub(crate) edit: Option<SharedEdit>,
    pub(crate) capture: bool,
    /// Whether the target named a point exactly (not a pattern).
    exact: bool,
    tags: BTreeSet<String>,
    enabled: bool,
}

/// The hooks registered with a model.
pub struct HookRegistry {
    catalog: HookCatalog,
    entries: Vec<Entry>,
    /// Group names ever used (tags, created groups), `all` included.
    groups: BTreeSet<String>,
    next_handle: u64,
}

/// For one pass: the indices of the entries that run at each hook point (by point
/// index), forward hooks and backward hooks apart.
pub(crate) struct PassPlan {
    pub(crate) by_point: Vec<Vec<usize>>,
    pub(crate) grad_by_point: Vec<Vec<usize>>,
}

impl PassPlan {
    /// This plan for a pass that computes only the points `computed` keeps: hooks
    /// registered by a pattern skip the others, and a hook registered by the exact name
    /// of one is an error saying `why` the pass lacks it.
    pub(crate) fn within(
        mut self,
        entries: &[Entry],
        points: &ModelPoints,
        computed: impl Fn(HookPoint) -> bool,
        why: &str,
    ) -> Result<Self> {
        for point in points.all() {
            if computed(point) {
                continue;
            }
            let i = points.index(point);
            for table in [&mut self.by_point, &mut self.grad_by_point] {
                if table[i].iter().any(|&e| entries[e].exact) {
                    return Err(Error::PointNotInPass {
                        point: point.to_string(),
                        why: why.to_string(),
                    });
                }
                table[i].clear();
            }
        }
        Ok(self)
    }
}

impl HookRegistry {
    /// An empty registry for the model described by `catalog`.
    pub fn new(catalog: HookCatalog) -> Self {
        Self {
            catalog,
            entries: Vec::new(),
            groups: BTreeSet::from([ALL.to_string()]),
            next_handle: 0,
        }
    }

    /// The names hooks can target.
    pub fn catalog(&self) -> &HookCatalog {
        &self.catalog
    }

    /// Registers `hook` at every point its target matches; one handle for all of them.
    /// Its tags must be group names that can be joined (not empty, not `all`).
    pub fn register(&mut self, hook: HookFunction) -> Result<HookHandle> {
        for tag in &hook.tags {
            check_group_name(tag)?;
        }
        let points = self.catalog.resolve(&hook.target, hook.kind)?;
        let edit = hook.edit.map(|e| Arc::new(Mutex::new(e)));
        let exact = !is_glob(&hook.target);
        Ok(self.add_entry(points, hook.kind, edit, hook.capture, exact, &hook.tags))
    }

    /// Registers one hook per point `hook`'s target matches, each tagged `group` and
    /// sharing `hook`'s edit. A pattern that matches nothing is an error, never an empty group.
    pub fn create_hook_group(
        &mut self,
        group: &str,
        hook: HookFunction,
    ) -> Result<Vec<HookHandle>> {
        check_group_name(group)?;
        for tag in &hook.tags {
            check_group_name(tag)?;
        }
        let points = self.catalog.resolve(&hook.target, hook.kind)?;
        let edit = hook.edit.map(|e| Arc::new(Mutex::new(e)));
        let exact = !is_glob(&hook.target);
        let mut tags = hook.tags;
        tags.push(group.to_string());
        self.groups.insert(group.to_string());
        Ok(points
            .into_iter()
            .map(|p| self.add_entry(vec![p], hook.kind, edit.clone(), hook.capture, exact, &tags))
            .collect())
    }

    fn add_entry(
        &mut self,
        points: Vec<HookPoint>,
        kind: HookKind,
        edit: Option<SharedEdit>,
        capture: bool,
        exact: bool,
        tags: &[String],
    ) -> HookHandle {
        let handle = HookHandle(self.next_handle);
        self.next_handle += 1;
        let mut tag_set = BTreeSet::from([ALL.to_string()]);
        tag_set.extend(tags.iter().cloned());
        self.groups.extend(tags.iter().cloned());
        self.entries.push(Entry {
            handle,
            kind,
            points,
            edit,
            capture,
            exact,
            tags: tag_set,
            enabled: true,
        });
        handle
    }

    /// Removes one hook.
    pub fn remove(&mut self, handle: HookHandle) -> Result<()> {
        let i = self.position(handle)?;
        self.entries.remove(i);
        Ok(())
    }

    /// Removes every hook (group names stay known).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The number of registered hooks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no hook is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The hook points of a registered hook.
    pub fn points(&self, handle: HookHandle) -> Result<&[HookPoint]> {
        Ok(&self.entries[self.position(handle)?].points)
    }

    /// The groups of a registered hook, `all` included.
    pub fn tags(&self, handle: HookHandle) -> Result<impl Iterator<Item = &str>> {
        Ok(self.entries[self.position(handle)?]
            .tags
            .iter()
            .map(String::as_str))
    }

    /// Every known group name, `all` included.
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        self.groups.iter().map(String::as_str)
    }

    /// Adds the selected hooks to `group`; returns how many hooks were selected.
    pub fn add_tag(&mut self, selector: impl Into<HookSelector>, group: &str) -> Result<usize> {
        check_group_name(group)?;
        let selected = self.select(&selector.into())?;
        for &i in &selected {
            self.entries[i].tags.insert(group.to_string());
        }
        self.groups.insert(group.to_string());
        Ok(selected.len())
    }

    /// Removes the selected hooks from `group` (never from `all`); returns how many
    /// hooks were selected.
    pub fn remove_tag(&mut self, selector: impl Into<HookSelector>, group: &str) -> Result<usize> {
        if group == ALL {
            return Err(Error::ImplicitGroup);
        }
        self.check_known(group)?;
        let selected = self.select(&selector.into())?;
        for &i in &selected {
            self.entries[i].tags.remove(group);
        }
        Ok(selected.len())
    }

    /// Enables or disables the selected hooks (a disabled hook never runs); returns how
    /// many hooks were selected.
    pub fn set_enabled(
        &mut self,
        selector: impl Into<HookSelector>,
        enabled: bool,
    ) -> Result<usize> {
        let selected = self.select(&selector.into())?;
        for &i in &selected {
            self.entries[i].enabled = enabled;
        }
        Ok(selected.len())
    }

    /// Enables or disables every hook of `group`; returns how many there are.
    pub fn set_group_enabled(&mut self, group: &str, enabled: bool) -> Result<usize> {
        self.check_known(group)?;
        let mut n = 0;
        for e in self.entries.iter_mut().filter(|e| e.tags.contains(group)) {
            e.enabled = enabled;
            n += 1;
        }
        Ok(n)
    }

    /// Which entries run at each hook point in a pass that runs `groups`.
    pub(crate) fn plan(&self, groups: &Groups) -> Result<PassPlan> {
        let wanted = |e: &Entry| -> bool {
            match groups {
                Groups::All => true,
                Groups::Only(g) => g.iter().any(|g| e.tags.contains(g)),
                Groups::Except(g) => !g.iter().any(|g| e.tags.contains(g)),
            }
        };
        if let Groups::Only(g) | Groups::Except(g) = groups {
            for name in g {
                self.check_known(name)?;
            }
        }
        let points = self.catalog.points();
        let mut by_point = vec![Vec::new(); points.count()];
        let mut grad_by_point = by_point.clone();
        for (i, entry) in self.entries.iter().enumerate() {
            if entry.enabled && wanted(entry) {
                let table = match entry.kind {
                    HookKind::Backward => &mut grad_by_point,
                    HookKind::Forward | HookKind::ForwardPre => &mut by_point,
                };
                for p in &entry.points {
                    table[points.index(*p)].push(i);
                }
            }
        }
        Ok(PassPlan {
            by_point,
            grad_by_point,
        })
    }

    pub(crate) fn entries(&self) -> &[Entry] {
        &self.entries
    }

    fn position(&self, handle: HookHandle) -> Result<usize> {
        self.entries
            .iter()
            .position(|e| e.handle == handle)
            .ok_or(Error::UnknownHandle(handle))
    }

    fn check_known(&self, group: &str) -> Result<()> {
        if self.groups.contains(group) {
            return Ok(());
        }
        Err(Error::UnknownGroup {
            name: group.to_string(),
            known: self.groups.iter().cloned().collect(),
        })
    }

    /// The entry indices `selector` picks; a pattern must pick at least one.
    fn select(&self, selector: &HookSelector) -> Result<Vec<usize>> {
        match selector {
            HookSelector::Handle(h) => Ok(vec![self.position(*h)?]),
            HookSelector::Pattern(pattern) => {
                let picked: Vec<usize> = (0..self.entries.len())
                    .filter(|&i| {
                        let points = &self.entries[i].points;
                        points.iter().any(|p| glob_match(pattern, &p.to_string()))
                    })
                    .collect();
                if picked.is_empty() {
                    return Err(Error::NoHookMatches(pattern.clone()));
                }
                Ok(picked)
            }
        }
    }
}

fn check_group_name(group: &str) -> Result<()> {
    if group.is_empty() {
        return Err(Error::EmptyGroupName);
    }
    if group == ALL {
        return Err(Error::ImplicitGroup);
    }
    Ok(())
}
