//! Durable consumers as the broker runs them: attaching a connection (starting the
//! consumer from its stored progress if it is not running, checking its owner, its pattern
//! and the limits on their number), retiring an idle one, listing, deleting, and waiting
//! for their last saves at shutdown. Starts and deletes of one consumer never interleave.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::consumer::{self, ConsumerStats, Dispatcher, Input, Retired};
use super::registry::Refusal;
use super::subscription;
use super::{
    Broker, BrokerError, ConsumerBackend, ConsumerInfo, ConsumerName, Delivery, Owner, Registry,
    SubscribeRequest,
};
use crate::store::{ConsumerProgress as Progress, ConsumerStore, EventLog, StorageError};

impl Broker {
    /// Attaches a connection to durable consumer `name`, starting it if it is not running
    /// (creating it, within the limits on their numbers, if it does not exist). A running
    /// consumer is joined at once; starting one reads its stored progress on the blocking
    /// pool and opens its dispatcher, holding the consumer's lock against a concurrent
    /// start or delete: an idle consumer's dispatcher has stored its progress before it
    /// left the running ones, so a start never reads an older one.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn attach(
        &self,
        store: &Arc<dyn ConsumerStore>,
        saver: &Arc<consumer::Saver>,
        log: &Arc<dyn EventLog>,
        name: &ConsumerName,
        request: &SubscribeRequest,
        start: subscription::From,
        redelivery: consumer::Redelivery,
        join: Input,
        member_tx: mpsc::Sender<Delivery>,
    ) -> Result<mpsc::Sender<Input>, BrokerError> {
        let pattern = request.pattern.as_str();
        let namespace = log.namespace();
        let conflict = |stored: &str| pattern_conflict(name, stored, pattern);
        // Ownership is checked before anything about the consumer is told.
        let check_owner = |owner: &Option<Owner>| match (owner, &request.owner) {
            (Some(owner), Some(caller)) if owner != caller && !request.admin => {
                Err(not_the_owner(name))
            }
            _ => Ok(()),
        };
        let key = (namespace.to_owned(), name.clone());
        // Joins the consumer if it runs; gives `join` back if it does not.
        let join_running = |join: &mut Option<Input>| {
            let mut durables = self.durables.lock().unwrap_or_else(|p| p.into_inner());
            let Some(entry) = durables.get(&key) else {
                return Ok(None);
            };
            check_owner(&entry.owner)?;
            if entry.pattern != pattern {
                return Err(conflict(&entry.pattern));
            }
            let Some(input) = join.take() else {
                return Ok(None);
            };
            match entry.inputs.try_send(input) {
                Ok(()) => Ok(Some(entry.inputs.clone())),
                Err(mpsc::error::TrySendError::Full(_)) => Err(BrokerError::Conflict(format!(
                    "consumer {name:?} is too busy to take a new member; retry"
                ))),
                // Its dispatcher ended (a read failed), after its last save: start it again.
                Err(mpsc::error::TrySendError::Closed(returned)) => {
                    *join = Some(returned);
                    durables.remove(&key);
                    Ok(None)
                }
            }
        };
        let mut join = Some(join);
        if let Some(inputs) = join_running(&mut join)? {
            return Ok(inputs);
        }
        let _changing = self.lock_changes(&key).await;
        // Someone may have started it while this waited.
        if let Some(inputs) = join_running(&mut join)? {
            return Ok(inputs);
        }
        // If it retired, its last save lands before its progress is read.
        self.settling.settle(&key).await;
        let stored = {
            let (consumers, ns, file) = (Arc::clone(store), namespace.to_owned(), name.clone());
            tokio::task::spawn_blocking(move || consumers.load(&ns, &file)).await
        };
        let stored = match stored {
            Ok(loaded) => loaded.map_err(|e| progress_unreadable(name, &e))?,
            Err(e) => return Err(blocking_task_failed(name, &e)),
        };
        if let Some(progress) = &stored {
            check_owner(&progress.owner)?;
        }
        let mut creating = Creating {
            registry: &self.registry,
            namespace,
            name,
            created: false,
        };
        let (from, progress) = match stored {
            Some(progress) if progress.pattern != pattern => {
                return Err(conflict(&progress.pattern))
            }
            Some(mut progress) => {
                // A consumer created while requests were not authenticated belongs to the
                // first token that attaches to it once they are.
                if progress.owner.is_none() && request.owner.is_some() {
                    tracing::info!(consumer = %name, "a durable consumer without an owner now belongs to the token that attached to it");
                    progress.owner = request.owner.clone();
                }
                // Counted as it is stored (also if its file was put there while the
                // server ran).
                self.registry
                    .insert(namespace, name.clone(), progress.owner.clone());
                (subscription::From::Position(progress.next), progress)
            }
            None => {
                self.registry
                    .create(namespace, name, request.owner.as_ref())
                    .map_err(|refusal| too_many_consumers(namespace, refusal))?;
                creating.created = true;
                (
                    start,
                    Progress {
                        pattern: pattern.to_owned(),
                        owner: request.owner.clone(),
                        ..Progress::default()
                    },
                )
            }
        };
        let owner = progress.owner.clone();
        let stats = Arc::new(ConsumerStats::default());
        stats.floor.store(progress.floor(), Ordering::Relaxed);
        let (inputs, receiver) = mpsc::channel(consumer::INPUT_QUEUE);
        let generation = self.next_member.fetch_add(1, Ordering::Relaxed);
        let durable = consumer::Durable {
            name: name.clone(),
            progress,
            stats: Arc::clone(&stats),
            saver: Arc::clone(saver),
            retire: self.retire(key.clone(), generation),
            landed: {
                let (settling, key) = (Arc::clone(&self.settling), key.clone());
                Arc::new(move || settling.forget_landed(&key))
            },
        };
        let opened = Dispatcher::open(
            Arc::clone(log),
            request.pattern.clone(),
            from,
            None,
            redelivery,
            self.max_inflight_bytes,
            receiver,
            self.readers(),
            Some(durable),
            Arc::clone(&self.delivery_counts),
            Arc::clone(&self.confirmations),
        )
        .await;
        let dispatcher = match opened {
            Ok(dispatcher) => dispatcher,
            Err(message) => {
                // Nothing was stored: a consumer this attachment created does not exist
                // (`creating` uncounts it).
                // Told on the stream, as an unknown start id is; the stream then ends
                // (the dispatcher's queue is closed).
                let _ = member_tx.try_send(Delivery::Error(message));
                return Ok(inputs);
            }
        };
        if let Some(join) = join {
            let _ = inputs.try_send(join);
        }
        // Running before its dispatcher can retire.
        self.durables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                key,
                DurableEntry {
                    generation,
                    inputs: inputs.clone(),
                    pattern: pattern.to_owned(),
                    owner,
                    stats,
                },
            );
        self.run_dispatcher(async move { dispatcher.run().await });
        creating.created = false;
        Ok(inputs)
    }

    /// How the dispatcher of start `generation` of durable consumer `key` leaves the
    /// running ones when it is idle (see [`consumer::Retire`]).
    fn retire(&self, key: DurableKey, generation: u64) -> consumer::Retire {
        let durables = Arc::clone(&self.durables);
        let settling = Arc::clone(&self.settling);
        Box::new(
            move |inputs: &mut mpsc::Receiver<Input>, save: &mut Option<consumer::Save>| {
                let mut durables = durables.lock().unwrap_or_else(|p| p.into_inner());
                if durables
                    .get(&key)
                    .is_none_or(|entry| entry.generation != generation)
                {
                    return Retired::NotRunning;
                }
                // Joins are sent under this lock: none can come between this look and the
                // close.
                if !inputs.is_empty() {
                    return Retired::InputsQueued;
                }
                // Waited for before anyone reads the progress again, so taken before the
                // consumer stops being running.
                if let Some(save) = save.take() {
                    if let Some(entry) = durables.get(&key) {
                        settling.add(&key, save, &entry.pattern, &entry.stats);
                    }
                }
                durables.remove(&key);
                inputs.close();
                Retired::Yes
            },
        )
    }

    /// The durable consumers of `namespace`. Blocking (it reads stored progress, or asks
    /// the storage): for the blocking pool (`tokio::task::spawn_blocking`), never an async
    /// worker.
    pub fn consumers(&self, namespace: &str) -> Result<Vec<ConsumerInfo>, BrokerError> {
        let log = self.log(namespace).map_err(BrokerError::Invalid)?;
        match &self.consumers {
            ConsumerBackend::Dispatched { store, .. } => self.dispatched_consumers(store, log),
            ConsumerBackend::Served(served) => {
                let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
                    BrokerError::Storage(
                        "the durable consumers are listed by the server only".into(),
                    )
                })?;
                runtime.block_on(self.served_consumers(served, log))
            }
        }
    }

    /// The durable consumers of a log whose progress the broker stores: running ones and
    /// stored ones.
    fn dispatched_consumers(
        &self,
        store: &Arc<dyn ConsumerStore>,
        log: &Arc<dyn EventLog>,
    ) -> Result<Vec<ConsumerInfo>, BrokerError> {
        let namespace = log.namespace();
        let committed = log.committed();
        // Figures newer than what is stored: those of the running consumers, and of those
        // that retired before their last save landed (without members).
        let mut running: HashMap<ConsumerName, (String, Arc<ConsumerStats>, bool)> = self
            .settling
            .listed(namespace)
            .into_iter()
            .map(|(name, pattern, stats)| (name, (pattern, stats, false)))
            .collect();
        running.extend(
            self.durables
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|((ns, _), _)| ns == namespace)
                .map(|((_, name), entry)| {
                    (
                        name.clone(),
                        (entry.pattern.clone(), Arc::clone(&entry.stats), true),
                    )
                }),
        );
        let members = |stats: &ConsumerStats, running: bool| {
            if running {
                stats.members.load(Ordering::Relaxed)
            } else {
                0
            }
        };
        let stored = store.list(namespace).map_err(|e| {
            tracing::error!(namespace, error = %e, "listing the stored durable consumers failed");
            BrokerError::Storage(format!(
                "the durable consumers of {namespace} cannot be listed (see the server's log)"
            ))
        })?;
        let mut all: Vec<ConsumerInfo> = stored
            .into_iter()
            .map(|(name, progress)| {
                let (floor, pending, members) = match running.get(&name) {
                    Some((_, stats, running)) => (
                        stats.floor.load(Ordering::Relaxed),
                        stats.pending.load(Ordering::Relaxed),
                        members(stats, *running),
                    ),
                    None => (progress.floor(), progress.unacked.len() as u64, 0),
                };
                ConsumerInfo {
                    dead_letter_subject: consumer::dead_letter_subject(namespace, &name),
                    name: name.to_string(),
                    pattern: progress.pattern,
                    acked_floor: floor,
                    pending,
                    lag: committed.saturating_sub(floor),
                    members,
                }
            })
            .collect();
        // A consumer started a moment ago may not have stored its progress yet.
        for (name, (pattern, stats, running)) in running {
            if all.iter().any(|c| c.name == name.as_str()) {
                continue;
            }
            let floor = stats.floor.load(Ordering::Relaxed);
            all.push(ConsumerInfo {
                dead_letter_subject: consumer::dead_letter_subject(namespace, &name),
                name: name.to_string(),
                pattern,
                acked_floor: floor,
                pending: stats.pending.load(Ordering::Relaxed),
                lag: committed.saturating_sub(floor),
                members: members(&stats, running),
            });
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Deletes durable consumer `name` of `namespace`: its members' streams end and its
    /// progress is removed (on the blocking pool, after the dispatcher's last save).
    pub async fn delete_consumer(
        &self,
        namespace: &str,
        name: &ConsumerName,
    ) -> Result<(), BrokerError> {
        self.log(namespace).map_err(BrokerError::Invalid)?;
        let store = match &self.consumers {
            ConsumerBackend::Dispatched { store, .. } => store,
            ConsumerBackend::Served(served) => {
                return self.delete_served(served, namespace, name).await
            }
        };
        let key = (namespace.to_owned(), name.clone());
        let _changing = self.lock_changes(&key).await;
        // If it retired, its last save lands first: it would bring the file back.
        self.settling.settle(&key).await;
        // A damaged progress file is deleted like any other.
        let stored = {
            let (consumers, ns, file) = (Arc::clone(store), namespace.to_owned(), name.clone());
            tokio::task::spawn_blocking(move || !matches!(consumers.load(&ns, &file), Ok(None)))
                .await
                .map_err(|e| blocking_task_failed(name, &e))?
        };
        let running = self
            .durables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        if let Some(entry) = &running {
            // Its dispatcher ends its members' streams and waits for its running save; its
            // queue closes when it has ended.
            let _ = entry.inputs.send(Input::Delete).await;
            entry.inputs.closed().await;
        }
        // It may have retired meanwhile.
        self.settling.settle(&key).await;
        let removed = {
            let (consumers, ns, file) = (Arc::clone(store), namespace.to_owned(), name.clone());
            tokio::task::spawn_blocking(move || consumers.remove(&ns, &file))
                .await
                .map_err(|e| blocking_task_failed(name, &e))?
        };
        removed.map_err(|e| {
            tracing::error!(consumer = %name, namespace, error = %e, "removing a consumer's stored progress failed");
            BrokerError::Storage(format!(
                "consumer {name}'s stored progress could not be removed (see the server's log)"
            ))
        })?;
        let counted = self.registry.remove(namespace, name);
        if running.is_none() && !stored && !counted {
            return Err(BrokerError::NotFound(format!(
                "namespace {namespace} has no consumer {name:?}"
            )));
        }
        Ok(())
    }

    /// Holds durable consumer `key` against other starts and deletes until dropped (see
    /// `changing`).
    pub(super) async fn lock_changes(&self, key: &DurableKey) -> ChangeGuard<'_> {
        let lock = Arc::clone(
            self.changing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key.clone())
                .or_default(),
        );
        ChangeGuard {
            changing: &self.changing,
            key: key.clone(),
            guard: Some(lock.lock_owned().await),
        }
    }

    /// Waits for the consumers' dispatchers to store their progress and end, and for the
    /// last saves of those that retired (after [`Broker::shut_down`]).
    pub async fn wait_for_consumers(&self) {
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.dispatchers.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
        self.settling.settle_all().await;
    }
}

/// A durable consumer: (namespace, name).
pub(super) type DurableKey = (String, ConsumerName);

/// A durable consumer whose dispatcher runs.
pub(super) struct DurableEntry {
    /// Tells this start of the consumer from a later one.
    generation: u64,
    inputs: mpsc::Sender<Input>,
    pattern: String,
    owner: Option<Owner>,
    stats: Arc<ConsumerStats>,
}

/// A durable consumer held against other starts and deletes ([`Broker::lock_changes`]).
pub(super) struct ChangeGuard<'a> {
    changing: &'a Mutex<HashMap<DurableKey, Arc<tokio::sync::Mutex<()>>>>,
    key: DurableKey,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        // The lock goes when no one else holds or waits for it: they hold a clone.
        if changing
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            changing.remove(&self.key);
        }
    }
}

/// A durable consumer this attachment counted as created, uncounted if it is dropped
/// before the consumer runs (an error, or the request went away): nothing was stored.
struct Creating<'a> {
    registry: &'a Registry,
    namespace: &'a str,
    name: &'a ConsumerName,
    created: bool,
}

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        if self.created {
            self.registry.remove(self.namespace, self.name);
        }
    }
}

/// An attachment names another pattern than durable consumer `name` reads.
pub(super) fn pattern_conflict(name: &ConsumerName, stored: &str, pattern: &str) -> BrokerError {
    BrokerError::Conflict(format!(
        "consumer {name:?} reads {stored:?}, not {pattern:?}: attach with its pattern, or delete it first"
    ))
}

/// Durable consumer `name` belongs to another token than the caller's.
pub(super) fn not_the_owner(name: &ConsumerName) -> BrokerError {
    BrokerError::Forbidden(format!(
        "consumer {name:?} belongs to another token; attach with the token that \
         created it (or one with the admin grant)"
    ))
}

/// A new durable consumer would pass a limit on their numbers. The message names the
/// server's flag that sets the limit, for the operator.
pub(super) fn too_many_consumers(namespace: &str, refusal: Refusal) -> BrokerError {
    BrokerError::Conflict(match refusal {
        Refusal::Namespace { limit } => format!(
            "namespace {namespace} has reached its limit of {limit} durable consumers \
             (--max-consumers): delete one (DELETE /consumers/{namespace}/<name>) or raise the limit"
        ),
        Refusal::Owner { limit } => format!(
            "this token owns {limit} durable consumers, its limit (--max-consumers-per-token): \
             delete one or raise the limit"
        ),
    })
}

/// A blocking task reading or removing a consumer's progress failed (panicked or was
/// cancelled at shutdown).
fn blocking_task_failed(name: &ConsumerName, error: &tokio::task::JoinError) -> BrokerError {
    tracing::error!(consumer = %name, error = %error, "a task storing a consumer's progress failed");
    BrokerError::Storage(format!(
        "consumer {name}'s stored progress could not be read or written (see the server's log)"
    ))
}

/// The stored progress of a durable consumer could not be read: logged with its path, told
/// to the client without it.
fn progress_unreadable(name: &ConsumerName, error: &StorageError) -> BrokerError {
    tracing::error!(consumer = %name, error = %error, "reading a consumer's stored progress failed");
    BrokerError::Storage(format!(
        "consumer {name}'s stored progress cannot be read (see the server's log)"
    ))
}
