//! The loops behind subscriptions: following a log, stop-and-wait manual acks, inboxes.
//!
//! A log subscription is a position and a pattern. Each turn it reads the next events
//! (memory or disk, the log decides), keeps the matching ones and yields them; when it
//! has read everything committed it waits for the watermark to move. The watermark is
//! marked as seen *before* reading, so an append between the read and the wait still
//! wakes it: no event is missed, none is read twice. The stream is only polled when the
//! reader has room, so a slow reader holds a position, not a buffer.
//!
//! The registrations that a stream owns (an inbox subscription, an ack receiver) are used
//! only through their methods inside the stream bodies: the generated async block then
//! captures them whole, and they live exactly as long as the stream.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::watch;

use super::acks::AckReceiver;
use super::inbox::InboxSubscription;
use super::{Delivery, READ_BATCH};
use crate::event::StoredEvent;
use crate::store::Log;
use crate::subject::Pattern;

/// Where a log subscription starts.
pub enum From {
    Position(u64),
    /// Strictly after the event with this id (which must exist).
    After(String),
}

pub struct Redelivery {
    pub every: Duration,
    pub max_deliveries: Option<u32>,
    /// Counts every delivery after an event's first.
    pub redeliveries: Arc<AtomicU64>,
}

/// Reads a log from a position on, returning batches of matching events.
struct Cursor {
    log: Arc<Log>,
    pattern: Pattern,
    next: u64,
    /// Where the subscription ends, if it was asked to stop at the log's end as it was
    /// when it started.
    stop_at: Option<u64>,
    watermark: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
}

impl Cursor {
    /// Resolves the start; an error message if the start id is unknown.
    async fn open(
        log: Arc<Log>,
        pattern: Pattern,
        from: From,
        stop_at: Option<u64>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Cursor, String> {
        let next = match from {
            From::Position(position) => position,
            From::After(id) => match log.find_id(&id).await {
                Ok(Some(position)) => position + 1,
                Ok(None) => {
                    return Err(format!(
                        "event {id} not found in namespace {}",
                        log.namespace()
                    ))
                }
                Err(e) => return Err(format!("cannot look up event {id}: {e}")),
            },
        };
        let watermark = log.watch_committed();
        Ok(Cursor {
            log,
            pattern,
            next,
            stop_at,
            watermark,
            shutdown,
        })
    }

    /// Whether the cursor has passed its stop position.
    fn finished(&self) -> bool {
        self.stop_at.is_some_and(|stop| self.next >= stop)
    }

    /// The next non-empty batch of matching events; `Ok(None)` once shut down or
    /// [`finished`](Cursor::finished).
    async fn next_batch(&mut self) -> Result<Option<Vec<StoredEvent>>, String> {
        loop {
            if *self.shutdown.borrow() || self.finished() {
                return Ok(None);
            }
            let mut committed = *self.watermark.borrow_and_update();
            if let Some(stop) = self.stop_at {
                committed = committed.min(stop);
            }
            if self.next >= committed {
                tokio::select! {
                    changed = self.watermark.changed() => {
                        if changed.is_err() {
                            return Ok(None);
                        }
                    }
                    _ = self.shutdown.changed() => return Ok(None),
                }
                continue;
            }
            let limit = committed - self.next;
            let events = self
                .log
                .read(
                    self.next,
                    READ_BATCH.min(usize::try_from(limit).unwrap_or(usize::MAX)),
                )
                .await
                .map_err(|e| format!("reading the log failed: {e}"))?;
            let Some(last) = events.last() else {
                continue;
            };
            self.next = last.position() + 1;
            let matching: Vec<StoredEvent> = events
                .into_iter()
                .filter(|e| self.pattern.matches(e.subject()))
                .collect();
            if !matching.is_empty() {
                return Ok(Some(matching));
            }
        }
    }
}

/// `ack=none`: every matching event, once, in log order.
pub fn follow(
    log: Arc<Log>,
    pattern: Pattern,
    from: From,
    stop_at: Option<u64>,
    shutdown: watch::Receiver<bool>,
) -> impl Stream<Item = Delivery> {
    async_stream::stream! {
        let mut cursor = match Cursor::open(log, pattern, from, stop_at, shutdown).await {
            Ok(cursor) => cursor,
            Err(message) => {
                yield Delivery::Error(message);
                return;
            }
        };
        loop {
            match cursor.next_batch().await {
                Ok(Some(events)) => yield Delivery::Events(events),
                Ok(None) => {
                    if cursor.finished() {
                        yield Delivery::End;
                    }
                    return;
                }
                Err(message) => {
                    yield Delivery::Error(message);
                    return;
                }
            }
        }
    }
}

/// `ack=manual`: one event at a time, redelivered until acknowledged or given up on.
pub fn manual(
    log: Arc<Log>,
    pattern: Pattern,
    from: From,
    stop_at: Option<u64>,
    redelivery: Redelivery,
    mut acks: AckReceiver,
    shutdown: watch::Receiver<bool>,
) -> impl Stream<Item = Delivery> {
    async_stream::stream! {
        let mut cursor = match Cursor::open(log, pattern, from, stop_at, shutdown.clone()).await {
            Ok(cursor) => cursor,
            Err(message) => {
                yield Delivery::Error(message);
                return;
            }
        };
        let mut shutdown = shutdown;
        let mut queued: VecDeque<StoredEvent> = VecDeque::new();
        loop {
            let event = match queued.pop_front() {
                Some(event) => event,
                None => match cursor.next_batch().await {
                    Ok(Some(events)) => {
                        queued.extend(events);
                        continue;
                    }
                    Ok(None) => {
                        if cursor.finished() {
                            yield Delivery::End;
                        }
                        return;
                    }
                    Err(message) => {
                        yield Delivery::Error(message);
                        return;
                    }
                },
            };
            let mut deliveries = 0u32;
            'redeliver: loop {
                if deliveries > 0 {
                    redelivery.redeliveries.fetch_add(1, Ordering::Relaxed);
                }
                yield Delivery::Events(vec![event.clone()]);
                deliveries = deliveries.saturating_add(1);
                let deadline = tokio::time::sleep(redelivery.every);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        ack = acks.recv() => match ack {
                            Some(id) if id == event.id() => break 'redeliver,
                            Some(_) => {} // a late ack for an earlier event
                            None => return,
                        },
                        _ = &mut deadline => break,
                        _ = shutdown.changed() => return,
                    }
                }
                if redelivery.max_deliveries.is_some_and(|max| deliveries >= max) {
                    tracing::info!(
                        event_id = event.id(),
                        deliveries,
                        "event not acknowledged after its last delivery; moving on"
                    );
                    break;
                }
            }
        }
    }
}

/// An inbox subscription: what is published to its subject while it is open.
pub fn inbox(
    mut subscription: InboxSubscription,
    mut shutdown: watch::Receiver<bool>,
) -> impl Stream<Item = Delivery> {
    async_stream::stream! {
        loop {
            tokio::select! {
                event = subscription.recv() => match event {
                    Some(event) => yield Delivery::Events(vec![event]),
                    None => return,
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}
