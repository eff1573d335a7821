//! [`KafkaSyncBus`]: the sync bus over a Kafka topic (crate `rskafka`).
//!
//! A bus is one topic (`warp.sync`, say) of one partition, created if missing. Every
//! invalidation is a record whose key is its channel, `k<hex>` (a lease revocation's
//! `l<hex>`), and whose value is the event's JSON; a batch (see [`BatchOptions`]) is one
//! produce request of gzip-compressed records, Kafka's own batching. Each handle reads
//! the topic with one consumer, started at its first subscription from the end of the
//! partition, and hands every record, in order, to the subscriptions of its channel:
//! every node reads every invalidation, and keeps those of its keys. Kafka does not tell a
//! producer that a consumer handled a record, so quorum and topology waits are
//! [`SyncError::QuorumUnsupported`] rather than a count that would only look like one.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rskafka::chrono::{DateTime, Utc};
use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;
use rskafka::BackoffConfig;
use tokio::sync::Mutex;

use super::batching::{Batcher, SendBatch};
use super::dispatch::Subscribers;
use super::{
    encoded, event_json, with_scheme, within, AbortOnDrop, BackendState, BatchOptions,
    KeySubscription, Metrics, PublishOptions, SyncBus, SyncError, SyncEvent,
};
use crate::timestamp::Timestamp;

/// The only partition of a bus's topic: one partition keeps every record in publish order.
const PARTITION: i32 = 0;
/// How long a fetch waits at the broker for records before it answers with none.
const FETCH_WAIT: Duration = Duration::from_millis(100);
/// The most record data one fetch asks for (the broker still returns a larger batch
/// whole).
const FETCH_BYTES: i32 = 4 << 20;
/// The consumer's pauses after a failed fetch: from the first, doubling up to the last.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// A node's handle on a sync bus carried by a Kafka topic. Its clones share its counts,
/// publish coalescing and batching, and its two connections: one to publish, and one
/// (made at the first subscription) on which one consumer reads the topic for all its
/// subscriptions. Every call to the brokers is bounded by the publish timeout (5 s
/// unless [`KafkaSyncBus::with_publish_timeout`] says otherwise). Kafka cannot say
/// whether anyone handled a record, so quorum and topology waits fail with
/// [`SyncError::QuorumUnsupported`].
///
/// ```no_run
/// use std::time::Duration;
/// use bus::syncbus::{KafkaSyncBus, PublishOptions, SyncBus, SyncError};
/// use futures_util::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let brokers = vec!["127.0.0.1:9092".to_owned()];
/// let web = KafkaSyncBus::new(brokers.clone(), "warp.sync").await?;
/// let worker = KafkaSyncBus::new(brokers, "warp.sync").await?;
/// let mut invalidations = worker.subscribe("user:42").await?;
/// web.publish("user:42", PublishOptions::default()).await?;
/// let event = invalidations.next().await.ok_or("subscription ended")?;
/// assert_eq!(event.key, "user:42");
/// assert_eq!(
///     web.publish_and_await("user:42", 1, Duration::from_secs(1)).await,
///     Err(SyncError::QuorumUnsupported)
/// );
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct KafkaSyncBus {
    brokers: Vec<String>,
    topic: String,
    client: Arc<Client>,
    /// The producer's connection to the partition's leader.
    partition: Arc<PartitionClient>,
    publish_timeout: Duration,
    batching: BatchOptions,
    batcher: Arc<Batcher>,
    state: Arc<BackendState>,
    subscribers: Arc<Subscribers>,
    /// The handle's consumer, started at its first subscription. Each subscription holds
    /// it too: it runs while a clone of the handle or one of its subscriptions lives, and
    /// stops once all are gone.
    consumer: Arc<Mutex<Option<Arc<AbortOnDrop>>>>,
}

fn backend(e: impl std::fmt::Display) -> SyncError {
    SyncError::Backend(format!("Kafka: {e}"))
}

/// The record of an invalidation of `key` (`kind` `k`) or a lease's revocation (`l`): its
/// channel as key, the event's JSON as value.
fn record(kind: char, key: &str, options: PublishOptions) -> Result<Record, SyncError> {
    Ok(Record {
        key: Some(encoded(kind, key).into_bytes()),
        value: Some(event_json(key, options)?.into_bytes()),
        headers: Default::default(),
        timestamp: now(),
    })
}

/// The time now, as Kafka records carry it (milliseconds since the Unix epoch).
fn now() -> DateTime<Utc> {
    let millis = Timestamp::now().unix_millis();
    DateTime::from_timestamp_millis(i64::try_from(millis).unwrap_or(i64::MAX)).unwrap_or_default()
}

/// A client of `brokers`. rskafka retries a failed request until it succeeds; its pauses
/// are kept short (1 s at most) to fit in the publish timeout that bounds every call.
async fn connect(brokers: Vec<String>) -> Result<Client, SyncError> {
    let backoff = BackoffConfig {
        max_backoff: Duration::from_secs(1),
        ..BackoffConfig::default()
    };
    ClientBuilder::new(brokers)
        .backoff_config(backoff)
        .build()
        .await
        .map_err(backend)
}

impl KafkaSyncBus {
    /// A sync bus on `topic` (`warp.sync`, say) through the Kafka cluster that
    /// `brokers` (`host:port` each) bootstrap. It connects here, once, creates the
    /// topic (one partition, replication 1) unless it exists, and fails with
    /// [`SyncError::Backend`] if it cannot, or [`SyncError::Timeout`] if the brokers do
    /// not answer within the default publish timeout (5 s). Nodes must share the topic to
    /// see each other's invalidations.
    ///
    /// ```no_run
    /// use bus::syncbus::{KafkaSyncBus, SyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = KafkaSyncBus::new(vec!["127.0.0.1:9092".into()], "warp.sync").await?;
    /// assert!(bus.is_healthy().await);
    /// assert_eq!(bus.peers(), ["kafka://127.0.0.1:9092"]);
    /// # Ok(()) }
    /// ```
    pub async fn new(brokers: Vec<String>, topic: &str) -> Result<KafkaSyncBus, SyncError> {
        if brokers.is_empty() {
            return Err(backend("no brokers given"));
        }
        let publish_timeout = Duration::from_secs(5);
        let (client, partition) = within(publish_timeout, async {
            let client = connect(brokers.clone()).await?;
            let controller = client.controller_client().map_err(backend)?;
            let timeout_ms = i32::try_from(publish_timeout.as_millis()).unwrap_or(i32::MAX);
            // Asked first: rskafka logs a refused creation as an error.
            let topics = client.list_topics().await.map_err(backend)?;
            let created = if topics.iter().any(|t| t.name == topic) {
                Ok(())
            } else {
                controller.create_topic(topic, 1, 1, timeout_ms).await
            };
            match created {
                Ok(())
                | Err(KafkaError::ServerError {
                    protocol_error: ProtocolError::TopicAlreadyExists,
                    ..
                }) => {}
                Err(e) => return Err(backend(e)),
            }
            // A topic just created may take a moment to have a leader: retry until then.
            let partition = client
                .partition_client(topic, PARTITION, UnknownTopicHandling::Retry)
                .await
                .map_err(backend)?;
            Ok((client, partition))
        })
        .await?;
        let partition = Arc::new(partition);
        let state = Arc::new(BackendState::default());
        let batching = BatchOptions::default();
        Ok(KafkaSyncBus {
            batcher: batcher(&partition, publish_timeout, batching, &state),
            subscribers: Arc::new(Subscribers::new(Arc::clone(&state.delivered))),
            brokers,
            topic: topic.to_owned(),
            client: Arc::new(client),
            partition,
            publish_timeout,
            batching,
            state,
            consumer: Arc::default(),
        })
    }

    /// The longest a call may wait for the brokers (5 s by default) before it fails with
    /// [`SyncError::Timeout`]: publishes, batches, lease revocations, subscribing (the
    /// first subscription connects the handle's consumer), and the metadata request of
    /// [`SyncBus::is_healthy`].
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use bus::syncbus::{KafkaSyncBus, PublishOptions, SyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = KafkaSyncBus::new(vec!["127.0.0.1:9092".into()], "warp.sync")
    ///     .await?
    ///     .with_publish_timeout(Duration::from_secs(1));
    /// bus.publish("user:42", PublishOptions::default()).await?;
    /// # Ok(()) }
    /// ```
    pub fn with_publish_timeout(mut self, timeout: Duration) -> KafkaSyncBus {
        self.publish_timeout = timeout;
        self.with_batcher()
    }

    /// When invalidations are batched (see [`BatchOptions`]; by default above 1000 per
    /// second, in windows of 10 ms). A batch is one produce request of its events'
    /// records, gzip-compressed together by Kafka's own record-batch compression; the
    /// consumers read them as the records they are, in order.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use bus::syncbus::{BatchOptions, KafkaSyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let options = BatchOptions { threshold: 5000, window: Duration::from_millis(5) };
    /// let bus = KafkaSyncBus::new(vec!["127.0.0.1:9092".into()], "warp.sync")
    ///     .await?
    ///     .with_batching(options);
    /// # Ok(()) }
    /// ```
    pub fn with_batching(mut self, options: BatchOptions) -> KafkaSyncBus {
        self.batching = options;
        self.with_batcher()
    }

    /// The handle's batcher again, after a setting it sends with changed.
    fn with_batcher(mut self) -> KafkaSyncBus {
        self.batcher = batcher(
            &self.partition,
            self.publish_timeout,
            self.batching,
            &self.state,
        );
        self
    }

    /// Produces one record, uncompressed (alone, gzip would only add to it).
    async fn send(&self, kind: char, key: &str, options: PublishOptions) -> Result<(), SyncError> {
        let record = record(kind, key, options)?;
        within(self.publish_timeout, async {
            self.partition
                .produce(vec![record], Compression::NoCompression)
                .await
                .map_err(backend)
        })
        .await?;
        self.state.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn subscribe_to(&self, kind: char, key: &str) -> Result<KeySubscription, SyncError> {
        let consumer = within(self.publish_timeout, async {
            let mut consumer = self.consumer.lock().await;
            match consumer.as_ref() {
                Some(running) if !running.0.is_finished() => Ok(Arc::clone(running)),
                _ => {
                    let started = Arc::new(self.start_consumer().await?);
                    *consumer = Some(Arc::clone(&started));
                    Ok(started)
                }
            }
        })
        .await?;
        // The consumer has its offset, the partition's end when it started: it hands the
        // subscription every record produced from now on.
        let fed = self.subscribers.add(&encoded(kind, key), None);
        Ok(KeySubscription::new(
            fed.events,
            (fed.registration, consumer),
        ))
    }

    /// Connects the handle's consumer and starts it from the partition's current end.
    async fn start_consumer(&self) -> Result<AbortOnDrop, SyncError> {
        // A connection of its own: fetches wait at the broker, produces must not.
        let client = connect(self.brokers.clone()).await?;
        let partition = client
            .partition_client(self.topic.as_str(), PARTITION, UnknownTopicHandling::Retry)
            .await
            .map_err(backend)?;
        let offset = partition
            .get_offset(OffsetAt::Latest)
            .await
            .map_err(backend)?;
        let consumer = Consumer {
            partition,
            offset,
            subscribers: Arc::clone(&self.subscribers),
            timeout: self.publish_timeout,
        };
        Ok(AbortOnDrop(tokio::spawn(consumer.run())))
    }
}

/// A batcher whose batches are one produce request each, of gzip-compressed records.
fn batcher(
    partition: &Arc<PartitionClient>,
    timeout: Duration,
    options: BatchOptions,
    state: &Arc<BackendState>,
) -> Arc<Batcher> {
    let (partition, state) = (Arc::clone(partition), Arc::clone(state));
    let send_batch: SendBatch = Arc::new(move |events| {
        let (partition, state) = (Arc::clone(&partition), Arc::clone(&state));
        Box::pin(async move {
            let records = events
                .into_iter()
                .map(|event| record('k', &event.key, event.options))
                .collect::<Result<Vec<_>, SyncError>>()?;
            let sent = records.len() as u64;
            within(timeout, async {
                partition
                    .produce(records, Compression::Gzip)
                    .await
                    .map_err(backend)
            })
            .await?;
            state.published.fetch_add(sent, Ordering::Relaxed);
            Ok(())
        })
    });
    Arc::new(Batcher::new(options, send_batch))
}

/// A handle's reader of the topic: fetches records from where it started, in order, and
/// hands each to the subscriptions of its channel.
struct Consumer {
    /// On the consumer's own connection.
    partition: PartitionClient,
    /// The next record to read.
    offset: i64,
    subscribers: Arc<Subscribers>,
    timeout: Duration,
}

impl Consumer {
    async fn run(mut self) {
        let mut pause = RETRY_FIRST;
        loop {
            match self.fetch().await {
                Ok(records) => {
                    pause = RETRY_FIRST;
                    for (channel, event) in records {
                        self.subscribers.deliver(&channel, &event).await;
                    }
                }
                Err(e) => {
                    let (topic, offset) = (self.partition.topic(), self.offset);
                    tracing::warn!(topic, offset, error = %e, "reading the sync bus failed");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// The bus's records from the consumer's offset on (maybe none), which it moves past
    /// them; records that are not the bus's are skipped.
    async fn fetch(&mut self) -> Result<Vec<(String, SyncEvent)>, SyncError> {
        let wait_ms = FETCH_WAIT.as_millis() as i32;
        let fetch = self
            .partition
            .fetch_records(self.offset, 1..FETCH_BYTES, wait_ms);
        let records = match within(self.timeout + FETCH_WAIT, async { Ok(fetch.await) }).await? {
            Ok((records, _high_watermark)) => records,
            Err(KafkaError::ServerError {
                protocol_error: ProtocolError::OffsetOutOfRange,
                ..
            }) => {
                // Records were deleted before they were read (retention), or the topic was
                // made again: read on from the oldest record there is, as none of them
                // was delivered.
                let earliest = self.partition.get_offset(OffsetAt::Earliest);
                self.offset =
                    within(self.timeout, async { earliest.await.map_err(backend) }).await?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(backend(e)),
        };
        let mut events = Vec::with_capacity(records.len());
        for record in records {
            if record.offset < self.offset {
                continue;
            }
            self.offset = record.offset + 1;
            let (Some(key), Some(value)) = (record.record.key, record.record.value) else {
                continue;
            };
            let (Ok(channel), Ok(event)) = (
                String::from_utf8(key),
                serde_json::from_slice::<SyncEvent>(&value),
            ) else {
                continue;
            };
            events.push((channel, event));
        }
        Ok(events)
    }
}

impl SyncBus for KafkaSyncBus {
    async fn publish(&self, key: &str, options: PublishOptions) -> Result<(), SyncError> {
        self.batcher
            .publish_key(&self.state.coalescer, key, options, |options| {
                self.send('k', key, options)
            })
            .await
    }

    async fn publish_and_await(
        &self,
        _key: &str,
        _replicas: usize,
        _timeout: Duration,
    ) -> Result<(), SyncError> {
        Err(SyncError::QuorumUnsupported)
    }

    async fn publish_and_await_topology(
        &self,
        _key: &str,
        _min_zones: usize,
        _timeout: Duration,
    ) -> Result<(), SyncError> {
        Err(SyncError::QuorumUnsupported)
    }

    async fn subscribe(&self, key: &str) -> Result<KeySubscription, SyncError> {
        self.subscribe_to('k', key).await
    }

    async fn revoke_lease(&self, id: &str) -> Result<(), SyncError> {
        self.send('l', id, PublishOptions::default()).await
    }

    async fn subscribe_lease(&self, id: &str) -> Result<KeySubscription, SyncError> {
        self.subscribe_to('l', id).await
    }

    fn metrics(&self) -> Metrics {
        self.state.metrics()
    }

    async fn is_healthy(&self) -> bool {
        let topics = async { self.client.list_topics().await.map_err(backend) };
        within(self.publish_timeout, topics).await.is_ok()
    }

    fn peers(&self) -> Vec<String> {
        let url = |broker: &String| with_scheme("kafka", broker);
        let peers: BTreeSet<String> = self.brokers.iter().map(url).collect();
        peers.into_iter().collect()
    }
}
