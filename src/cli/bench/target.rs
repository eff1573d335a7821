//! The server a benchmark measures: the one at `--host`, or one it starts for the run
//! (`--embedded`: a `bus server` child process on a temporary directory, so that its CPU
//! and memory are its own and not the load generator's).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

/// Where the server under test is.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The server to measure; several nodes of one bus (on one JetStream) separated by
    /// commas: the load's connections are spread over them in turn.
    #[arg(long, env = "BUS_HOST", default_value = crate::client::DEFAULT_HOST)]
    pub host: String,
    /// Start a server for the run instead (`bus server` on a temporary directory).
    #[arg(long)]
    pub embedded: bool,
    /// With --embedded: the server's fsync policy.
    #[arg(long, default_value = "always")]
    pub fsync: String,
    /// With --embedded: extra `bus server` flags, e.g. "--secret-key k".
    #[arg(long, default_value = "")]
    pub server_args: String,
    /// The namespace to use (the server must declare it; --embedded does).
    #[arg(long, default_value = "bench")]
    pub namespace: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A server started for a run; stopped when dropped.
struct Embedded {
    child: Child,
    dir: PathBuf,
    /// The server's log lines with its statistics, written as it shuts down.
    statistics: Arc<std::sync::Mutex<Vec<String>>>,
    /// Drains the server's standard error.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Embedded {
    /// Stops the server (SIGTERM, as an operator would) and waits for it to exit.
    fn stop(&mut self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends `signal` to the server, unless it exited, and waits for it to exit.
    fn signal(&mut self, signal: libc::c_int) {
        // Once reaped, its process id may be another process's: signal it only while it
        // has not been (`try_wait` answers from what `wait` kept, without a system call).
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill only sends a signal to the child we started.
            unsafe {
                libc::kill(self.child.id() as i32, signal);
            }
            let _ = self.child.wait();
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The server under test: its address, and its process id when known (for memory).
pub struct Server {
    /// The (first) node's address.
    pub host: String,
    /// Every node's address (`--host` may name several).
    pub hosts: Vec<String>,
    pub pid: Option<u32>,
    _embedded: Option<Embedded>,
}

impl Server {
    /// The node the `n`-th connection of a kind goes to: the nodes in turn.
    pub fn node(&self, n: usize) -> &str {
        &self.hosts[n % self.hosts.len()]
    }

    /// Kills an embedded server (SIGKILL: a machine lost, nothing flushed or said).
    pub fn kill(mut self) {
        if let Some(embedded) = self._embedded.as_mut() {
            embedded.signal(libc::SIGKILL);
        }
    }

    /// Stops an embedded server; the reads it made from its segment files (rather than
    /// its in-memory tail) in `namespace`, from the statistics it logs as it stops.
    pub fn stop(mut self, namespace: &str) -> Option<u64> {
        let embedded = self._embedded.as_mut()?;
        embedded.stop();
        let lines = embedded
            .statistics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let wanted = format!("namespace=\"{namespace}\"");
        let wanted_plain = format!("namespace={namespace} ");
        lines
            .iter()
            .find(|line| line.contains(&wanted) || line.contains(&wanted_plain))
            .and_then(|line| {
                let value = line
                    .split_whitespace()
                    .find_map(|field| field.strip_prefix("disk_reads="))?;
                let digits = value.bytes().take_while(u8::is_ascii_digit).count();
                value[..digits].parse().ok()
            })
    }
}

impl Target {
    /// `rest` as a subject in the benchmark's namespace.
    pub fn subject(&self, rest: &str) -> String {
        format!("{}.{rest}", self.namespace)
    }

    pub async fn start(&self) -> anyhow::Result<Server> {
        self.start_with(&[]).await
    }

    /// Starts the server, embedded with `extra` flags before the user's.
    pub async fn start_with(&self, extra: &[&str]) -> anyhow::Result<Server> {
        if !self.embedded {
            let hosts: Vec<String> = self
                .host
                .split(',')
                .map(str::trim)
                .filter(|host| !host.is_empty())
                .map(str::to_owned)
                .collect();
            let Some(host) = hosts.first().cloned() else {
                anyhow::bail!("--host names no server");
            };
            return Ok(Server {
                host,
                hosts,
                pid: None,
                _embedded: None,
            });
        }
        // One directory per server a run starts (a run may start several nodes).
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "bus-bench-server-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let exe = std::env::current_exe().context("finding the bus binary")?;
        let mut command = Command::new(exe);
        command
            .args(["server", "--addr", "127.0.0.1:0", "--namespaces"])
            .arg(&self.namespace)
            .args(["--fsync", &self.fsync, "--path"])
            .arg(&dir)
            .args(extra)
            .args(self.server_args.split_whitespace())
            // The listening line is logged at INFO; the reader below drains the rest.
            .env("BUS_LOG_LEVEL", "INFO")
            .env("BUS_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("starting bus server")?;
        let stderr = child.stderr.take().context("server stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let statistics = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = Arc::clone(&statistics);
        let reader = std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("namespace statistics") {
                    kept.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                    continue;
                }
                if !sent {
                    if let Some(addr) = line
                        .split_whitespace()
                        .find_map(|f| f.strip_prefix("addr="))
                    {
                        let _ = tx.send(addr.to_owned());
                        sent = true;
                    }
                }
            }
        });
        let pid = child.id();
        let embedded = Embedded {
            child,
            dir,
            statistics,
            reader: Some(reader),
        };
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await?
            .context("the embedded server did not start")?;
        let host = format!("http://{addr}");
        Ok(Server {
            hosts: vec![host.clone()],
            host,
            pid: Some(pid),
            _embedded: Some(embedded),
        })
    }
}
