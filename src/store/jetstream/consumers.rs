//! Durable consumers' progress on the JetStream store: a key-value bucket, so that it
//! lives with the events, not on a node's disk.

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::runtime::Handle;

use async_nats::jetstream::{self, kv};

use super::connection::{open_bucket, unavailable};
use crate::store::api::{ConsumerStore, ErrorKind, StorageError};
use crate::store::consumers::{ConsumerName, ConsumerProgress};

/// The bucket of durable consumers' progress.
const CONSUMERS_BUCKET: &str = "BUS_CONSUMERS";

/// Durable consumers' progress in a JetStream key-value bucket (key `<ns>.<name>`), so
/// that it lives with the events, not on a node's disk.
pub struct JetStreamConsumers {
    bucket: kv::Store,
    runtime: Handle,
}

impl JetStreamConsumers {
    /// Opens the bucket, creating it with `replicas` copies if it does not exist.
    pub async fn open(
        context: &jetstream::Context,
        replicas: usize,
    ) -> Result<JetStreamConsumers, StorageError> {
        let bucket = open_bucket(context, CONSUMERS_BUCKET, replicas).await?;
        Ok(JetStreamConsumers {
            bucket,
            runtime: Handle::current(),
        })
    }

    fn key(namespace: &str, name: &ConsumerName) -> String {
        format!("{namespace}.{name}")
    }
}

impl ConsumerStore for JetStreamConsumers {
    fn load(
        &self,
        namespace: &str,
        name: &ConsumerName,
    ) -> Result<Option<ConsumerProgress>, StorageError> {
        let key = Self::key(namespace, name);
        let value = self
            .runtime
            .block_on(self.bucket.get(&key))
            .map_err(|e| unavailable(&format!("reading consumer {key}"), e))?;
        value
            .map(|bytes| {
                serde_json::from_slice(&bytes).map_err(|e| {
                    StorageError::new(
                        ErrorKind::Corrupt,
                        format!("consumer progress {key} in {CONSUMERS_BUCKET}: damaged: {e}"),
                    )
                })
            })
            .transpose()
    }

    fn save(
        &self,
        namespace: &str,
        name: &ConsumerName,
        progress: &ConsumerProgress,
    ) -> Result<(), StorageError> {
        let key = Self::key(namespace, name);
        let body = serde_json::to_vec(progress)
            .map_err(|e| StorageError::new(ErrorKind::Internal, e.to_string()))?;
        self.runtime
            .block_on(self.bucket.put(&key, Bytes::from(body)))
            .map(|_| ())
            .map_err(|e| unavailable(&format!("saving consumer {key}"), e))
    }

    fn remove(&self, namespace: &str, name: &ConsumerName) -> Result<(), StorageError> {
        let key = Self::key(namespace, name);
        self.runtime
            .block_on(self.bucket.purge(&key))
            .map_err(|e| unavailable(&format!("removing consumer {key}"), e))
    }

    fn list(&self, namespace: &str) -> Result<Vec<(ConsumerName, ConsumerProgress)>, StorageError> {
        let prefix = format!("{namespace}.");
        let keys: Vec<String> = self.runtime.block_on(async {
            let mut keys = match self.bucket.keys().await {
                Ok(keys) => keys,
                Err(e) => return Err(unavailable("listing consumers", e)),
            };
            let mut found = Vec::new();
            while let Some(key) = keys.next().await {
                match key {
                    Ok(key) if key.starts_with(&prefix) => found.push(key),
                    Ok(_) => {}
                    Err(e) => return Err(unavailable("listing consumers", e)),
                }
            }
            Ok(found)
        })?;
        let mut consumers = Vec::new();
        for key in keys {
            let Ok(name) = ConsumerName::parse(&key[prefix.len()..]) else {
                continue;
            };
            match self.load(namespace, &name) {
                Ok(Some(progress)) => consumers.push((name, progress)),
                Ok(None) => {}
                Err(e) if e.kind == ErrorKind::Corrupt => {
                    tracing::warn!(error = %e, "a damaged consumer progress is left out")
                }
                Err(e) => return Err(e),
            }
        }
        consumers.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        Ok(consumers)
    }
}
