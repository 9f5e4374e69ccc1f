//! Where hook time goes: a tracing layer that sums the `hook.*` spans per hook point.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// One phase of a hook call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HookPhase {
    /// Joining the shards' pieces into the full tensor (`hook.gather`).
    Gather,
    /// Running the edits (`hook.edit`).
    Edit,
    /// Splitting the edited tensor and sending the pieces back (`hook.scatter`).
    Scatter,
    /// Keeping the captured value in the activation store (`hook.store`).
    Store,
}

impl HookPhase {
    /// Every phase, in the order of a hook call.
    pub const ALL: [HookPhase; 4] = [Self::Gather, Self::Edit, Self::Scatter, Self::Store];

    fn of_span(name: &str) -> Option<Self> {
        match name {
            "hook.gather" => Some(Self::Gather),
            "hook.edit" => Some(Self::Edit),
            "hook.scatter" => Some(Self::Scatter),
            "hook.store" => Some(Self::Store),
            _ => None,
        }
    }

    /// The span's name without the `hook.` prefix.
    pub fn label(self) -> &'static str {
        match self {
            Self::Gather => "gather",
            Self::Edit => "edit",
            Self::Scatter => "scatter",
            Self::Store => "store",
        }
    }
}

/// The sums of one phase at one hook point.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTotals {
    /// How many spans ended.
    pub calls: u64,
    /// Their summed wall time.
    pub time: Duration,
    /// Their summed `hook.bytes`.
    pub bytes: u64,
}

type Totals = BTreeMap<(String, HookPhase), PhaseTotals>;

/// A [`Layer`] that sums the wall time and bytes of every `hook.*` span by hook point and
/// phase. Clones share the sums.
#[derive(Debug, Clone, Default)]
pub struct HookProfile {
    totals: Arc<Mutex<Totals>>,
}

/// What the layer keeps in an open span.
struct OpenHookSpan {
    phase: HookPhase,
    hook: String,
    bytes: u64,
    start: Instant,
}

/// Reads `hook.name` and `hook.bytes`.
#[derive(Default)]
struct HookFields {
    hook: Option<String>,
    bytes: Option<u64>,
}

impl Visit for HookFields {
    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "hook.bytes" {
            self.bytes = Some(value.max(0) as u64);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "hook.bytes" {
            self.bytes = Some(value);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "hook.name" {
            self.hook = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "hook.name" {
            self.hook = Some(format!("{value:?}"));
        }
    }
}

impl HookProfile {
    /// An empty profile.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the sums so far, leaving the profile empty.
    pub fn take(&self) -> BTreeMap<(String, HookPhase), PhaseTotals> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Totals> {
        // A poisoned lock only means a panic elsewhere; the sums stay consistent.
        self.totals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<S> Layer<S> for HookProfile
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(phase) = HookPhase::of_span(attrs.metadata().name()) else {
            return;
        };
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut fields = HookFields::default();
        attrs.record(&mut fields);
        span.extensions_mut().insert(OpenHookSpan {
            phase,
            hook: fields.hook.unwrap_or_default(),
            bytes: fields.bytes.unwrap_or(0),
            start: Instant::now(),
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut fields = HookFields::default();
        values.record(&mut fields);
        if let (Some(open), Some(bytes)) = (
            span.extensions_mut().get_mut::<OpenHookSpan>(),
            fields.bytes,
        ) {
            open.bytes = bytes;
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let Some(open) = span.extensions_mut().remove::<OpenHookSpan>() else {
            return;
        };
        let elapsed = open.start.elapsed();
        let mut totals = self.lock();
        let entry = totals.entry((open.hook, open.phase)).or_default();
        entry.calls += 1;
        entry.time += elapsed;
        entry.bytes += open.bytes;
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn hook_spans_are_summed_by_point_and_phase_and_others_ignored() {
        let profile = HookProfile::new();
        let subscriber = tracing_subscriber::registry().with(profile.clone());
        tracing::subscriber::with_default(subscriber, || {
            for call in 0..3i64 {
                let _s = tracing::info_span!(
                    "hook.store",
                    hook.name = "a",
                    hook.call = call,
                    hook.bytes = 10i64
                )
                .entered();
            }
            let scatter = tracing::info_span!(
                "hook.scatter",
                hook.name = "b",
                hook.call = 0i64,
                hook.bytes = tracing::field::Empty
            );
            scatter.record("hook.bytes", 7i64);
            drop(scatter);
            let _other = tracing::info_span!("forward").entered();
        });
        let totals = profile.take();
        assert_eq!(totals.len(), 2);
        let store = totals[&("a".to_string(), HookPhase::Store)];
        assert_eq!((store.calls, store.bytes), (3, 30));
        let scatter = totals[&("b".to_string(), HookPhase::Scatter)];
        assert_eq!((scatter.calls, scatter.bytes), (1, 7));
        assert!(profile.take().is_empty());
    }
}
