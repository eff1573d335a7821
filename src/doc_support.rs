//! A throwaway server for the SDK's documentation examples, so that they run against a
//! real server instead of pretending. Not part of the API.

use std::path::PathBuf;

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
    /// `http://127.0.0.1:PORT`.
    pub fn host(&self) -> &str {
        &self.host
    }
}

impl Drop for DocServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts a server for one example.
pub async fn server() -> anyhow::Result<DocServer> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("bus-doc-{}-{nanos}", std::process::id()));
    let config = ServerConfig::from_args([
        "--addr",
        "127.0.0.1:0",
        "--namespaces",
        "app,orders",
        "--path",
        &dir.display().to_string(),
    ])
    .context("example server flags")?;
    let server = crate::server::start(&config)
        .await
        .context("starting the example server")?;
    Ok(DocServer {
        host: format!("http://{}", server.local_addr()),
        dir,
        _server: server,
    })
}
