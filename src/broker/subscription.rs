//! The loops behind subscriptions: following a log, and inboxes (manual-ack consumers
//! are in [`super::consumer`], on the same [`Cursor`]).
//!
//! A log subscription is a position and a pattern. Each turn it reads the next events
//! (memory or disk, the log decides), keeps the matching ones and yields them; when it
//! has read everything committed it waits for the watermark to move. The watermark is
//! marked as seen *before* reading, so an append between the read and the wait still
//! wakes it: no event is missed, none is read twice. The stream is only polled when the
//! reader has room, so a slow reader holds a position, not a buffer. At most
//! [`CONCURRENT_READS`] reads of one broker run at once, whatever the number of
//! subscribers ([`Readers`]).
//!
//! The registrations that a stream owns (an inbox subscription, an ack receiver) are used
//! only through their methods inside the stream bodies: the generated async block then
//! captures them whole, and they live exactly as long as the stream.

use std::sync::Arc;

use futures_util::Stream;
use tokio::sync::{watch, Semaphore};

use super::inbox::InboxSubscription;
use super::{Delivery, Skipped, Start, READ_BATCH};
use crate::event::StoredEvent;
use crate::store::EventLog;
use crate::subject::Pattern;
use crate::timestamp::Timestamp;

/// Reads of the logs that cursors make at once, across the server. Each holds up to one
/// read's buffers (about twice [the log's read size](crate::store::EventLog::read)) and,
/// from disk, a thread of the blocking pool: a crowd of subscribers catching up costs
/// this many reads at a time, not one per subscriber. A read from the in-memory tail
/// holds its permit for microseconds.
pub(super) const CONCURRENT_READS: usize = 16;

/// What the cursors of one broker share: its shutdown signal, and the permits for reads
/// of its logs.
#[derive(Clone)]
pub struct Readers {
    pub(super) shutdown: watch::Receiver<bool>,
    reads: Arc<Semaphore>,
}

impl Readers {
    pub(super) fn new(shutdown: watch::Receiver<bool>, reads: Arc<Semaphore>) -> Readers {
        Readers { shutdown, reads }
    }
}

/// Where a log subscription starts.
pub enum From {
    Position(u64),
    /// Strictly after the event with this id (which must exist).
    After(String),
    /// At the first event the log committed at or after this time (the server's commit
    /// time, not a `created_at` the client chose).
    Time(Timestamp),
}

impl From {
    /// Where a subscription's `start` begins in `log`, as of now: "newest" means what is
    /// published from now on.
    pub(super) fn of(start: &Start, log: &dyn EventLog) -> From {
        match start {
            Start::Newest => From::Position(log.committed()),
            Start::Oldest => From::Position(log.first_position()),
            Start::After(id) => From::After(id.clone()),
            Start::Position(position) => From::Position(*position),
            Start::Time(time) => From::Time(*time),
        }
    }
}

/// The position a start names; an error message if it names an id the log does not have
/// (or the log cannot be read).
pub(super) async fn resolve(log: &dyn EventLog, from: From) -> Result<u64, String> {
    Ok(match from {
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
        From::Time(time) => log
            .first_committed_at_or_after(time)
            .await
            .map_err(|e| format!("reading the log failed: {e}"))?,
    })
}

/// Reads a log from a position on, returning batches of matching events.
pub(super) struct Cursor {
    log: Arc<dyn EventLog>,
    pattern: Pattern,
    /// More patterns of the same namespace: an event matching any is read.
    also: Vec<Pattern>,
    next: u64,
    /// Where the subscription ends, if it was asked to stop at the log's end as it was
    /// when it started.
    stop_at: Option<u64>,
    watermark: watch::Receiver<u64>,
    /// The storage's outages: a live wait ends with an error during one.
    outage: watch::Receiver<Option<String>>,
    shutdown: watch::Receiver<bool>,
    reads: Arc<Semaphore>,
    /// Why the cursor jumped ahead, not yet reported.
    notice: Option<Skipped>,
}

impl Cursor {
    /// Resolves the start; an error message if the start id is unknown.
    pub(super) async fn open(
        log: Arc<dyn EventLog>,
        pattern: Pattern,
        from: From,
        stop_at: Option<u64>,
        readers: Readers,
    ) -> Result<Cursor, String> {
        let next = resolve(log.as_ref(), from).await?;
        let watermark = log.watch_committed();
        let outage = log.watch_outage();
        Ok(Cursor {
            outage,
            log,
            pattern,
            also: Vec::new(),
            next,
            stop_at,
            watermark,
            shutdown: readers.shutdown,
            reads: readers.reads,
            notice: None,
        })
    }

    /// The next position it reads.
    pub(super) fn next_position(&self) -> u64 {
        self.next
    }

    /// Whether the cursor has passed its stop position.
    pub(super) fn finished(&self) -> bool {
        self.stop_at.is_some_and(|stop| self.next >= stop)
    }

    /// Moves a cursor that points before the oldest kept event (retention removed what
    /// it was to read) to that event, keeping a notice for [`Cursor::take_notice`].
    pub(super) fn skip_removed(&mut self) {
        let first = self.log.first_position();
        if self.next >= first {
            return;
        }
        self.notice = Some(Skipped {
            first: self.next,
            last: first - 1,
            next: first,
        });
        self.next = first;
    }

    /// The notice of the last [`Cursor::skip_removed`] that moved the cursor, once.
    pub(super) fn take_notice(&mut self) -> Option<Skipped> {
        self.notice.take()
    }

    /// The next non-empty batch of matching events; `Ok(None)` once shut down or
    /// [`finished`](Cursor::finished).
    pub(super) async fn next_batch(&mut self) -> Result<Option<Vec<StoredEvent>>, String> {
        loop {
            if *self.shutdown.borrow() || self.finished() {
                return Ok(None);
            }
            self.skip_removed();
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
                    why = next_outage(&mut self.outage) => {
                        return Err(format!("{why}; reconnect to resume"));
                    }
                }
                continue;
            }
            let limit = committed - self.next;
            let permit = self.reads.acquire().await;
            let read = self
                .log
                .read(
                    self.next,
                    READ_BATCH.min(usize::try_from(limit).unwrap_or(usize::MAX)),
                )
                .await;
            drop(permit);
            let events = match read {
                Ok(events) => events,
                // Retention removed the segment while it was being read.
                Err(_) if self.next < self.log.first_position() => continue,
                Err(e) => return Err(format!("reading the log failed: {e}")),
            };
            let Some(last) = events.last() else {
                // Nothing is stored from `next` to the watermark (positions a store skips):
                // what comes next is beyond it.
                self.next = committed;
                continue;
            };
            self.next = last.position() + 1;
            let matching: Vec<StoredEvent> = events
                .into_iter()
                .filter(|e| {
                    self.pattern.matches(e.subject())
                        || self.also.iter().any(|p| p.matches(e.subject()))
                })
                .collect();
            if !matching.is_empty() {
                return Ok(Some(matching));
            }
        }
    }
}

/// Why the storage is out of reach, once it is (at once if it is now); never, for a
/// backend whose receiver stays `None`.
pub(super) async fn next_outage(outage: &mut watch::Receiver<Option<String>>) -> String {
    loop {
        if let Some(why) = outage.borrow_and_update().clone() {
            return why;
        }
        if outage.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// `ack=none`: every event matching `pattern` or one of `also` (patterns of the same
/// namespace), once, in log order.
pub fn follow(
    log: Arc<dyn EventLog>,
    pattern: Pattern,
    also: Vec<Pattern>,
    from: From,
    stop_at: Option<u64>,
    readers: Readers,
) -> impl Stream<Item = Delivery> {
    async_stream::stream! {
        let mut cursor = match Cursor::open(log, pattern, from, stop_at, readers).await {
            Ok(cursor) => Cursor { also, ..cursor },
            Err(message) => {
                yield Delivery::Error(message);
                return;
            }
        };
        // Told before anything else, not with the first event, which may be long in coming.
        cursor.skip_removed();
        if let Some(skipped) = cursor.take_notice() {
            yield Delivery::Skipped(skipped);
        }
        loop {
            let batch = cursor.next_batch().await;
            if let Some(skipped) = cursor.take_notice() {
                yield Delivery::Skipped(skipped);
            }
            match batch {
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
