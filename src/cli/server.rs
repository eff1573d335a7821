//! `bus server`: serves until SIGINT or SIGTERM, then shuts down cleanly (see
//! [`crate::server`]) and exits 0. SIGHUP re-reads the server's files (see
//! [`crate::reload`]) and serves on.

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::ServerConfig;

pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    // Listen for signals before the (possibly slow) start, so none is missed.
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    raise_open_file_limit();
    let server = crate::server::start(&config).await?;
    loop {
        tokio::select! {
            _ = terminate.recv() => {
                tracing::info!("SIGTERM received, shutting down");
                break;
            }
            _ = interrupt.recv() => {
                tracing::info!("SIGINT received, shutting down");
                break;
            }
            // Each step logs what it reloaded or why it kept the old.
            _ = hangup.recv() => {
                server.reload("SIGHUP").await;
            }
        }
    }
    server.shutdown().await?;
    tracing::info!("bus server stopped");
    Ok(())
}

/// Every connection and segment file takes a file descriptor, and the usual soft limit
/// (1024) is far below what a server with many subscribers needs: raise it to the hard
/// limit the system allows.
pub(crate) fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if raised {
        tracing::debug!(open_files = limit.rlim_cur, "open-file limit raised");
    } else {
        tracing::warn!("could not raise the open-file limit; many connections may be refused");
    }
}
