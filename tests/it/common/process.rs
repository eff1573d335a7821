//! Helpers for tests that run `bus server` as a real process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `bus` binary, with no `BUS_*` variable inherited from the test's environment.
pub fn bus() -> Command {
    // The tests talk to the processes with reqwest, which needs a TLS provider installed.
    bus::client::install_tls_provider();
    let mut command = Command::new(env!("CARGO_BIN_EXE_bus"));
    for (key, _) in std::env::vars() {
        if key.starts_with("BUS_") {
            command.env_remove(key);
        }
    }
    command
}

/// A running `bus server` process.
pub struct ServerProcess {
    pub child: Child,
    /// `http://127.0.0.1:<port>/`
    pub url: String,
    /// What the server logged after it started.
    pub log: mpsc::Receiver<String>,
}

impl ServerProcess {
    /// Starts `bus server` with `args` (add `--addr 127.0.0.1:0` unless an address is
    /// given) and waits until it listens.
    pub fn start(command: Command) -> ServerProcess {
        ServerProcess::start_sampling(command, |_| {})
    }

    /// [`ServerProcess::start`], calling `sample` with the process id every few
    /// milliseconds until the server listens (to watch its start-up).
    pub fn start_sampling(mut command: Command, mut sample: impl FnMut(u32)) -> ServerProcess {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bus");
        let pid = child.id();
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        // What it logged, for the panic message if it does not start.
        let mut logged = Vec::new();
        loop {
            sample(pid);
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(2));
            match log.recv_timeout(wait) {
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Ok(line) if line.contains("bus server listening") => {
                    let addr = line
                        .split_whitespace()
                        .find_map(|field| field.strip_prefix("addr="))
                        .expect("the listening line names the address")
                        .to_owned();
                    return ServerProcess {
                        child,
                        url: format!("http://{addr}/"),
                        log,
                    };
                }
                Ok(line) => logged.push(line),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "server did not start ({e}); it said:\n{}",
                        logged.join("\n")
                    );
                }
            }
        }
    }

    /// `bus server --addr 127.0.0.1:0 --path <data> <args…>`
    pub fn start_on(data: &Path, args: &[&str]) -> ServerProcess {
        ServerProcess::start(server_command(data, args))
    }

    /// [`ServerProcess::start_on`], and the most anonymous memory (`RssAnon`) the server
    /// held while starting (sampled every few milliseconds).
    pub fn start_on_measuring(data: &Path, args: &[&str]) -> (ServerProcess, u64) {
        let mut peak = 0;
        let server = ServerProcess::start_sampling(server_command(data, args), |pid| {
            if let Some(anon) = try_status_bytes(pid, "RssAnon:") {
                peak = peak.max(anon);
            }
        });
        (server, peak)
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit; kills it and panics after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("server did not exit within {limit:?}");
    }

    /// Lines logged since the last call.
    pub fn logged(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Raises this process's open-file limit to its hard limit (tests with many connections).
pub fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

impl ServerProcess {
    /// The server's resident memory now (`VmRSS` of `/proc/PID/status`), in bytes.
    pub fn resident_bytes(&self) -> u64 {
        status_bytes(self.child.id(), "VmRSS:")
    }

    /// The server's resident anonymous memory now (`RssAnon`: its heap and stacks, not
    /// the page cache of files it maps), in bytes.
    pub fn anon_resident_bytes(&self) -> u64 {
        status_bytes(self.child.id(), "RssAnon:")
    }

    /// The server's peak resident memory so far (`VmHWM`), in bytes.
    pub fn peak_resident_bytes(&self) -> u64 {
        status_bytes(self.child.id(), "VmHWM:")
    }
}

fn server_command(data: &Path, args: &[&str]) -> Command {
    let mut command = bus();
    command.args(["server", "--addr", "127.0.0.1:0", "--path"]);
    command.arg(data);
    command.args(args);
    command
}

/// A `kB` line of `/proc/PID/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    try_status_bytes(pid, field).unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn try_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}
