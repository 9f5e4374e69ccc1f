//! A client of `flexmodel serve` (feature `client`): typed requests, tensors back.
//!
//! ```no_run
//! use flexmodel::api::ForwardRequest;
//! use flexmodel::client::Client;
//!
//! # fn main() -> Result<(), flexmodel::client::ClientError> {
//! let client = Client::new("http://127.0.0.1:8080", std::fs::read_to_string("token")?.trim())?;
//! let request = ForwardRequest::prompts(["The capital of France is"])
//!     .hook("blocks.*.hook_resid_post")
//!     .edit("blocks.3.attn.hook_z=zero-head:1");
//! let tensors = client.forward(&request)?;
//! let resid = &tensors["blocks.29.hook_resid_post"];
//! # let _ = resid;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use tokio_rustls::rustls;

use crate::api::{
    ErrorBody, ForwardRequest, GenerateAnswer, GenerateRequest, GradMetric, Health, Positions,
    Reduce,
};

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached, or the connection broke.
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    /// The server answered with an error.
    #[error("the server answered {status}: {message}")]
    Server {
        /// The HTTP status.
        status: u16,
        /// What the server said.
        message: String,
    },
    /// The answer was not the tensors it should be.
    #[error("the answer's tensors: {0}")]
    Tensors(#[from] candle_core::Error),
    /// A file the request needed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The certificates to trust.
    #[error("TLS: {0}")]
    Tls(String),
}

/// A server's address and a client's token.
pub struct Client {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
}

impl Client {
    /// The server at `base` (`http://HOST:PORT`), authenticated with `token`.
    pub fn new(base: impl Into<String>, token: impl Into<String>) -> Result<Self, ClientError> {
        Ok(Self {
            base: base.into().trim_end_matches('/').to_string(),
            token: token.into(),
            http: http_client(rustls::RootCertStore::empty())?,
        })
    }

    /// The server at `base` (`https://HOST:PORT`), whose certificate must chain to one of
    /// the PEM certificates in the file `ca` (a self-signed certificate to itself),
    /// authenticated with `token`.
    pub fn with_ca(
        base: impl Into<String>,
        token: impl Into<String>,
        ca: &std::path::Path,
    ) -> Result<Self, ClientError> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let tls = |e: &dyn std::fmt::Display| ClientError::Tls(format!("{}: {e}", ca.display()));
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).map_err(|e| tls(&e))? {
            roots.add(cert.map_err(|e| tls(&e))?).map_err(|e| tls(&e))?;
        }
        if roots.is_empty() {
            return Err(tls(&"holds no certificate"));
        }
        Ok(Self {
            base: base.into().trim_end_matches('/').to_string(),
            token: token.into(),
            http: http_client(roots)?,
        })
    }

    /// The captures (and `loss`, `attention_mask`) of one pass, by name.
    pub fn forward(
        &self,
        request: &ForwardRequest,
    ) -> Result<HashMap<String, Tensor>, ClientError> {
        let bytes = self.post("/v1/forward", request)?;
        Ok(candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?)
    }

    /// The completions of a generation (`request.stream` is ignored: the client waits
    /// for the whole answer).
    pub fn generate(&self, request: &GenerateRequest) -> Result<GenerateAnswer, ClientError> {
        let request = GenerateRequest {
            stream: false,
            ..request.clone()
        };
        let bytes = self.post("/v1/generate", &request)?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Server {
            status: 200,
            message: format!("not a generation's answer: {e}"),
        })
    }

    /// The body of the answer to `request` posted as JSON to `path`.
    fn post(&self, path: &str, request: &impl serde::Serialize) -> Result<Vec<u8>, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Server {
            status: 0,
            message: format!("the request does not serialize: {e}"),
        })?;
        let answer = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .body(body)
            .send()?;
        Ok(checked(answer)?.bytes()?.to_vec())
    }

    /// The server's model, layout, live ranks and queue.
    pub fn health(&self) -> Result<Health, ClientError> {
        let answer = self.get("/v1/health")?;
        serde_json::from_slice(&answer.bytes()?).map_err(|e| ClientError::Server {
            status: 200,
            message: format!("not health: {e}"),
        })
    }

    /// The hook points, as `flexmodel hooks` prints them.
    pub fn hooks(&self) -> Result<String, ClientError> {
        Ok(self.get("/v1/hooks")?.text()?)
    }

    fn get(&self, path: &str) -> Result<reqwest::blocking::Response, ClientError> {
        let answer = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()?;
        checked(answer)
    }
}

/// ring's cryptography for rustls, made the process's default if it has none: this
/// feature builds reqwest's rustls without a provider of its own, and reqwest's other
/// users in the process (the OTLP exporter over HTTP) take the default.
pub(crate) fn ring_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    // ring rather than aws-lc (which builds a C library with cmake); rustls marks ring's
    // provider deprecated because it has no post-quantum key exchange.
    #[allow(deprecated)]
    let ring = rustls::crypto::ring::default_provider();
    // Refused (and harmless) when the process already has a default.
    let _ = ring.clone().install_default();
    std::sync::Arc::new(ring)
}

/// An HTTP client without a time limit whose TLS (rustls, with ring's cryptography)
/// trusts `roots`.
fn http_client(roots: rustls::RootCertStore) -> Result<reqwest::blocking::Client, ClientError> {
    let config = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(reqwest::blocking::Client::builder()
        .timeout(None)
        .tls_backend_preconfigured(config)
        .build()?)
}

/// `answer`, or the error it carries.
fn checked(
    answer: reqwest::blocking::Response,
) -> Result<reqwest::blocking::Response, ClientError> {
    let status = answer.status();
    if status.is_success() {
        return Ok(answer);
    }
    let body = answer.bytes().unwrap_or_default();
    let message = match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(error) => error.error,
        Err(_) => String::from_utf8_lossy(&body).into_owned(),
    };
    Err(ClientError::Server {
        status: status.as_u16(),
        message,
    })
}

impl ForwardRequest {
    /// A pass over token ids, a row per sequence.
    pub fn tokens(rows: impl IntoIterator<Item = Vec<u32>>) -> Self {
        Self {
            tokens: Some(rows.into_iter().collect()),
            ..Self::default()
        }
    }

    /// A pass over texts, a sequence each.
    pub fn prompts<S: Into<String>>(texts: impl IntoIterator<Item = S>) -> Self {
        Self {
            prompts: Some(texts.into_iter().map(Into::into).collect()),
            ..Self::default()
        }
    }

    /// Also captures `pattern`.
    pub fn hook(mut self, pattern: impl Into<String>) -> Self {
        self.hooks.push(pattern.into());
        self
    }

    /// Also applies `spec` (`--edit`'s syntax).
    pub fn edit(mut self, spec: impl Into<String>) -> Self {
        self.edits.push(spec.into());
        self
    }

    /// Adds `delta` to `target` (broadcast), sent along with the request.
    pub fn add(mut self, target: &str, delta: &Tensor) -> Result<Self, ClientError> {
        use base64::Engine as _;
        let key = format!("add{}", self.tensors.len());
        let file = tempfile::NamedTempFile::new()?;
        delta.save_safetensors(&key, file.path())?;
        let bytes = std::fs::read(file.path())?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
        self.edits.push(format!("{target}=add:@{key}"));
        self.tensors.insert(key, encoded);
        Ok(self)
    }

    /// Which logits the pass computes: `all`, `last` or `none`.
    pub fn logits(mut self, logits: impl Into<String>) -> Self {
        self.logits = Some(logits.into());
        self
    }

    /// Runs blocks `0..n` only.
    pub fn stop_at_layer(mut self, n: usize) -> Self {
        self.stop_at_layer = Some(n);
        self
    }

    /// Applies the persistent edit installed on the server under `name`.
    pub fn use_edits(mut self, name: impl Into<String>) -> Self {
        self.use_edits.push(name.into());
        self
    }

    /// Answers only `positions` of each capture.
    pub fn positions(mut self, positions: Positions) -> Self {
        self.positions = Some(positions);
        self
    }

    /// Reduces each capture over its positions on the server.
    pub fn reduce(mut self, reduce: Reduce) -> Self {
        self.reduce = Some(reduce);
        self
    }

    /// Also captures the gradient of `metric` at each hooked point (`NAME_grad`).
    pub fn grad(mut self, metric: GradMetric) -> Self {
        self.grad = Some(metric);
        self
    }

    /// Fails with 504 unless answered within `ms` milliseconds of arriving.
    pub fn deadline_ms(mut self, ms: u64) -> Self {
        self.deadline_ms = Some(ms);
        self
    }
}

impl GenerateAnswer {
    /// The captures of the generation, by name (none without `hooks`).
    pub fn captures(&self) -> Result<HashMap<String, Tensor>, ClientError> {
        use base64::Engine as _;
        let Some(encoded) = &self.captures else {
            return Ok(HashMap::new());
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| ClientError::Server {
                status: 200,
                message: format!("the captures are not base64: {e}"),
            })?;
        Ok(candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?)
    }
}

impl GenerateRequest {
    /// Continuations of `prompts`, greedy, 32 tokens at most.
    pub fn prompts<S: Into<String>>(texts: impl IntoIterator<Item = S>) -> Self {
        Self {
            prompts: texts.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Generates at most `n` tokens per prompt.
    pub fn max_new_tokens(mut self, n: usize) -> Self {
        self.max_new_tokens = Some(n);
        self
    }

    /// Captures `pattern` over the whole generation.
    pub fn hook(mut self, pattern: impl Into<String>) -> Self {
        self.hooks.push(pattern.into());
        self
    }

    /// Applies `spec` (as `--edit` writes it) at every step.
    pub fn edit(mut self, spec: impl Into<String>) -> Self {
        self.edits.push(spec.into());
        self
    }
}
