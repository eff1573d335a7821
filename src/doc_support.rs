//! Throwaway servers for the SDK's documentation examples, so that they run against a
//! real server instead of pretending. Not part of the API.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::ServerConfig;
use crate::server::RunningServer;

/// A server on 127.0.0.1 with a fresh data directory (namespaces `app` and `orders`).
/// Dropping it removes the directory; the server itself ends with the example's runtime.
pub struct DocServer {
    host: String,
    dir: PathBuf,
    _server: RunningServer,
}

impl DocServer {
    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` for [`tls_server`].
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The CA certificate (PEM) that signed [`tls_server`]'s certificate.
    pub fn ca_pem_path(&self) -> PathBuf {
        fixture("ca.pem")
    }
}

impl Drop for DocServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts a plain-HTTP server for one example.
pub async fn server() -> anyhow::Result<DocServer> {
    start(&[], "http://127.0.0.1").await
}

/// Starts a server with TLS (the test certificate for `localhost`, signed by the test CA
/// in `tests/fixtures/tls`).
pub async fn tls_server() -> anyhow::Result<DocServer> {
    let (cert, key) = (fixture("cert.pem"), fixture("key.pem"));
    let flags = [
        "--tls-cert",
        &*cert.to_string_lossy(),
        "--tls-key",
        &*key.to_string_lossy(),
    ]
    .map(str::to_owned);
    start(&flags, "https://localhost").await
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

async fn start(flags: &[String], scheme_and_host: &str) -> anyhow::Result<DocServer> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("bus-doc-{}-{nanos}", std::process::id()));
    let mut args = [
        "--addr",
        "127.0.0.1:0",
        "--namespaces",
        "app,orders",
        "--path",
        &dir.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(flags.iter().cloned());
    let config = ServerConfig::from_args(args).context("example server flags")?;
    let server = crate::server::start(&config)
        .await
        .context("starting the example server")?;
    Ok(DocServer {
        host: format!("{scheme_and_host}:{}", server.local_addr().port()),
        dir,
        _server: server,
    })
}
