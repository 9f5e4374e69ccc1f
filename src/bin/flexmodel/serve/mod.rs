//! `flexmodel serve`: a long-running driver that holds the model's ranks and answers HTTP
//! requests of authenticated clients (axum on tokio). Forward requests that arrive
//! within a short window run as one batch, each with only its own hooks and edits.

mod batching;
mod clients;
mod generation;
mod passes;
mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response, sse};
use axum::routing::{delete, get, post};
use clap::Args;
use flexmodel::api::{ErrorBody, ForwardRequest, GenerateRequest, Health, NamedEdits};
use flexmodel::edits::EditSpec;
use flexmodel::{Checkpoint, HookCatalog, HookKind, Tokenizer};
use tokio::sync::oneshot;

use crate::layout::{LayoutArgs, Plan};
use batching::Prepared;
use clients::ClientTokens;
use passes::{Batching, Failure, Job, ModelSource, Queue, Refused, Work};

/// Options of `flexmodel serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// `smollm2`, `gemma3-270m`, a .gguf file or a Hugging Face model directory.
    #[arg(long)]
    model: String,
    /// The address to listen on (`127.0.0.1:8080`; port 0 takes a free one). The
    /// address listened on is the first line printed.
    #[arg(long)]
    listen: SocketAddr,
    /// Serve HTTPS with this certificate chain (PEM, the server's certificate first).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// How long a forward request waits for others to share its pass, in milliseconds.
    #[arg(long, default_value_t = 5)]
    batch_window_ms: u64,
    /// The most tokens (sequences × padded length) one pass runs; a request of more is
    /// refused (400).
    #[arg(long, default_value_t = 16384)]
    max_batch_tokens: usize,
    /// The most requests waiting for a pass; more are turned away (429, `Retry-After`).
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    #[command(flatten)]
    layout: LayoutArgs,
}

/// What every request's handler shares.
struct Served {
    queue: Queue,
    clients: ClientTokens,
    health: Health,
    hooks: String,
    catalog: HookCatalog,
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    context: usize,
    max_batch_tokens: usize,
    /// The persistent edits, by name.
    edits: Mutex<BTreeMap<String, NamedEdits>>,
}

/// The OpenAPI document of the endpoints.
const OPENAPI: &str = include_str!("openapi.json");

/// Serves until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let Some(token_file) = &args.layout.token_file else {
        bail!("serve needs --token-file F: the clients' tokens, one per line");
    };
    let clients = ClientTokens::read(token_file)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::config(cert, key)?),
        _ => None,
    };
    let checkpoint = Checkpoint::open(&args.model)?;
    let layout = args.layout.layout()?;
    let (points, _) = flexmodel::sae::splice_all(checkpoint.config.points(), &args.layout.saes)?;
    let health = Health {
        model: args.model.clone(),
        layout: layout.to_string(),
        ranks_alive: layout.world_size(),
        queue: 0,
        passes: 0,
        cancelled: 0,
    };
    let hooks = crate::hooks::table(&points);
    let tokenizer = Arc::new(checkpoint.tokenizer.clone());
    let (vocab_size, context) = (checkpoint.config.vocab_size(), checkpoint.config.context());
    let (layout_args, model_name) = (args.layout.clone(), args.model.clone());
    let ranks = layout.world_size();
    let source = ModelSource {
        build: move || {
            let model = layout_args.build(&checkpoint, &model_name, Plan::default())?;
            Ok((model, ranks))
        },
        rebuild_after_loss: args.layout.cluster.is_none(),
    };
    let batching = Batching {
        window: Duration::from_millis(args.batch_window_ms),
        max_batch_tokens: args.max_batch_tokens,
        max_queue: args.max_queue,
    };
    let queue = passes::start(source, batching)?;
    let served = Arc::new(Served {
        queue,
        clients,
        health,
        hooks,
        catalog: HookCatalog::new(points),
        tokenizer,
        vocab_size,
        context,
        max_batch_tokens: args.max_batch_tokens,
        edits: Mutex::new(BTreeMap::new()),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(listen(args.listen, tls, served))
}

async fn listen(
    addr: SocketAddr,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    served: Arc<Served>,
) -> anyhow::Result<()> {
    let authenticated = Router::new()
        .route("/v1/forward", post(forward))
        .route("/v1/generate", post(generate))
        .route("/v1/hooks", get(hooks))
        .route("/v1/edits", post(install_edits).get(list_edits))
        .route("/v1/edits/{name}", delete(remove_edits))
        .route("/v1/health", get(health))
        .route_layer(middleware::from_fn_with_state(served.clone(), authenticate));
    let app = Router::new()
        .merge(authenticated)
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .with_state(served);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    println!("listening on {}", listener.local_addr()?);
    use std::io::Write as _;
    std::io::stdout().flush()?;
    // SIGINT and SIGTERM end the process (see `main`), its workers stopped first.
    match tls {
        Some(config) => axum::serve(tls::TlsListener::new(listener, config)?, app).await?,
        None => axum::serve(listener, app).await?,
    }
    Ok(())
}

/// An error answer: `{"error": TEXT}` with `status`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        error: message.into(),
    };
    (status, axum::Json(body)).into_response()
}

/// Lets through the requests that carry `Authorization: Bearer TOKEN` with a client's
/// token; 401 otherwise.
async fn authenticate(State(served): State<Arc<Served>>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if served.clients.accepts(token.trim().as_bytes()) => next.run(request).await,
        Some(_) => error(
            StatusCode::UNAUTHORIZED,
            "the bearer token is not a client's",
        ),
        None => error(
            StatusCode::UNAUTHORIZED,
            "every request needs an `Authorization: Bearer TOKEN` header",
        ),
    }
}

async fn forward(State(served): State<Arc<Served>>, body: Bytes) -> Response {
    let arrived = Instant::now();
    let request: ForwardRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the request's JSON: {e}")),
    };
    let deadline = request.deadline_ms.map(Duration::from_millis);
    let mut request = request;
    let use_edits = std::mem::take(&mut request.use_edits);
    let prepared =
        match with_persistent_edits(&served, use_edits, &mut request.edits, &mut request.tensors)
            .map_err(Failure::bad)
            .and_then(|()| prepare(&served, &request))
        {
            Ok(prepared) => prepared,
            Err(failure) => return failed(failure),
        };
    let (reply, answer) = oneshot::channel();
    let span = tracing::info_span!(
        parent: None,
        "serve.request",
        serve.endpoint = "/v1/forward",
        serve.sequences = prepared.sequences() as i64,
        serve.tokens = (prepared.sequences() * prepared.len()) as i64
    );
    let job = Job {
        arrived,
        span,
        work: Work::Forward {
            request: prepared,
            reply,
        },
    };
    if let Err(refused) = served.queue.submit(job) {
        return refusal(&served, refused);
    }
    let answer = match deadline {
        // Dropping `answer` at the deadline drops the request if its pass has not begun.
        Some(deadline) => {
            match tokio::time::timeout_at((arrived + deadline).into(), answer).await {
                Ok(answer) => answer,
                Err(_) => {
                    return error(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "the request's deadline of {} ms passed before its answer",
                            deadline.as_millis()
                        ),
                    );
                }
            }
        }
        None => answer.await,
    };
    match answer {
        Ok(Ok(bytes)) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
        }
        Ok(Err(failure)) => failed(failure),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model's thread has stopped",
        ),
    }
}

/// The answer to a request the queue did not take.
fn refusal(served: &Served, refused: Refused) -> Response {
    match refused {
        Refused::Full { retry_after_s } => {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the queue is full ({} requests wait); try again in {retry_after_s} s",
                    served.queue.depth()
                ),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after_s.into());
            response
        }
        Refused::Stopped => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model's thread has stopped",
        ),
    }
}

/// `POST /v1/generate`: the JSON of `generate --json`, or with `stream` server-sent
/// events, `token` per token and then `done` (or `error`).
async fn generate(State(served): State<Arc<Served>>, body: Bytes) -> Response {
    let arrived = Instant::now();
    let mut request: GenerateRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the request's JSON: {e}")),
    };
    let use_edits = std::mem::take(&mut request.use_edits);
    let prepared =
        match with_persistent_edits(&served, use_edits, &mut request.edits, &mut request.tensors)
            .map_err(Failure::bad)
            .and_then(|()| {
                generation::Prepared::new(
                    &request,
                    &served.catalog,
                    served.tokenizer.clone(),
                    served.vocab_size,
                )
            }) {
            Ok(prepared) => prepared,
            Err(failure) => return failed(failure),
        };
    let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
    let span = tracing::info_span!(
        parent: None,
        "serve.request",
        serve.endpoint = "/v1/generate",
        serve.sequences = request.prompts.len() as i64
    );
    let job = Job {
        arrived,
        span,
        work: Work::Generate {
            request: prepared,
            events,
        },
    };
    if let Err(refused) = served.queue.submit(job) {
        return refusal(&served, refused);
    }
    if !request.stream {
        while let Some(event) = received.recv().await {
            match event {
                generation::Event::Token { .. } => {}
                generation::Event::Done(answer) => return axum::Json(answer).into_response(),
                generation::Event::Failed(failure) => return failed(failure),
            }
        }
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model's thread has stopped",
        );
    }
    let stream = futures_util::stream::unfold(received, |mut received| async move {
        let event = match received.recv().await? {
            generation::Event::Token {
                sequence,
                token,
                text,
            } => sse::Event::default()
                .event("token")
                .json_data(serde_json::json!({"sequence": sequence, "token": token, "text": text})),
            generation::Event::Done(answer) => {
                sse::Event::default().event("done").json_data(answer)
            }
            generation::Event::Failed(failure) => {
                sse::Event::default().event("error").json_data(ErrorBody {
                    error: failure.message,
                })
            }
        };
        Some((event, received))
    });
    sse::Sse::new(stream).into_response()
}

/// The error answer of `failure`.
fn failed(Failure { status, message }: Failure) -> Response {
    error(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        message,
    )
}

/// `request` tokenized and checked, ready to join a batch.
fn prepare(served: &Served, request: &ForwardRequest) -> Result<Prepared, Failure> {
    let rows = match (&request.tokens, &request.prompts) {
        (Some(rows), None) => rows.clone(),
        (None, Some(prompts)) => prompts
            .iter()
            .map(|text| served.tokenizer.encode(text))
            .collect::<flexmodel::Result<_>>()?,
        _ => return Err(Failure::bad("give either tokens or prompts")),
    };
    let prepared = Prepared::new(
        request,
        rows,
        &served.catalog,
        served.vocab_size,
        served.context,
    )?;
    let tokens = prepared.sequences() * prepared.len();
    if tokens > served.max_batch_tokens {
        return Err(Failure::bad(format!(
            "the request is {} sequences of up to {} tokens ({tokens} with padding); \
             a pass of this server runs at most {} (--max-batch-tokens)",
            prepared.sequences(),
            prepared.len(),
            served.max_batch_tokens
        )));
    }
    Ok(prepared)
}

/// Puts the persistent edits named in `use_edits` before a request's own `edits`, their
/// tensors among its `tensors` under keys prefixed with the edit's name.
fn with_persistent_edits(
    served: &Served,
    use_edits: Vec<String>,
    edits: &mut Vec<String>,
    tensors: &mut BTreeMap<String, String>,
) -> Result<(), String> {
    let installed = served
        .edits
        .lock()
        .map_err(|_| "the edits' lock is poisoned")?;
    let mut persistent = Vec::new();
    for name in use_edits {
        let named = installed.get(&name).ok_or_else(|| {
            let known: Vec<&str> = installed.keys().map(String::as_str).collect();
            format!("no persistent edit is named {name:?} (installed: {known:?})")
        })?;
        for spec in &named.edits {
            persistent.push(spec.replace("=add:@", &format!("=add:@{name}/")));
        }
        for (key, tensor) in &named.tensors {
            tensors.insert(format!("{name}/{key}"), tensor.clone());
        }
    }
    persistent.append(edits);
    *edits = persistent;
    Ok(())
}

/// Installs (or replaces) a persistent edit, checked against the model's hook points.
async fn install_edits(State(served): State<Arc<Served>>, body: Bytes) -> Response {
    let named: NamedEdits = match serde_json::from_slice(&body) {
        Ok(named) => named,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the request's JSON: {e}")),
    };
    let valid_name = !named.name.is_empty()
        && named
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !valid_name {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "an edit's name is letters, digits, '_', '.' and '-', not {:?}",
                named.name
            ),
        );
    }
    let checked = batching::inline_tensors(&named.tensors)
        .map_err(|f| f.message)
        .and_then(|inline| {
            for spec in &named.edits {
                let edit = EditSpec::parse_with(spec, &inline).map_err(|e| e.to_string())?;
                served
                    .catalog
                    .resolve(&edit.target, HookKind::Forward)
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        });
    if let Err(message) = checked {
        return error(StatusCode::BAD_REQUEST, message);
    }
    let Ok(mut installed) = served.edits.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the edits' lock is poisoned",
        );
    };
    let listed = NamedEdits {
        tensors: BTreeMap::new(),
        ..named.clone()
    };
    installed.insert(named.name.clone(), named);
    (StatusCode::CREATED, axum::Json(listed)).into_response()
}

/// The persistent edits (without their tensors).
async fn list_edits(State(served): State<Arc<Served>>) -> Response {
    let Ok(installed) = served.edits.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the edits' lock is poisoned",
        );
    };
    let listed: Vec<NamedEdits> = installed
        .values()
        .map(|named| NamedEdits {
            tensors: BTreeMap::new(),
            ..named.clone()
        })
        .collect();
    axum::Json(listed).into_response()
}

async fn remove_edits(State(served): State<Arc<Served>>, Path(name): Path<String>) -> Response {
    let Ok(mut installed) = served.edits.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the edits' lock is poisoned",
        );
    };
    match installed.remove(&name) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no persistent edit is named {name:?}"),
        ),
    }
}

async fn hooks(State(served): State<Arc<Served>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        served.hooks.clone(),
    )
        .into_response()
}

async fn health(State(served): State<Arc<Served>>) -> Response {
    let health = Health {
        queue: served.queue.depth(),
        ranks_alive: served.queue.ranks_alive(),
        passes: served.queue.passes(),
        cancelled: served.queue.cancelled(),
        ..served.health.clone()
    };
    axum::Json(health).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found(request: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no endpoint {} {}", request.method(), request.uri().path()),
    )
}
