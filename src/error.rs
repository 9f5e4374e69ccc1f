//! The error type of the `flexmodel` library.

use std::path::PathBuf;

/// Everything that can go wrong while loading, running or hooking a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A weights file is unreadable, truncated or corrupt.
    #[error("{path}: {message}")]
    BadWeightsFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// One tensor of a weights file is missing, corrupt or unsupported.
    #[error("{path}: tensor {tensor}: {message}")]
    BadTensor {
        /// The file (or directory, for sharded checkpoints).
        path: PathBuf,
        /// The tensor's name in that file.
        tensor: String,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor has another shape than the model's configuration requires.
    #[error("{path}: tensor {tensor} has shape {found:?}, the configuration requires {expected:?}")]
    ShapeMismatch {
        /// The file (or directory).
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A model configuration is missing a field, inconsistent or unsupported.
    #[error("{path}: {message}")]
    BadConfig {
        /// Where the configuration came from.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The tokenizer could not be built, loaded or run.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A token id is not in the model's vocabulary.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfVocabulary {
        /// The offending id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The input batch is malformed (empty, ragged, wrong rank).
    #[error("bad input: {0}")]
    BadInput(String),
    /// Fetching a pretrained model into the cache failed.
    #[error("fetching {model}: {message}")]
    Fetch {
        /// The model being fetched.
        model: String,
        /// What went wrong and what to do about it.
        message: String,
    },
    /// The `--model` argument names nothing loadable.
    #[error(
        "unknown model {0:?}: expected `smollm2`, a .gguf file or a Hugging Face model directory"
    )]
    UnknownModel(String),
    /// A hook target names no hook point.
    #[error("unknown {kind} hook target {name:?}{}", suggest(.suggestions))]
    UnknownHookPoint {
        /// The target as given.
        name: String,
        /// `forward` or `forward-pre`.
        kind: &'static str,
        /// The nearest valid names.
        suggestions: Vec<String>,
    },
    /// A parameter name the model does not have.
    #[error("unknown parameter {name:?}{}", suggest(.suggestions))]
    UnknownParameter {
        /// The name as given.
        name: String,
        /// The nearest parameter names.
        suggestions: Vec<String>,
    },
    /// A selector pattern matches no registered hook.
    #[error("no registered hook has a hook point matching {0:?}")]
    NoHookMatches(String),
    /// A group name that no hook was ever tagged with.
    #[error("unknown hook group {name:?} (known groups: {})", .known.join(", "))]
    UnknownGroup {
        /// The name as given.
        name: String,
        /// The groups that exist.
        known: Vec<String>,
    },
    /// An attempt to create, join or leave the implicit group `all`.
    #[error("the group `all` is implicit: every hook is in it, and none can leave it")]
    ImplicitGroup,
    /// A handle of a hook that is not registered (any more).
    #[error("{0} is not registered")]
    UnknownHandle(crate::HookHandle),
    /// An edit closure failed.
    #[error("hook {hook}: {source}")]
    HookFailed {
        /// The hook point's name.
        hook: String,
        /// What the closure returned (or that it panicked).
        source: Box<Error>,
    },
    /// An edit returned a tensor of another shape or dtype.
    #[error(
        "hook {hook}: the edit returned {found}, expected {expected} (edits must keep shape and dtype)"
    )]
    EditChangedTensor {
        /// The hook point's name.
        hook: String,
        /// Shape and dtype of the value given to the edit.
        expected: String,
        /// Shape and dtype the edit returned.
        found: String,
    },
    /// The hook protocol between a shard and the coordinator failed (usually because the
    /// pass was aborted after another failure).
    #[error("hook protocol: {0}")]
    Protocol(String),
    /// A figure could not be drawn or written.
    #[error("{path}: drawing the figure: {message}")]
    Plot {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A sharded pass failed.
    #[error(transparent)]
    Sharded(#[from] flexmodel_actors::Error),
    /// A layout or collective error.
    #[error(transparent)]
    Cluster(#[from] flexmodel_cluster::Error),
    /// A tensor operation failed.
    #[error("{}", flexmodel_cluster::tensor_error_message(.0))]
    Tensor(#[from] candle_core::Error),
}

/// Result with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

fn suggest(names: &[String]) -> String {
    match names {
        [] => String::new(),
        names => format!("; nearest: {}", names.join(", ")),
    }
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
