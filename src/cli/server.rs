//! `bus server`: opens every declared namespace's log and serves until SIGINT or SIGTERM,
//! then commits what is queued, syncs, and exits 0.

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::ServerConfig;
use crate::store::Store;

pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    let namespaces = config.namespaces();
    if namespaces.is_empty() {
        anyhow::bail!(
            "no namespaces declared: pass --namespaces or set BUS_NAMESPACES (e.g. app,orders)"
        );
    }
    // Listen for signals before the (possibly slow) open, so none is missed.
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let store_config = config.store_config();
    let store = tokio::task::spawn_blocking(move || Store::open(&store_config, &namespaces))
        .await
        .context("opening the store")?
        .with_context(|| format!("opening the data directory {}", config.path.display()))?;
    for log in store.logs() {
        let recovery = log.recovery();
        tracing::info!(
            namespace = log.namespace(),
            events = recovery.events,
            segments = recovery.segments,
            clean_shutdown = recovery.clean_shutdown,
            "namespace opened"
        );
    }
    tracing::info!(
        path = %config.path.display(),
        fsync = %config.fsync,
        "bus server started"
    );

    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = interrupt.recv() => tracing::info!("SIGINT received, shutting down"),
    }
    store.close().await.context("closing the store")?;
    tracing::info!("bus server stopped");
    Ok(())
}
