//! The error type of the `flexmodel` library.

use std::path::PathBuf;

/// Everything that can go wrong while loading, running or hooking a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A hook registered by the exact name of a point that the pass does not compute
    /// (one stopped at a layer, or one without the logits).
    #[error("hook point {point} is not computed by this pass: {why}")]
    PointNotInPass {
        /// The point.
        point: String,
        /// Why the pass does not compute it.
        why: String,
    },
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
    /// Token ids that are not a `[batch, seq]` batch of u32 with at least one token.
    #[error(
        "tokens must be a non-empty [batch, seq] batch of u32 ids, got {dtype:?} of shape {dims:?}"
    )]
    BadTokens {
        /// The shape given.
        dims: Vec<usize>,
        /// The dtype given.
        dtype: candle_core::DType,
    },
    /// Sequences longer than the model's context.
    #[error("sequences of {len} tokens are longer than the model's context of {context} tokens")]
    SequenceTooLong {
        /// The length given.
        len: usize,
        /// The model's `max_position_embeddings`.
        context: usize,
    },
    /// Sequences too short for what was asked of them.
    #[error("{what} needs sequences of at least {need} tokens, got {len}")]
    SequenceTooShort {
        /// What needs them (a backward pass, the loss, induction).
        what: &'static str,
        /// The least length it takes.
        need: usize,
        /// The length given.
        len: usize,
    },
    /// A sequence of a batch with no real token.
    #[error("sequence {index} of the batch is empty: every sequence needs a token")]
    EmptySequence {
        /// The sequence's index in the batch.
        index: usize,
    },
    /// An attention mask that does not fit its tokens.
    #[error("bad attention mask: {problem}")]
    BadAttentionMask {
        /// What is wrong with it.
        problem: String,
    },
    /// A text or prompt with no tokens.
    #[error("{what} has no tokens")]
    NoTokens {
        /// `the prompt`, `the text`.
        what: &'static str,
    },
    /// A line of a tokens file (or the whole file) is malformed.
    #[error("{}{}: {problem}", .path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    BadTokensFile {
        /// The file.
        path: PathBuf,
        /// The line (1-based), if one is at fault.
        line: Option<usize>,
        /// What is wrong with it.
        problem: String,
    },
    /// A batch has fewer sequences than there are data-parallel replicas.
    #[error("a batch of {batch} sequences cannot be split over {replicas} data-parallel replicas")]
    BatchTooSmall {
        /// The sequences in the batch.
        batch: usize,
        /// The replicas.
        replicas: usize,
    },
    /// A layout that cannot split this model (or would not fit this machine).
    #[error("bad layout: {0}")]
    BadLayout(crate::runtime::sharding::LayoutProblem),
    /// A sparse autoencoder asked for at a point that cannot host one.
    #[error(transparent)]
    CannotSplice(#[from] crate::hooks::point::CannotSplice),
    /// An argument of a public function outside what it accepts.
    #[error("{argument}: {problem}")]
    InvalidArgument {
        /// The argument's name.
        argument: &'static str,
        /// What it must be, and what it was.
        problem: String,
    },
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
        "unknown model {0:?}: expected `smollm2`, `gemma3-270m`, a .gguf file or a Hugging Face model directory"
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
    /// A backward hook on a point the loss has no gradient at (the token ids).
    #[error("{hook} has no gradient: the loss is not differentiable in token ids")]
    NoGradientAt {
        /// The hook target.
        hook: String,
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
    /// A hook's tags name a group that cannot be joined (empty, or `all`).
    #[error("a group name cannot be empty")]
    EmptyGroupName,
    /// A value in the save context has another type than the one asked for.
    #[error("save context: {key:?} holds a {stored}, not a {requested}")]
    SaveContextType {
        /// The key.
        key: String,
        /// The type stored under it.
        stored: &'static str,
        /// The type asked for.
        requested: &'static str,
    },
    /// A trainable variable of this name is already registered.
    #[error("a trainable variable {name:?} is already registered")]
    TrainableExists {
        /// The name.
        name: String,
    },
    /// No trainable variable of this name is registered.
    #[error("no trainable variable {name:?} is registered (registered: {})", .known.join(", "))]
    UnknownTrainable {
        /// The name asked for.
        name: String,
        /// The names registered.
        known: Vec<String>,
    },
    /// A parameter's gradient was asked for before any backward pass.
    #[error("no gradient for {parameter}: run forward_backward first")]
    NoGradient {
        /// The parameter.
        parameter: String,
    },
    /// A hook point was expected in the store after a pass that captured it.
    #[error("{hook} was not captured")]
    NotCaptured {
        /// The hook point's name.
        hook: String,
    },
    /// An edit closure failed.
    #[error("hook {hook}: {source}")]
    HookFailed {
        /// The hook point's name.
        hook: String,
        /// What the closure returned (or that it panicked).
        source: Box<Error>,
    },
    /// An edit closure panicked.
    #[error("the edit panicked: {message}")]
    EditPanicked {
        /// The panic's message.
        message: String,
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
    /// A `zero-head` edit on a hook point without heads.
    #[error("zero-head: {hook} has no head dimension")]
    NoHeadDimension {
        /// The hook point's name.
        hook: String,
    },
    /// A `zero-head` edit of a head the point does not have.
    #[error("zero-head: head {head} does not exist, {hook} has {heads} heads")]
    NoSuchHead {
        /// The hook point's name.
        hook: String,
        /// The head asked for.
        head: usize,
        /// The heads the point has.
        heads: usize,
    },
    /// A latent edit (`zero-latent`, `clamp-latent`) on a point that is not an SAE's
    /// latents.
    #[error(
        "{edit}: {hook} is not an SAE's latents (HOOK.hook_sae_acts_pre or HOOK.hook_sae_acts_post)"
    )]
    NoLatentDimension {
        /// The edit.
        edit: &'static str,
        /// The hook point's name.
        hook: String,
    },
    /// A latent edit of a latent the SAE does not have.
    #[error("{edit}: latent {latent} does not exist, {hook} has {latents} latents")]
    NoSuchLatent {
        /// The edit.
        edit: &'static str,
        /// The hook point's name.
        hook: String,
        /// The latent asked for.
        latent: usize,
        /// The latents the SAE has.
        latents: usize,
    },
    /// An `add` edit whose tensor does not broadcast to the value.
    #[error("add: a tensor of shape {delta:?} does not broadcast to {hook} of shape {value:?}")]
    DoesNotBroadcast {
        /// The hook point's name.
        hook: String,
        /// The shape of the tensor to add.
        delta: Vec<usize>,
        /// The shape of the value.
        value: Vec<usize>,
    },
    /// An `--edit` spec that does not parse.
    #[error("malformed edit {spec:?}: {problem}")]
    MalformedEdit {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A driver-side loss that is not a scalar.
    #[error("the loss must be a scalar, got shape {dims:?}")]
    LossNotScalar {
        /// The shape it had.
        dims: Vec<usize>,
    },
    /// Fault injection on a model that has no shards to fail.
    #[error("fault injection needs a sharded layout")]
    FaultNeedsShards,
    /// An analysis was given inputs it cannot measure anything on.
    #[error("{analysis}: {problem}")]
    Analysis {
        /// `activation patching`, `induction`, `tuned lens`.
        analysis: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// A corpus without one whole sequence within its token budget.
    #[error("the corpus has {tokens} tokens to use, fewer than one sequence of {seq_len}")]
    CorpusTooShort {
        /// The tokens available (within the budget).
        tokens: usize,
        /// The tokens of one sequence.
        seq_len: usize,
    },
    /// One row of a dataset would not fit in a shard.
    #[error(
        "one row of the dataset takes {row_bytes} bytes, more than a shard of at most {shard_bytes} bytes can hold: raise the shard size or store fewer hook points"
    )]
    RowTooLarge {
        /// The bytes of one row, with the shard's own overhead.
        row_bytes: u64,
        /// The most bytes of a shard.
        shard_bytes: u64,
    },
    /// A directory holding a dataset made with other arguments.
    #[error(
        "{} holds a dataset made with other arguments ({differences}): give the same arguments to resume it, or another directory",
        .dir.display()
    )]
    DatasetMismatch {
        /// The dataset's directory.
        dir: PathBuf,
        /// Each argument that differs, with its value there and here.
        differences: String,
    },
    /// A directory that is not an activation dataset FlexModel-rs can resume.
    #[error("{}: {problem}", .dir.display())]
    NotADataset {
        /// The directory.
        dir: PathBuf,
        /// What it holds instead.
        problem: String,
    },
    /// Writing a dataset's shard failed; the shards before it are complete and listed.
    #[error(
        "writing the dataset in {} failed: {source}{}",
        .dir.display(),
        match .complete {
            0 => String::new(),
            n => format!("; its {n} complete shards of {shards} are intact, and the same command continues after them"),
        }
    )]
    DatasetWrite {
        /// The dataset's directory.
        dir: PathBuf,
        /// The complete shards it holds.
        complete: usize,
        /// The shards it will hold when finished.
        shards: usize,
        /// What failed.
        source: Box<Error>,
    },
    /// A value too large for the float16 that stores `bf16` datasets.
    #[error(
        "{hook} has the value {value}, beyond the range of float16 (65504), which stores bf16 datasets: store f32"
    )]
    Float16Overflow {
        /// The hook point.
        hook: String,
        /// The value.
        value: f32,
    },
    /// Setting up logs or trace export failed.
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    /// An error of the caller's own code: an edit closure, a loss function.
    #[error(transparent)]
    Custom(Box<dyn std::error::Error + Send + Sync>),
    /// An invariant of FlexModel-rs did not hold: a bug, please report it.
    #[error("internal error: {0}")]
    Internal(&'static str),
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
    Sharded(Box<flexmodel_actors::Error>),
    /// An error of the hook layer inside a shard, carried to the shard's runtime as it is.
    #[error(transparent)]
    ShardHook(flexmodel_actors::BoxError),
    /// A layout or collective error.
    #[error(transparent)]
    Cluster(#[from] flexmodel_cluster::Error),
    /// A tensor operation failed.
    #[error("{}", tensor_message(.0))]
    Tensor(#[from] candle_core::Error),
}

/// Result with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// The message of a candle error without the backtrace candle attaches when
/// `RUST_BACKTRACE` is set: error messages are for people, not for debugging candle.
pub(crate) fn tensor_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => tensor_message(inner),
        e => e.to_string(),
    }
}

fn suggest(names: &[String]) -> String {
    match names {
        [] => String::new(),
        names => format!("; nearest: {}", names.join(", ")),
    }
}

impl From<flexmodel_actors::Error> for Error {
    /// A failed sharded pass; an error of the driver's own hooks (an edit, a loss) comes
    /// back as itself, so that callers can match it whatever the layout.
    fn from(e: flexmodel_actors::Error) -> Self {
        match e {
            flexmodel_actors::Error::Sink(inner) => match inner.downcast::<Error>() {
                Ok(own) => *own,
                Err(other) => Error::Sharded(Box::new(flexmodel_actors::Error::Sink(other))),
            },
            e => Error::Sharded(Box::new(e)),
        }
    }
}

impl Error {
    /// An [`Error::Custom`]: what an edit closure or a loss of your own returns when it
    /// fails (`Err(Error::custom("probe not trained"))`).
    pub fn custom(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Error::Custom(error.into())
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
