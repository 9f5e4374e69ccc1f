//! A `flexmodel serve` process for the tests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A `flexmodel serve` process, killed and reaped when dropped.
pub struct Server {
    /// The process.
    pub child: Child,
    /// `http://ADDR`, the address it listens on.
    pub url: String,
}

impl Server {
    /// Serves the model at `model` to the clients of `tokens`, with `extra` options.
    pub fn start(model: &Path, tokens: &Path, extra: &[&str]) -> Server {
        Self::start_with_env(model, tokens, extra, &[])
    }

    /// [`Server::start`] with the variables `env` set.
    pub fn start_with_env(
        model: &Path,
        tokens: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let mut child = Command::new(super::flexmodel_binary())
            .args(["serve", "--model", model.to_str().unwrap()])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--token-file",
                tokens.to_str().unwrap(),
            ])
            .args(extra)
            .env("FLEXMODEL_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting flexmodel serve");
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("serve printed {line:?}"))
            .to_string();
        Server {
            child,
            url: format!("http://{addr}"),
        }
    }

    /// Stops it with SIGTERM and waits for it to exit.
    pub fn terminate(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
