//! A real etcd for the tests (Debian's `etcd-server`, on free loopback ports, its data
//! in a temporary directory), and `flexmodel worker` processes joined to a job in it.
//! Everything started here is killed and reaped when dropped, also when a test fails.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::child::OutputWithin;
use flexmodel_cluster::membership::{ClusterUrl, EtcdJob, MemberRecord, MemberState};

/// A port no one listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// One etcd member process.
pub struct EtcdMember {
    pub name: String,
    pub client: String,
    child: Option<Child>,
    /// How to start it again after [`EtcdMember::kill`].
    command: Vec<String>,
}

impl EtcdMember {
    /// Kills the member (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(command: &[String], log: &Path) -> Child {
        let log = std::fs::File::create(log).expect("etcd's log file");
        Command::new(&command[0])
            .args(&command[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd's log file"))
            .stderr(log)
            .spawn()
            .expect("etcd (Debian's etcd-server) must be installed: scripts/test installs it")
    }
}

/// An etcd cluster of one or more members on loopback.
pub struct Etcd {
    pub members: Vec<EtcdMember>,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// A single-member etcd, answering.
    pub fn start() -> Etcd {
        Self::cluster(1)
    }

    /// An etcd cluster of `n` members, answering.
    pub fn cluster(n: usize) -> Etcd {
        let dir = tempfile::tempdir().expect("a directory for etcd's data");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let name = format!("m{i}");
                let client = format!("127.0.0.1:{client}");
                let command: Vec<String> = [
                    "etcd",
                    "--name",
                    &name,
                    "--data-dir",
                    dir.path().join(&name).to_str().unwrap(),
                    "--listen-client-urls",
                    &format!("http://{client}"),
                    "--advertise-client-urls",
                    &format!("http://{client}"),
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-cluster",
                    &initial.join(","),
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "flexmodel-test",
                    "--heartbeat-interval",
                    "100",
                    "--election-timeout",
                    "1000",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                let child = EtcdMember::spawn(&command, &dir.path().join(format!("{name}.log")));
                EtcdMember {
                    name,
                    client,
                    child: Some(child),
                    command,
                }
            })
            .collect();
        let etcd = Etcd { members, dir };
        etcd.wait_until_answering();
        etcd
    }

    /// Starts member `i` again after it was killed.
    pub fn restart(&mut self, i: usize) {
        let member = &mut self.members[i];
        let log = self.dir.path().join(format!("{}-again.log", member.name));
        member.child = Some(EtcdMember::spawn(&member.command, &log));
    }

    /// `HOST:PORT,...` of every member.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The URL of job `job` in this etcd.
    pub fn url(&self, job: &str) -> ClusterUrl {
        ClusterUrl::new(&self.endpoints(), job).unwrap()
    }

    /// The id of the current leader's member index, asked with etcdctl.
    pub fn leader(&self) -> usize {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoints(), "endpoint", "status"])
            .output_within(Duration::from_secs(60));
        let text = String::from_utf8_lossy(&out.stdout);
        // One line per endpoint: ENDPOINT, ID, VERSION, DB SIZE, IS LEADER, ...
        for line in text.lines() {
            let cells: Vec<&str> = line.split(", ").collect();
            if cells.get(4) == Some(&"true") {
                let endpoint = cells[0].trim_start_matches("http://");
                if let Some(i) = self.members.iter().position(|m| m.client == endpoint) {
                    return i;
                }
            }
        }
        panic!("no leader in: {text}");
    }

    fn wait_until_answering(&self) {
        let url = self.url("probe");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if EtcdJob::connect(&url).and_then(|job| job.members()).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "etcd did not answer within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        // Also when a later member of its cluster fails to start.
        self.kill();
    }
}

/// A job's token file, mode 0600, in its own temporary directory.
pub struct TokenFile {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TokenFile {
    pub fn new(secret: &str) -> TokenFile {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, secret).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        TokenFile { path, _dir: dir }
    }
}

/// A `flexmodel worker` process of a job, killed and reaped when dropped.
pub struct JobWorker {
    child: Option<Child>,
}

impl JobWorker {
    /// Starts a worker of `url`'s job holding `token` (or none), listening on `listen`.
    pub fn start(url: &ClusterUrl, token: Option<&Path>, listen: &str) -> JobWorker {
        Self::spawn(&mut Self::command(url, token, listen))
    }

    /// The command that starts a worker as [`JobWorker::start`] does, to change first.
    pub fn command(url: &ClusterUrl, token: Option<&Path>, listen: &str) -> Command {
        let mut command = Command::new(crate::common::flexmodel_binary());
        command
            .args([
                "worker",
                "--etcd",
                &url.endpoints.join(","),
                "--job",
                &url.job,
            ])
            .args(["--listen", listen])
            .env("RAYON_NUM_THREADS", "1")
            .env(
                "FLEXMODEL_LOG",
                // Warnings only, unless a test run asks for more.
                std::env::var("FLEXMODEL_TEST_WORKER_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(token) = token {
            command.arg("--token-file").arg(token);
        }
        command
    }

    /// Starts `command`, a worker.
    pub fn spawn(command: &mut Command) -> JobWorker {
        JobWorker {
            child: Some(command.spawn().expect("flexmodel worker")),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for JobWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` workers of `url`'s job, once all of them are registered.
pub fn start_workers(url: &ClusterUrl, token: Option<&Path>, n: usize) -> Vec<JobWorker> {
    let before = members(url).len();
    let workers: Vec<JobWorker> = (0..n)
        .map(|_| JobWorker::start(url, token, "127.0.0.1:0"))
        .collect();
    wait_for_members(url, before + n);
    workers
}

/// The job's members as etcd has them.
pub fn members(url: &ClusterUrl) -> Vec<MemberRecord> {
    EtcdJob::connect(url).unwrap().members().unwrap()
}

/// Whether every member of the job is in `state`.
pub fn all_members_are(url: &ClusterUrl, state: MemberState) -> bool {
    members(url).iter().all(|m| m.state == state)
}

/// Waits until the job has `n` members.
pub fn wait_for_members(url: &ClusterUrl, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while members(url).len() != n {
        assert!(
            Instant::now() < deadline,
            "the job has {} members, not {n}, after 30 s",
            members(url).len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A job for one test: its own etcd, a token file, and `n` workers registered in it.
pub struct TestJob {
    pub workers: Vec<JobWorker>,
    pub token: TokenFile,
    pub url: ClusterUrl,
    pub etcd: Etcd,
}

impl TestJob {
    /// The job `name` on an etcd of `members` members, with `workers` workers.
    pub fn start(name: &str, members: usize, workers: usize) -> TestJob {
        let etcd = Etcd::cluster(members);
        let url = etcd.url(name);
        let token = TokenFile::new(&format!("{name}-secret"));
        let workers = start_workers(&url, Some(&token.path), workers);
        TestJob {
            workers,
            token,
            url,
            etcd,
        }
    }

    /// The job's workers as a placement for the job's token.
    pub fn placement(&self) -> flexmodel::runtime::Placement {
        self.placement_with(&self.token)
    }

    /// The job's workers as a placement for another token.
    pub fn placement_with(&self, token: &TokenFile) -> flexmodel::runtime::Placement {
        flexmodel::runtime::Placement::Cluster(flexmodel::runtime::Cluster {
            url: self.url.clone(),
            model: None,
            token_file: token.path.clone(),
        })
    }
}
