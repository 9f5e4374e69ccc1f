//! How a pass's trace context crosses from the driver to its worker processes, so that
//! the spans of every process join one trace.

use std::sync::Arc;

/// Writes a span's trace context as text fields (W3C `traceparent`, say) and makes such
/// fields, read in another process, the parent of a span there. The program provides
/// it (the runtime knows nothing of the exporter).
pub trait TracePropagation: Send + Sync {
    /// The trace context of `span`, as fields for the wire (none if it has none).
    fn inject(&self, span: &tracing::Span) -> Vec<(String, String)>;

    /// Makes `context` (from [`inject`](Self::inject) in another process) the parent
    /// of `span`, which was just created.
    fn adopt(&self, span: &tracing::Span, context: &[(String, String)]);
}

/// The parent, in another process, of a shard's spans.
#[derive(Clone)]
pub(crate) struct RemoteParent {
    pub(crate) propagation: Arc<dyn TracePropagation>,
    pub(crate) context: Vec<(String, String)>,
}

impl RemoteParent {
    /// Makes the remote parent the parent of `span`.
    pub(crate) fn adopt(&self, span: &tracing::Span) {
        self.propagation.adopt(span, &self.context);
    }
}
