//! Logs and traces. Every pass is one trace: a root span `forward` (or `backward` for a
//! forward and backward pass), a `shard.forward` / `shard.backward` span per shard with
//! its rank and tp/pp/dp coordinates, and for each hook call `hook.gather`, `hook.edit`,
//! `hook.scatter` and `hook.store` with `hook.name`, `hook.call` and `hook.bytes`.
//!
//! With the model in one shard (no shard actors), the hook spans run inside that shard's
//! `shard.forward` span; sharded, they run in the driver, directly under the pass's span.
//!
//! [`init`] installs the process's subscriber: logs on stderr, plus an OTLP exporter when
//! the standard variables ask for one (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_EXPORTER_OTLP_PROTOCOL` = `grpc` or
//! `http/protobuf`, the default; `OTEL_SERVICE_NAME`, default `flexmodel`), and a
//! [`Profile`] (per hook point, [`HookProfile`]; per kind of op, [`OpProfile`]) when asked
//! for one.

mod op_profile;
#[cfg(feature = "otlp")]
mod otlp;
mod profile;

pub use op_profile::{OP_KINDS, OP_TARGET, OpProfile, OpTotals};
pub use profile::{HookPhase, HookProfile, PhaseTotals};

use tracing::level_filters::LevelFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Why logs or trace export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An OpenTelemetry variable has a value FlexModel-rs does not support.
    #[error("{variable}={value:?} is not supported: use `grpc` or `http/protobuf`")]
    UnsupportedProtocol {
        /// The variable.
        variable: String,
        /// Its value.
        value: String,
    },
    /// Another tracing subscriber was installed first (by the program or a library).
    #[error("a tracing subscriber is already set: {0}")]
    SubscriberAlreadySet(String),
    /// The OTLP exporter could not be built (its runtime or its client).
    #[error("the OTLP trace exporter cannot be built: {0}")]
    Exporter(String),
}

/// Result of the telemetry setup.
pub type Result<T> = std::result::Result<T, TelemetryError>;

/// The transport of the OTLP exporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// gRPC (port 4317 by convention).
    Grpc,
    /// Protobuf over HTTP (port 4318, path `/v1/traces`).
    HttpProtobuf,
}

/// Whether and how to export traces, from the standard OpenTelemetry variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The transport.
    pub protocol: OtlpProtocol,
}

/// The first non-empty value among the variables `names`, with its variable.
pub(crate) fn first_set(
    var: &impl Fn(&str) -> Option<String>,
    names: &[&str],
) -> Option<(String, String)> {
    names.iter().find_map(|name| {
        var(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .map(|v| (name.to_string(), v))
    })
}

/// The process environment's value of `name`.
pub(crate) fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl OtlpConfig {
    /// From the process environment: see [`OtlpConfig::from_vars`].
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(env_var)
    }

    /// `None` unless `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// is set (and neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`); the
    /// protocol is `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL`,
    /// `http/protobuf` by default, and any value but `grpc` and `http/protobuf` is an
    /// error. `var` looks a variable up.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let is = |name: &str, value: &str| {
            first_set(&var, &[name]).is_some_and(|(_, v)| v.eq_ignore_ascii_case(value))
        };
        let disabled = is("OTEL_SDK_DISABLED", "true") || is("OTEL_TRACES_EXPORTER", "none");
        let endpoint = first_set(
            &var,
            &[
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ],
        );
        if disabled || endpoint.is_none() {
            return Ok(None);
        }
        let protocol = match first_set(
            &var,
            &[
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ],
        ) {
            None => OtlpProtocol::HttpProtobuf,
            Some((_, v)) if v == "http/protobuf" => OtlpProtocol::HttpProtobuf,
            Some((_, v)) if v == "grpc" => OtlpProtocol::Grpc,
            Some((variable, value)) => {
                return Err(TelemetryError::UnsupportedProtocol { variable, value });
            }
        };
        Ok(Some(Self { protocol }))
    }
}

/// The installed subscriber's exporter; dropping it flushes every finished span.
#[must_use = "dropping the guard flushes and stops the exporter"]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    _exporter: Option<otlp::Exporter>,
}

/// Where the time of passes goes: the hook spans per hook point and the model's op spans
/// per kind. Clones share the sums.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    /// The `hook.*` spans.
    pub hooks: HookProfile,
    /// The `op` spans.
    pub ops: OpProfile,
}

/// Installs the global subscriber: logs filtered by `logs` on stderr, the OTLP exporter
/// if [`OtlpConfig::from_env`] asks for one (only FlexModel's own spans are exported, not
/// those of the exporter's network stack, nor the model's TRACE-level op spans), and
/// `profile` if given.
///
/// Without the `otlp` feature nothing is exported, and a variable asking for export is
/// answered with a warning.
pub fn init(logs: EnvFilter, profile: Option<Profile>) -> Result<Telemetry> {
    let config = OtlpConfig::from_env()?;
    let ours = Targets::new()
        .with_target("flexmodel", LevelFilter::INFO)
        .with_target("flexmodel_actors", LevelFilter::INFO)
        .with_target("flexmodel_cluster", LevelFilter::INFO);
    #[cfg(feature = "otlp")]
    let exporter = config.as_ref().map(otlp::Exporter::new).transpose()?;
    #[cfg(feature = "otlp")]
    let otel = exporter
        .as_ref()
        .map(|exporter| exporter.layer().with_filter(ours.clone()));
    #[cfg(not(feature = "otlp"))]
    let otel: Option<tracing_subscriber::layer::Identity> = None;
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .without_time()
        .with_filter(logs);
    let (hooks, ops) = match profile {
        Some(Profile { hooks, ops }) => (Some(hooks), Some(ops)),
        None => (None, None),
    };
    let op_spans = Targets::new().with_target(OP_TARGET, LevelFilter::TRACE);
    tracing_subscriber::registry()
        .with(logs)
        .with(otel)
        .with(hooks.map(|p| p.with_filter(ours)))
        .with(ops.map(|p| p.with_filter(op_spans)))
        .try_init()
        .map_err(|e| TelemetryError::SubscriberAlreadySet(e.to_string()))?;
    match config {
        Some(config) if cfg!(feature = "otlp") => {
            tracing::info!("exporting traces over OTLP ({:?})", config.protocol);
        }
        Some(_) => tracing::warn!(
            "an OTLP endpoint is set, but this build of flexmodel has no trace export (feature `otlp`)"
        ),
        None => {}
    }
    Ok(Telemetry {
        #[cfg(feature = "otlp")]
        _exporter: exporter,
    })
}

/// Exports every finished span now: for an exit that skips destructors (on a signal),
/// which would lose the spans the batch exporter holds.
pub fn flush() {
    #[cfg(feature = "otlp")]
    otlp::flush();
}

/// How a pass's trace context travels to worker processes, so that their spans join
/// the driver's trace: W3C trace context with the `otlp` feature, nothing without.
pub fn propagation() -> Option<std::sync::Arc<dyn flexmodel_actors::TracePropagation>> {
    #[cfg(feature = "otlp")]
    return Some(std::sync::Arc::new(otlp::W3cPropagation));
    #[cfg(not(feature = "otlp"))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Option<OtlpConfig>> {
        OtlpConfig::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint() {
        assert_eq!(config(&[]).unwrap(), None);
        assert_eq!(
            config(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap(),
            None
        );
        assert_eq!(
            config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]).unwrap(),
            None
        );
        let disabled = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ];
        assert_eq!(config(&disabled).unwrap(), None);
    }

    #[test]
    fn the_protocol_defaults_to_http_protobuf_and_the_traces_variables_win() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318");
        let protocol = |vars: &[(&str, &str)]| config(vars).unwrap().unwrap().protocol;
        assert_eq!(protocol(&[endpoint]), OtlpProtocol::HttpProtobuf);
        let grpc = ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
        assert_eq!(protocol(&[endpoint, grpc]), OtlpProtocol::Grpc);
        let traces = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf");
        assert_eq!(
            protocol(&[endpoint, grpc, traces]),
            OtlpProtocol::HttpProtobuf
        );
        let traces_endpoint = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://h:4317");
        assert_eq!(protocol(&[traces_endpoint, grpc]), OtlpProtocol::Grpc);
    }

    #[test]
    fn an_unsupported_protocol_is_an_error_naming_the_variable() {
        let error = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"http/json\""),
            "{error}"
        );
    }
}
