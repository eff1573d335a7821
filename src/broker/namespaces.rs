//! What a namespace holds and who reads it ([`NamespaceInfo`]), for operators: its log's
//! retained range and usage, and its durable consumers. Event streams are counted by the
//! front end that serves them, which fills in `subscribers`.

use std::sync::Arc;

use super::{Broker, BrokerError};
use crate::event::StoredEvent;
use crate::store::{EventLog, StorageError};
use crate::wire::NamespaceInfo;

impl Broker {
    /// What `namespace` holds now, with `subscribers` left at 0. A namespace the server
    /// does not serve is [`BrokerError::NotFound`].
    pub async fn namespace_info(
        self: &Arc<Broker>,
        namespace: &str,
    ) -> Result<NamespaceInfo, BrokerError> {
        self.log(namespace).map_err(BrokerError::NotFound)?;
        // Stored consumers are read from files: off the async workers.
        let consumers = {
            let broker = Arc::clone(self);
            let of = namespace.to_owned();
            tokio::task::spawn_blocking(move || broker.consumers(&of))
                .await
                .map_err(|e| BrokerError::Storage(format!("measuring {namespace} failed: {e}")))??
        };
        self.namespace_info_counting(namespace, consumers.len() as u64)
            .await
    }

    /// [`Broker::namespace_info`] for a caller that listed the namespace's durable
    /// consumers already (there are `consumers` of them), so they are not read twice.
    pub async fn namespace_info_counting(
        &self,
        namespace: &str,
        consumers: u64,
    ) -> Result<NamespaceInfo, BrokerError> {
        let log = Arc::clone(self.log(namespace).map_err(BrokerError::NotFound)?);
        // Usage is measured on disk (or asked of the storage): off the async workers.
        let usage = {
            let log = Arc::clone(&log);
            tokio::task::spawn_blocking(move || log.usage())
                .await
                .map_err(|e| BrokerError::Storage(format!("measuring {namespace} failed: {e}")))?
        };
        let usage = usage.map_err(|e| storage(namespace, e))?;
        let first_index = log.first_position();
        let next_index = log.committed();
        let (first, last) = if first_index < next_index {
            (
                one_event(log.as_ref(), first_index).await,
                one_event(log.as_ref(), next_index - 1).await,
            )
        } else {
            (Ok(None), Ok(None))
        };
        let created_at = |event: Result<Option<StoredEvent>, StorageError>| {
            Ok::<_, BrokerError>(
                event
                    .map_err(|e| storage(namespace, e))?
                    .as_ref()
                    .and_then(StoredEvent::created_at)
                    .map(|time| time.to_string()),
            )
        };
        Ok(NamespaceInfo {
            namespace: namespace.to_owned(),
            first_index,
            last_index: next_index.checked_sub(1).filter(|_| usage.events > 0),
            next_index,
            events: usage.events,
            bytes: usage.bytes,
            segments: usage.segments,
            first_created_at: created_at(first)?,
            last_created_at: created_at(last)?,
            subscribers: 0,
            consumers,
        })
    }
}

/// The event at `position` or the first after it.
async fn one_event(log: &dyn EventLog, position: u64) -> Result<Option<StoredEvent>, StorageError> {
    Ok(log.read(position, 1).await?.into_iter().next())
}

/// The storage failed: logged, told without its details.
fn storage(namespace: &str, error: StorageError) -> BrokerError {
    tracing::error!(namespace, error = %error, "describing a namespace failed");
    BrokerError::Storage(format!(
        "reading namespace {namespace} failed; retry, or see the server's log"
    ))
}
