//! `flexmodel worker`: serves one rank of a model for a driver.
//!
//! Under `--procs` a command starts one worker per rank itself, with `--driver` and
//! `--rank`: the worker connects to that driver, learns its layout, its peers and its
//! model, reads only its rank's weights and serves passes until the driver is done or
//! gone. (Joining a job through etcd with `--etcd` and `--job` is the next step.)

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use flexmodel::runtime::LlamaLoader;
use flexmodel_actors::{WorkerOptions, serve};
use flexmodel_cluster::transport::Token;

/// What `worker` takes.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The driver's address (`HOST:PORT`) to serve.
    #[arg(long, hide = true)]
    driver: SocketAddr,
    /// The rank to serve.
    #[arg(long, hide = true)]
    rank: usize,
    /// The address other processes reach this worker at (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The job's secret token (a file, mode 0600).
    #[arg(long, value_name = "F")]
    token_file: PathBuf,
}

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let options = WorkerOptions {
        driver: args.driver,
        rank: args.rank,
        listen: args.listen,
        trace: flexmodel::telemetry::propagation(),
        token: Token::read(&args.token_file)?,
    };
    serve(&options, &LlamaLoader)?;
    Ok(())
}
