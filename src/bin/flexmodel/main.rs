//! The `flexmodel` command line (DESIGN.md, "Command line").

mod bench;
mod generate;
mod layout;

use clap::{Parser, Subcommand};
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
    /// Time forward passes over a random batch.
    Bench(bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("FLEXMODEL_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
