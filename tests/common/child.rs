//! Child processes that a test cannot leak or hang on: killed and reaped when dropped,
//! on every path (a failed assertion included), and waited on only with a deadline that
//! fails the test with what the child printed.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a test's run of a program may take before the test fails: far above what
/// any takes (the longest, the README's lens run in a debug build beside the other tests,
/// took more than 10 minutes), so that it catches only a hang.
pub const RUN_DEADLINE: Duration = Duration::from_secs(1800);

/// A child process, killed (SIGKILL) and reaped when dropped.
pub struct Guarded {
    child: Child,
    what: String,
    /// Readers of its piped stdout and stderr, started once it is waited on.
    readers: Option<[JoinHandle<Vec<u8>>; 2]>,
}

impl Guarded {
    /// Starts `command`; `what` names it in failures.
    pub fn spawn(command: &mut Command, what: &str) -> Guarded {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Guarded {
            child,
            what: what.to_string(),
            readers: None,
        }
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, once it has ended, waiting at most `timeout`: past it, the child
    /// is killed and the test fails with what it printed (where piped).
    pub fn wait_within(&mut self, timeout: Duration) -> ExitStatus {
        self.read_pipes();
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    self.kill();
                    let (stdout, stderr) = self.printed();
                    panic!(
                        "{} did not end within {timeout:?}; stdout:\n{stdout}\nstderr:\n{stderr}",
                        self.what
                    );
                }
                Err(e) => panic!("waiting on {}: {e}", self.what),
            }
        }
    }

    /// Its status and what it printed (where piped), once it has ended, waiting at most
    /// `timeout` as [`wait_within`](Self::wait_within) does.
    pub fn output_within(mut self, timeout: Duration) -> Output {
        let status = self.wait_within(timeout);
        let (stdout, stderr) = self.take_printed();
        Output {
            status,
            stdout,
            stderr,
        }
    }

    /// Kills it (SIGKILL) and reaps it; nothing if it has ended.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts reading its piped outputs, so that a full pipe never blocks it.
    fn read_pipes(&mut self) {
        if self.readers.is_some() {
            return;
        }
        fn reader(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut bytes);
                }
                bytes
            })
        }
        self.readers = Some([
            reader(self.child.stdout.take()),
            reader(self.child.stderr.take()),
        ]);
    }

    /// What it printed to its pipes, once it has ended.
    fn take_printed(&mut self) -> (Vec<u8>, Vec<u8>) {
        match self.readers.take() {
            Some([out, err]) => (
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default(),
            ),
            None => (Vec::new(), Vec::new()),
        }
    }

    /// What it printed to its piped stdout and stderr, once it has ended (waited on).
    pub fn printed(&mut self) -> (String, String) {
        let (out, err) = self.take_printed();
        (
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        )
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.kill();
    }
}

/// [`Command::output`] with a deadline.
pub trait OutputWithin {
    /// Runs the command to its end with its stdout and stderr captured (and no stdin), as
    /// [`Command::output`] does; past `timeout` it is killed and the test fails with what
    /// it printed.
    fn output_within(&mut self, timeout: Duration) -> Output;
}

impl OutputWithin for Command {
    fn output_within(&mut self, timeout: Duration) -> Output {
        use std::process::Stdio;
        let what = format!("{:?}", self.get_program());
        self.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Guarded::spawn(self, &what).output_within(timeout)
    }
}
