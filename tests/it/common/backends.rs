//! NATS, Redis and Kafka (tansu) servers for the sync-bus tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

/// The tansu release the tests run, and where `.ci/run` installs it.
const TANSU_VERSION: &str = "0.6.0";

/// A server process (nats-server, redis-server, tansu) on a free port, killed when
/// dropped; `None` if the program is not installed (`.ci/run` installs them all).
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
        Backend::redis_on(super::cli::free_port())
    }

    /// A Redis server on `port` (again, after one there was stopped, say).
    pub fn redis_on(port: u16) -> Option<Backend> {
        Backend::start_on("redis-server", port, |port| {
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

    /// A Kafka-protocol broker: tansu, keeping its topics in memory, advertising its own
    /// address.
    pub fn kafka() -> Option<Backend> {
        Backend::kafka_advertising(None)
    }

    /// As [`Backend::kafka`], but telling clients (in its metadata) to connect to
    /// `127.0.0.1:<advertised>` rather than to the broker itself: to a proxy there, say.
    pub fn kafka_advertising(advertised: Option<u16>) -> Option<Backend> {
        let Some(tansu) = tansu() else {
            eprintln!(
                "skipped: tansu is not installed (cargo install tansu --version {TANSU_VERSION} \
                 --locked --features dynostore, or set TANSU to its path)"
            );
            return None;
        };
        Backend::start(&tansu.to_string_lossy(), |port| {
            let advertised = advertised.unwrap_or(port);
            [
                "broker",
                "--cluster-id",
                "bus-test",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{advertised}"),
                "--storage-engine",
                "memory://tansu/",
                "--silent",
            ]
            .map(String::from)
            .to_vec()
        })
    }

    fn start(program: &str, args: impl Fn(u16) -> Vec<String>) -> Option<Backend> {
        Backend::start_on(program, super::cli::free_port(), args)
    }

    fn start_on(program: &str, port: u16, args: impl Fn(u16) -> Vec<String>) -> Option<Backend> {
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

/// The tansu binary: `$TANSU`, else `tansu` on the PATH, else where `.ci/run` installs it.
fn tansu() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TANSU") {
        return Some(path.into());
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("tansu"))
            .find(|path| path.is_file())
    });
    let installed = std::env::var_os("HOME").map(|home| {
        PathBuf::from(home).join(format!(".cache/bus-ci/tansu-{TANSU_VERSION}/bin/tansu"))
    });
    on_path.or(installed.filter(|path| path.is_file()))
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
