//! `flexmodel worker`: serves one rank of a model at a time, for driver after driver.
//!
//! With `--etcd` and `--job`, the worker registers in the job and serves its drivers
//! (`--cluster etcd://.../JOB`) one after another, keeping its loaded slice for the next
//! driver that asks for the same model and layout, until it is stopped (SIGTERM or
//! SIGINT: it leaves the job at once). Under `--procs` a command starts one worker per
//! rank itself, with the hidden `--driver` and `--rank`: that worker serves that driver
//! alone and ends with it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use flexmodel::runtime::CheckpointLoader;
use flexmodel_actors::{Join, WorkerOptions, serve};
use flexmodel_cluster::DeviceSpec;
use flexmodel_cluster::membership::ClusterUrl;
use flexmodel_cluster::transport::Token;

/// What `worker` takes.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The etcd endpoints of the job (`HOST:PORT[,HOST:PORT...]`).
    #[arg(
        long,
        value_name = "HOST:PORT[,...]",
        requires = "job",
        required_unless_present = "driver"
    )]
    etcd: Option<String>,
    /// The job to join.
    #[arg(long, requires = "etcd")]
    job: Option<String>,
    /// The driver's address (`HOST:PORT`) to serve, for a worker a driver started.
    #[arg(long, hide = true, requires = "rank", conflicts_with = "etcd")]
    driver: Option<SocketAddr>,
    /// The rank to serve, for a worker a driver started.
    #[arg(long, hide = true, requires = "driver")]
    rank: Option<usize>,
    /// The address other processes reach this worker at (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The job's secret token (a file, mode 0600, that the job's drivers hold too).
    #[arg(long, value_name = "F")]
    token_file: PathBuf,
    /// The device to compute on: `cpu`, `cuda:N`, or `cuda` (for each rank it serves,
    /// GPU rank mod the number of GPUs). Needs a build with the `cuda` feature.
    #[arg(long, default_value_t = DeviceSpec::Cpu, value_name = "cpu|cuda[:N]")]
    device: DeviceSpec,
}

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    // A device this build or machine cannot give fails now, not at the first driver.
    args.device.device(args.rank.unwrap_or(0))?;
    let join = match (&args.etcd, &args.job, args.driver, args.rank) {
        (Some(etcd), Some(job), None, None) => Join::Job {
            url: ClusterUrl::new(etcd, job)?,
            device: args.device,
        },
        (None, None, Some(driver), Some(rank)) => Join::Driver { driver, rank },
        _ => anyhow::bail!("give --etcd HOST:PORT[,...] and --job JOB"),
    };
    let token = Token::read(&args.token_file)?;
    let options = WorkerOptions {
        join,
        listen: args.listen,
        trace: flexmodel::telemetry::propagation(),
        token,
    };
    serve(&options, &CheckpointLoader)?;
    Ok(())
}
