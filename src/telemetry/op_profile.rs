//! Where a pass's time goes: a tracing layer that sums the model's `op` spans by kind.
//!
//! The model opens an [`op_span!`](crate::op_span) around each part of its computation
//! (the matrix products, attention, the norms, …). The spans are at TRACE level under
//! the target `flexmodel::op`, so unless an [`OpProfile`] is installed they are
//! disabled and cost one check each.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// The tracing target of the model's op spans.
pub const OP_TARGET: &str = "flexmodel::op";

/// Every kind of op span the model opens, in the order of a block.
pub const OP_KINDS: [&str; 10] = [
    "embed",
    "norm",
    "matmul",
    "rope",
    "layout",
    "attention",
    "activation",
    "residual",
    "collective",
    "hooks",
];

/// Opens a span timing one kind of the model's computation (one of
/// [`OP_KINDS`](crate::telemetry::OP_KINDS)) until the returned guard drops.
#[macro_export]
macro_rules! op_span {
    ($kind:literal) => {
        ::tracing::trace_span!(target: "flexmodel::op", "op", kind = $kind).entered()
    };
}

/// The sums of one kind of op.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpTotals {
    /// How many spans ended.
    pub calls: u64,
    /// Their summed wall time, less that of op spans opened inside them.
    pub time: Duration,
}

type Totals = BTreeMap<String, OpTotals>;

/// A [`Layer`] that sums the wall time of every `op` span by its `kind`, each span's own
/// time only (an op span inside another counts once, for the inner kind). Spans on
/// several threads (shards of one process) add up. Clones share the sums.
#[derive(Debug, Clone, Default)]
pub struct OpProfile {
    totals: Arc<Mutex<Totals>>,
}

/// What the layer keeps in an open span.
struct OpenOp {
    kind: String,
    start: Instant,
    /// The time of the op spans that ended inside this one.
    inner: Duration,
}

/// Reads `kind`.
#[derive(Default)]
struct KindField(Option<String>);

impl Visit for KindField {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "kind" {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "kind" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl OpProfile {
    /// An empty profile.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the sums so far, leaving the profile empty.
    pub fn take(&self) -> BTreeMap<String, OpTotals> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Totals> {
        // A poisoned lock only means a panic elsewhere; the sums stay consistent.
        self.totals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<S> Layer<S> for OpProfile
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().target() != OP_TARGET {
            return;
        }
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut kind = KindField::default();
        attrs.record(&mut kind);
        span.extensions_mut().insert(OpenOp {
            kind: kind.0.unwrap_or_default(),
            start: Instant::now(),
            inner: Duration::ZERO,
        });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let Some(open) = span.extensions_mut().remove::<OpenOp>() else {
            return;
        };
        let elapsed = open.start.elapsed();
        if let Some(parent) = span.parent()
            && let Some(outer) = parent.extensions_mut().get_mut::<OpenOp>()
        {
            outer.inner += elapsed;
        }
        let mut totals = self.lock();
        let entry = totals.entry(open.kind).or_default();
        entry.calls += 1;
        entry.time += elapsed.saturating_sub(open.inner);
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn op_spans_are_summed_by_kind_with_inner_spans_counted_once() {
        let profile = OpProfile::new();
        let subscriber = tracing_subscriber::registry().with(profile.clone());
        let wait = Duration::from_millis(20);
        let outer = tracing::subscriber::with_default(subscriber, || {
            for _ in 0..2 {
                let _matmul = crate::op_span!("matmul");
            }
            let _other = tracing::trace_span!("forward").entered();
            let start = Instant::now();
            {
                let _attention = crate::op_span!("attention");
                std::thread::sleep(wait);
                let _collective = crate::op_span!("collective");
                std::thread::sleep(wait);
            }
            start.elapsed()
        });
        let totals = profile.take();
        assert_eq!(
            totals.keys().collect::<Vec<_>>(),
            ["attention", "collective", "matmul"]
        );
        assert_eq!(totals["matmul"].calls, 2);
        let (attention, collective) = (totals["attention"].time, totals["collective"].time);
        assert!(attention >= wait && collective >= wait);
        // The attention span lasted both waits; its own time is only the first.
        assert!(
            attention + collective <= outer,
            "{attention:?} + {collective:?} > {outer:?}"
        );
        assert!(profile.take().is_empty());
    }
}
