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
    /// A layout or collective error.
    #[error(transparent)]
    Cluster(#[from] flexmodel_cluster::Error),
    /// A tensor operation failed.
    #[error("{}", flexmodel_cluster::tensor_error_message(.0))]
    Tensor(#[from] candle_core::Error),
}

/// Result with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
