//! NATS and Redis servers for the sync-bus tests.
#![allow(dead_code)]

use std::time::Duration;

/// A server process (nats-server, redis-server) on a free port, killed when dropped; `None`
/// if the program is not installed (`.ci/run` installs both).
pub struct Backend {
    child: std::process::Child,
    pub port: u16,
}

impl Backend {
    pub fn nats() -> Option<Backend> {
        Backend::start("nats-server", |port| {
            vec![
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ]
        })
    }

    pub fn redis() -> Option<Backend> {
        Backend::start("redis-server", |port| {
            [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .map(String::from)
            .to_vec()
        })
    }

    fn start(program: &str, args: impl Fn(u16) -> Vec<String>) -> Option<Backend> {
        let port = super::cli::free_port();
        let child = match std::process::Command::new(program)
            .args(args(port))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("skipped: {program} is not installed (apt-get install {program})");
                return None;
            }
            Err(e) => panic!("starting {program}: {e}"),
        };
        let backend = Backend { child, port };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{program} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(backend)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
