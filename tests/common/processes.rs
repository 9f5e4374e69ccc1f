//! Processes as the tests of worker processes see them: signals, children, and whether
//! a process has ended.

use std::process::Command;
use std::time::{Duration, Instant};

/// Sends `signal` (`KILL`, `STOP`, …) to process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Whether process `pid` has ended (gone, or a zombie waiting for a reaper).
pub fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Waits until `done`, failing the test after `timeout`; returns how long it took.
pub fn wait_until(what: &str, timeout: Duration, done: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// Asserts that every one of `pids` ends within 5 s; returns how long it took.
pub fn assert_gone(pids: &[u32]) -> Duration {
    wait_until("every process to end", Duration::from_secs(5), || {
        pids.iter().all(|&p| ended(p))
    })
}

/// The process ids of `parent`'s children.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, r)| r.split_whitespace().collect());
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            children.push(pid);
        }
    }
    children
}

/// A driver-side edit of `point` that sends `how` (`KILL`, `STOP`) to process `victim`
/// while the pass waits on the hook: the victim reaches the hook and says so in a
/// heartbeat first, and its fate is seen before the shards go on.
pub fn signal_at_hook(point: &str, victim: u32, how: &'static str) -> flexmodel::HookFunction {
    flexmodel::HookFunction::new(point)
        .without_capture()
        .with_edit(move |_, x| {
            std::thread::sleep(Duration::from_millis(500));
            signal(victim, how);
            std::thread::sleep(Duration::from_millis(300));
            Ok(x.clone())
        })
}
