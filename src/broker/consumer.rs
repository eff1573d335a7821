//! Manual-ack consumers: windows of unacknowledged deliveries, per-event redelivery,
//! negative acks, and durable named consumers shared by queue groups.
//!
//! A consumer is one task (the dispatcher) that reads its pattern's events from the log
//! and hands them to its members — the connections attached to it — each of which may
//! hold up to its window (`max_inflight`) of unacknowledged events. Every delivered event
//! has its own redelivery time; when it passes without an ack, or the member leaves, or
//! the consumer naks it, the event is handed out again (to whichever member has room,
//! lowest position first). After `max_deliveries` deliveries an ephemeral consumer gives
//! the event up, as the reference does; a durable one appends it to its dead-letter
//! subject first.
//!
//! - **Ephemeral** consumers (no `consumer=` name) have exactly one member and end with
//!   it. With a window of 1 this is the reference's stop-and-wait.
//! - **Durable** consumers have a name and a stored progress (see [`Progress`]), and any
//!   number of connections may attach (a queue group). Their dispatcher runs while they
//!   have members: when the last one leaves, it stores the progress and ends, freeing
//!   what it held, and the next attachment starts it again from what it stored. The
//!   progress keeps what the dispatcher knew of each unacknowledged event (deliveries so
//!   far, a negative ack's delay, a reply taken), so an idle consumer that ends changes
//!   nothing a client can see: no timer runs for an event no member holds, and an event
//!   still goes to its dead-letter subject after its last delivery.
//!
//! Memory: a member holds at most its window of events and at most `max_bytes` of them
//! (their frames), beyond its first, which is always delivered however large. The
//! dispatcher reads ahead only while its members have room, in events and in bytes, for
//! more than what already waits; so what it holds is bounded by its members' windows plus
//! one read. Events are held as shared frames: the members of a durable consumer, and the
//! log's in-memory tail, share them rather than copy them.
//!
//! Order: each member receives events in log order, except redeliveries, which come back
//! when they are due. Across a group's members there is no order between events handed
//! to different members.
//!
//! The dispatcher never blocks: its reads of the log run on the blocking pool and its
//! saves of a durable consumer's progress (write, fsync, rename, directory fsync) on the
//! broker's [`Saver`] threads while it goes on taking acks, and a read it started is
//! finished even when inputs arrive meanwhile (see [`Dispatcher`]). The [`Progress`]
//! functions themselves block: they are called only from those threads and the blocking
//! pool. A change of progress is stored within `SAVE_EVERY` (50 ms) plus the time its
//! save waits for the saves before it (its consumer's previous one, and others queued
//! for the saver threads: nothing much unless hundreds of consumers save at once), and
//! the last save is finished when the dispatcher ends.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::confirm::Confirmations;
use super::subscription::{Cursor, From, Readers};
use super::{Delivery, Skipped, READ_BATCH};
use crate::event::{EventDraft, PendingEvent, StoredEvent};
use crate::store::{
    ConsumerName, ConsumerProgress as Progress, ConsumerStore, EventLog, StorageError,
};
use crate::subject::Pattern;
use crate::timestamp::Timestamp;

/// Messages a consumer's dispatcher takes (from the broker, acks and members).
#[derive(Debug)]
pub enum Input {
    Join {
        member: u64,
        max_inflight: usize,
        deliveries: mpsc::Sender<Delivery>,
    },
    Leave {
        member: u64,
    },
    Ack {
        event_ids: Vec<String>,
        /// The connection that acked, and the zone it declared.
        consumer_id: String,
        zone: Option<String>,
    },
    Nak {
        event_id: String,
        delay: Duration,
    },
    /// Member `member` wants to reply to `event_id`: answered with the event if it was
    /// delivered to that member, is not acknowledged yet and has no reply yet (the event
    /// is then marked as replied to), else with why not.
    ClaimReply {
        event_id: String,
        member: u64,
        answer: oneshot::Sender<Result<StoredEvent, ReplyRefused>>,
    },
    /// A claimed reply was not published after all: the event may be replied to again.
    ReleaseReply {
        event_id: String,
    },
    /// Ends every member's stream and removes the stored progress.
    Delete,
}

/// Why a reply carried by an ack is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyRefused {
    /// The event is not one this connection was delivered and has not acknowledged.
    NotDelivered,
    /// The event was replied to already.
    Replied,
}

/// Capacity of a dispatcher's input queue; acks beyond it are dropped (and the events
/// redelivered), so that a client flooding acks cannot grow the server's memory.
pub const INPUT_QUEUE: usize = 4096;
/// Bytes of frames sent to a member in one delivery: small events go together (the front
/// end writes them as one chunk, a copy), a larger event goes alone (its shared frame).
pub(super) const DELIVERY_BYTES: usize = 64 << 10;
/// How often a durable consumer's progress is written when it changed.
const SAVE_EVERY: Duration = Duration::from_millis(50);
/// Threads writing durable consumers' progress, across the broker (see [`Saver`]).
pub const SAVER_THREADS: usize = 2;

/// How a consumer redelivers.
#[derive(Debug, Clone, Copy)]
pub struct Redelivery {
    pub every: Duration,
    /// Deliveries of one event before it is given up (`None`: never).
    pub max_deliveries: Option<u32>,
}

/// What a durable consumer's dispatcher shows the broker (admin listing, metrics).
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Events read and not yet acknowledged (delivered or waiting for a member).
    pub pending: AtomicU64,
    /// The first position that is not done.
    pub floor: AtomicU64,
    pub members: AtomicU64,
}

/// What the manual-ack consumers of a broker counted, for its metrics: shared by every
/// dispatcher (and every member the storage serves).
#[derive(Debug, Default)]
pub struct DeliveryCounts {
    /// Deliveries repeated because no ack came in time (or a nak asked for it).
    pub redeliveries: AtomicU64,
    /// Events a durable consumer gave up after their last delivery and appended to its
    /// dead-letter subject.
    pub dead_letters: AtomicU64,
    /// Events an ephemeral consumer gave up after their last delivery (dropped, as the
    /// reference does: it has no dead-letter subject).
    pub given_up: AtomicU64,
}

/// The dead-letter subject of a durable consumer: `<namespace>._dead.<consumer>`.
pub fn dead_letter_subject(namespace: &str, consumer: &ConsumerName) -> String {
    format!("{namespace}._dead.{consumer}")
}

/// Takes an idle durable consumer out of the broker's running ones, given its input
/// queue and its last save (if one runs): the broker answers under the lock that
/// attachments send their joins under, so that a join is either queued before (and
/// taken) or finds the consumer gone. When it retires, the broker takes the save, which
/// the next start (or a delete) of the consumer waits for before it reads (or removes)
/// the stored progress: a retiring consumer does not wait for its disk.
pub type Retire =
    Box<dyn Fn(&mut mpsc::Receiver<Input>, &mut Option<Save>) -> Retired + Send + Sync>;

/// What came of asking to retire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// The consumer is no longer running, its queue is closed and its last save is the
    /// broker's: the dispatcher ends.
    Yes,
    /// Inputs (a join, say) are queued: the dispatcher takes them first.
    InputsQueued,
    /// It is no longer the running consumer (being deleted): the dispatcher waits for
    /// what comes.
    NotRunning,
}

/// A durable consumer's identity, for its stored progress and dead letters.
pub struct Durable {
    pub name: ConsumerName,
    pub progress: Progress,
    pub stats: Arc<ConsumerStats>,
    /// The broker's saver threads, which store the progress.
    pub saver: Arc<Saver>,
    /// Takes the consumer out of the broker's running ones when it is idle.
    pub retire: Retire,
    /// Called after each of its saves (the broker forgets a retired consumer's last save
    /// once it landed).
    pub landed: Landed,
}

struct Pending {
    event: StoredEvent,
    /// The member holding it; `None` while it waits for one.
    member: Option<u64>,
    deliveries: u32,
    /// Held: when its redelivery is due. Waiting: when it may be handed out (a nak's
    /// delay), if later than now.
    due: Option<Instant>,
    /// The members it was delivered to (a reply is taken only from one of them).
    delivered_to: Vec<u64>,
    /// A reply to it was claimed (replies are taken once).
    replied: bool,
}

struct Member {
    max_inflight: usize,
    in_flight: usize,
    /// Bytes of the frames it holds.
    bytes: usize,
    deliveries: mpsc::Sender<Delivery>,
}

impl Member {
    /// Events it may be handed now, and bytes of them (the first is handed whatever its
    /// size).
    fn room(&self, max_bytes: usize) -> (usize, usize) {
        let events = self.max_inflight.saturating_sub(self.in_flight);
        let bytes = match (events, self.in_flight) {
            (0, _) => 0,
            (_, 0) => max_bytes.max(1),
            _ => max_bytes.saturating_sub(self.bytes),
        };
        (events, bytes)
    }
}

/// The bytes an event takes while a consumer holds it: its frame.
fn size(event: &StoredEvent) -> usize {
    event.sse_frame().len()
}

/// A read of the log, owning the cursor until it completes.
type Read = Pin<Box<dyn Future<Output = (Cursor, ReadResult)> + Send>>;
type ReadResult = Result<Option<Vec<StoredEvent>>, String>;

/// The dispatcher's cursor, lent to a read while one runs.
///
/// A read is started only when members have room for more events, and once started it is
/// kept until it completes, across as many rounds of the dispatcher's loop as inputs
/// arrive meanwhile. Dropping it at each ack, as a plain `select!` branch would, throws
/// away a disk read half done (its blocking task runs on and its result is lost) and
/// starts it again; a consumer acked often enough would hardly read at all.
struct Reader {
    /// The cursor, when no read has it.
    idle: Option<Cursor>,
    read: Option<Read>,
    /// The cursor's next position, and whether it passed its stop position, as of its
    /// last read (the events of a read still running are not the consumer's yet).
    next: u64,
    finished: bool,
}

impl Reader {
    fn new(cursor: Cursor) -> Reader {
        Reader {
            next: cursor.next_position(),
            finished: cursor.finished(),
            idle: Some(cursor),
            read: None,
        }
    }

    fn reading(&self) -> bool {
        self.read.is_some()
    }

    /// The next batch of matching events (see [`Cursor::next_batch`]) and the cursor's
    /// notice, if it has one. Cancel-safe: dropped before it is ready, it leaves the read
    /// running for the next call to finish.
    async fn next_batch(&mut self) -> (ReadResult, Option<Skipped>) {
        if self.read.is_none() {
            let Some(mut cursor) = self.idle.take() else {
                // Cannot happen: a read that ends gives the cursor back.
                return (Err("the consumer lost its place in the log".into()), None);
            };
            self.read = Some(Box::pin(async move {
                let batch = cursor.next_batch().await;
                (cursor, batch)
            }));
        }
        let Some(read) = self.read.as_mut() else {
            return std::future::pending().await;
        };
        let (mut cursor, batch) = read.await;
        self.read = None;
        self.next = cursor.next_position();
        self.finished = cursor.finished();
        let notice = cursor.take_notice();
        self.idle = Some(cursor);
        (batch, notice)
    }
}

/// A save of a durable consumer's progress, queued or running on a saver thread; the
/// answer says how it went.
pub type Save = oneshot::Receiver<Result<(), StorageError>>;

/// Stores durable consumers' progress on threads of its own, like the log's writer: a
/// save (write, fsync, rename, directory fsync) takes the disk for a millisecond or more,
/// which no async worker may wait for. Saves beyond the threads' number queue up, so that
/// many busy consumers do not crowd the log's own syncs off the disk (each consumer has
/// one save at a time, coalescing what changed meanwhile into its next).
pub struct Saver {
    jobs: std::sync::mpsc::Sender<SaveJob>,
}

struct SaveJob {
    namespace: String,
    name: ConsumerName,
    progress: Progress,
    done: oneshot::Sender<Result<(), StorageError>>,
    /// Called once the answer is sent.
    landed: Landed,
}

/// Called on a saver thread after each save of a durable consumer was answered.
pub type Landed = Arc<dyn Fn() + Send + Sync>;

impl Saver {
    /// Starts `threads` threads saving into `store`; they end when the saver is dropped.
    pub fn new(store: Arc<dyn ConsumerStore>, threads: usize) -> Saver {
        let (jobs, queue) = std::sync::mpsc::channel::<SaveJob>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for n in 0..threads.max(1) {
            let queue = Arc::clone(&queue);
            let store = Arc::clone(&store);
            let spawned = std::thread::Builder::new()
                .name(format!("bus-progress-{n}"))
                .spawn(move || loop {
                    let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(job) = job else {
                        return;
                    };
                    let saved = store.save(&job.namespace, &job.name, &job.progress);
                    let _ = job.done.send(saved);
                    (job.landed)();
                });
            if let Err(e) = spawned {
                // Saves then fail (and are retried) rather than the server failing.
                tracing::error!(error = %e, "starting a thread to store consumers' progress failed");
            }
        }
        Saver { jobs }
    }

    /// Queues a save of `progress`; the answer says how it went, then `landed` is
    /// called.
    fn save(
        &self,
        namespace: &str,
        name: ConsumerName,
        progress: Progress,
        landed: Landed,
    ) -> Save {
        let (done, answer) = oneshot::channel();
        // Without a thread to take it, `done` is dropped and the save reported failed.
        let _ = self.jobs.send(SaveJob {
            namespace: namespace.to_owned(),
            name,
            progress,
            done,
            landed,
        });
        answer
    }
}

/// Runs a consumer until it ends: an ephemeral one when its member leaves, a durable one
/// when its last member leaves (it retires, see [`Retire`]), when the server shuts down
/// or when it is deleted.
///
/// A durable consumer's progress is written by one save at a time on the broker's
/// [`Saver`] threads (write, fsync, rename, directory fsync), never on the dispatcher's
/// task: acks go on being taken while a save runs. A save takes a copy of the progress as
/// it is when it starts; changes made meanwhile wait for it to end and go into the next
/// one, so saves land in the order they were taken and an older one never overwrites a
/// newer one. The dispatcher ends only after its last save has ended, except when it
/// retires: then the broker takes that save, and whatever reads or removes the stored
/// progress next (a start, a delete, shutdown) waits for it first.
pub struct Dispatcher {
    log: Arc<dyn EventLog>,
    reader: Reader,
    redelivery: Redelivery,
    /// Bytes of frames one member may hold beyond its first event.
    max_bytes: usize,
    inputs: mpsc::Receiver<Input>,
    shutdown: watch::Receiver<bool>,
    pending: BTreeMap<u64, Pending>,
    ids: HashMap<String, u64>,
    members: BTreeMap<u64, Member>,
    /// Where the last assignment round started, so that members take turns.
    next_member: u64,
    durable: Option<Durable>,
    /// A durable consumer whose last member left: it retires once its progress is stored.
    idle: bool,
    /// The progress changed since the last save started.
    dirty: bool,
    saving: Option<Save>,
    counts: Arc<DeliveryCounts>,
    confirmations: Arc<Confirmations>,
}

impl Dispatcher {
    /// A consumer reading `pattern` from `from`, whose members each hold at most
    /// `max_bytes` of events beyond their first; an error message if `from` names an event
    /// that does not exist. A durable consumer's unacknowledged events are read again.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        log: Arc<dyn EventLog>,
        pattern: Pattern,
        from: From,
        stop_at: Option<u64>,
        redelivery: Redelivery,
        max_bytes: usize,
        inputs: mpsc::Receiver<Input>,
        readers: Readers,
        durable: Option<Durable>,
        counts: Arc<DeliveryCounts>,
        confirmations: Arc<Confirmations>,
    ) -> Result<Dispatcher, String> {
        let shutdown = readers.shutdown.clone();
        let cursor = Cursor::open(Arc::clone(&log), pattern, from, stop_at, readers).await?;
        let mut dispatcher = Dispatcher {
            log,
            reader: Reader::new(cursor),
            redelivery,
            max_bytes,
            inputs,
            shutdown,
            pending: BTreeMap::new(),
            ids: HashMap::new(),
            members: BTreeMap::new(),
            next_member: 0,
            idle: false,
            // A durable consumer is stored as soon as it exists.
            dirty: durable.is_some(),
            durable,
            saving: None,
            counts,
            confirmations,
        };
        dispatcher.restore_unacked().await?;
        Ok(dispatcher)
    }

    /// A durable consumer reopened: the events it had read but not had acknowledged are
    /// read again (a read per run of consecutive positions), to be delivered first, with
    /// their deliveries so far, delays and replies.
    async fn restore_unacked(&mut self) -> Result<(), String> {
        let Some(durable) = &self.durable else {
            return Ok(());
        };
        let progress = &durable.progress;
        // Events that retention removed since cannot be delivered any more.
        let first = self.log.first_position();
        let mut unacked: Vec<u64> = progress
            .unacked
            .iter()
            .copied()
            .filter(|&position| position >= first)
            .collect();
        unacked.sort_unstable();
        unacked.dedup();
        let delivered: HashMap<u64, u32> = progress
            .delivered
            .iter()
            .map(|&[position, n]| (position, u32::try_from(n).unwrap_or(u32::MAX)))
            .collect();
        let (now, now_ms) = (Instant::now(), Timestamp::now().unix_millis());
        let delayed: HashMap<u64, Instant> = progress
            .delayed
            .iter()
            .filter(|&&[_, until]| until > now_ms)
            .map(|&[position, until]| (position, later(now, Duration::from_millis(until - now_ms))))
            .collect();
        let replied: std::collections::HashSet<u64> = progress.replied.iter().copied().collect();
        let mut i = 0;
        while i < unacked.len() {
            let mut run = 1;
            while i + run < unacked.len()
                && run < READ_BATCH
                && unacked[i + run] == unacked[i] + run as u64
            {
                run += 1;
            }
            let events = self
                .log
                .read(unacked[i], run)
                .await
                .map_err(|e| format!("reading the log failed: {e}"))?;
            // Reads stop at a byte limit: what was not read is read next.
            let read = events.len().clamp(1, run);
            for event in events.into_iter().take(run) {
                let position = event.position();
                self.hold(event);
                if let Some(pending) = self.pending.get_mut(&position) {
                    pending.deliveries = delivered.get(&position).copied().unwrap_or(0);
                    pending.due = delayed.get(&position).copied();
                    pending.replied = replied.contains(&position);
                }
            }
            i += read;
        }
        Ok(())
    }

    fn hold(&mut self, event: StoredEvent) {
        // Held until acknowledged, perhaps long: with a frame of its own, not one that
        // keeps a whole read of the log or a group commit alive (windows are counted in
        // events' own bytes).
        let event = event.detached();
        self.ids.insert(event.id().to_owned(), event.position());
        self.pending.insert(
            event.position(),
            Pending {
                event,
                member: None,
                deliveries: 0,
                due: None,
                delivered_to: Vec::new(),
                replied: false,
            },
        );
    }

    pub async fn run(mut self) {
        let mut save_at: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if self.forget_closed_members() && self.durable.is_none() && self.members.is_empty() {
                return;
            }
            self.expire(now).await;
            self.assign(now);
            if self.finished() {
                for member in self.members.values() {
                    let _ = member.deliveries.try_send(Delivery::End);
                }
                self.save_last().await;
                return;
            }
            if self.idle && self.members.is_empty() {
                match self.retire().await {
                    Retired::Yes => return,
                    // Taken below; it tries again when it is idle again.
                    Retired::InputsQueued => {}
                    // Being deleted: the delete comes.
                    Retired::NotRunning => self.idle = false,
                }
            }
            self.publish_stats();
            if self.dirty && self.durable.is_some() && save_at.is_none() {
                save_at = Some(later(now, SAVE_EVERY));
            }
            if save_at.is_some_and(|at| at <= now) && self.saving.is_none() {
                save_at = None;
                self.start_save();
            }
            // A save that is due while another runs starts when that one ends (which
            // wakes the loop), not on a timer.
            let save_wake = save_at.filter(|_| self.saving.is_none());
            let wake = self.next_due().into_iter().chain(save_wake).min();
            let read = self.wants_events() || self.reader.reading();
            tokio::select! {
                input = self.inputs.recv() => match input {
                    Some(Input::Delete) => {
                        self.delete().await;
                        return;
                    }
                    Some(input) => {
                        self.take(input);
                        // Take whatever else is queued before the next round.
                        while let Ok(input) = self.inputs.try_recv() {
                            if matches!(input, Input::Delete) {
                                self.delete().await;
                                return;
                            }
                            self.take(input);
                        }
                        if self.durable.is_none() && self.members.is_empty() {
                            return;
                        }
                    }
                    None => {
                        self.save_last().await;
                        return;
                    }
                },
                (batch, notice) = self.reader.next_batch(), if read => {
                    if let Some(skipped) = notice {
                        for member in self.members.values() {
                            let _ = member.deliveries.try_send(Delivery::Skipped(skipped));
                        }
                    }
                    match batch {
                        Ok(Some(events)) => {
                            for event in events {
                                self.hold(event);
                            }
                            self.dirty = true;
                        }
                        Ok(None) => {
                            if *self.shutdown.borrow() {
                                self.save_last().await;
                                return;
                            }
                        }
                        Err(message) => {
                            for member in self.members.values() {
                                let _ = member.deliveries.try_send(Delivery::Error(message.clone()));
                            }
                            self.save_last().await;
                            return;
                        }
                    }
                },
                saved = save_ended(&mut self.saving), if self.saving.is_some() => {
                    self.saved(saved);
                }
                // What is due is done at the top of the loop.
                () = sleep_until(wake) => {}
                _ = self.shutdown.changed() => {
                    self.save_last().await;
                    return;
                }
            }
        }
    }

    /// A durable consumer without members leaves the broker's running consumers, unless
    /// someone joined meanwhile, handing the broker the save of what changed; its pending
    /// events are freed when it ends. Saves of one consumer never overlap: a save that
    /// runs ends first.
    async fn retire(&mut self) -> Retired {
        if let Some(saving) = self.saving.take() {
            let result = saving.await;
            self.saved(result);
        }
        self.start_save();
        // The figures the admin listing shows until the save lands.
        self.publish_stats();
        let Some(durable) = &self.durable else {
            return Retired::NotRunning;
        };
        // Not retired: the save is still this dispatcher's, awaited as any other.
        let retired = (durable.retire)(&mut self.inputs, &mut self.saving);
        if retired == Retired::Yes {
            tracing::debug!(consumer = %durable.name, "durable consumer idle: its dispatcher ends");
        }
        retired
    }

    fn take(&mut self, input: Input) {
        match input {
            Input::Join {
                member,
                max_inflight,
                deliveries,
            } => {
                self.members.insert(
                    member,
                    Member {
                        max_inflight: max_inflight.max(1),
                        in_flight: 0,
                        bytes: 0,
                        deliveries,
                    },
                );
            }
            Input::Leave { member } => self.leave(member),
            Input::Ack {
                event_ids,
                consumer_id,
                zone,
            } => {
                // A durable consumer confirms as one, whichever member acked.
                let confirmer = match &self.durable {
                    Some(durable) => durable.name.to_string(),
                    None => consumer_id,
                };
                for id in event_ids {
                    let Some(position) = self.ids.remove(&id) else {
                        continue; // late, repeated or unknown: acks are idempotent
                    };
                    if let Some(pending) = self.pending.remove(&position) {
                        self.release(pending.member, size(&pending.event));
                        self.dirty = true;
                        self.confirmations.record(&id, &confirmer, zone.as_deref());
                    }
                }
            }
            Input::Nak { event_id, delay } => {
                let Some(&position) = self.ids.get(&event_id) else {
                    return;
                };
                let max_deliveries = self.redelivery.max_deliveries;
                let (member, bytes) = match self.pending.get_mut(&position) {
                    Some(pending) if pending.member.is_some() => {
                        if max_deliveries.is_some_and(|max| pending.deliveries >= max) {
                            // Its last delivery failed: given up at once, as on a timeout.
                            pending.due = Some(Instant::now());
                            return;
                        }
                        pending.due = Some(later(Instant::now(), delay));
                        (pending.member.take(), size(&pending.event))
                    }
                    _ => return,
                };
                self.release(member, bytes);
                // The delay is part of the stored progress.
                self.dirty = true;
            }
            Input::ClaimReply {
                event_id,
                member,
                answer,
            } => {
                let pending = self
                    .ids
                    .get(&event_id)
                    .and_then(|position| self.pending.get_mut(position))
                    .filter(|pending| pending.delivered_to.contains(&member));
                let claimed = match pending {
                    None => Err(ReplyRefused::NotDelivered),
                    Some(pending) if pending.replied => Err(ReplyRefused::Replied),
                    Some(pending) => {
                        pending.replied = true;
                        Ok(pending.event.clone())
                    }
                };
                self.dirty |= claimed.is_ok();
                let _ = answer.send(claimed);
            }
            Input::ReleaseReply { event_id } => {
                if let Some(pending) = self
                    .ids
                    .get(&event_id)
                    .and_then(|position| self.pending.get_mut(position))
                {
                    pending.replied = false;
                    self.dirty = true;
                }
            }
            Input::Delete => {}
        }
    }

    /// A member's slot, and the bytes of the event in it, free up.
    fn release(&mut self, member: Option<u64>, bytes: usize) {
        if let Some(member) = member.and_then(|m| self.members.get_mut(&m)) {
            member.in_flight = member.in_flight.saturating_sub(1);
            member.bytes = member.bytes.saturating_sub(bytes);
        }
    }

    /// Members whose stream is gone without a word (their leave was dropped with the
    /// input queue full) leave now, rather than at the next delivery to them, which may
    /// never come: an idle durable consumer must see its last member go. Whether any
    /// left.
    fn forget_closed_members(&mut self) -> bool {
        let closed: Vec<u64> = self
            .members
            .iter()
            .filter(|(_, member)| member.deliveries.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for &member in &closed {
            self.leave(member);
        }
        !closed.is_empty()
    }

    /// A member left: what it held goes to the others at once.
    fn leave(&mut self, member: u64) {
        self.members.remove(&member);
        for pending in self.pending.values_mut() {
            if pending.member == Some(member) {
                pending.member = None;
                pending.due = None;
            }
        }
        self.idle = self.durable.is_some() && self.members.is_empty();
    }

    /// Held events whose redelivery is due go back to the waiting ones, or are given up
    /// after their last delivery.
    async fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.member.is_some() && p.due.is_some_and(|due| due <= now))
            .map(|(&position, _)| position)
            .collect();
        for position in expired {
            let Some(pending) = self.pending.get_mut(&position) else {
                continue;
            };
            let member = pending.member.take();
            let bytes = size(&pending.event);
            pending.due = None;
            let exhausted = self
                .redelivery
                .max_deliveries
                .is_some_and(|max| pending.deliveries >= max);
            self.release(member, bytes);
            if exhausted {
                if let Some(pending) = self.pending.remove(&position) {
                    self.ids.remove(pending.event.id());
                    give_up(
                        self.log.as_ref(),
                        self.durable.as_ref(),
                        &pending,
                        &self.counts,
                    )
                    .await;
                    self.dirty = true;
                }
            }
        }
    }

    /// Hands waiting events to members with room (in events and bytes), lowest position
    /// first, members taking turns. Each member takes a prefix of what waits, so that it
    /// receives events in log order; small events go in deliveries of up to
    /// `DELIVERY_BYTES`, a larger one alone.
    fn assign(&mut self, now: Instant) {
        let mut ready: std::collections::VecDeque<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.member.is_none() && p.due.is_none_or(|due| due <= now))
            .map(|(&position, _)| position)
            .collect();
        if ready.is_empty() {
            return;
        }
        let member_ids: Vec<u64> = self
            .members
            .range(self.next_member..)
            .chain(self.members.range(..self.next_member))
            .map(|(&id, _)| id)
            .collect();
        let mut gone = Vec::new();
        for member_id in member_ids {
            if ready.is_empty() {
                break;
            }
            let Some(member) = self.members.get(&member_id) else {
                continue;
            };
            let (room, room_bytes) = member.room(self.max_bytes);
            let first_free = member.in_flight == 0;
            // Deliveries of up to DELIVERY_BYTES, the events chosen for this member.
            let mut deliveries: Vec<Vec<u64>> = Vec::new();
            let (mut chosen, mut bytes, mut chunk_bytes) = (0, 0usize, 0usize);
            while let Some(&position) = ready.front() {
                if chosen == room {
                    break;
                }
                let Some(pending) = self.pending.get(&position) else {
                    ready.pop_front();
                    continue;
                };
                let size = size(&pending.event);
                let always = first_free && chosen == 0;
                if !always && bytes.saturating_add(size) > room_bytes {
                    break;
                }
                ready.pop_front();
                chosen += 1;
                bytes = bytes.saturating_add(size);
                match deliveries.last_mut() {
                    Some(chunk) if chunk_bytes.saturating_add(size) <= DELIVERY_BYTES => {
                        chunk.push(position);
                        chunk_bytes += size;
                    }
                    _ => {
                        deliveries.push(vec![position]);
                        chunk_bytes = size;
                    }
                }
            }
            let due = later(now, self.redelivery.every);
            for chunk in deliveries {
                let events: Vec<StoredEvent> = chunk
                    .iter()
                    .filter_map(|p| self.pending.get(p).map(|p| p.event.clone()))
                    .collect();
                let Some(member) = self.members.get(&member_id) else {
                    break;
                };
                match member.deliveries.try_send(Delivery::Events(events)) {
                    Ok(()) => {
                        let mut sent_bytes = 0;
                        for position in &chunk {
                            if let Some(pending) = self.pending.get_mut(position) {
                                if pending.deliveries > 0 {
                                    self.counts.redeliveries.fetch_add(1, Ordering::Relaxed);
                                }
                                if !pending.delivered_to.contains(&member_id) {
                                    pending.delivered_to.push(member_id);
                                }
                                pending.member = Some(member_id);
                                pending.deliveries = pending.deliveries.saturating_add(1);
                                pending.due = Some(due);
                                sent_bytes += size(&pending.event);
                            }
                        }
                        if let Some(member) = self.members.get_mut(&member_id) {
                            member.in_flight += chunk.len();
                            member.bytes += sent_bytes;
                        }
                        self.next_member = member_id + 1;
                        // Deliveries so far are part of the stored progress.
                        self.dirty = true;
                    }
                    // What was not sent waits for the next round.
                    Err(mpsc::error::TrySendError::Full(_)) => break,
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        gone.push(member_id);
                        break;
                    }
                }
            }
        }
        for member in gone {
            self.leave(member);
        }
    }

    /// Whether reading further is useful: members have room beyond what waits already,
    /// in events and in bytes (so a dispatcher holds at most its members' windows and
    /// one read more).
    fn wants_events(&self) -> bool {
        if self.reader.finished {
            return false;
        }
        let (room, room_bytes) = self
            .members
            .values()
            .map(|m| m.room(self.max_bytes))
            .fold((0usize, 0usize), |(events, bytes), (e, b)| {
                (events + e, bytes.saturating_add(b))
            });
        let (waiting, waiting_bytes) = self
            .pending
            .values()
            .filter(|p| p.member.is_none())
            .fold((0usize, 0usize), |(events, bytes), p| {
                (events + 1, bytes.saturating_add(size(&p.event)))
            });
        room > waiting && room_bytes > waiting_bytes
    }

    /// An ephemeral consumer asked to stop at the log's end, that got there.
    fn finished(&self) -> bool {
        self.reader.finished && self.pending.is_empty()
    }

    fn next_due(&self) -> Option<Instant> {
        self.pending.values().filter_map(|p| p.due).min()
    }

    /// Deleted by an admin: members' streams end. The broker removes the stored progress
    /// once the dispatcher has ended, so a save still running must end first (it would
    /// bring the file back) and no other may start.
    async fn delete(&mut self) {
        self.end_members("the consumer was deleted");
        if let Some(saving) = self.saving.take() {
            let _ = saving.await;
        }
        self.dirty = false;
    }

    fn end_members(&mut self, message: &str) {
        for member in self.members.values() {
            let _ = member
                .deliveries
                .try_send(Delivery::Error(message.to_owned()));
        }
        self.members.clear();
    }

    fn publish_stats(&self) {
        if let Some(durable) = &self.durable {
            let stats = &durable.stats;
            stats
                .pending
                .store(self.pending.len() as u64, Ordering::Relaxed);
            stats.floor.store(self.floor(), Ordering::Relaxed);
            stats
                .members
                .store(self.members.len() as u64, Ordering::Relaxed);
        }
    }

    fn floor(&self) -> u64 {
        self.pending
            .keys()
            .next()
            .copied()
            .unwrap_or(self.reader.next)
    }

    /// Starts storing a durable consumer's progress on a saver thread, if it changed and
    /// no save is running; whether it started one.
    fn start_save(&mut self) -> bool {
        if !self.dirty || self.saving.is_some() {
            return false;
        }
        let Some(durable) = &mut self.durable else {
            // An ephemeral consumer stores nothing.
            self.dirty = false;
            return false;
        };
        let progress = &mut durable.progress;
        progress.next = self.reader.next;
        progress.unacked = self.pending.keys().copied().collect();
        progress.delivered = self
            .pending
            .iter()
            .filter(|(_, p)| p.deliveries > 0)
            .map(|(&position, p)| [position, u64::from(p.deliveries)])
            .collect();
        let (now, now_ms) = (Instant::now(), Timestamp::now().unix_millis());
        progress.delayed = self
            .pending
            .iter()
            .filter(|(_, p)| p.member.is_none())
            .filter_map(|(&position, p)| {
                let wait = p.due?.checked_duration_since(now)?;
                let wait = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                Some([position, now_ms.saturating_add(wait.max(1))])
            })
            .collect();
        progress.replied = self
            .pending
            .iter()
            .filter(|(_, p)| p.replied)
            .map(|(&position, _)| position)
            .collect();
        self.saving = Some(durable.saver.save(
            self.log.namespace(),
            durable.name.clone(),
            durable.progress.clone(),
            Arc::clone(&durable.landed),
        ));
        self.dirty = false;
        self.publish_stats();
        true
    }

    /// A save ended; if it failed, the progress is stored again at the next interval.
    fn saved(&mut self, result: Result<Result<(), StorageError>, oneshot::error::RecvError>) {
        self.saving = None;
        let error = match result {
            Ok(Ok(())) => {
                // An idle consumer whose earlier save failed may retire now.
                if self.durable.is_some() && self.members.is_empty() {
                    self.idle = true;
                }
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no thread took the save".to_owned(),
        };
        if let Some(durable) = &self.durable {
            tracing::error!(consumer = %durable.name, error, "saving a consumer's progress failed; retrying");
        }
        self.dirty = true;
    }

    /// The dispatcher's last act: waits for the running save, then stores what changed
    /// since. The broker's shutdown awaits the dispatchers, so it finds every ack stored.
    async fn save_last(&mut self) {
        if let Some(saving) = self.saving.take() {
            let result = saving.await;
            self.saved(result);
        }
        if self.start_save() {
            if let Some(saving) = self.saving.take() {
                let result = saving.await;
                self.saved(result);
            }
        }
    }
}

/// The end of the running save (never, if none runs).
async fn save_ended(
    saving: &mut Option<Save>,
) -> Result<Result<(), StorageError>, oneshot::error::RecvError> {
    match saving {
        Some(saving) => saving.await,
        None => std::future::pending().await,
    }
}

/// An event delivered its last time without an ack. (Not a method: a `&Dispatcher` held
/// across its await would need the dispatcher, and the read it holds, to be `Sync`.)
async fn give_up(
    log: &dyn EventLog,
    durable: Option<&Durable>,
    pending: &Pending,
    counts: &DeliveryCounts,
) {
    let consumer = durable.map(|durable| &durable.name);
    give_up_event(log, consumer, &pending.event, pending.deliveries, counts).await;
}

/// Gives up an event after `deliveries` without an ack: durable consumer `consumer`
/// appends it to its dead-letter subject; an ephemeral one moves on, as the reference
/// does.
pub(super) async fn give_up_event(
    log: &dyn EventLog,
    consumer: Option<&ConsumerName>,
    event: &StoredEvent,
    deliveries: u32,
    counts: &DeliveryCounts,
) {
    let Some(consumer) = consumer else {
        counts.given_up.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            event_id = event.id(),
            deliveries,
            "event not acknowledged after its last delivery; moving on"
        );
        return;
    };
    let subject = dead_letter_subject(log.namespace(), consumer);
    tracing::warn!(
        consumer = %consumer,
        event_id = event.id(),
        deliveries,
        dead_letter_subject = subject,
        "event not acknowledged after its last delivery; appended to the dead-letter subject"
    );
    let payload = format!(
        r#"{{"event":{},"consumer":{},"deliveries":{}}}"#,
        String::from_utf8_lossy(&event.json()),
        serde_json::Value::from(consumer.as_str()),
        deliveries
    );
    let draft = EventDraft {
        subject: &subject,
        payload: Some(payload.as_bytes()),
        ..EventDraft::default()
    };
    let appended = match PendingEvent::new(&draft) {
        Ok(dead) => log
            .append(vec![dead])
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match appended {
        Ok(()) => {
            counts.dead_letters.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            tracing::error!(consumer = %consumer, event_id = event.id(), error = %e, "appending a dead letter failed");
        }
    }
}

/// `now + wait`, or a time beyond any server's lifetime if that cannot be represented:
/// durations come from clients, and overflowing `Instant` would panic the dispatcher.
pub(super) fn later(now: Instant, wait: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(wait.min(CENTURY))
        .or_else(|| now.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(now)
}

pub(super) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};
    use std::thread::ThreadId;

    use futures_util::StreamExt;

    use super::*;
    use crate::broker::{
        AckMode, Broker, BrokerConfig, BrokerError, NewEvent, Publication, Start, SubscribeRequest,
        Subscription, READ_BATCH,
    };
    use std::path::Path;

    use crate::store::memory::{MemoryConsumers, MemoryLog};
    use crate::store::{FsyncPolicy, Log, Owner, Storage, StoreConfig};

    const WAIT: Duration = Duration::from_secs(10);

    /// A progress I/O, as a test sees it.
    #[derive(Debug)]
    enum Io<'a> {
        Load,
        List,
        Save(&'a Progress),
        Remove,
    }

    type Hook = Arc<dyn Fn(Io<'_>) + Send + Sync>;

    /// Durable consumers' progress in memory, with a hook a test sets to watch (and slow
    /// down) each operation, called on the thread that does it.
    #[derive(Default)]
    struct Watched {
        inner: MemoryConsumers,
        hook: Mutex<Option<Hook>>,
    }

    /// A hook in place; removed when dropped.
    struct Watching<'a>(&'a Watched);

    impl Drop for Watching<'_> {
        fn drop(&mut self) {
            *self.0.hook.lock().unwrap() = None;
        }
    }

    impl Watched {
        fn watch(&self, hook: impl Fn(Io<'_>) + Send + Sync + 'static) -> Watching<'_> {
            *self.hook.lock().unwrap() = Some(Arc::new(hook));
            Watching(self)
        }

        fn call(&self, io: Io<'_>) {
            let hook = self.hook.lock().unwrap().clone();
            if let Some(hook) = hook {
                hook(io);
            }
        }

        fn stored(&self, name: &str) -> Option<Progress> {
            let name = ConsumerName::parse(name).expect("name");
            self.inner.load("orders", &name).expect("load")
        }
    }

    impl ConsumerStore for Watched {
        fn load(
            &self,
            namespace: &str,
            name: &ConsumerName,
        ) -> Result<Option<Progress>, StorageError> {
            self.call(Io::Load);
            self.inner.load(namespace, name)
        }

        fn save(
            &self,
            namespace: &str,
            name: &ConsumerName,
            progress: &Progress,
        ) -> Result<(), StorageError> {
            self.call(Io::Save(progress));
            self.inner.save(namespace, name, progress)
        }

        fn remove(&self, namespace: &str, name: &ConsumerName) -> Result<(), StorageError> {
            self.call(Io::Remove);
            self.inner.remove(namespace, name)
        }

        fn list(&self, namespace: &str) -> Result<Vec<(ConsumerName, Progress)>, StorageError> {
            self.call(Io::List);
            self.inner.list(namespace)
        }
    }

    /// A broker for a test, its namespace `orders` and its consumers' progress.
    struct Bed {
        broker: Arc<Broker>,
        log: Arc<dyn EventLog>,
        consumers: Arc<Watched>,
    }

    impl Bed {
        /// On the in-memory store.
        fn in_memory(config: BrokerConfig) -> Bed {
            Bed::over(Arc::new(MemoryLog::new("orders")), config)
        }

        /// On the file store, keeping `tail_bytes` of recent events in memory: for what
        /// concerns reads from disk.
        fn on_disk(data: &Path, tail_bytes: usize, config: BrokerConfig) -> (Bed, Arc<Log>) {
            let store = StoreConfig {
                fsync: FsyncPolicy::Never,
                tail_bytes,
                ..StoreConfig::new(data)
            };
            let log = Arc::new(Log::open(&data.join("orders"), "orders", &store).expect("open"));
            (
                Bed::over(Arc::clone(&log) as Arc<dyn EventLog>, config),
                log,
            )
        }

        fn over(log: Arc<dyn EventLog>, config: BrokerConfig) -> Bed {
            Bed::with(log, Arc::new(Watched::default()), config)
        }

        fn with(log: Arc<dyn EventLog>, consumers: Arc<Watched>, config: BrokerConfig) -> Bed {
            let storage = Storage {
                logs: vec![Arc::clone(&log)],
                consumers: crate::store::Consumers::Dispatched(
                    Arc::clone(&consumers) as Arc<dyn ConsumerStore>
                ),
                relay: None,
            };
            let config = BrokerConfig {
                dup_size: 0,
                ..config
            };
            Bed {
                broker: Arc::new(Broker::new(storage, &config)),
                log,
                consumers,
            }
        }

        /// A broker over the same log and progress, as after a restart.
        fn restarted(&self, config: BrokerConfig) -> Bed {
            Bed::with(Arc::clone(&self.log), Arc::clone(&self.consumers), config)
        }
    }

    async fn publish(broker: &Broker, events: usize) {
        let batch = (0..events)
            .map(|n| NewEvent {
                subject: "orders.paid".into(),
                payload: Some(format!("{{\"n\":{n}}}").into_bytes()),
                ..NewEvent::default()
            })
            .collect();
        broker
            .publish(Publication::Batch(batch))
            .await
            .expect("publish");
    }

    fn manual(consumer: Option<&str>, max_inflight: usize) -> SubscribeRequest {
        SubscribeRequest {
            pattern: Pattern::parse("orders.>").expect("pattern"),
            start: Start::Oldest,
            ack: AckMode::Manual {
                redelivery: Duration::from_secs(60),
                max_deliveries: None,
                max_inflight,
            },
            until_now: false,
            owner: None,
            admin: false,
            consumer: consumer.map(|name| ConsumerName::parse(name).expect("name")),
            zone: None,
        }
    }

    async fn subscribe(broker: &Broker, request: SubscribeRequest) -> Subscription {
        broker.subscribe(request).await.expect("subscribe")
    }

    /// The ids of the next delivery's events.
    async fn next_ids(subscription: &mut Subscription) -> Vec<String> {
        match tokio::time::timeout(WAIT, subscription.deliveries.next()).await {
            Ok(Some(Delivery::Events(events))) => {
                events.iter().map(|e| e.id().to_owned()).collect()
            }
            Ok(other) => panic!("expected events, got {other:?}"),
            Err(_) => panic!("no delivery within {WAIT:?}"),
        }
    }

    /// Waits (without blocking the runtime) until `done` holds.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Loading, saving and removing a durable consumer's progress (file reads, fsyncs,
    /// renames) never run on a thread of the async runtime: on a current-thread runtime,
    /// the hook records every progress I/O that runs on the test's own thread.
    #[tokio::test(flavor = "current_thread")]
    async fn a_durable_consumers_progress_io_never_runs_on_the_runtime_thread() {
        let bed = Bed::in_memory(BrokerConfig::default());
        let broker = &bed.broker;
        publish(broker, 3).await;
        let runtime: ThreadId = std::thread::current().id();
        let seen = Arc::new(Mutex::new(Vec::<(String, bool)>::new()));
        let saved_all = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _hook = bed.consumers.watch({
            let seen = Arc::clone(&seen);
            let saved_all = Arc::clone(&saved_all);
            move |io| {
                if let Io::Save(progress) = &io {
                    if progress.next == 3 && progress.unacked.is_empty() {
                        saved_all.store(true, Ordering::SeqCst);
                    }
                }
                let kind = format!("{io:?}").split('(').next().unwrap_or("").to_owned();
                let on_runtime = std::thread::current().id() == runtime;
                seen.lock().unwrap().push((kind, on_runtime));
            }
        });

        let mut member = subscribe(broker, manual(Some("billing"), 10)).await;
        let ids = next_ids(&mut member).await;
        assert_eq!(ids.len(), 3);
        assert!(broker.ack(&member.consumer_id, ids));
        until("the acks stored", || saved_all.load(Ordering::SeqCst)).await;
        drop(member);
        let name = ConsumerName::parse("billing").expect("name");
        broker
            .delete_consumer("orders", &name)
            .await
            .expect("delete");
        // Created again, then stored once more as the server shuts down.
        let _member = subscribe(broker, manual(Some("billing"), 10)).await;
        broker.shut_down();
        broker.wait_for_consumers().await;

        let seen = seen.lock().unwrap().clone();
        for kind in ["Load", "Save", "Remove"] {
            assert!(
                seen.iter().any(|(k, _)| k == kind),
                "no {kind} happened: {seen:?}"
            );
        }
        let on_runtime: Vec<&str> = seen
            .iter()
            .filter(|(_, on_runtime)| *on_runtime)
            .map(|(kind, _)| kind.as_str())
            .collect();
        assert!(
            on_runtime.is_empty(),
            "progress I/O on the runtime's thread: {on_runtime:?}"
        );
    }

    /// Holds saves until opened; opens when dropped, so that a failing test never leaves
    /// a thread waiting.
    struct Gate(Arc<(Mutex<bool>, Condvar)>);

    impl Gate {
        fn new() -> Gate {
            Gate(Arc::new((Mutex::new(false), Condvar::new())))
        }

        fn open(&self) {
            *self.0 .0.lock().unwrap() = true;
            self.0 .1.notify_all();
        }
    }

    impl Drop for Gate {
        fn drop(&mut self) {
            self.open();
        }
    }

    /// A slow save (a stalled disk) does not stop the dispatcher: acks keep being taken
    /// and events keep being delivered while it lasts. Saves are not reordered (each one
    /// stores at least as much as the one before), and the last one is finished when the
    /// dispatcher has ended at shutdown.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dispatcher_keeps_taking_acks_while_a_save_is_slow() {
        const EVENTS: usize = 20;
        let bed = Bed::in_memory(BrokerConfig::default());
        let broker = &bed.broker;
        publish(broker, EVENTS).await;
        let gate = Gate::new();
        let saves = Arc::new(Mutex::new(Vec::<Progress>::new()));
        // Saves that returned (through the gate, or after waiting for it in vain).
        let returned = Arc::new(AtomicU64::new(0));
        let _hook = bed.consumers.watch({
            let gate = Arc::clone(&gate.0);
            let saves = Arc::clone(&saves);
            let returned = Arc::clone(&returned);
            move |io| {
                if let Io::Save(progress) = io {
                    saves.lock().unwrap().push(progress.clone());
                    let (open, opened) = &*gate;
                    let open = open.lock().unwrap();
                    // Bounded, so that a dispatcher blocked by this save (and the test's
                    // timers with it) gets going again and the test can say so.
                    let _ = opened.wait_timeout_while(open, Duration::from_secs(20), |open| !*open);
                    returned.fetch_add(1, Ordering::SeqCst);
                }
            }
        });

        let mut member = subscribe(broker, manual(Some("slow"), 1)).await;
        let mut ids = next_ids(&mut member).await;
        until("the first save started", || {
            !saves.lock().unwrap().is_empty()
        })
        .await;
        // The first save hangs; acks go on being taken and answered with the next event.
        for _ in 1..EVENTS {
            assert!(broker.ack(&member.consumer_id, ids.clone()));
            ids = next_ids(&mut member).await;
        }
        assert_eq!(
            returned.load(Ordering::SeqCst),
            0,
            "the dispatcher stood still until the slow save gave up"
        );
        assert_eq!(saves.lock().unwrap().len(), 1, "saves overlapped");
        assert!(broker.ack(&member.consumer_id, ids));
        gate.open();
        until("every ack stored", || {
            saves
                .lock()
                .unwrap()
                .last()
                .is_some_and(|p| p.next == EVENTS as u64 && p.unacked.is_empty())
        })
        .await;
        broker.shut_down();
        broker.wait_for_consumers().await;

        let saves = saves.lock().unwrap().clone();
        let done = |p: &Progress| p.next - p.unacked.len() as u64;
        assert!(
            saves
                .windows(2)
                .all(|w| done(&w[0]) <= done(&w[1]) && w[0].next <= w[1].next),
            "a save overtook a newer one: {saves:?}"
        );
        let stored = bed.consumers.stored("slow").expect("stored");
        assert_eq!((stored.next, stored.unacked), (EVENTS as u64, vec![]));
    }

    /// A consumer catching up from disk while acks keep arriving reads each batch once:
    /// an input that arrives during a read does not discard it (the log counts its disk
    /// reads). The acks here name no delivered event, as late or repeated acks do; each
    /// one still wakes the dispatcher.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ack_arriving_mid_read_does_not_throw_the_read_away() {
        const EVENTS: usize = 20_000;
        let data = tempfile::tempdir().expect("tempdir");
        // No in-memory tail: every read goes to the segment files.
        let (bed, log) = Bed::on_disk(data.path(), 0, BrokerConfig::default());
        let broker = bed.broker;
        for _ in 0..EVENTS / 1000 {
            publish(&broker, 1000).await;
        }
        let reads_before = log.stats().disk_reads;
        let mut member = subscribe(&broker, manual(None, 100)).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acker = std::thread::spawn({
            let broker = Arc::clone(&broker);
            let consumer_id = member.consumer_id.clone();
            let stop = Arc::clone(&stop);
            move || {
                while !stop.load(Ordering::Relaxed) {
                    broker.ack(&consumer_id, vec!["e_0000000000000000000a".into()]);
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        });
        let mut received = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while received < EVENTS {
            let left = deadline.saturating_duration_since(Instant::now());
            let delivery = tokio::time::timeout(left, member.deliveries.next()).await;
            let Ok(Some(Delivery::Events(events))) = delivery else {
                stop.store(true, Ordering::Relaxed);
                panic!(
                    "{received} of {EVENTS} events delivered; {} disk reads",
                    log.stats().disk_reads - reads_before
                );
            };
            received += events.len();
            let ids = events.iter().map(|e| e.id().to_owned()).collect();
            assert!(broker.ack(&member.consumer_id, ids));
        }
        stop.store(true, Ordering::Relaxed);
        acker.join().expect("acker");
        let reads = log.stats().disk_reads - reads_before;
        let needed = EVENTS.div_ceil(READ_BATCH) as u64;
        assert!(
            reads <= needed + 2,
            "{reads} disk reads for {EVENTS} events, where {needed} suffice"
        );
        broker.shut_down();
        broker.wait_for_consumers().await;
    }

    /// Events with a payload of `bytes` bytes (a JSON string).
    async fn publish_large(broker: &Broker, events: usize, bytes: usize) {
        for _ in 0..events {
            let event = NewEvent {
                subject: "orders.big".into(),
                payload: Some(format!("\"{}\"", "x".repeat(bytes)).into_bytes()),
                ..NewEvent::default()
            };
            broker
                .publish(Publication::One(event))
                .await
                .expect("publish");
        }
    }

    /// Every event delivered until none comes for a while.
    async fn drain(subscription: &mut Subscription) -> Vec<StoredEvent> {
        let mut events = Vec::new();
        while let Ok(Some(delivery)) =
            tokio::time::timeout(Duration::from_millis(300), subscription.deliveries.next()).await
        {
            match delivery {
                Delivery::Events(more) => events.extend(more),
                other => panic!("expected events, got {other:?}"),
            }
        }
        events
    }

    fn request(
        consumer: Option<&str>,
        max_inflight: usize,
        redelivery: Duration,
        max: Option<u32>,
    ) -> SubscribeRequest {
        SubscribeRequest {
            ack: AckMode::Manual {
                redelivery,
                max_deliveries: max,
                max_inflight,
            },
            ..manual(consumer, max_inflight)
        }
    }

    fn owned(consumer: &str, owner: &str) -> SubscribeRequest {
        SubscribeRequest {
            owner: Some(Owner(owner.into())),
            ..manual(Some(consumer), 1)
        }
    }

    fn running(broker: &Broker, name: &str) -> bool {
        let key = (
            "orders".to_owned(),
            ConsumerName::parse(name).expect("name"),
        );
        broker
            .durables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&key)
    }

    fn listed(broker: &Broker, name: &str) -> crate::broker::ConsumerInfo {
        broker
            .consumers("orders")
            .expect("list")
            .into_iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("{name} is not listed"))
    }

    /// A member's window is bounded in bytes as well as in events: with room for 100
    /// events it holds as many as fit in `max_inflight_bytes`, the dispatcher reads no
    /// further ahead than one read beyond that, and each ack lets one more in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_window_is_bounded_in_bytes_and_the_dispatcher_reads_no_further() {
        const BUDGET: usize = 1 << 20;
        let config = BrokerConfig {
            max_inflight_bytes: BUDGET,
            ..BrokerConfig::default()
        };
        let broker = Bed::in_memory(config).broker;
        publish_large(&broker, 40, 200 << 10).await;
        let mut member = subscribe(&broker, manual(Some("big"), 100)).await;
        let held = drain(&mut member).await;
        let size = held[0].sse_frame().len();
        let fit = BUDGET / size;
        assert_eq!(
            held.len(),
            fit,
            "{} events of {size} bytes held with a budget of {BUDGET}",
            held.len()
        );
        // Read but not delivered: at most one read (256 KiB, or one event) beyond the
        // window.
        let pending = listed(&broker, "big").pending as usize;
        assert!(
            pending <= fit + (256 << 10) / size + 1,
            "{pending} events pending for a max_inflight of {fit}"
        );
        assert!(broker.ack(&member.consumer_id, vec![held[0].id().to_owned()]));
        let next = drain(&mut member).await;
        assert_eq!(next.len(), 1, "one ack makes room for one event");
        assert_eq!(
            next[0].position(),
            held.last().expect("held").position() + 1
        );
        broker.shut_down();
        broker.wait_for_consumers().await;
    }

    /// An event larger than the whole budget is still delivered, alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_larger_than_the_budget_is_delivered_alone() {
        let data = tempfile::tempdir().expect("tempdir");
        let config = BrokerConfig {
            max_inflight_bytes: 64 << 10,
            ..BrokerConfig::default()
        };
        // From disk: no tail.
        let broker = Bed::on_disk(data.path(), 0, config).0.broker;
        publish_large(&broker, 3, 256 << 10).await;
        let mut member = subscribe(&broker, manual(None, 10)).await;
        for position in 0..3 {
            let held = drain(&mut member).await;
            assert_eq!(held.len(), 1);
            assert_eq!(held[0].position(), position);
            assert!(broker.ack(&member.consumer_id, vec![held[0].id().to_owned()]));
        }
        broker.shut_down();
        broker.wait_for_consumers().await;
    }

    /// When its last member leaves, a durable consumer stores its progress and its
    /// dispatcher ends (holding nothing); it is still listed, with its stored figures.
    /// The next attachment resumes from what was stored: its unacknowledged events come
    /// first, and their deliveries so far still count towards giving them up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_durable_consumer_ends_and_resumes_where_it_stood() {
        let bed = Bed::in_memory(BrokerConfig::default());
        let broker = Arc::clone(&bed.broker);
        publish(&broker, 5).await;
        let long = Duration::from_secs(60);
        let mut member = subscribe(&broker, request(Some("idle"), 5, long, Some(2))).await;
        let ids = next_ids(&mut member).await;
        assert_eq!(ids.len(), 5);
        assert!(broker.ack(&member.consumer_id, ids[..2].to_vec()));
        until("the acks taken", || listed(&broker, "idle").pending == 3).await;
        drop(member);
        until("the dispatcher retired", || !running(&broker, "idle")).await;
        until("its task ended", || {
            broker
                .dispatchers
                .lock()
                .unwrap()
                .iter()
                .all(|task| task.is_finished())
        })
        .await;
        // Its last save is on its way (the next start waits for it).
        let name = ConsumerName::parse("idle").expect("name");
        let stored = || bed.consumers.stored("idle").unwrap_or_default();
        until("the last save landed", || stored().unacked == [2, 3, 4]).await;
        assert_eq!(stored().next, 5);
        assert_eq!(stored().delivered, vec![[2, 1], [3, 1], [4, 1]]);
        let info = listed(&broker, "idle");
        assert_eq!((info.members, info.pending, info.acked_floor), (0, 3, 2));

        // Back: the unacknowledged events first. Event 4 is not acked: its second
        // delivery is its last, and it goes to the dead letters when that times out.
        let short = Duration::from_millis(200);
        let mut member = subscribe(&broker, request(Some("idle"), 5, short, Some(2))).await;
        assert!(running(&broker, "idle"));
        let again = next_ids(&mut member).await;
        assert_eq!(again, ids[2..].to_vec());
        assert!(broker.ack(&member.consumer_id, again[..2].to_vec()));
        let dead = dead_letter_subject("orders", &name);
        let dead_lettered = || async {
            let events = bed.log.read(0, 100).await.expect("read");
            events.iter().any(|event| event.subject() == dead)
        };
        let deadline = Instant::now() + WAIT;
        while !dead_lettered().await {
            assert!(Instant::now() < deadline, "event 4 was not given up");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        broker.shut_down();
        broker.wait_for_consumers().await;
    }

    /// Attachments that race with an idle consumer's dispatcher ending are never lost:
    /// each one joins the ending dispatcher in time or starts a new one from the stored
    /// progress, and gets the unacknowledged event.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attachments_racing_an_idle_consumer_ending_lose_nothing() {
        let broker = Bed::in_memory(BrokerConfig::default()).broker;
        publish(&broker, 1).await;
        let mut first = None;
        for _ in 0..200 {
            let mut member = subscribe(&broker, manual(Some("racing"), 1)).await;
            let ids = next_ids(&mut member).await;
            assert_eq!(&ids, first.get_or_insert_with(|| ids.clone()));
        }
        broker.shut_down();
        broker.wait_for_consumers().await;
    }

    /// What a durable consumer knew of an unacknowledged event beyond its position — a
    /// negative ack's delay, a reply already taken — survives its dispatcher ending.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delay_and_a_reply_survive_an_idle_consumer_ending() {
        let broker = Bed::in_memory(BrokerConfig::default()).broker;
        for response_subject in ["", "_bus_.answers"] {
            let event = NewEvent {
                subject: "orders.asked".into(),
                response_subject: response_subject.into(),
                ..NewEvent::default()
            };
            broker
                .publish(Publication::One(event))
                .await
                .expect("publish");
        }
        let mut member = subscribe(&broker, manual(Some("keeps"), 2)).await;
        let ids = next_ids(&mut member).await;
        assert_eq!(ids.len(), 2);
        assert!(broker.nak(
            &member.consumer_id,
            ids[0].clone(),
            Duration::from_secs(3600)
        ));
        let claim = broker
            .claim_reply(&member.consumer_id, &ids[1])
            .await
            .expect("claim");
        broker.publish_reply(claim, b"42").await.expect("reply");
        until("the nak taken", || listed(&broker, "keeps").pending == 2).await;
        drop(member);
        until("the dispatcher retired", || !running(&broker, "keeps")).await;

        let mut member = subscribe(&broker, manual(Some("keeps"), 2)).await;
        // The replied event comes back (not acknowledged); the delayed one does not.
        assert_eq!(next_ids(&mut member).await, vec![ids[1].clone()]);
        match broker.claim_reply(&member.consumer_id, &ids[1]).await {
            Err(BrokerError::Conflict(message)) => {
                assert!(message.contains("replied to already"), "{message}")
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("a second reply was taken"),
        }
        let more = tokio::time::timeout(Duration::from_millis(300), member.deliveries.next()).await;
        assert!(more.is_err(), "the delayed event came early: {more:?}");
        broker.shut_down();
        broker.wait_for_consumers().await;
    }

    /// Holds every save of `consumers` until `gate` opens (or 20 s pass).
    fn hold_saves<'a>(consumers: &'a Watched, gate: &Gate) -> Watching<'a> {
        let gate = Arc::clone(&gate.0);
        consumers.watch(move |io| {
            if let Io::Save(_) = io {
                let (open, opened) = &*gate;
                let open = open.lock().unwrap();
                let _ = opened.wait_timeout_while(open, Duration::from_secs(20), |open| !*open);
            }
        })
    }

    /// A retiring consumer does not wait for its last save, but its next start and a
    /// delete do: a start never reads progress older than that save, and a delete is not
    /// undone by it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retired_consumers_last_save_lands_before_its_next_start_or_delete() {
        let bed = Bed::in_memory(BrokerConfig::default());
        let broker = Arc::clone(&bed.broker);
        publish(&broker, 3).await;
        let name = ConsumerName::parse("settles").expect("name");
        let stored = || bed.consumers.stored("settles");
        let mut member = subscribe(&broker, manual(Some("settles"), 3)).await;
        let ids = next_ids(&mut member).await;
        until("created", || {
            stored().is_some_and(|p| p.unacked == [0, 1, 2])
        })
        .await;

        let gate = Gate::new();
        let hook = hold_saves(&bed.consumers, &gate);
        assert!(broker.ack(&member.consumer_id, ids[..2].to_vec()));
        drop(member);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Usually retired by now, its save held; else still saving, and joined.
        let retired = !running(&broker, "settles");
        let attaching = tokio::spawn({
            let broker = Arc::clone(&broker);
            async move { subscribe(&broker, manual(Some("settles"), 3)).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        if retired {
            assert!(
                !attaching.is_finished(),
                "started before the last save landed"
            );
            // Listed with the figures it retired with, not the older ones stored.
            let info = listed(&broker, "settles");
            assert_eq!((info.members, info.pending, info.acked_floor), (0, 1, 2));
        }
        gate.open();
        let mut member = attaching.await.expect("join");
        assert_eq!(next_ids(&mut member).await, vec![ids[2].clone()]);
        drop(hook);

        let gate = Gate::new();
        let _hook = hold_saves(&bed.consumers, &gate);
        assert!(broker.ack(&member.consumer_id, vec![ids[2].clone()]));
        drop(member);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let deleting = tokio::spawn({
            let broker = Arc::clone(&broker);
            let name = name.clone();
            async move { broker.delete_consumer("orders", &name).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !deleting.is_finished(),
            "deleted while a save was on its way"
        );
        gate.open();
        deleting.await.expect("join").expect("deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            stored().is_none(),
            "a save brought the deleted consumer back"
        );
        broker.shut_down();
        broker.wait_for_consumers().await;
    }

    /// Creating a durable consumer beyond the limits is refused with a conflict naming the
    /// flag: per namespace (stored consumers count, running or idle, also after a restart)
    /// and per owner. Attaching to an existing one is not creating; deleting makes room.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durable_consumers_are_limited_per_namespace_and_per_owner() {
        let config = BrokerConfig {
            max_consumers: 3,
            max_consumers_per_owner: 2,
            ..BrokerConfig::default()
        };
        let bed = Bed::in_memory(config.clone());
        let broker = Arc::clone(&bed.broker);
        let refused = |result: Result<Subscription, BrokerError>, flag: &str| match result {
            Err(BrokerError::Conflict(message)) => {
                assert!(message.contains(flag), "{message}")
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("created beyond {flag}"),
        };
        for name in ["a1", "a2"] {
            drop(subscribe(&broker, owned(name, "ana")).await);
        }
        refused(
            broker.subscribe(owned("a3", "ana")).await,
            "--max-consumers-per-token",
        );
        let _b1 = subscribe(&broker, owned("b1", "bob")).await;
        refused(
            broker.subscribe(owned("b2", "bob")).await,
            "(--max-consumers)",
        );
        // Existing ones, running or idle, still take members.
        let _a1 = subscribe(&broker, owned("a1", "ana")).await;
        let _b1_again = subscribe(&broker, owned("b1", "bob")).await;
        let name = ConsumerName::parse("a2").expect("name");
        broker
            .delete_consumer("orders", &name)
            .await
            .expect("delete");
        drop(subscribe(&broker, owned("a3", "ana")).await);
        refused(
            broker.subscribe(owned("b2", "bob")).await,
            "(--max-consumers)",
        );
        broker.shut_down();
        broker.wait_for_consumers().await;

        // A restart counts what is stored.
        let restarted = bed.restarted(config).broker;
        refused(
            restarted.subscribe(manual(Some("c1"), 1)).await,
            "(--max-consumers)",
        );
        let name = ConsumerName::parse("b1").expect("name");
        restarted
            .delete_consumer("orders", &name)
            .await
            .expect("delete");
        let _c1 = restarted
            .subscribe(manual(Some("c1"), 1))
            .await
            .expect("room again");
        restarted.shut_down();
        restarted.wait_for_consumers().await;
    }

    #[test]
    fn times_beyond_the_clock_saturate_instead_of_panicking() {
        let now = Instant::now();
        assert_eq!(
            later(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        for huge in [Duration::MAX, Duration::from_secs(u64::MAX / 2)] {
            let at = later(now, huge);
            assert!(at > now + Duration::from_secs(365 * 24 * 3600), "{huge:?}");
        }
    }
}
