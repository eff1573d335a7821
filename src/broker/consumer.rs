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
//! - **Durable** consumers have a name and a stored progress (see [`Progress`]); they
//!   live from their first attachment until the server stops or they are deleted, and
//!   any number of connections may attach (a queue group).
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
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::confirm::Confirmations;
use super::subscription::{Cursor, From};
use super::Delivery;
use crate::event::{EventDraft, PendingEvent, StoredEvent};
use crate::store::Log;
use crate::subject::Pattern;

/// Messages a consumer's dispatcher takes (from the broker, acks and members).
#[derive(Debug)]
pub enum Input {
    Join {
        member: u64,
        window: usize,
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

/// What a durable consumer has stored: where its reading is, and which events it read
/// but has not had acknowledged. Everything before `next` that is not in `unacked` is
/// done (acknowledged, given up, or not matching).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    pub pattern: String,
    pub next: u64,
    pub unacked: Vec<u64>,
    /// Who created the consumer when requests are authenticated (an [`Owner`]); only
    /// they, or a caller with the admin grant, may attach to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
}

/// Who opened a subscription or created a durable consumer, as the front end identifies
/// callers when requests are authenticated: an opaque value, compared for equality only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Owner(pub String);

/// A durable consumer's name: 1 to 64 ASCII letters, digits, `_` or `-`. It becomes a file
/// name and a subject segment, so every name from a client goes through
/// [`ConsumerName::parse`] before it is used, and nothing else can name a file.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerName(String);

impl ConsumerName {
    /// The name, or a message that says what a name may contain.
    pub fn parse(text: &str) -> Result<ConsumerName, String> {
        let valid = (1..=64).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        if valid {
            Ok(ConsumerName(text.to_owned()))
        } else {
            Err(format!(
                "consumer: {text:?} is not a valid name (1 to 64 letters, digits, _ or -)"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Quoted, as a string is: messages write `consumer {name:?}`.
impl std::fmt::Debug for ConsumerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::fmt::Display for ConsumerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A durable consumer's stored progress could not be read or written; it names the file,
/// for the server's log (never for a client).
#[derive(Debug, thiserror::Error)]
#[error("consumer progress {}: {reason}", path.display())]
pub struct ProgressError {
    pub path: PathBuf,
    pub reason: String,
}

impl Progress {
    /// The first position that is not done.
    pub fn floor(&self) -> u64 {
        self.unacked.iter().copied().min().unwrap_or(self.next)
    }

    fn path(dir: &Path, name: &ConsumerName) -> PathBuf {
        dir.join("consumers").join(format!("{name}.json"))
    }

    /// The stored progress of consumer `name` of the log in `dir`, if it exists
    /// (blocking).
    pub fn load(dir: &Path, name: &ConsumerName) -> Result<Option<Progress>, ProgressError> {
        #[cfg(test)]
        io_hook::call(dir, io_hook::Io::Load);
        let path = Progress::path(dir, name);
        let failed = |reason: String| ProgressError {
            path: path.clone(),
            reason,
        };
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| failed(format!("damaged: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(failed(format!("reading failed: {e}"))),
        }
    }

    /// Every stored consumer of the log in `dir`, by name (blocking).
    pub fn load_all(dir: &Path) -> Vec<(ConsumerName, Progress)> {
        #[cfg(test)]
        io_hook::call(dir, io_hook::Io::LoadAll);
        let Ok(entries) = std::fs::read_dir(dir.join("consumers")) else {
            return Vec::new();
        };
        let mut all: Vec<(ConsumerName, Progress)> = entries
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                let name = path.file_name()?.to_str()?.strip_suffix(".json")?;
                // Only files a consumer can have written (not the temporary `.name.json.new`).
                let name = ConsumerName::parse(name).ok()?;
                match Progress::load(dir, &name) {
                    Ok(progress) => Some((name, progress?)),
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring a consumer's stored progress");
                        None
                    }
                }
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Writes the progress atomically (a new file renamed over the old one, synced;
    /// blocking).
    pub fn save(&self, dir: &Path, name: &ConsumerName) -> std::io::Result<()> {
        #[cfg(test)]
        io_hook::call(dir, io_hook::Io::Save(self));
        let path = Progress::path(dir, name);
        let consumers = dir.join("consumers");
        std::fs::create_dir_all(&consumers)?;
        let temporary = consumers.join(format!(".{name}.json.new"));
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        {
            let file = std::fs::File::create(&temporary)?;
            std::io::Write::write_all(&mut &file, &bytes)?;
            file.sync_data()?;
        }
        std::fs::rename(&temporary, &path)?;
        std::fs::File::open(&consumers)?.sync_all()
    }

    /// Removes the stored progress, if there is one (blocking).
    pub fn remove(dir: &Path, name: &ConsumerName) -> std::io::Result<()> {
        #[cfg(test)]
        io_hook::call(dir, io_hook::Io::Remove);
        match std::fs::remove_file(Progress::path(dir, name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Tests watch (and slow down) the stored progress's file I/O: a hook set for a log's
/// directory is called on the thread that does the I/O, before each load, save or removal.
#[cfg(test)]
pub(crate) mod io_hook {
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};

    use super::Progress;

    #[derive(Debug)]
    pub enum Io<'a> {
        Load,
        LoadAll,
        Save(&'a Progress),
        Remove,
    }

    type Hook = Arc<dyn Fn(Io<'_>) + Send + Sync>;

    static HOOKS: Mutex<Vec<(PathBuf, Hook)>> = Mutex::new(Vec::new());

    /// A hook in place; removed when dropped.
    pub struct Set(PathBuf);

    impl Drop for Set {
        fn drop(&mut self) {
            HOOKS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(dir, _)| dir != &self.0);
        }
    }

    /// Calls `hook` for the progress I/O of the log in `dir` until the result is dropped.
    pub fn set(dir: &Path, hook: impl Fn(Io<'_>) + Send + Sync + 'static) -> Set {
        HOOKS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((dir.to_owned(), Arc::new(hook)));
        Set(dir.to_owned())
    }

    pub(super) fn call(dir: &Path, io: Io<'_>) {
        let hook = HOOKS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(hooked, _)| hooked == dir)
            .map(|(_, hook)| Arc::clone(hook));
        if let Some(hook) = hook {
            hook(io);
        }
    }
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

/// The dead-letter subject of a durable consumer: `<namespace>._dead.<consumer>`.
pub fn dead_letter_subject(namespace: &str, consumer: &ConsumerName) -> String {
    format!("{namespace}._dead.{consumer}")
}

/// A durable consumer's identity, for its stored progress and dead letters.
pub struct Durable {
    pub name: ConsumerName,
    pub progress: Progress,
    pub stats: Arc<ConsumerStats>,
    /// The broker's saver threads, which store the progress.
    pub saver: Arc<Saver>,
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
    window: usize,
    in_flight: usize,
    deliveries: mpsc::Sender<Delivery>,
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
    async fn next_batch(&mut self) -> (ReadResult, Option<String>) {
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

/// A save of a durable consumer's progress, queued or running on a saver thread.
type Save = oneshot::Receiver<std::io::Result<()>>;

/// Stores durable consumers' progress on threads of its own, like the log's writer: a
/// save (write, fsync, rename, directory fsync) takes the disk for a millisecond or more,
/// which no async worker may wait for. Saves beyond the threads' number queue up, so that
/// many busy consumers do not crowd the log's own syncs off the disk (each consumer has
/// one save at a time, coalescing what changed meanwhile into its next).
pub struct Saver {
    jobs: std::sync::mpsc::Sender<SaveJob>,
}

struct SaveJob {
    dir: PathBuf,
    name: ConsumerName,
    progress: Progress,
    done: oneshot::Sender<std::io::Result<()>>,
}

impl Saver {
    /// Starts `threads` saver threads; they end when the saver is dropped.
    pub fn new(threads: usize) -> Saver {
        let (jobs, queue) = std::sync::mpsc::channel::<SaveJob>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for n in 0..threads.max(1) {
            let queue = Arc::clone(&queue);
            let spawned = std::thread::Builder::new()
                .name(format!("bus-progress-{n}"))
                .spawn(move || loop {
                    let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(job) = job else {
                        return;
                    };
                    let _ = job.done.send(job.progress.save(&job.dir, &job.name));
                });
            if let Err(e) = spawned {
                // Saves then fail (and are retried) rather than the server failing.
                tracing::error!(error = %e, "starting a thread to store consumers' progress failed");
            }
        }
        Saver { jobs }
    }

    /// Queues a save of `progress`; the answer says how it went.
    fn save(&self, dir: PathBuf, name: ConsumerName, progress: Progress) -> Save {
        let (done, answer) = oneshot::channel();
        // Without a thread to take it, `done` is dropped and the save reported failed.
        let _ = self.jobs.send(SaveJob {
            dir,
            name,
            progress,
            done,
        });
        answer
    }
}

/// Runs a consumer until it ends: an ephemeral one when its member leaves, a durable one
/// when the server shuts down or it is deleted.
///
/// A durable consumer's progress is written by one save at a time on the broker's
/// [`Saver`] threads (write, fsync, rename, directory fsync), never on the dispatcher's
/// task: acks go on being taken while a save runs. A save takes a copy of the progress as
/// it is when it starts; changes made meanwhile wait for it to end and go into the next
/// one, so saves land in the order they were taken and an older one never overwrites a
/// newer one. The dispatcher ends only after its last save has ended.
pub struct Dispatcher {
    log: Arc<Log>,
    reader: Reader,
    redelivery: Redelivery,
    inputs: mpsc::Receiver<Input>,
    shutdown: watch::Receiver<bool>,
    pending: BTreeMap<u64, Pending>,
    ids: HashMap<String, u64>,
    members: BTreeMap<u64, Member>,
    /// Where the last assignment round started, so that members take turns.
    next_member: u64,
    durable: Option<Durable>,
    /// The progress changed since the last save started.
    dirty: bool,
    saving: Option<Save>,
    redeliveries: Arc<AtomicU64>,
    confirmations: Arc<Confirmations>,
}

impl Dispatcher {
    /// A consumer reading `pattern` from `from`; an error message if `from` names an
    /// event that does not exist.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        log: Arc<Log>,
        pattern: Pattern,
        from: From,
        stop_at: Option<u64>,
        redelivery: Redelivery,
        inputs: mpsc::Receiver<Input>,
        shutdown: watch::Receiver<bool>,
        durable: Option<Durable>,
        redeliveries: Arc<AtomicU64>,
        confirmations: Arc<Confirmations>,
    ) -> Result<Dispatcher, String> {
        let cursor =
            Cursor::open(Arc::clone(&log), pattern, from, stop_at, shutdown.clone()).await?;
        let mut dispatcher = Dispatcher {
            log,
            reader: Reader::new(cursor),
            redelivery,
            inputs,
            shutdown,
            pending: BTreeMap::new(),
            ids: HashMap::new(),
            members: BTreeMap::new(),
            next_member: 0,
            // A durable consumer is stored as soon as it exists.
            dirty: durable.is_some(),
            durable,
            saving: None,
            redeliveries,
            confirmations,
        };
        dispatcher.restore_unacked().await?;
        Ok(dispatcher)
    }

    /// A durable consumer reopened: the events it had read but not had acknowledged are
    /// read again, to be delivered first.
    async fn restore_unacked(&mut self) -> Result<(), String> {
        let Some(durable) = &self.durable else {
            return Ok(());
        };
        // Events that retention removed since cannot be delivered any more.
        let first = self.log.first_position();
        let unacked: Vec<u64> = durable
            .progress
            .unacked
            .iter()
            .copied()
            .filter(|&position| position >= first)
            .collect();
        for position in unacked {
            let events = self
                .log
                .read(position, 1)
                .await
                .map_err(|e| format!("reading the log failed: {e}"))?;
            if let Some(event) = events.into_iter().next() {
                self.hold(event);
            }
        }
        Ok(())
    }

    fn hold(&mut self, event: StoredEvent) {
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
            self.expire(now).await;
            self.assign(now);
            if self.finished() {
                for member in self.members.values() {
                    let _ = member.deliveries.try_send(Delivery::End);
                }
                self.save_last().await;
                return;
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
                    if let Some(notice) = notice {
                        for member in self.members.values() {
                            let _ = member.deliveries.try_send(Delivery::Notice(notice.clone()));
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

    fn take(&mut self, input: Input) {
        match input {
            Input::Join {
                member,
                window,
                deliveries,
            } => {
                self.members.insert(
                    member,
                    Member {
                        window: window.max(1),
                        in_flight: 0,
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
                        self.release(pending.member);
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
                let member = match self.pending.get_mut(&position) {
                    Some(pending) if pending.member.is_some() => {
                        if max_deliveries.is_some_and(|max| pending.deliveries >= max) {
                            // Its last delivery failed: given up at once, as on a timeout.
                            pending.due = Some(Instant::now());
                            return;
                        }
                        pending.due = Some(later(Instant::now(), delay));
                        pending.member.take()
                    }
                    _ => return,
                };
                self.release(member);
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
                let _ = answer.send(claimed);
            }
            Input::ReleaseReply { event_id } => {
                if let Some(pending) = self
                    .ids
                    .get(&event_id)
                    .and_then(|position| self.pending.get_mut(position))
                {
                    pending.replied = false;
                }
            }
            Input::Delete => {}
        }
    }

    /// A member's slot frees up.
    fn release(&mut self, member: Option<u64>) {
        if let Some(member) = member.and_then(|m| self.members.get_mut(&m)) {
            member.in_flight = member.in_flight.saturating_sub(1);
        }
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
            pending.due = None;
            let exhausted = self
                .redelivery
                .max_deliveries
                .is_some_and(|max| pending.deliveries >= max);
            self.release(member);
            if exhausted {
                if let Some(pending) = self.pending.remove(&position) {
                    self.ids.remove(pending.event.id());
                    give_up(&self.log, self.durable.as_ref(), &pending).await;
                    self.dirty = true;
                }
            }
        }
    }

    /// Hands waiting events to members with room, lowest position first, members taking
    /// turns.
    fn assign(&mut self, now: Instant) {
        let member_ids: Vec<u64> = self
            .members
            .range(self.next_member..)
            .chain(self.members.range(..self.next_member))
            .map(|(&id, _)| id)
            .collect();
        let mut gone = Vec::new();
        for member_id in member_ids {
            let Some(member) = self.members.get(&member_id) else {
                continue;
            };
            let room = member.window.saturating_sub(member.in_flight);
            if room == 0 {
                continue;
            }
            let chosen: Vec<u64> = self
                .pending
                .iter()
                .filter(|(_, p)| p.member.is_none() && p.due.is_none_or(|due| due <= now))
                .take(room)
                .map(|(&position, _)| position)
                .collect();
            if chosen.is_empty() {
                break;
            }
            let events: Vec<StoredEvent> = chosen
                .iter()
                .filter_map(|p| self.pending.get(p).map(|p| p.event.clone()))
                .collect();
            match member.deliveries.try_send(Delivery::Events(events)) {
                Ok(()) => {
                    let due = later(now, self.redelivery.every);
                    for position in &chosen {
                        if let Some(pending) = self.pending.get_mut(position) {
                            if pending.deliveries > 0 {
                                self.redeliveries.fetch_add(1, Ordering::Relaxed);
                            }
                            if !pending.delivered_to.contains(&member_id) {
                                pending.delivered_to.push(member_id);
                            }
                            pending.member = Some(member_id);
                            pending.deliveries = pending.deliveries.saturating_add(1);
                            pending.due = Some(due);
                        }
                    }
                    if let Some(member) = self.members.get_mut(&member_id) {
                        member.in_flight += chosen.len();
                    }
                    self.next_member = member_id + 1;
                }
                Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => gone.push(member_id),
            }
        }
        for member in gone {
            self.leave(member);
        }
    }

    /// Whether reading further is useful: members have room beyond what waits already.
    fn wants_events(&self) -> bool {
        let room: usize = self
            .members
            .values()
            .map(|m| m.window.saturating_sub(m.in_flight))
            .sum();
        let waiting = self.pending.values().filter(|p| p.member.is_none()).count();
        room > waiting && !self.reader.finished
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
        durable.progress.next = self.reader.next;
        durable.progress.unacked = self.pending.keys().copied().collect();
        self.saving = Some(durable.saver.save(
            self.log.dir().to_owned(),
            durable.name.clone(),
            durable.progress.clone(),
        ));
        self.dirty = false;
        self.publish_stats();
        true
    }

    /// A save ended; if it failed, the progress is stored again at the next interval.
    fn saved(&mut self, result: Result<std::io::Result<()>, oneshot::error::RecvError>) {
        self.saving = None;
        let error = match result {
            Ok(Ok(())) => return,
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
) -> Result<std::io::Result<()>, oneshot::error::RecvError> {
    match saving {
        Some(saving) => saving.await,
        None => std::future::pending().await,
    }
}

/// An event delivered its last time without an ack. (Not a method: a `&Dispatcher` held
/// across its await would need the dispatcher, and the read it holds, to be `Sync`.)
async fn give_up(log: &Log, durable: Option<&Durable>, pending: &Pending) {
    let event = &pending.event;
    let Some(durable) = durable else {
        tracing::info!(
            event_id = event.id(),
            deliveries = pending.deliveries,
            "event not acknowledged after its last delivery; moving on"
        );
        return;
    };
    let subject = dead_letter_subject(log.namespace(), &durable.name);
    tracing::warn!(
        consumer = %durable.name,
        event_id = event.id(),
        deliveries = pending.deliveries,
        dead_letter_subject = subject,
        "event not acknowledged after its last delivery; appended to the dead-letter subject"
    );
    let payload = format!(
        r#"{{"event":{},"consumer":{},"deliveries":{}}}"#,
        String::from_utf8_lossy(&event.json()),
        serde_json::Value::from(durable.name.as_str()),
        pending.deliveries
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
    if let Err(e) = appended {
        tracing::error!(consumer = %durable.name, event_id = event.id(), error = %e, "appending a dead letter failed");
    }
}

/// `now + wait`, or a time beyond any server's lifetime if that cannot be represented:
/// durations come from clients, and overflowing `Instant` would panic the dispatcher.
fn later(now: Instant, wait: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(wait.min(CENTURY))
        .or_else(|| now.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(now)
}

async fn sleep_until(at: Option<Instant>) {
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
        AckMode, Broker, BrokerConfig, NewEvent, Publication, Start, SubscribeRequest,
        Subscription, READ_BATCH,
    };
    use crate::store::{FsyncPolicy, StoreConfig};

    const WAIT: Duration = Duration::from_secs(10);

    fn broker_over(data: &Path, tail_bytes: usize) -> (Arc<Broker>, Arc<Log>) {
        let config = StoreConfig {
            fsync: FsyncPolicy::Never,
            tail_bytes,
            ..StoreConfig::new(data)
        };
        let log = Arc::new(Log::open(&data.join("orders"), "orders", &config).expect("open"));
        let broker = Broker::new(
            [Arc::clone(&log)],
            &BrokerConfig {
                dup_size: 0,
                ..BrokerConfig::default()
            },
        );
        (Arc::new(broker), log)
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

    fn manual(consumer: Option<&str>, window: usize) -> SubscribeRequest {
        SubscribeRequest {
            pattern: Pattern::parse("orders.>").expect("pattern"),
            start: Start::Oldest,
            ack: AckMode::Manual {
                redelivery: Duration::from_secs(60),
                max_deliveries: None,
                window,
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
        let data = tempfile::tempdir().expect("tempdir");
        let (broker, log) = broker_over(data.path(), 1 << 20);
        publish(&broker, 3).await;
        let runtime: ThreadId = std::thread::current().id();
        let seen = Arc::new(Mutex::new(Vec::<(String, bool)>::new()));
        let saved_all = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _hook = io_hook::set(log.dir(), {
            let seen = Arc::clone(&seen);
            let saved_all = Arc::clone(&saved_all);
            move |io| {
                if let io_hook::Io::Save(progress) = &io {
                    if progress.next == 3 && progress.unacked.is_empty() {
                        saved_all.store(true, Ordering::SeqCst);
                    }
                }
                let kind = format!("{io:?}").split('(').next().unwrap_or("").to_owned();
                let on_runtime = std::thread::current().id() == runtime;
                seen.lock().unwrap().push((kind, on_runtime));
            }
        });

        let mut member = subscribe(&broker, manual(Some("billing"), 10)).await;
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
        let _member = subscribe(&broker, manual(Some("billing"), 10)).await;
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
        let data = tempfile::tempdir().expect("tempdir");
        let (broker, log) = broker_over(data.path(), 1 << 20);
        publish(&broker, EVENTS).await;
        let gate = Gate::new();
        let saves = Arc::new(Mutex::new(Vec::<Progress>::new()));
        // Saves that returned (through the gate, or after waiting for it in vain).
        let returned = Arc::new(AtomicU64::new(0));
        let _hook = io_hook::set(log.dir(), {
            let gate = Arc::clone(&gate.0);
            let saves = Arc::clone(&saves);
            let returned = Arc::clone(&returned);
            move |io| {
                if let io_hook::Io::Save(progress) = io {
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

        let mut member = subscribe(&broker, manual(Some("slow"), 1)).await;
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
        let name = ConsumerName::parse("slow").expect("name");
        let stored = Progress::load(log.dir(), &name)
            .expect("load")
            .expect("stored");
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
        let (broker, log) = broker_over(data.path(), 0);
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

    #[test]
    fn consumer_names_are_file_names_of_their_own_directory_only() {
        for good in ["billing", "a", "Invoice_2-x", &"n".repeat(64)] {
            assert_eq!(ConsumerName::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "..",
            "../x",
            "a/b",
            "a.b",
            "a\\b",
            "a\0",
            "é",
            &"n".repeat(65),
        ] {
            let error = ConsumerName::parse(bad).unwrap_err();
            assert!(error.contains("not a valid name"), "{bad:?}: {error}");
        }
    }
}
