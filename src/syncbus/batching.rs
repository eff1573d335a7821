//! Adaptive batching: while invalidations come faster than a threshold, a backend gathers
//! them (while the previous batch is on its way, for a short window at most) and sends
//! them as one message; below it, each goes at once.
//!
//! [`Batcher`] decides and collects; the backend says how a batch travels. Redis and NATS
//! send one message on the bus's batch channel whose body is [`encode_batch`]'s: a gzip
//! stream of the JSON array of the [`SyncEvent`]s, in publish order. Kafka sends the
//! batch as one produce request of gzip-compressed records (Kafka's own compression).
//! Receivers hand each event to the subscriptions of its key, in order.

// Without a broker backend (only the in-memory and mesh buses), the batcher goes unused.
#![cfg_attr(
    not(any(feature = "nats", feature = "redis", feature = "kafka")),
    allow(dead_code)
)]

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{Coalescer, PublishOptions, SyncError, SyncEvent};

/// When a backend batches invalidations (see [the module's "Adaptive
/// batching"](crate::syncbus#adaptive-batching)).
/// While more than `threshold` invalidations per second are published through one handle,
/// they are gathered into batches, each sent as one compressed message: a batch gathers
/// while the one before it is on its way, for `window` at most; below the threshold,
/// nothing waits. A publish still returns once its batch has been sent, so errors reach
/// the caller.
///
/// ```
/// use std::time::Duration;
/// use bus::syncbus::BatchOptions;
///
/// let defaults = BatchOptions::default();
/// assert_eq!(defaults.threshold, 1000);
/// assert_eq!(defaults.window, Duration::from_millis(10));
/// let eager = BatchOptions { threshold: 200, window: Duration::from_millis(5) };
/// assert!(BatchOptions::disabled().threshold > eager.threshold);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Invalidations per second above which publishes are batched (1000 by default).
    pub threshold: u32,
    /// The longest a batch gathers while the one before it is on its way (10 ms by
    /// default); then it is sent beside it.
    pub window: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            threshold: 1000,
            window: Duration::from_millis(10),
        }
    }
}

impl BatchOptions {
    /// Never batch: every invalidation is its own message.
    ///
    /// ```
    /// use bus::syncbus::BatchOptions;
    ///
    /// assert_eq!(BatchOptions::disabled().threshold, u32::MAX);
    /// ```
    pub fn disabled() -> BatchOptions {
        BatchOptions {
            threshold: u32::MAX,
            ..BatchOptions::default()
        }
    }

    /// Invalidations within one window that make the rate count as above the threshold.
    fn per_window(&self) -> u64 {
        let per_window = f64::from(self.threshold) * self.window.as_secs_f64();
        (per_window.ceil() as u64).max(1)
    }
}

/// The most invalidations one batch carries; a fuller one is sent at once.
const MAX_BATCH: usize = 4096;

/// How a backend sends a batch.
pub(crate) type SendBatch = Arc<
    dyn Fn(Vec<SyncEvent>) -> Pin<Box<dyn Future<Output = Result<(), SyncError>> + Send>>
        + Send
        + Sync,
>;

/// The outcome of a batch, for the publishes waiting on it.
type Outcome = watch::Receiver<Option<Result<(), SyncError>>>;

/// Decides, per invalidation, whether it goes alone or joins a batch, and sends batches.
///
/// Above the threshold, a batch is sent at once if none is on its way; else it gathers
/// until the one on its way is done (then it goes next), or for `window` at most (then
/// it goes beside it). So a batch holds what came during one send, and an invalidation
/// waits for one send at most, or `window` if that is shorter: publishers that each
/// wait for their publish are not held to one batch per window. Batches are sent in the
/// order they were gathered.
pub(crate) struct Batcher {
    options: BatchOptions,
    send_batch: SendBatch,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// The start of the current window of the rate count, and the counts of it and the
    /// window before.
    window_start: Option<Instant>,
    this_window: u64,
    last_window: u64,
    /// The batch gathering, if any, and the number the next one gets.
    pending: Option<Pending>,
    next_batch: u64,
    /// Batches done gathering (full, or their window passed), to send before `pending`.
    ready: VecDeque<Pending>,
    /// Tasks sending batches.
    senders: usize,
}

struct Pending {
    number: u64,
    events: Vec<SyncEvent>,
    outcome: watch::Sender<Option<Result<(), SyncError>>>,
}

impl Batcher {
    pub(crate) fn new(options: BatchOptions, send_batch: SendBatch) -> Batcher {
        Batcher {
            options,
            send_batch,
            state: Arc::default(),
        }
    }

    /// Publishes an invalidation of `key` as the broker backends do: coalesced with
    /// publishes of the key on their way (see [`Coalescer`]), then alone with `send_one`
    /// or in a batch (see [`Batcher::publish`]).
    pub(crate) async fn publish_key<F, Fut>(
        &self,
        coalescer: &Coalescer,
        key: &str,
        options: PublishOptions,
        send_one: F,
    ) -> Result<(), SyncError>
    where
        F: Fn(PublishOptions) -> Fut,
        Fut: Future<Output = Result<(), SyncError>>,
    {
        coalescer
            .publish(key, || {
                let event = SyncEvent {
                    key: key.to_owned(),
                    options: options.clone(),
                };
                self.publish(event, send_one(options.clone()))
            })
            .await
    }

    /// Sends `event` alone with `send_one` while the rate is below the threshold, else
    /// adds it to the batch gathering; returns once it has been sent either way.
    pub(crate) async fn publish<F>(&self, event: SyncEvent, send_one: F) -> Result<(), SyncError>
    where
        F: Future<Output = Result<(), SyncError>>,
    {
        let outcome = {
            let mut state = lock(&self.state);
            let busy = state.count(self.options);
            match &mut state.pending {
                Some(pending) => {
                    pending.events.push(event);
                    let outcome = pending.outcome.subscribe();
                    if pending.events.len() >= MAX_BATCH {
                        state.seal();
                    }
                    Some(outcome)
                }
                None if busy => {
                    let (sender, outcome) = watch::channel(None);
                    let number = state.next_batch;
                    state.next_batch += 1;
                    state.pending = Some(Pending {
                        number,
                        events: vec![event],
                        outcome: sender,
                    });
                    if state.senders == 0 {
                        start_sender(&self.state, &self.send_batch, &mut state);
                    } else {
                        self.send_after_window(number);
                    }
                    Some(outcome)
                }
                None => None,
            }
        };
        match outcome {
            None => send_one.await,
            Some(outcome) => wait(outcome).await,
        }
    }

    /// Sends batch `number` beside the one on its way once the window has passed, if it
    /// is still gathering then.
    fn send_after_window(&self, number: u64) {
        let (shared, send_batch, window) = (
            Arc::clone(&self.state),
            Arc::clone(&self.send_batch),
            self.options.window,
        );
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            let mut state = lock(&shared);
            if state.pending.as_ref().is_some_and(|p| p.number == number) {
                state.seal();
                start_sender(&shared, &send_batch, &mut state);
            }
        });
    }
}

/// Starts a task that sends the batches ready, then the one gathering, until none is
/// left.
fn start_sender(shared: &Arc<Mutex<State>>, send_batch: &SendBatch, state: &mut State) {
    state.senders += 1;
    let (shared, send_batch) = (Arc::clone(shared), Arc::clone(send_batch));
    tokio::spawn(async move {
        loop {
            let batch = {
                let mut state = lock(&shared);
                match state.ready.pop_front().or_else(|| state.pending.take()) {
                    Some(batch) => batch,
                    None => {
                        state.senders -= 1;
                        return;
                    }
                }
            };
            let result = send_batch(batch.events).await;
            // Nobody waiting (all cancelled) is fine.
            let _ = batch.outcome.send(Some(result));
        }
    });
}

impl State {
    /// Ends the gathering of the pending batch: it is sent next.
    fn seal(&mut self) {
        if let Some(pending) = self.pending.take() {
            self.ready.push_back(pending);
        }
    }

    /// Counts one invalidation; whether the rate is above the threshold.
    fn count(&mut self, options: BatchOptions) -> bool {
        let now = Instant::now();
        let start = *self.window_start.get_or_insert(now);
        let elapsed = now.duration_since(start);
        if elapsed >= options.window {
            // A window or more passed: the last one is the one just ended, or empty.
            self.last_window = if elapsed < options.window * 2 {
                self.this_window
            } else {
                0
            };
            self.this_window = 0;
            self.window_start = Some(now);
        }
        self.this_window += 1;
        let limit = options.per_window();
        self.this_window > limit || self.last_window > limit
    }
}

async fn wait(mut outcome: Outcome) -> Result<(), SyncError> {
    match outcome.wait_for(Option::is_some).await {
        Ok(result) => result.clone().unwrap_or(Ok(())),
        Err(_) => Err(SyncError::Backend(
            "the batch was dropped before it was sent".into(),
        )),
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// A batcher whose batches are [`encode_batch`]'s bodies handed to `publish` (one
/// message each, within `timeout`), counted as published by `state`: how Redis and NATS
/// batch.
#[cfg(any(feature = "nats", feature = "redis"))]
pub(crate) fn gzip_batcher<F, Fut>(
    options: BatchOptions,
    timeout: Duration,
    state: &Arc<super::BackendState>,
    publish: F,
) -> Arc<Batcher>
where
    F: Fn(Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), SyncError>> + Send + 'static,
{
    let (state, publish) = (Arc::clone(state), Arc::new(publish));
    let send_batch: SendBatch = Arc::new(move |events| {
        let (state, publish) = (Arc::clone(&state), Arc::clone(&publish));
        Box::pin(async move {
            let body = encode_batch(&events)?;
            super::within(timeout, publish(body)).await?;
            state
                .published
                .fetch_add(events.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        })
    });
    Arc::new(Batcher::new(options, send_batch))
}

/// A batch as Redis and NATS carry it: the gzip of the JSON array of its events.
#[cfg(any(feature = "nats", feature = "redis"))]
pub(crate) fn encode_batch(events: &[SyncEvent]) -> Result<Vec<u8>, SyncError> {
    let json = serde_json::to_vec(events)
        .map_err(|e| SyncError::Backend(format!("encoding a batch: {e}")))?;
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder
        .write_all(&json)
        .and_then(|()| encoder.finish())
        .map_err(|e| SyncError::Backend(format!("compressing a batch: {e}")))
}

#[cfg(any(feature = "nats", feature = "redis"))]
/// The largest batch a receiver unpacks (decompressed): far above what [`MAX_BATCH`]
/// events make, and a bound on what a forged message can cost.
const MAX_BATCH_BYTES: u64 = 64 << 20;

/// The events of a batch from [`encode_batch`]; `None` if it is not one.
#[cfg(any(feature = "nats", feature = "redis"))]
pub(crate) fn decode_batch(body: &[u8]) -> Option<Vec<SyncEvent>> {
    use std::io::Read;
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(body)
        .take(MAX_BATCH_BYTES)
        .read_to_end(&mut json)
        .ok()?;
    serde_json::from_slice(&json).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syncbus::PublishOptions;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn event(key: &str) -> SyncEvent {
        SyncEvent {
            key: key.into(),
            options: PublishOptions::default(),
        }
    }

    #[cfg(any(feature = "nats", feature = "redis"))]
    #[test]
    fn a_batch_decodes_to_its_events_in_order() {
        let events: Vec<_> = (0..100).map(|i| event(&format!("user:{i}"))).collect();
        let body = encode_batch(&events).unwrap();
        assert!(body.len() < serde_json::to_vec(&events).unwrap().len() / 3);
        assert_eq!(decode_batch(&body).unwrap(), events);
        assert_eq!(decode_batch(b"{\"key\":\"k\"}"), None);
    }

    /// Below the threshold every publish goes alone; a burst above it is carried by a few
    /// batches holding every event once, in order.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn only_a_burst_is_batched() {
        let batches = Arc::new(Mutex::new(Vec::<Vec<SyncEvent>>::new()));
        let recorded = Arc::clone(&batches);
        let send_batch: SendBatch = Arc::new(move |events| {
            recorded.lock().unwrap().push(events);
            Box::pin(async { Ok(()) })
        });
        let batcher = Arc::new(Batcher::new(BatchOptions::default(), send_batch));
        let alone = Arc::new(AtomicUsize::new(0));

        // 100 per second: below the threshold of 1000.
        for i in 0..50 {
            let alone = Arc::clone(&alone);
            batcher
                .publish(event(&format!("slow:{i}")), async move {
                    alone.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                })
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(alone.load(Ordering::Relaxed), 50);
        assert!(batches.lock().unwrap().is_empty());

        // 10,000 at once.
        let publishes = (0..10_000).map(|i| {
            let (batcher, alone) = (Arc::clone(&batcher), Arc::clone(&alone));
            async move {
                batcher
                    .publish(event(&format!("hot:{i}")), async move {
                        alone.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    })
                    .await
            }
        });
        for result in futures_util::future::join_all(publishes).await {
            result.unwrap();
        }
        let alone = alone.load(Ordering::Relaxed) - 50;
        let batches = batches.lock().unwrap();
        assert!(alone <= 10, "{alone} sent alone");
        assert!(batches.len() <= 4, "{} batches", batches.len());
        let batched: Vec<_> = batches.iter().flatten().map(|e| e.key.clone()).collect();
        let expected: Vec<_> = (alone..10_000).map(|i| format!("hot:{i}")).collect();
        assert_eq!(batched, expected);
    }

    /// Publishers that each wait for their publish (64 lanes, one publish at a time each)
    /// are carried by one batch per send, not one per window: with sends of 1 ms, 50
    /// rounds take about 50 ms, not the 500 ms of waiting out a 10 ms window each time.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn waiting_publishers_are_batched_per_send_not_per_window() {
        let batches = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&batches);
        let send_batch: SendBatch = Arc::new(move |_| {
            counted.fetch_add(1, Ordering::Relaxed);
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(())
            })
        });
        let batcher = Arc::new(Batcher::new(BatchOptions::default(), send_batch));
        let started = Instant::now();
        let lanes = (0..64).map(|lane| {
            let batcher = Arc::clone(&batcher);
            async move {
                for round in 0..50 {
                    let send_one = async {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        Ok(())
                    };
                    let event = event(&format!("{lane}:{round}"));
                    batcher.publish(event, send_one).await.unwrap();
                }
            }
        });
        futures_util::future::join_all(lanes).await;
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_millis(150), "{elapsed:?}");
        assert!(batches.load(Ordering::Relaxed) <= 110, "{batches:?}");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_failed_batch_fails_its_publishes() {
        let send_batch: SendBatch =
            Arc::new(|_| Box::pin(async { Err(SyncError::Backend("down".into())) }));
        let batcher = Batcher::new(
            BatchOptions {
                threshold: 100,
                window: Duration::from_millis(10),
            },
            send_batch,
        );
        let publishes = (0..10).map(|i| batcher.publish(event(&format!("k{i}")), async { Ok(()) }));
        let results = futures_util::future::join_all(publishes).await;
        // One goes alone (the first of the window), the rest in the failed batch.
        assert!(results[0].is_ok());
        for result in &results[1..] {
            assert_eq!(result, &Err(SyncError::Backend("down".into())));
        }
    }
}
