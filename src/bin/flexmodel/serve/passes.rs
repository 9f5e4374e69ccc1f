//! The thread that holds the model: it gathers the requests that arrive within a short
//! window into batches and runs them, a pass per batch.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use flexmodel::FlexModel;
use tokio::sync::oneshot;

use super::batching::{self, BatchKey, Prepared};
use super::generation;

/// Why a request failed: the HTTP status and what to tell the client.
#[derive(Debug)]
pub struct Failure {
    /// 400 for what the request got wrong, 503 when a rank was lost, 500 otherwise.
    pub status: u16,
    /// The message.
    pub message: String,
}

impl Failure {
    /// A request the server cannot run as it is.
    pub fn bad(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }
}

impl From<flexmodel::Error> for Failure {
    fn from(e: flexmodel::Error) -> Self {
        let status = match &e {
            flexmodel::Error::Sharded(_) => 503,
            flexmodel::Error::Internal(_) => 500,
            _ => 400,
        };
        Self {
            status,
            message: e.to_string(),
        }
    }
}

impl From<candle_core::Error> for Failure {
    fn from(e: candle_core::Error) -> Self {
        flexmodel::Error::from(e).into()
    }
}

/// A request waiting for the model, with where its answer goes.
pub struct Job {
    /// When it arrived.
    pub arrived: Instant,
    /// Its span (`serve.request`, the root of its trace), linked to its pass's.
    pub span: tracing::Span,
    /// What it asks.
    pub work: Work,
}

/// What a request asks of the model.
pub enum Work {
    /// A forward pass, shared with the other forward requests of its batch; the answer
    /// is a safetensors file.
    Forward { request: Prepared, reply: Reply },
    /// A generation, run on its own; its tokens and its end go to `events`.
    Generate {
        request: generation::Prepared,
        events: tokio::sync::mpsc::UnboundedSender<generation::Event>,
    },
}

impl Job {
    /// Whether it runs in a pass of its own: a generation, or a backward pass.
    fn alone(&self) -> bool {
        match &self.work {
            Work::Forward { request, .. } => request.alone(),
            Work::Generate { .. } => true,
        }
    }

    /// Whether its client is gone.
    fn abandoned(&self) -> bool {
        match &self.work {
            Work::Forward { reply, .. } => reply.is_closed(),
            Work::Generate { events, .. } => events.is_closed(),
        }
    }
}

/// How the model's thread gathers requests into passes.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// How long the first request of a pass waits for others to join it.
    pub window: Duration,
    /// The most tokens (sequences × padded length) one pass runs.
    pub max_batch_tokens: usize,
    /// The most requests waiting at once; more are turned away (429).
    pub max_queue: usize,
}

/// What the model's thread and the handlers share.
#[derive(Default)]
struct Counters {
    /// Requests queued and not yet taken into a pass.
    waiting: AtomicUsize,
    /// Passes run.
    passes: AtomicU64,
    /// Requests dropped before their pass because their client had left.
    cancelled: AtomicU64,
    /// The last pass's time, in milliseconds.
    last_pass_ms: AtomicU64,
    /// The ranks whose shards answer.
    ranks_alive: AtomicUsize,
}

/// The sending side of the model's queue.
#[derive(Clone)]
pub struct Queue {
    jobs: mpsc::Sender<Job>,
    counters: Arc<Counters>,
    max_queue: usize,
}

/// Why a request was not queued.
pub enum Refused {
    /// The queue is full: try again after this many seconds.
    Full { retry_after_s: u64 },
    /// The model's thread has stopped.
    Stopped,
}

impl Queue {
    /// Queues `job`, unless the queue is full or the model's thread gone.
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        let waiting = self.counters.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_queue {
            self.counters.waiting.fetch_sub(1, Ordering::SeqCst);
            // The passes ahead, at the last pass's pace.
            let pass_ms = self.counters.last_pass_ms.load(Ordering::SeqCst).max(1);
            let ahead = (waiting as u64).div_ceil(self.max_queue.max(1) as u64) + 1;
            return Err(Refused::Full {
                retry_after_s: (pass_ms * ahead).div_ceil(1000).max(1),
            });
        }
        if self.jobs.send(job).is_err() {
            self.counters.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Stopped);
        }
        Ok(())
    }

    /// The requests waiting for a pass.
    pub fn depth(&self) -> usize {
        self.counters.waiting.load(Ordering::SeqCst)
    }

    /// The passes run so far.
    pub fn passes(&self) -> u64 {
        self.counters.passes.load(Ordering::SeqCst)
    }

    /// The requests dropped because their client left before their pass.
    pub fn cancelled(&self) -> u64 {
        self.counters.cancelled.load(Ordering::SeqCst)
    }

    /// The ranks whose shards answer.
    pub fn ranks_alive(&self) -> usize {
        self.counters.ranks_alive.load(Ordering::SeqCst)
    }
}

/// How the model's thread gets its model: built at the start, and built again after a
/// pass lost a rank when `rebuild_after_loss` (worker processes of its own, which do
/// not come back; a `--cluster` job takes a replacement worker by itself).
pub struct ModelSource<B> {
    /// Builds the model, returning it with its number of ranks.
    pub build: B,
    /// Whether to build it again after a rank was lost.
    pub rebuild_after_loss: bool,
}

/// Starts the model's thread: it builds the model (which stays on that thread), then
/// runs the queue's requests in batches. Returns the queue once the model is built, or
/// why it could not be.
pub fn start<B>(source: ModelSource<B>, batching: Batching) -> anyhow::Result<Queue>
where
    B: FnMut() -> anyhow::Result<(FlexModel, usize)> + Send + 'static,
{
    let (jobs, received) = mpsc::channel::<Job>();
    let counters = Arc::new(Counters::default());
    let queue = Queue {
        jobs,
        counters: counters.clone(),
        max_queue: batching.max_queue,
    };
    let (ready, built) = mpsc::channel();
    std::thread::Builder::new()
        .name("flexmodel-model".into())
        .spawn(move || {
            let ModelSource {
                mut build,
                rebuild_after_loss,
            } = source;
            let mut model = match build() {
                Ok((model, ranks)) => {
                    counters.ranks_alive.store(ranks, Ordering::SeqCst);
                    model
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let _ = ready.send(Ok(()));
            let mut waiting = VecDeque::new();
            while gather(&received, &mut waiting, batching.window) {
                let batch = take_batch(&mut waiting, batching.max_batch_tokens, &counters);
                if batch.is_empty() {
                    continue;
                }
                let started = Instant::now();
                // The pass is a trace of its own, linked both ways to its requests'.
                let pass = tracing::info_span!(
                    parent: None,
                    "serve.pass",
                    serve.requests = batch.len() as i64
                );
                for job in &batch {
                    pass.follows_from(job.span.id());
                    job.span.follows_from(pass.id());
                }
                let lost_rank = pass.in_scope(|| run_batch(&mut model, batch));
                counters
                    .last_pass_ms
                    .store(started.elapsed().as_millis() as u64, Ordering::SeqCst);
                counters.passes.fetch_add(1, Ordering::SeqCst);
                if lost_rank && rebuild_after_loss {
                    let alive = counters.ranks_alive.load(Ordering::SeqCst);
                    counters
                        .ranks_alive
                        .store(alive.saturating_sub(1), Ordering::SeqCst);
                    match build() {
                        Ok((rebuilt, ranks)) => {
                            model = rebuilt;
                            counters.ranks_alive.store(ranks, Ordering::SeqCst);
                        }
                        Err(e) => tracing::error!("rebuilding the model after a lost rank: {e:#}"),
                    }
                }
            }
        })?;
    built
        .recv()
        .map_err(|_| anyhow::anyhow!("the model's thread ended while building the model"))??;
    Ok(queue)
}

/// Waits for a request if none is waiting, then for the window from the oldest
/// waiting request's arrival; false once the queue's senders are all gone.
fn gather(received: &mpsc::Receiver<Job>, waiting: &mut VecDeque<Job>, window: Duration) -> bool {
    if waiting.is_empty() {
        match received.recv() {
            Ok(job) => waiting.push_back(job),
            Err(_) => return false,
        }
    }
    let until = waiting
        .front()
        .map_or_else(Instant::now, |j| j.arrived + window);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(job) => waiting.push_back(job),
            Err(RecvTimeoutError::Timeout) => break,
            Err(RecvTimeoutError::Disconnected) => return !waiting.is_empty(),
        }
    }
    // Whatever else is already here joins too.
    waiting.extend(received.try_iter());
    true
}

/// The next pass's requests: a generation on its own, or the oldest waiting forward
/// request and, in order of arrival, the forward requests of the same key that fit in
/// `max_tokens` with it. Requests whose clients left are dropped on the way.
fn take_batch(waiting: &mut VecDeque<Job>, max_tokens: usize, counters: &Counters) -> Vec<Job> {
    let mut batch: Vec<Job> = Vec::new();
    let mut key: Option<BatchKey> = None;
    let (mut rows, mut len) = (0usize, 0usize);
    let mut kept = VecDeque::with_capacity(waiting.len());
    for job in waiting.drain(..) {
        if job.abandoned() {
            counters.waiting.fetch_sub(1, Ordering::SeqCst);
            counters.cancelled.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let fits = match (&job.work, key, batch.first()) {
            (_, _, None) => true,
            (Work::Forward { request, .. }, Some(key), Some(first)) => {
                !job.alone()
                    && !first.alone()
                    && key == request.key()
                    && (rows + request.sequences()) * len.max(request.len()) <= max_tokens
            }
            _ => false,
        };
        if !fits {
            kept.push_back(job);
            continue;
        }
        if let Work::Forward { request, .. } = &job.work {
            key = Some(request.key());
            rows += request.sequences();
            len = len.max(request.len());
        }
        counters.waiting.fetch_sub(1, Ordering::SeqCst);
        batch.push(job);
    }
    *waiting = kept;
    batch
}

/// Runs `batch` (a generation, or forward requests as one pass) and answers its
/// requests; true if it lost a rank.
fn run_batch(model: &mut FlexModel, batch: Vec<Job>) -> bool {
    let mut forwards = Vec::with_capacity(batch.len());
    for job in batch {
        match job.work {
            Work::Forward { request, reply } => forwards.push((request, reply)),
            Work::Generate { request, events } => {
                let lost = generation::run(model, &request, &events);
                model.hooks_mut().clear();
                model.store_mut().clear();
                return lost;
            }
        }
    }
    run_forwards(model, forwards)
}

/// Runs forward requests as one pass and answers them; true if the pass lost a rank. A
/// pass that fails for another reason is run again a request at a time, so that only
/// the request at fault gets its error.
fn run_forwards(model: &mut FlexModel, batch: Vec<(Prepared, Reply)>) -> bool {
    let requests: Vec<&Prepared> = batch.iter().map(|(request, _)| request).collect();
    let answers = batching::run(model, &requests);
    // What a pass leaves behind is not the next one's.
    model.hooks_mut().clear();
    model.store_mut().clear();
    match answers {
        Ok(answers) => {
            for ((_, reply), answer) in batch.into_iter().zip(answers) {
                // A client that left no longer waits for its answer.
                let _ = reply.send(Ok(answer));
            }
            false
        }
        Err(failure) if failure.status == 503 || batch.len() == 1 => {
            for (_, reply) in batch {
                let _ = reply.send(Err(Failure {
                    status: failure.status,
                    message: failure.message.clone(),
                }));
            }
            failure.status == 503
        }
        Err(_) => {
            let mut lost = false;
            for one in batch {
                lost |= run_forwards(model, vec![one]);
            }
            lost
        }
    }
}

/// Where a forward request's answer goes.
type Reply = oneshot::Sender<Result<Vec<u8>, Failure>>;
