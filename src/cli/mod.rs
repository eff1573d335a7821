//! The `bus` command line: one module per subcommand. `main` parses, sets up logging and
//! dispatches; each subcommand returns an error that is printed as one line on standard
//! error.
//!
//! Exit codes, for scripts, the same for every command: 0 success; 1 failure (the message
//! says why: a refusal, an unreachable server, a wait that timed out, damaged data); 2 bad
//! usage.

pub mod archive;
pub mod bench;
mod consumers;
pub mod debug;
pub mod events;
mod health;
pub mod import;
mod info;
mod progress;
pub mod server;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tracing::level_filters::LevelFilter;

use crate::client::{Client, DEFAULT_HOST};
use crate::config::ServerConfig;

pub use crate::units::parse_duration;

/// Exit codes, the same for every command: 0 success, [`EXIT_FAILURE`] for anything that
/// went wrong (a refusal, an unreachable server, a wait that timed out, damaged data: one
/// line on standard error says which), [`EXIT_USAGE`] for a command line that does not
/// make sense.
pub const EXIT_FAILURE: u8 = 1;
/// Also what clap exits with on a usage error.
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "bus",
    version,
    about = "A persistent message bus over HTTP and Server-Sent Events"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// How log lines on standard error are written: `text` for people, `json` (one object
    /// per line) for log collectors.
    #[arg(long, global = true, env = "BUS_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// What is logged on standard error, as RUST_LOG writes it: a level (`error`, `warn`,
    /// `info`, `debug`, `trace`, `off`) and/or `target=level` pairs, comma-separated, a
    /// target being a module path and what is under it. `warn,bus::http=debug`: warnings,
    /// and everything from the HTTP layer; `info,bus::access=off`: no access lines. A
    /// filter without a bare level logs nothing but its targets.
    #[arg(
        long,
        global = true,
        env = "BUS_LOG_LEVEL",
        default_value = "info",
        value_parser = parse_log_filter
    )]
    pub log_level: LogFilter,
}

/// A parsed `--log-level`: which targets log at which levels.
#[derive(Debug, Clone)]
pub struct LogFilter(tracing_subscriber::filter::Targets);

/// Parses `--log-level`. Levels are read in any case (`DEBUG` as before); `warning` is
/// `warn`. An empty value is `info`. Unlike `RUST_LOG`, a bare word must be a level (a
/// target is written `target=level`): a misspelt level is refused rather than taken
/// for a target, which would silence every log.
pub fn parse_log_filter(text: &str) -> Result<LogFilter, String> {
    let invalid = |why: String| format!("invalid --log-level (BUS_LOG_LEVEL) {text:?}: {why}");
    let mut directives = Vec::new();
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, level) = match directive.split_once('=') {
            Some((target, level)) => (Some(target.trim()), level.trim()),
            None => (None, directive),
        };
        let level = level.to_ascii_lowercase();
        let level = if level == "warning" {
            "warn".to_owned()
        } else {
            level
        };
        if !["off", "error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
            return Err(invalid(format!(
                "{level:?} is not a level: use off, error, warn, info, debug or trace, alone or as target=level"
            )));
        }
        directives.push(match target {
            Some("") => return Err(invalid(format!("{directive:?} names no target"))),
            Some(target) => format!("{target}={level}"),
            None => level,
        });
    }
    if directives.is_empty() {
        directives.push("info".to_owned());
    }
    directives
        .join(",")
        .parse()
        .map(LogFilter)
        .map_err(|e| invalid(e.to_string()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    #[command(after_help = "Examples:
  bus server --namespaces app,orders
  bus server --namespaces app --path /var/lib/bus --tls-cert cert.pem --tls-key key.pem")]
    Server(Box<ServerConfig>),
    /// Publish an event.
    #[command(after_help = r#"Examples:
  bus put orders.created '{"id":1042}'
  echo '{"id":1043}' | bus put orders.created
  bus put --subject orders.paid --data @payment.json --key pay-1042 --confirm 2"#)]
    Put(events::PutArgs),
    /// Subscribe and print events, one JSON object per line.
    #[command(after_help = "Examples:
  bus get --subject 'orders.>' --start oldest --until-now
  bus get --subject orders.created --start-time 2026-12-01T09:00:00Z --format pretty
  bus get --subject 'orders.>' --ack auto --consumer billing")]
    Get(events::GetArgs),
    /// Acknowledge an event delivered to a manual-ack consumer.
    #[command(after_help = "Example:
  bus ack --consumer-id c_0i4mmjhbh8g4fd781t3j --event-id e_ikv8s43r000000000000")]
    Ack(events::AckArgs),
    /// Export events as JSON Lines, from a server or a data directory.
    #[command(after_help = "Examples:
  bus dump --namespace orders -o orders.jsonl
  bus dump --path ./bus_data --secret-key \"$KEY\" > all.jsonl")]
    Dump(archive::DumpArgs),
    /// Import events from JSON Lines, keeping their ids and times.
    #[command(after_help = "Examples:
  bus restore -i orders.jsonl
  bus restore --path ./bus_data -i orders.jsonl")]
    Restore(archive::RestoreArgs),
    /// Copy namespaces from one data directory to another.
    #[command(after_help = "Example:
  bus copy --from ./bus_data --to ./encrypted --dst-secret-key \"$KEY\"")]
    Copy(archive::CopyArgs),
    /// Import a reference server's (ella.to/bus) data directory into a bus data directory,
    /// keeping ids, times and order.
    Import(import::ImportArgs),
    /// Show, list or verify what a data directory holds.
    #[command(after_help = "Examples:
  bus debug --path ./bus_data
  bus debug --path ./bus_data --verify")]
    Debug(debug::DebugArgs),
    /// Check that the server is ready (exit code 0) or not (1), found from its own
    /// settings (BUS_ADDR, BUS_TLS_CERT): the container health check.
    #[command(after_help = "Examples:
  bus health
  bus health --host https://bus.example.com")]
    Health(health::HealthArgs),
    /// Show what a running server's namespaces hold and who reads them: events, retained
    /// range, size, segments, subscribers and durable consumers.
    #[command(after_help = "Examples:
  bus info
  bus info orders --json")]
    Info(info::InfoArgs),
    /// List or delete durable consumers.
    #[command(after_help = "Examples:
  bus consumers list --namespace orders
  bus consumers delete --namespace orders --name billing")]
    Consumers(consumers::ConsumersArgs),
    /// Measure performance.
    #[command(after_help = "Examples:
  bus bench publish --embedded --connections 32
  bus bench idle --embedded --subscribers 10000 --http2")]
    Bench(bench::BenchArgs),
}

/// The server a client command talks to.
#[derive(Debug, Args)]
pub struct HostArgs {
    /// The server's address.
    #[arg(long, env = "BUS_HOST", default_value = DEFAULT_HOST)]
    pub host: String,
    /// Token for a server that requires one (`--auth-file`).
    #[arg(long, env = "BUS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to trust, besides the system's, for an https:// server whose
    /// certificate a private CA signed (or a self-signed one).
    #[arg(long, env = "BUS_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

impl HostArgs {
    /// A client for the server, presenting the token and trusting the CA if given.
    pub fn client(&self) -> anyhow::Result<Client> {
        let mut client = Client::new(&self.host)?;
        if let Some(token) = self.token.as_deref().filter(|t| !t.trim().is_empty()) {
            client = client.with_token(token)?;
        }
        if let Some(path) = &self.ca_cert {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading --ca-cert {}", path.display()))?;
            client = client
                .with_root_certificate(&pem)
                .with_context(|| format!("--ca-cert {}", path.display()))?;
        }
        Ok(client)
    }
}

/// An outcome with its own exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub code: u8,
    /// Printed on standard error unless empty.
    pub message: String,
}

impl Exit {
    /// Ends the command successfully without a word (its output pipe was closed).
    pub fn quiet() -> Exit {
        Exit {
            code: 0,
            message: String::new(),
        }
    }
}

/// Runs a parsed command line and turns its outcome into an exit code.
pub fn main(cli: Cli) -> ExitCode {
    init_logging(cli.log_format, cli.log_level);
    // Before any HTTP client is built (the benchmarks build their own).
    crate::client::install_tls_provider();
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
            Command::Server(config) => server::run(*config).await,
            Command::Put(args) => events::put(args).await,
            Command::Get(args) => events::get(args).await,
            Command::Ack(args) => events::ack(args).await,
            Command::Dump(args) => archive::dump(args).await,
            Command::Restore(args) => archive::restore(args).await,
            Command::Copy(args) => archive::copy(args).await,
            Command::Import(args) => import::run(args).await,
            Command::Debug(args) => debug::run(args).await,
            Command::Info(args) => info::run(args).await,
            Command::Health(args) => health::run(args).await,
            Command::Consumers(args) => consumers::run(args).await,
            Command::Bench(args) => bench::run(args).await,
        }
    });
    // Streams still open (a `get` that stopped early) must not hold the exit up.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(exit) = e.downcast_ref::<Exit>() {
                if !exit.message.is_empty() {
                    eprintln!("bus: {}", exit.message);
                }
                return ExitCode::from(exit.code);
            }
            eprintln!("bus: {}", one_line(&format!("{e:#}")));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Error messages are one line, whatever their sources put in them.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Logs go to standard error, as `format` says, filtered by `--log-level` (`BUS_LOG_LEVEL`).
///
/// The filter is tracing-subscriber's `Targets`, which reads RUST_LOG's `target=level`
/// syntax without the `env-filter` feature (and the regex engine that feature brings):
/// what it leaves out, filters on span names and fields, the server's logs do not need.
fn init_logging(format: LogFormat, filter: LogFilter) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // The most verbose level any target enables: events above it are not even built.
    let most = filter.0.iter().map(|(_, level)| level).max();
    let most = most.into_iter().chain(filter.0.default_level()).max();
    let logs = tracing_subscriber::fmt()
        .with_max_level(most.unwrap_or(LevelFilter::OFF))
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => logs
            .with_ansi(std::io::stderr().is_terminal())
            .finish()
            .with(filter.0)
            .init(),
        LogFormat::Json => logs.json().with_ansi(false).finish().with(filter.0).init(),
    }
}
