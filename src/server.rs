//! The server's lifecycle: open the store, build the broker, listen, and shut down in the
//! right order.
//!
//! Shutting down: stop accepting connections and end every event stream at once, let
//! requests in flight finish (publishes get their answer), then commit, sync and close
//! every log. Connections that do not finish within [`SHUTDOWN_GRACE`] (a client that
//! stopped reading, say) are dropped, so the server always exits promptly.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::broker::Broker;
use crate::config::{MemoryLimit, Retention, ServerConfig, StoreKind};
use crate::http::auth::jwt::JwtSettings;
use crate::http::auth::{Authenticator, CredentialFiles};
use crate::http::traffic::Traffic;
use crate::http::{self, AppState, Limits};
use crate::memory::{self, MemoryBudget};
use crate::metrics::RetentionCounts;
use crate::reload::{ReloadReport, Reloader};
use crate::store::jetstream::{
    self, JetStreamConfig, JetStreamConsumers, JetStreamLog, JetStreamRelay,
};
use crate::store::{Consumers, EventLog, Storage, StorageError, Store, StoreConfig};
use crate::units::approximate_size;

/// How long shutting down waits for open connections to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// The streams of the namespaces, and their consumers, on JetStream.
/// `key_window` is how long the nodes together remember a deduplication key at most
/// (`None`: deduplication is off).
async fn open_jetstream(
    config: &JetStreamConfig,
    namespaces: &[String],
    store_config: &StoreConfig,
    key_window: Option<Duration>,
) -> Result<Storage, StorageError> {
    let (client, context) = jetstream::connect(config).await?;
    let mut logs: Vec<Arc<dyn EventLog>> = Vec::with_capacity(namespaces.len());
    let mut sealings = HashMap::new();
    for namespace in namespaces {
        let log = JetStreamLog::open(
            &client,
            &context,
            namespace,
            config.replicas,
            store_config.cipher.as_ref(),
            store_config.tail_bytes,
            key_window,
        )
        .await?;
        tracing::info!(
            namespace,
            events = log.stats().events,
            stream = jetstream::stream_name(namespace),
            "namespace opened on JetStream"
        );
        sealings.insert(namespace.clone(), log.sealing().clone());
        logs.push(Arc::new(log));
    }
    let relay = JetStreamRelay::new(client.clone());
    let consumers = JetStreamConsumers::new(client, context, sealings);
    Ok(Storage {
        logs,
        consumers: Consumers::Served(Arc::new(consumers)),
        relay: Some(Arc::new(relay)),
    })
}

/// A server that is accepting connections.
pub struct RunningServer {
    addr: SocketAddr,
    storage: Storage,
    broker: Arc<Broker>,
    shutdown: watch::Sender<bool>,
    serving: JoinHandle<()>,
    /// What [`RunningServer::reload`] re-reads.
    reloader: Arc<Reloader>,
}

/// Opens the data directory and starts serving.
pub async fn start(config: &ServerConfig) -> anyhow::Result<RunningServer> {
    memory::tune_allocator();
    let namespaces = config.namespaces();
    if namespaces.is_empty() {
        bail!("no namespaces declared: pass --namespaces or set BUS_NAMESPACES (e.g. app,orders)");
    }
    let store_config = config.store_config().map_err(anyhow::Error::msg)?;
    let retention = config.retention().map_err(anyhow::Error::msg)?;
    let cors_origins = config.cors_origins().map_err(anyhow::Error::msg)?;
    let certificate = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            Some(http::tls::Certificate::load(cert, key).map_err(anyhow::Error::msg)?)
        }
        _ => None,
    };
    let tls = certificate
        .as_ref()
        .map(|certificate| certificate.acceptor())
        .transpose()
        .map_err(anyhow::Error::msg)?;
    config.check_auth_flags().map_err(anyhow::Error::msg)?;
    let credentials = credential_files(config);
    let auth = if credentials.is_set() {
        let auth = tokio::task::spawn_blocking(move || Authenticator::load(credentials))
            .await
            .context("reading the credentials")?
            .map_err(anyhow::Error::msg)?;
        Some(Arc::new(auth))
    } else {
        None
    };
    // What SIGHUP and `POST /admin/reload` re-read, in this order.
    let mut reloader = Reloader::new();
    if let Some(auth) = &auth {
        reloader.add(Arc::clone(auth) as _);
    }
    if let Some(certificate) = &certificate {
        reloader.add(Arc::clone(certificate) as _);
    }
    let reloader = Arc::new(reloader);
    let broker_config = config.broker_config();
    let storage = match config.store {
        StoreKind::File => tokio::task::spawn_blocking(move || {
            let store = Store::open(&store_config, &namespaces)?;
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
            anyhow::Ok(store.storage())
        })
        .await
        .context("opening the store")?
        .with_context(|| format!("opening the data directory {}", config.path.display()))?,
        StoreKind::Jetstream => {
            let key_window = (broker_config.dup_size > 0).then(|| {
                broker_config
                    .dup_ttl
                    .unwrap_or(jetstream::DEFAULT_KEY_WINDOW)
            });
            open_jetstream(
                &config.jetstream_config(),
                &namespaces,
                &store_config,
                key_window,
            )
            .await
            .with_context(|| format!("opening JetStream at {}", config.nats_url))?
        }
    };
    let broker = {
        let storage = storage.clone();
        tokio::task::spawn_blocking(move || Broker::new(storage, &broker_config))
            .await
            .context("starting the broker")?
    };
    let broker = Arc::new(broker);

    let listen = config.listen_addr();
    let listener = match TcpListener::bind(&listen).await {
        Ok(listener) => listener,
        Err(e) => {
            let _ = close(&storage).await;
            return Err(e).with_context(|| format!("listening on {listen}"));
        }
    };
    let addr = listener
        .local_addr()
        .context("reading the listening address")?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let limits = limits(config);
    let memory = Arc::new(memory_budget(config.max_memory).await);
    memory.sample_now();
    tokio::spawn(Arc::clone(&memory).watch(shutdown_rx.clone()));
    let mut state = AppState::new(
        Arc::clone(&broker),
        config.ping_interval,
        shutdown_rx.clone(),
        limits.clone(),
        memory,
    );
    let auth_kind = match &auth {
        None => "open".to_owned(),
        Some(auth) => auth.current().describe(),
    };
    state.auth = auth;
    state.reloader = Arc::clone(&reloader);
    state.cors_origins = cors_origins.map(Arc::new);
    state.auth_cookie = config.auth_cookie.as_deref().map(Arc::from);
    let node = config.node_name();
    state.node = Arc::from(node.as_str());
    state.traffic = Arc::new(Traffic::new(config.access_log));
    state.console = !config.no_console;
    if retention.is_set() {
        tokio::spawn(enforce_retention(
            storage.logs.clone(),
            retention,
            Arc::clone(&state.retention),
            shutdown_rx.clone(),
        ));
    }
    let connections = Arc::clone(&state.connections);
    let traffic = Arc::clone(&state.traffic);
    let serving = tokio::spawn(http::serve::serve(
        listener,
        http::router(state),
        Arc::new(limits),
        connections,
        tls.clone(),
        traffic,
        shutdown_rx,
    ));
    tracing::info!(
        %addr,
        %node,
        path = %config.path.display(),
        fsync = %config.fsync,
        auth = %auth_kind,
        tls = tls.is_some(),
        access_log = config.access_log,
        console = !config.no_console,
        "bus server listening"
    );
    Ok(RunningServer {
        addr,
        storage,
        broker,
        shutdown,
        serving,
        reloader,
    })
}

/// Which credential files the flags name.
fn credential_files(config: &ServerConfig) -> CredentialFiles {
    CredentialFiles {
        auth_file: config.auth_file.clone(),
        jwt: JwtSettings {
            secret_file: config.jwt_secret_file.clone(),
            public_key: config.jwt_public_key.clone(),
            jwks: config.jwt_jwks.clone(),
            audience: config.jwt_audience.clone(),
            issuer: config.jwt_issuer.clone(),
        },
    }
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Re-reads the server's files (credentials; see [`crate::reload`]) as SIGHUP asks;
    /// `why` names who asked, for the log.
    pub async fn reload(&self, why: &str) -> ReloadReport {
        self.reloader.reload(why).await
    }

    /// The storage the server runs on.
    pub fn store(&self) -> &Storage {
        &self.storage
    }

    /// Stops serving and closes the store (see the module docs).
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.broker.shut_down();
        self.shutdown.send_replace(true);
        let mut serving = self.serving;
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut serving).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the HTTP server task failed"),
            Err(_) => {
                tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
                serving.abort();
            }
        }
        // Consumers store their progress (and may append dead letters) as they end.
        if tokio::time::timeout(SHUTDOWN_GRACE, self.broker.wait_for_consumers())
            .await
            .is_err()
        {
            tracing::warn!("consumers still storing their progress after {SHUTDOWN_GRACE:?}");
        }
        for log in &self.storage.logs {
            let stats = log.stats();
            tracing::info!(
                namespace = log.namespace(),
                events = stats.events,
                group_commits = stats.groups,
                fsyncs = stats.syncs,
                disk_reads = stats.disk_reads,
                "namespace statistics of this run"
            );
        }
        close(&self.storage).await.context("closing the store")
    }
}

/// Closes every log (committing what is queued, syncing); the first failure, if any.
async fn close(storage: &Storage) -> Result<(), crate::store::StorageError> {
    let mut first_error = None;
    for log in &storage.logs {
        if let Err(e) = log.close().await {
            tracing::error!(namespace = log.namespace(), error = %e, "closing a log failed");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Deletes what retention no longer keeps, every `retention.interval`, until shutdown.
async fn enforce_retention(
    logs: Vec<Arc<dyn EventLog>>,
    retention: Retention,
    deleted: Arc<RetentionCounts>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        for log in &logs {
            let namespace = log.namespace().to_owned();
            let (age, bytes) = (
                retention.age.get(&namespace),
                retention.bytes.get(&namespace),
            );
            if age.is_none() && bytes.is_none() {
                continue;
            }
            let log = Arc::clone(log);
            let enforced =
                tokio::task::spawn_blocking(move || log.enforce_retention(age, bytes)).await;
            match enforced {
                Ok(Ok(removed)) => {
                    for (first, events) in removed {
                        deleted.deleted(&namespace, events);
                        tracing::info!(
                            namespace,
                            first_position = first,
                            events,
                            "retention deleted a segment"
                        );
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(namespace, error = %e, "enforcing retention failed")
                }
                Err(e) => tracing::warn!(namespace, error = %e, "the retention task failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(retention.interval) => {}
            _ = shutdown.wait_for(|down| *down) => return,
        }
    }
}

/// The memory budget `--max-memory` asks for, logged: `auto` is decided from the machine
/// (see [`crate::memory`]).
async fn memory_budget(limit: MemoryLimit) -> MemoryBudget {
    let (bytes, source) = match limit {
        MemoryLimit::Bytes(bytes) => (Some(bytes), "--max-memory"),
        MemoryLimit::Auto => {
            let auto = tokio::task::spawn_blocking(memory::detect_auto_budget)
                .await
                .unwrap_or(memory::AutoBudget {
                    bytes: None,
                    source: "auto: the memory size is unknown",
                });
            (auto.bytes, auto.source)
        }
    };
    match bytes {
        Some(bytes) => {
            tracing::info!(
                budget = %approximate_size(bytes),
                budget_bytes = bytes,
                from = source,
                "memory budget: beyond it new publishes and subscriptions are answered 503"
            );
            MemoryBudget::new(bytes)
        }
        None => {
            tracing::warn!(
                "the machine's memory size is unknown: no memory budget (set --max-memory)"
            );
            MemoryBudget::unlimited()
        }
    }
}

/// What clients may ask of the server, from its settings.
fn limits(config: &ServerConfig) -> Limits {
    Limits {
        max_body: usize::try_from(config.max_body).unwrap_or(usize::MAX),
        max_subject_len: config.max_subject_len as usize,
        max_connections: config.max_connections as usize,
        max_subscriptions: config.max_subscriptions as usize,
        max_key_len: config.max_key_len as usize,
        max_batch: config.max_batch as usize,
        idle_timeout: config.idle_timeout,
        body_timeout: config.body_timeout,
    }
}
