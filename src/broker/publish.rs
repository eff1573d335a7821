//! Publishing: a batch is validated (subjects, namespaces, batch rules), its
//! deduplication keys reserved, and it is appended to its namespace's log, or an inbox
//! event handed to its subscribers; and, at start-up, the deduplication window rebuilt
//! from the newest keyed events of each log.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::{
    dedup, random_id, Broker, Dedup, NewEvent, Publication, PublishError, Published,
    DEDUP_REBUILD_EVENTS, DUPLICATE_KEY,
};
use crate::event::{self, JsonLayout, PendingEvent, StoredEvent};
use crate::store::{ErrorKind, EventLog, KeyedEvent, StorageError};
use crate::subject::Subject;
use crate::timestamp::Timestamp;

impl Broker {
    /// Publishes one event or an atomic batch (see the module docs).
    pub async fn publish(&self, publication: Publication) -> Result<Vec<Published>, PublishError> {
        let invalid = PublishError::Invalid;
        // A single event is not put into a Vec of its own: `first` and the rest.
        let (first, rest, is_batch) = match publication {
            Publication::One(event) => (event, Vec::new().into_iter(), false),
            Publication::Batch(events) => {
                let mut events = events.into_iter();
                let Some(first) = events.next() else {
                    return Err(invalid("empty batch: send at least one event".into()));
                };
                (first, events, true)
            }
        };
        let (namespace_len, is_inbox) = {
            let subject = Subject::parse(&first.subject).map_err(|e| invalid(e.to_string()))?;
            // The namespace is the first subject's prefix of this many bytes.
            (subject.namespace().len(), subject.is_inbox())
        };
        // The events are consumed as they are encoded, so that a large batch is not held
        // in both forms; only the deduplication keys (if any) are kept for the check below.
        let keyed = !first.key.is_empty() || rest.as_slice().iter().any(|e| !e.key.is_empty());
        let count = 1 + rest.len();
        let mut keys: Vec<(String, String)> = Vec::with_capacity(if keyed { count } else { 0 });
        let mut pending = Vec::with_capacity(count);
        let encode = |event: &NewEvent, pending: &mut Vec<PendingEvent>| {
            if !event.response_subject.is_empty() {
                if is_batch {
                    return Err(invalid(
                        "events in a batch cannot have a response_subject; publish them one by one"
                            .into(),
                    ));
                }
                Subject::parse(&event.response_subject)
                    .map_err(|e| invalid(format!("response_subject: {e}")))?;
            }
            pending.push(PendingEvent::new(&event.draft()).map_err(|e| invalid(e.to_string()))?);
            Ok(())
        };
        encode(&first, &mut pending)?;
        // Only the first event's subject (the namespace is its prefix) and key are kept:
        // its payload is dropped now, as the others' are in the loop, not after the append.
        let (first_subject, first_key) = subject_and_key(first);
        if keyed {
            // Filled in below, once the first subject is no longer needed as the namespace.
            keys.push((String::new(), String::new()));
        }
        for event in rest {
            let subject = Subject::parse(&event.subject).map_err(|e| invalid(e.to_string()))?;
            let namespace = &first_subject[..namespace_len];
            if subject.namespace() != namespace {
                return Err(invalid(format!(
                    "a batch must stay in one namespace: {:?} and {:?} differ",
                    namespace,
                    subject.namespace()
                )));
            }
            encode(&event, &mut pending)?;
            if keyed {
                keys.push((event.subject, event.key));
            }
        }

        if is_inbox {
            if is_batch {
                return Err(invalid(
                    "inbox subjects (_bus_.…) take one event at a time, not batches".into(),
                ));
            }
            return Ok(vec![
                self.publish_to_inbox(&first_subject, &pending[0]).await,
            ]);
        }
        let log = self.log(&first_subject[..namespace_len]).map_err(invalid)?;
        if keyed {
            keys[0] = (first_subject, first_key);
        }

        let reservation = self
            .dedup
            .reserve(
                keys.iter()
                    .map(|(subject, key)| (subject.as_str(), key.as_str())),
            )
            .map_err(|duplicate| {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                // The reference's clients match the first words.
                let which = if is_batch {
                    format!(" (event {} of the batch)", duplicate.event)
                } else {
                    String::new()
                };
                PublishError::Duplicate(format!(
                    "{DUPLICATE_KEY}: {:?} was already published to this subject{which}",
                    duplicate.key
                ))
            })?;
        drop(keys);
        let mut reservation = reservation;
        let forgotten = reservation.take_forgotten();
        if !forgotten.is_empty() {
            let forgotten = forgotten
                .iter()
                .map(|(subject, key)| (subject.to_string(), key.to_string()))
                .collect();
            log.forget_keys(forgotten).await;
        }
        let appended = if reservation.is_empty() {
            log.append(pending).await
        } else {
            // The keys must stay reserved exactly when the events are stored. Once they
            // are reserved the append runs to its end on its own task, so that a request
            // dropped while it waits (the client left, shutdown) neither keeps keys for
            // events that were never stored nor releases those of events that were.
            let log = Arc::clone(log);
            tokio::spawn(async move {
                let appended = log.append(pending).await;
                if appended.is_ok() {
                    reservation.commit();
                }
                appended
            })
            .await
            .unwrap_or_else(|e| {
                Err(StorageError::new(
                    ErrorKind::Internal,
                    format!("the append task failed: {e}"),
                ))
            })
        };
        match appended {
            Ok(appended) => Ok(appended
                .into_iter()
                .map(|a| Published {
                    id: a.id,
                    created_at: a.created_at,
                    index: a.position as i64,
                })
                .collect()),
            Err(e) if e.kind == ErrorKind::Conflict => {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                Err(PublishError::Duplicate(e.message))
            }
            Err(other) => Err(PublishError::Storage(other)),
        }
    }

    pub(super) async fn publish_to_inbox(
        &self,
        subject: &str,
        pending: &PendingEvent,
    ) -> Published {
        let id = match pending.client_id() {
            Some(id) => id.to_owned(),
            None => random_id("e_"),
        };
        let created_at = pending.created_at.unwrap_or_else(Timestamp::now);
        let mut json = Vec::with_capacity(pending.encoded_len_hint());
        let layout: JsonLayout = pending.write_json(&mut json, &id, &created_at.format(), -1);
        let mut frame = BytesMut::with_capacity(event::sse_frame_len(&id, &json));
        event::push_sse_frame(&mut frame, &id, &json);
        let stored = StoredEvent::new(0, frame.freeze(), &layout);
        self.inboxes.publish(subject, &stored);
        if let Some(relayed) = &self.relayed_inboxes {
            relayed.publish(subject, &stored).await;
        }
        Published {
            id,
            created_at,
            index: -1,
        }
    }
}

/// An event's subject and key; the rest of it is dropped.
fn subject_and_key(event: NewEvent) -> (String, String) {
    (event.subject, event.key)
}

/// Refills the deduplication window from the newest events of a log.
///
/// What is gathered is bounded like the window itself: keys longer than `max_key_len`
/// (which no publish can use again) are skipped, and of the rest only the newest that fit
/// the window's budget are kept while scanning.
pub(super) fn rebuild_dedup(log: &dyn EventLog, dedup: &Dedup, max_key_len: usize) {
    let mut keyed: std::collections::VecDeque<KeyedEvent> = Default::default();
    let mut bytes = 0;
    let cost = |event: &KeyedEvent| event.subject.len() + event.key.len() + dedup::ENTRY_OVERHEAD;
    let scanned = log.visit_recent_keys(DEDUP_REBUILD_EVENTS, max_key_len, &mut |event| {
        bytes += cost(&event);
        keyed.push_back(event);
        while bytes > dedup.budget() {
            match keyed.pop_front() {
                Some(oldest) => bytes -= cost(&oldest),
                None => break,
            }
        }
    });
    if let Err(e) = scanned {
        tracing::warn!(namespace = log.namespace(), error = %e, "cannot rebuild the deduplication window from the log");
        return;
    }
    let now = Timestamp::now();
    let mut restored = HashMap::<String, usize>::new();
    for event in keyed.into_iter().rev() {
        let age = Duration::from_nanos(
            now.unix_nanos()
                .saturating_sub(event.committed_at.unix_nanos())
                .max(0) as u64,
        );
        if dedup.restore(&event.subject, &event.key, age) {
            *restored.entry(event.subject).or_default() += 1;
        }
    }
    if !restored.is_empty() {
        tracing::info!(
            namespace = log.namespace(),
            keys = restored.values().sum::<usize>(),
            subjects = restored.len(),
            "deduplication window rebuilt from the log"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use super::*;
    use crate::broker::{BrokerConfig, NewEvent, Storage};
    use crate::event::EventDraft;
    use crate::store::memory::MemoryConsumers;
    use crate::store::{Log, StoreConfig};

    fn keyed(key: &str) -> Publication {
        Publication::One(NewEvent {
            subject: "orders.paid".into(),
            key: key.into(),
            payload: Some(b"1".to_vec()),
            ..NewEvent::default()
        })
    }

    /// Polls `future` once, then drops it: a request abandoned at that await point.
    fn poll_once_and_drop<F: Future>(future: F) {
        let mut future = std::pin::pin!(future);
        let mut context = Context::from_waker(Waker::noop());
        assert!(
            matches!(future.as_mut().poll(&mut context), Poll::Pending),
            "the publish must be waiting for the writer"
        );
    }

    /// Events stored with key `key`.
    fn stored_with_key(log: &Log, key: &str) -> usize {
        let mut found = 0;
        log.scan_blocking(0, |_, json, layout| {
            if let Some(range) = layout.key.clone() {
                if json[range] == *format!("\"{key}\"").as_bytes() {
                    found += 1;
                }
            }
        })
        .expect("scan");
        found
    }

    /// A publish dropped while it waits for room in the writer's queue, or for the writer
    /// to commit it, leaves its key reserved exactly when its event is stored: the retry
    /// is refused only if the event is in the log, and the log holds it once either way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_publish_keeps_its_keys_exactly_when_its_event_is_stored() {
        for queue_full in [true, false] {
            let data = tempfile::tempdir().expect("tempdir");
            let config = StoreConfig::new(data.path());
            let log =
                Arc::new(Log::open(&data.path().join("orders"), "orders", &config).expect("open"));
            let storage = Storage {
                logs: vec![Arc::clone(&log) as Arc<dyn EventLog>],
                consumers: crate::store::Consumers::Dispatched(
                    Arc::new(MemoryConsumers::default()),
                ),
                relay: None,
            };
            let broker = Broker::new(
                storage,
                &BrokerConfig {
                    dup_size: 100,
                    ..BrokerConfig::default()
                },
            );
            let resume = log.pause_writer().await;
            let mut fillers = Vec::new();
            if queue_full {
                for _ in 0..log.queue_room() {
                    let log = Arc::clone(&log);
                    let event = PendingEvent::new(&EventDraft {
                        subject: "orders.filler",
                        ..EventDraft::default()
                    })
                    .expect("event");
                    fillers.push(tokio::spawn(async move { log.append(vec![event]).await }));
                }
                while log.queue_room() > 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            poll_once_and_drop(broker.publish(keyed("k")));
            // Whatever was started in the background may now finish.
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(resume);
            for filler in fillers {
                filler.await.expect("join").expect("filler stored");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;

            let before = stored_with_key(&log, "k");
            let retry = broker.publish(keyed("k")).await;
            let after = stored_with_key(&log, "k");
            match retry {
                Err(PublishError::Duplicate(message)) => {
                    assert!(message.starts_with(DUPLICATE_KEY), "{message}");
                    assert_eq!(
                        before, 1,
                        "refused although nothing was stored (queue full: {queue_full})"
                    );
                }
                Ok(_) => assert_eq!(
                    before, 0,
                    "accepted a second copy (queue full: {queue_full})"
                ),
                Err(other) => panic!("{other}"),
            }
            assert_eq!(after, 1, "queue full: {queue_full}");
            log.close().await.expect("close");
        }
    }
}
