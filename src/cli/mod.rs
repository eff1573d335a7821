//! The `bus` command line: one module per subcommand. `main` parses, sets up logging and
//! dispatches; each subcommand returns an error that is printed as one line.

pub mod bench;
pub mod server;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::level_filters::LevelFilter;

use crate::config::ServerConfig;

#[derive(Debug, Parser)]
#[command(
    name = "bus",
    version,
    about = "A persistent message bus over HTTP and Server-Sent Events"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Server(ServerConfig),
    /// Measure performance.
    Bench(bench::BenchArgs),
}

/// Runs a parsed command line and turns its outcome into an exit code.
pub fn main(cli: Cli) -> ExitCode {
    if let Err(message) = init_logging() {
        eprintln!("bus: {message}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bus: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Server(config) => server::run(config).await,
            Command::Bench(args) => bench::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bus: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to standard error at the level named by `BUS_LOG_LEVEL` (default `INFO`).
fn init_logging() -> Result<(), String> {
    let level = match std::env::var("BUS_LOG_LEVEL") {
        Err(_) => LevelFilter::INFO,
        Ok(text) => match text.trim().to_ascii_uppercase().as_str() {
            "" | "INFO" => LevelFilter::INFO,
            "DEBUG" => LevelFilter::DEBUG,
            "TRACE" => LevelFilter::TRACE,
            "WARN" | "WARNING" => LevelFilter::WARN,
            "ERROR" => LevelFilter::ERROR,
            _ => {
                return Err(format!(
                    "invalid BUS_LOG_LEVEL {text:?}: use DEBUG, INFO, WARN or ERROR"
                ))
            }
        },
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    Ok(())
}
