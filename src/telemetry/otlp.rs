//! OTLP export of the pass spans (feature `otlp`): a batch exporter over gRPC or
//! protobuf over HTTP, configured by the standard OpenTelemetry variables.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

use super::{OtlpConfig, OtlpProtocol, Result, TelemetryError, env_var, first_set};

/// The process's exporting provider, for [`flush`].
static EXPORTING: std::sync::OnceLock<SdkTracerProvider> = std::sync::OnceLock::new();

/// Exports every finished span now.
pub(super) fn flush() {
    if let Some(provider) = EXPORTING.get()
        && let Err(e) = provider.force_flush()
    {
        tracing::warn!("exporting the finished traces failed: {e}");
    }
}

/// A running exporter; dropping it flushes every finished span.
pub(super) struct Exporter {
    provider: SdkTracerProvider,
    /// The runtime the gRPC exporter's connection runs on.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Exporter {
    /// A batch-exporting tracer provider for `config` (the endpoint and timeouts come
    /// from the standard variables, read by the exporter), and the runtime gRPC needs.
    pub(super) fn new(config: &OtlpConfig) -> Result<Self> {
        let failed = |e: &dyn std::fmt::Display| TelemetryError::Exporter(e.to_string());
        let (exporter, runtime) = match config.protocol {
            OtlpProtocol::Grpc => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("otlp-grpc")
                    .enable_all()
                    .build()
                    .map_err(|e| failed(&e))?;
                let _entered = runtime.enter();
                let exporter = SpanExporter::builder()
                    .with_tonic()
                    .build()
                    .map_err(|e| failed(&e))?;
                (exporter, Some(runtime))
            }
            OtlpProtocol::HttpProtobuf => {
                // reqwest's rustls needs a provider when the client feature built it.
                #[cfg(feature = "client")]
                crate::client::ring_provider();
                let exporter = SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .build()
                    .map_err(|e| failed(&e))?;
                (exporter, None)
            }
        };
        // Workers export their own spans: the process tells them apart in one trace.
        let pid = opentelemetry::KeyValue::new("process.pid", i64::from(std::process::id()));
        let mut resource = Resource::builder().with_attribute(pid);
        if first_set(&env_var, &["OTEL_SERVICE_NAME"]).is_none() {
            resource = resource.with_service_name("flexmodel");
        }
        let provider = SdkTracerProvider::builder()
            .with_resource(resource.build())
            .with_batch_exporter(exporter)
            .build();
        let _ = EXPORTING.set(provider.clone());
        Ok(Self { provider, runtime })
    }

    /// The tracing layer that hands spans to this exporter.
    pub(super) fn layer<S>(&self) -> impl Layer<S> + use<S>
    where
        S: Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("flexmodel"))
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!("exporting the last traces failed: {e}");
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// W3C trace context (`traceparent`, `tracestate`) between the driver and its workers.
pub(super) struct W3cPropagation;

impl flexmodel_actors::TracePropagation for W3cPropagation {
    fn inject(&self, span: &tracing::Span) -> Vec<(String, String)> {
        use opentelemetry::propagation::TextMapPropagator as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let mut carrier = std::collections::HashMap::new();
        TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
        carrier.into_iter().collect()
    }

    fn adopt(&self, span: &tracing::Span, context: &[(String, String)]) {
        use opentelemetry::propagation::TextMapPropagator as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let carrier: std::collections::HashMap<String, String> = context.iter().cloned().collect();
        let parent = TraceContextPropagator::new().extract(&carrier);
        // A span that is not exported (no OpenTelemetry layer) has no parent to set.
        let _ = span.set_parent(parent);
    }
}
