//! The `flexmodel` command line (the README's "Command line").

mod bench;
mod cache;
mod capture;
mod generate;
mod hook_args;
mod hooks;
mod induction;
mod input;
mod layout;
mod lens;
mod pass_args;
mod random_checkpoint;
mod serve;
mod worker;
mod workers;

use clap::{Parser, Subcommand};
use flexmodel::telemetry::{self, Profile};
use tracing_subscriber::EnvFilter;

/// Hook any point of a sharded transformer as if it were in one piece.
#[derive(Parser)]
#[command(name = "flexmodel", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Greedy generation from a prompt.
    Generate(generate::GenerateArgs),
    /// Capture hook points (optionally edited) into a safetensors file.
    Capture(capture::CaptureArgs),
    /// Stream the activations of a corpus to disk as a Hugging Face dataset (resumable).
    Cache(cache::CacheArgs),
    /// List every hook point with its shape and shard spec.
    Hooks(hooks::HooksArgs),
    /// Time forward passes over a random batch, with and without hooks.
    Bench(bench::BenchArgs),
    /// Induction scores of every head on repeated random tokens, with figures.
    Induction(induction::InductionArgs),
    /// Train a tuned lens and compare it with the logit lens on held-out text.
    Lens(lens::LensArgs),
    /// Serve passes with hooks and edits over HTTP to clients with a token.
    Serve(serve::ServeArgs),
    /// Join a job in etcd and serve its drivers' passes, one rank at a time.
    Worker(worker::WorkerArgs),
    /// List the workers of a job: id, host, address, device, rank, model, state.
    Workers(workers::WorkersArgs),
    /// Write a random model in the Hugging Face layout (for checks without weights).
    #[command(hide = true)]
    RandomCheckpoint(random_checkpoint::RandomCheckpointArgs),
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    one_thread_pool();
    stop_workers_on_signals();
    let cli = Cli::parse();
    let profile = match &cli.command {
        Command::Bench(args) if args.profile => Some(Profile::default()),
        _ => None,
    };
    let logs = EnvFilter::try_from_env("FLEXMODEL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let telemetry = match telemetry::init(logs, profile.clone()) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Capture(args) => capture::run(args),
        Command::Cache(args) => cache::run(args),
        Command::Hooks(args) => hooks::run(args),
        Command::Bench(args) => bench::run(args, profile),
        Command::Induction(args) => induction::run(args),
        Command::Lens(args) => lens::run(args),
        Command::Workers(args) => workers::run(args),
        Command::Serve(args) => serve::run(args),
        Command::RandomCheckpoint(args) => random_checkpoint::run(args),
        Command::Worker(args) => {
            // The shard's thread may still be blocked in a pass: end the process now.
            let code = match worker::run(args) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: {}", describe(&e));
                    1
                }
            };
            drop(telemetry);
            std::process::exit(code);
        }
    };
    wait_if_exiting_on_a_signal();
    // Flushes the spans still queued for export.
    drop(telemetry);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Keeps the pass's work on one pool of threads: the matrix products' and the fused
/// kernels' (rayon's), not also candle's pool for elementwise ops, whose threads spin
/// after each op and took cores from the matrix products (one SmolLM2 pass: 1158–1178 ms
/// with both pools, 920–957 ms with rayon's alone; the README's "Performance").
/// `CANDLE_NUM_THREADS` set by the user is left as it is.
fn one_thread_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

/// Keeps memory that passes free for the next pass instead of returning it to the OS.
///
/// A pass that captures every hook point holds its activations (917 MB for SmolLM2 at
/// 4 × 128 tokens) until they are dropped; with glibc's default trimming, the next pass
/// then faults all of that memory in again, which costs more than the capture itself.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes glibc's allocation parameters; it is called before
    // any other thread exists, and a rejected value leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

/// Exits on SIGINT and SIGTERM only after stopping and reaping this process's worker
/// processes (`--procs`), so that none is left behind, not even as a zombie, and after
/// leaving the job a worker joined, so that its record goes at once.
///
/// The two signals are blocked in every thread (this runs before any other thread
/// starts, and threads inherit the mask; child processes start with none blocked) and
/// taken by one thread that waits for them.
#[cfg(unix)]
fn stop_workers_on_signals() {
    // SAFETY: sigset_t is plain data that sigemptyset initialises; pthread_sigmask only
    // changes this thread's mask, before any other thread exists.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return;
        }
        set
    };
    let waiter = std::thread::Builder::new().name("flexmodel-signals".into());
    let spawned = waiter.spawn(move || {
        let mut signal = 0;
        // SAFETY: `set` is initialised and blocked in every thread; sigwait writes the
        // signal taken into `signal`.
        if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
            EXITING_ON_SIGNAL.store(true, std::sync::atomic::Ordering::SeqCst);
            flexmodel::runtime::stop_every_worker();
            flexmodel::runtime::leave_every_job();
            flexmodel::telemetry::flush();
            std::process::exit(128 + signal);
        }
    });
    if spawned.is_err() {
        // Without the waiting thread, let the signals act as they would.
        // SAFETY: as above.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
}

#[cfg(not(unix))]
fn stop_workers_on_signals() {}

/// Set once a signal was taken: the process exits with 128 + the signal.
static EXITING_ON_SIGNAL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A command that ends because its workers were stopped on a signal leaves the exit to
/// the thread that took the signal.
fn wait_if_exiting_on_a_signal() {
    while EXITING_ON_SIGNAL.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::park();
    }
}

/// The error and its causes, each cause added only if the message does not already say it.
fn describe(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message = format!("{message}: {cause}");
        }
    }
    message
}

/// Whether the error is stdout closed by the reader (`flexmodel hooks | head`).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}
