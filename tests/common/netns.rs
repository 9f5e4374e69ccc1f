//! Hosts on one machine: network namespaces joined by a bridge (in a namespace of its
//! own, so that nothing outside the test's namespaces is touched), each host with its
//! own address and, for the processes started on it, its own host name. Needs root.
//! Every namespace (and with it every link) the test made is deleted when dropped,
//! also when the test fails.

use crate::common::child::OutputWithin;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Namespaces this process made, numbered so that two tests never share a name.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Runs `ip` with `args`, panicking with its error if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output_within(Duration::from_secs(60));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Hosts in network namespaces on one bridged subnet, `10.77.0.0/24`.
pub struct Hosts {
    /// The hosts' namespaces, host `i` at `10.77.0.{i + 1}`.
    hosts: Vec<String>,
    /// The namespace holding the bridge.
    switch: String,
}

impl Hosts {
    /// `n` hosts, their links up.
    pub fn new(n: usize) -> Hosts {
        remove_stale();
        let tag = format!(
            "fm-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let switch = format!("{tag}-sw");
        let mut made = Hosts {
            hosts: Vec::new(),
            switch: switch.clone(),
        };
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for i in 0..n {
            let host = format!("{tag}-h{i}");
            ip(&["netns", "add", &host]);
            made.hosts.push(host.clone());
            ip(&["-n", &host, "link", "set", "lo", "up"]);
            let port = format!("p{i}");
            ip(&[
                "-n", &host, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &switch,
            ]);
            ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"]);
            let address = format!("{}/24", made.address(i));
            ip(&["-n", &host, "addr", "add", &address, "dev", "eth0"]);
            ip(&["-n", &host, "link", "set", "eth0", "up"]);
        }
        made
    }

    /// Host `i`'s address.
    pub fn address(&self, i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// Host `i`'s name, as the processes started on it see it.
    pub fn name(&self, i: usize) -> String {
        format!("host-{}", (b'a' + i as u8) as char)
    }

    /// A command that runs `program` with `args` on host `i`, under the host's name.
    pub fn command(&self, i: usize, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args([
                "netns",
                "exec",
                &self.hosts[i],
                "unshare",
                "--uts",
                "sh",
                "-c",
            ])
            .arg(format!("hostname {} && exec \"$@\"", self.name(i)))
            .arg("sh")
            .arg(program)
            .args(args);
        command
    }

    /// Takes host `i`'s link down: nothing reaches it or leaves it, and no connection
    /// is told.
    pub fn cut(&self, i: usize) {
        ip(&["-n", &self.switch, "link", "set", &format!("p{i}"), "down"]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes its links.
        for namespace in self.hosts.iter().chain(std::iter::once(&self.switch)) {
            let _ = Command::new("ip")
                .args(["netns", "del", namespace])
                .status();
        }
    }
}

/// Deletes the namespaces of test processes that are gone (killed before they could).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name.strip_prefix("fm-").and_then(|r| r.split('-').next()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// A single-member etcd on host `i` of `hosts`, at port 2379 of its address; killed
/// when dropped.
pub struct EtcdOnHost {
    pub endpoint: String,
    child: std::process::Child,
    _data: tempfile::TempDir,
}

impl EtcdOnHost {
    /// Starts it and waits until it answers (asked from its own host).
    pub fn start(hosts: &Hosts, i: usize) -> EtcdOnHost {
        let data = tempfile::tempdir().unwrap();
        let address = hosts.address(i);
        let client = format!("http://{address}:2379");
        let peer = format!("http://{address}:2380");
        let log = std::fs::File::create(data.path().join("etcd.log")).unwrap();
        let dir = data.path().join("m0");
        let args = [
            "--name",
            "m0",
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("m0={peer}"),
        ];
        let child = hosts
            .command(i, "etcd", &args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd (Debian's etcd-server)");
        let etcd = EtcdOnHost {
            endpoint: format!("{address}:2379"),
            child,
            _data: data,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let health = hosts
                .command(
                    i,
                    "etcdctl",
                    &["--endpoints", &etcd.endpoint, "endpoint", "health"],
                )
                .env("ETCDCTL_API", "3")
                .output_within(Duration::from_secs(60));
            if health.status.success() {
                return etcd;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "etcd on host {i} did not answer"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

impl Drop for EtcdOnHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
