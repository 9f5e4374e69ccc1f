//! Traces reach a real OTLP receiver running in the test, over gRPC and over
//! HTTP/protobuf: `flexmodel capture` of a sharded model with an edit exports one trace
//! whose span tree is the pass, also when its ranks are worker processes or a job's
//! long-running workers, which export their spans themselves.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

use common::child::{OutputWithin, RUN_DEADLINE};
use flexmodel::tiny::tiny_checkpoint;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

/// A received span: its name, ids and attributes (values as text).
#[derive(Debug, Clone)]
struct ReceivedSpan {
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attributes: HashMap<String, String>,
    /// The `(trace id, span id)` of each span it links to.
    links: Vec<(Vec<u8>, Vec<u8>)>,
    /// The `process.pid` of the resource that exported it.
    pid: String,
}

/// Every span of `requests`, and the `service.name` of each resource.
fn spans_of(requests: &[ExportTraceServiceRequest]) -> (Vec<ReceivedSpan>, Vec<String>) {
    let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
        .as_ref()
        .and_then(|v| v.value.clone())
    {
        Some(Value::StringValue(s)) => s,
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    };
    let mut spans = Vec::new();
    let mut services = Vec::new();
    for resource_spans in requests.iter().flat_map(|r| &r.resource_spans) {
        let pid = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "process.pid")
            .map(|kv| text(&kv.value))
            .unwrap_or_default();
        if let Some(resource) = &resource_spans.resource {
            services.extend(
                resource
                    .attributes
                    .iter()
                    .filter(|kv| kv.key == "service.name")
                    .map(|kv| text(&kv.value)),
            );
        }
        for span in resource_spans.scope_spans.iter().flat_map(|s| &s.spans) {
            spans.push(ReceivedSpan {
                name: span.name.clone(),
                trace_id: span.trace_id.clone(),
                pid: pid.clone(),
                span_id: span.span_id.clone(),
                parent: span.parent_span_id.clone(),
                attributes: span
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), text(&kv.value)))
                    .collect(),
                links: span
                    .links
                    .iter()
                    .map(|l| (l.trace_id.clone(), l.span_id.clone()))
                    .collect(),
            });
        }
    }
    (spans, services)
}

/// Runs a capture of the tiny model under tp=2 × pp=2 with an edit, exporting to
/// `endpoint` over `protocol`; `extra` adds options.
fn capture_with_export(dir: &Path, endpoint: &str, protocol: &str, extra: &[&str]) {
    let model = dir.join("tiny");
    tiny_checkpoint(3).unwrap().save_hf_dir(&model).unwrap();
    let out = Command::new(common::flexmodel_binary())
        .args([
            "capture",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "hello world",
            "--hook",
            "blocks.1.hook_resid_post",
            "--edit",
            "blocks.0.attn.hook_z=zero-head:1",
            "--out",
            dir.join("out.safetensors").to_str().unwrap(),
            "--tp",
            "2",
            "--pp",
            "2",
        ])
        .args(extra)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        .env("OTEL_SERVICE_NAME", "flexmodel-test")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .output_within(RUN_DEADLINE);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Collects requests until none arrives for a while (the process has exited, so
/// everything was flushed before).
fn drain(requests: &Receiver<ExportTraceServiceRequest>) -> Vec<ExportTraceServiceRequest> {
    let mut all = Vec::new();
    while let Ok(request) = requests.recv_timeout(Duration::from_secs(2)) {
        all.push(request);
    }
    all
}

/// Checks the span tree of the capture: one trace, one root `forward`, a `shard.forward`
/// per rank under it, and the hook phases of the edited and the captured point.
fn assert_pass_tree(requests: &[ExportTraceServiceRequest]) {
    let (spans, services) = spans_of(requests);
    assert!(!spans.is_empty(), "no spans arrived");
    assert!(
        services.iter().all(|s| s == "flexmodel-test") && !services.is_empty(),
        "{services:?}"
    );
    let known = [
        "forward",
        "shard.forward",
        "hook.gather",
        "hook.edit",
        "hook.scatter",
        "hook.store",
    ];
    for span in &spans {
        assert!(
            known.contains(&span.name.as_str()),
            "unexpected span {}",
            span.name
        );
    }
    let roots: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 1, "roots: {roots:?}");
    let root = roots[0];
    assert_eq!(root.name, "forward");
    assert!(
        spans.iter().all(|s| s.trace_id == root.trace_id),
        "one trace"
    );
    let ids: Vec<&Vec<u8>> = spans.iter().map(|s| &s.span_id).collect();
    assert!(
        spans
            .iter()
            .all(|s| s.parent.is_empty() || ids.contains(&&s.parent)),
        "every parent is in the trace"
    );

    // One shard span per rank (tp=2 × pp=2), children of the root, with coordinates.
    let shards: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == "shard.forward").collect();
    assert_eq!(shards.len(), 4);
    let mut coords: Vec<(String, String, String, String)> = shards
        .iter()
        .map(|s| {
            assert_eq!(s.parent, root.span_id);
            let a = |k: &str| s.attributes.get(k).cloned().unwrap_or_default();
            (a("rank"), a("tp"), a("pp"), a("dp"))
        })
        .collect();
    coords.sort();
    let expected: Vec<(String, String, String, String)> =
        [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
            .iter()
            .map(|(r, tp, pp)| {
                (
                    r.to_string(),
                    tp.to_string(),
                    pp.to_string(),
                    "0".to_string(),
                )
            })
            .collect();
    assert_eq!(coords, expected);

    // The hook phases, in the driver, under the root, with name, call and bytes.
    let phase = |name: &str, hook: &str| -> Vec<&ReceivedSpan> {
        spans
            .iter()
            .filter(|s| {
                s.name == name && s.attributes.get("hook.name").map(String::as_str) == Some(hook)
            })
            .collect()
    };
    let z = "blocks.0.attn.hook_z";
    let resid = "blocks.1.hook_resid_post";
    // "hello world" is 11 byte tokens; z is [1, 11, 8, 8] f32, resid [1, 11, 64] f32.
    let z_bytes = (11 * 8 * 8 * 4).to_string();
    let resid_bytes = (11 * 64 * 4).to_string();
    for (name, hook, bytes) in [
        ("hook.gather", z, &z_bytes),
        ("hook.edit", z, &z_bytes),
        ("hook.scatter", z, &z_bytes),
        ("hook.gather", resid, &resid_bytes),
        ("hook.store", resid, &resid_bytes),
    ] {
        let found = phase(name, hook);
        assert_eq!(found.len(), 1, "{name} {hook}: {found:?}");
        let span = found[0];
        assert_eq!(span.parent, root.span_id, "{name} {hook}");
        assert_eq!(
            span.attributes.get("hook.call").map(String::as_str),
            Some("0")
        );
        assert_eq!(
            span.attributes.get("hook.bytes"),
            Some(bytes),
            "{name} {hook}"
        );
    }
    assert!(
        phase("hook.edit", resid).is_empty(),
        "the capture has no edit"
    );
}

/// The OTLP trace service, forwarding each request to a channel.
struct Collector(Sender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[test]
fn a_sharded_capture_with_an_edit_exports_its_span_tree_over_grpc() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (sender, requests) = channel();
    let incoming = runtime
        .block_on(async {
            tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
        })
        .unwrap();
    let address = incoming.local_addr().unwrap();
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(sender)))
            .serve_with_incoming(incoming),
    );
    let dir = tempfile::tempdir().unwrap();
    capture_with_export(dir.path(), &format!("http://{address}"), "grpc", &[]);
    assert_pass_tree(&drain(&requests));
}

/// Serves HTTP/1.1 on `listener`: each POST's path and protobuf body go to `sender`,
/// answered with an empty `ExportTraceServiceResponse`.
fn serve_http(listener: TcpListener, sender: Sender<(String, ExportTraceServiceRequest)>) {
    for stream in listener.incoming().flatten() {
        let sender = sender.clone();
        std::thread::spawn(move || {
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            loop {
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                    return;
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                let mut headers = BTreeMap::new();
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some((key, value)) = line.split_once(':') {
                        headers.insert(key.to_ascii_lowercase(), value.trim().to_string());
                    }
                }
                let length: usize = headers["content-length"].parse().unwrap();
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                assert_eq!(headers["content-type"], "application/x-protobuf");
                let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
                let _ = sender.send((path, request));
                let response = ExportTraceServiceResponse::default().encode_to_vec();
                write!(
                    writer,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
                    response.len()
                )
                .unwrap();
                writer.write_all(&response).unwrap();
            }
        });
    }
}

/// Runs the capture (with `extra` options) against an HTTP/protobuf receiver in this
/// process; returns what it received.
fn export_over_http(extra: &[&str]) -> Vec<ExportTraceServiceRequest> {
    export_over_http_with(extra, |_| {})
}

/// As [`export_over_http`], after `before` was given the receiver's endpoint (to start
/// processes that export to it too).
fn export_over_http_with(
    extra: &[&str],
    before: impl FnOnce(&str),
) -> Vec<ExportTraceServiceRequest> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (sender, received) = channel();
    std::thread::spawn(move || serve_http(listener, sender));
    before(&format!("http://{address}"));
    let dir = tempfile::tempdir().unwrap();
    capture_with_export(
        dir.path(),
        &format!("http://{address}"),
        "http/protobuf",
        extra,
    );
    let mut requests = Vec::new();
    while let Ok((path, request)) = received.recv_timeout(Duration::from_secs(2)) {
        assert_eq!(path, "/v1/traces");
        requests.push(request);
    }
    requests
}

#[test]
fn a_sharded_capture_with_an_edit_exports_its_span_tree_over_http_protobuf() {
    assert_pass_tree(&export_over_http(&[]));
}

#[test]
fn a_backward_pass_is_one_trace_rooted_at_backward_with_each_shards_two_halves() {
    let (spans, _) = spans_of(&export_over_http(&["--grad"]));
    let roots: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 1, "{roots:?}");
    assert_eq!(roots[0].name, "backward");
    assert!(spans.iter().all(|s| s.trace_id == roots[0].trace_id));
    for name in ["shard.forward", "shard.backward"] {
        let shards = spans.iter().filter(|s| s.name == name);
        assert_eq!(shards.clone().count(), 4, "{name}");
        assert!(
            shards.clone().all(|s| s.parent == roots[0].span_id),
            "{name}"
        );
    }
    // The gradient at the captured point is gathered and stored too.
    assert!(spans.iter().any(|s| s.name == "hook.store"
        && s.attributes.get("hook.name").map(String::as_str)
            == Some("blocks.1.hook_resid_post_grad")));
}

/// The root span of the pass, and the process ids that exported `shard.forward` spans.
fn root_and_shard_pids(
    spans: &[ReceivedSpan],
) -> (&ReceivedSpan, std::collections::BTreeSet<&str>) {
    let root = spans.iter().find(|s| s.parent.is_empty()).unwrap();
    let shard_pids = spans
        .iter()
        .filter(|s| s.name == "shard.forward")
        .map(|s| s.pid.as_str())
        .collect();
    (root, shard_pids)
}

#[test]
fn under_procs_one_pass_is_one_trace_with_shard_spans_from_every_worker_process() {
    let requests = export_over_http(&["--procs"]);
    assert_pass_tree(&requests);
    let (spans, _) = spans_of(&requests);
    let (root, shard_pids) = root_and_shard_pids(&spans);
    assert_eq!(shard_pids.len(), 4, "one process per rank: {shard_pids:?}");
    assert!(
        !shard_pids.contains(root.pid.as_str()) && !root.pid.is_empty(),
        "the driver {} exports the pass and its hook phases, the workers their shards",
        root.pid
    );
    for span in spans.iter().filter(|s| s.name.starts_with("hook.")) {
        assert_eq!(span.pid, root.pid, "{} runs in the driver", span.name);
    }
}

#[test]
fn under_a_job_one_pass_is_one_trace_with_shard_spans_from_every_long_running_worker() {
    let etcd = common::etcd::Etcd::start();
    let url = etcd.url("traces");
    let token = common::etcd::TokenFile::new("traces-secret");
    let mut workers = Vec::new();
    let requests = export_over_http_with(
        &[
            "--cluster",
            &url.to_string(),
            "--token-file",
            token.path.to_str().unwrap(),
        ],
        |endpoint| {
            for _ in 0..4 {
                let mut command =
                    common::etcd::JobWorker::command(&url, Some(&token.path), "127.0.0.1:0");
                command
                    .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
                    .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
                    .env("OTEL_SERVICE_NAME", "flexmodel-test")
                    // Workers live on: they export as they go, not when they exit.
                    .env("OTEL_BSP_SCHEDULE_DELAY", "100");
                workers.push(common::etcd::JobWorker::spawn(&mut command));
            }
            common::etcd::wait_for_members(&url, 4);
        },
    );
    assert_pass_tree(&requests);
    let (spans, _) = spans_of(&requests);
    let (root, shard_pids) = root_and_shard_pids(&spans);
    let worker_pids: std::collections::BTreeSet<String> =
        workers.iter().map(|w| w.pid().to_string()).collect();
    assert_eq!(
        shard_pids
            .iter()
            .map(|p| p.to_string())
            .collect::<std::collections::BTreeSet<_>>(),
        worker_pids
    );
    assert!(!shard_pids.contains(root.pid.as_str()));
}

#[test]
fn a_served_request_is_a_trace_of_its_own_linked_both_ways_to_the_pass_it_shared() {
    use flexmodel::api::ForwardRequest;
    use flexmodel::client::Client;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (sender, received) = channel();
    std::thread::spawn(move || serve_http(listener, sender));
    let dir = tempfile::tempdir().unwrap();
    tiny_checkpoint(4).unwrap().save_hf_dir(dir.path()).unwrap();
    let tokens = common::etcd::TokenFile::new("kim-secret\n");
    let endpoint = format!("http://{address}");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
    ];
    let options = ["--batch-window-ms", "1500", "--tp", "2"];
    let server = common::serve::Server::start_with_env(dir.path(), &tokens.path, &options, &env);
    let request = ForwardRequest::tokens([vec![1, 2, 3]]).hook("blocks.0.hook_resid_post");
    std::thread::scope(|s| {
        for _ in 0..2 {
            let client = Client::new(&server.url, "kim-secret").unwrap();
            let request = request.clone();
            s.spawn(move || client.forward(&request).unwrap());
        }
    });
    server.terminate();
    let mut requests = Vec::new();
    while let Ok((_, request)) = received.recv_timeout(Duration::from_secs(2)) {
        requests.push(request);
    }
    let (spans, _) = spans_of(&requests);
    let named =
        |name: &str| -> Vec<&ReceivedSpan> { spans.iter().filter(|s| s.name == name).collect() };
    let (served, passes) = (named("serve.request"), named("serve.pass"));
    assert_eq!(served.len(), 2, "{spans:#?}");
    assert_eq!(passes.len(), 1, "one pass for both");
    let pass = passes[0];
    assert_ne!(
        served[0].trace_id, served[1].trace_id,
        "a trace per request"
    );
    for request in &served {
        assert!(request.parent.is_empty(), "a request is its trace's root");
        assert_ne!(request.trace_id, pass.trace_id);
        assert!(
            pass.links
                .contains(&(request.trace_id.clone(), request.span_id.clone()))
        );
        assert_eq!(
            request.links,
            [(pass.trace_id.clone(), pass.span_id.clone())]
        );
        assert_eq!(
            request.attributes.get("serve.endpoint").map(String::as_str),
            Some("/v1/forward")
        );
    }
    // The model's pass runs in the pass's trace, under it.
    let forward = named("forward");
    assert_eq!(forward.len(), 1, "{forward:#?}");
    assert_eq!(forward[0].trace_id, pass.trace_id);
    assert_eq!(forward[0].parent, pass.span_id);
}
