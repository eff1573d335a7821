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

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
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

    /// The stored progress of consumer `name` of the log in `dir`, if it exists.
    pub fn load(dir: &Path, name: &ConsumerName) -> Result<Option<Progress>, ProgressError> {
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

    /// Every stored consumer of the log in `dir`, by name.
    pub fn load_all(dir: &Path) -> Vec<(ConsumerName, Progress)> {
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

    /// Writes the progress atomically (a new file renamed over the old one, synced).
    pub fn save(&self, dir: &Path, name: &ConsumerName) -> std::io::Result<()> {
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

    pub fn remove(dir: &Path, name: &ConsumerName) -> std::io::Result<()> {
        match std::fs::remove_file(Progress::path(dir, name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
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

/// Runs a consumer until it ends: an ephemeral one when its member leaves, a durable one
/// when the server shuts down or it is deleted.
pub struct Dispatcher {
    log: Arc<Log>,
    cursor: Cursor,
    redelivery: Redelivery,
    inputs: mpsc::Receiver<Input>,
    shutdown: watch::Receiver<bool>,
    pending: BTreeMap<u64, Pending>,
    ids: HashMap<String, u64>,
    members: BTreeMap<u64, Member>,
    /// Where the last assignment round started, so that members take turns.
    next_member: u64,
    durable: Option<Durable>,
    dirty: bool,
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
            cursor,
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
                self.save();
                return;
            }
            self.publish_stats();
            if self.dirty && save_at.is_none() {
                save_at = Some(later(now, SAVE_EVERY));
            }
            let wake = self.next_due().into_iter().chain(save_at).min();
            let want_more = self.wants_events();
            tokio::select! {
                input = self.inputs.recv() => match input {
                    Some(Input::Delete) => {
                        self.delete();
                        return;
                    }
                    Some(input) => {
                        self.take(input);
                        // Take whatever else is queued before the next round.
                        while let Ok(input) = self.inputs.try_recv() {
                            if matches!(input, Input::Delete) {
                                self.delete();
                                return;
                            }
                            self.take(input);
                        }
                        if self.durable.is_none() && self.members.is_empty() {
                            return;
                        }
                    }
                    None => {
                        self.save();
                        return;
                    }
                },
                batch = self.cursor.next_batch(), if want_more => match batch {
                    Ok(Some(events)) => {
                        if let Some(notice) = self.cursor.take_notice() {
                            for member in self.members.values() {
                                let _ = member.deliveries.try_send(Delivery::Notice(notice.clone()));
                            }
                        }
                        for event in events {
                            self.hold(event);
                        }
                        self.dirty = true;
                    }
                    Ok(None) => {
                        if *self.shutdown.borrow() {
                            self.save();
                            return;
                        }
                    }
                    Err(message) => {
                        for member in self.members.values() {
                            let _ = member.deliveries.try_send(Delivery::Error(message.clone()));
                        }
                        self.save();
                        return;
                    }
                },
                () = sleep_until(wake) => {
                    if save_at.is_some_and(|at| at <= Instant::now()) {
                        save_at = None;
                        self.save();
                    }
                }
                _ = self.shutdown.changed() => {
                    self.save();
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
                    self.give_up(&pending).await;
                    self.dirty = true;
                }
            }
        }
    }

    /// An event delivered its last time without an ack.
    async fn give_up(&self, pending: &Pending) {
        let event = &pending.event;
        let Some(durable) = &self.durable else {
            tracing::info!(
                event_id = event.id(),
                deliveries = pending.deliveries,
                "event not acknowledged after its last delivery; moving on"
            );
            return;
        };
        let subject = dead_letter_subject(self.log.namespace(), &durable.name);
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
            Ok(dead) => self
                .log
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
        room > waiting && !self.cursor.finished()
    }

    /// An ephemeral consumer asked to stop at the log's end, that got there.
    fn finished(&self) -> bool {
        self.cursor.finished() && self.pending.is_empty()
    }

    fn next_due(&self) -> Option<Instant> {
        self.pending.values().filter_map(|p| p.due).min()
    }

    /// Deleted by an admin: members' streams end and the stored progress goes.
    fn delete(&mut self) {
        self.end_members("the consumer was deleted");
        if let Some(durable) = &self.durable {
            if let Err(e) = Progress::remove(self.log.dir(), &durable.name) {
                tracing::warn!(consumer = %durable.name, error = %e, "removing a deleted consumer's progress failed");
            }
        }
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
            .unwrap_or(self.cursor.next_position())
    }

    /// Stores a durable consumer's progress if it changed.
    fn save(&mut self) {
        if !self.dirty {
            return;
        }
        let Some(durable) = &mut self.durable else {
            return;
        };
        durable.progress.next = self.cursor.next_position();
        durable.progress.unacked = self.pending.keys().copied().collect();
        match durable.progress.save(self.log.dir(), &durable.name) {
            Ok(()) => self.dirty = false,
            Err(e) => {
                tracing::error!(consumer = %durable.name, error = %e, "saving a consumer's progress failed; retrying")
            }
        }
        self.publish_stats();
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
    use super::*;

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
