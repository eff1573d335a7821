//! The last saves of durable consumers whose dispatcher retired (see
//! [`super::consumer::Retire`]), until they land.
//!
//! A dispatcher whose last member left does not wait for its disk: it hands its last save
//! here and ends. Whatever reads or removes the consumer's stored progress next waits for
//! that save first ([`Settling::settle`]: a start, a delete, shutdown), so no one reads
//! progress older than it, and a delete is not undone by it. Until it lands, the admin
//! listing shows the consumer with the figures it retired with ([`Settling::listed`]).
//!
//! A save that landed is forgotten at once ([`Settling::forget_landed`], called by the
//! saver thread after each save), so idle consumers hold nothing here.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::consumer::{ConsumerStats, Save};
use super::DurableKey;
use crate::store::{ConsumerName, StorageError};

/// A retired consumer whose saves have not all been waited for.
struct Retiring {
    /// Oldest first; taken out while they are waited for.
    saves: VecDeque<Save>,
    /// [`Settling::settle`]s waiting for its saves: it stays listed meanwhile.
    waiting: usize,
    pattern: String,
    stats: Arc<ConsumerStats>,
}

#[derive(Default)]
pub struct Settling {
    retiring: Mutex<HashMap<DurableKey, Retiring>>,
}

impl Settling {
    fn retiring(&self) -> std::sync::MutexGuard<'_, HashMap<DurableKey, Retiring>> {
        self.retiring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last save of consumer `key`, which retired reading `pattern` with these
    /// figures.
    pub fn add(&self, key: &DurableKey, mut save: Save, pattern: &str, stats: &Arc<ConsumerStats>) {
        let mut retiring = self.retiring();
        // Its saver may have answered already; then `forget_landed` came before it.
        match save.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => {}
            landed => {
                settled(&key.1, landed.ok());
                return;
            }
        }
        let entry = retiring.entry(key.clone()).or_insert_with(|| Retiring {
            saves: VecDeque::new(),
            waiting: 0,
            pattern: pattern.to_owned(),
            stats: Arc::clone(stats),
        });
        entry.saves.push_back(save);
        entry.pattern = pattern.to_owned();
        entry.stats = Arc::clone(stats);
    }

    /// Forgets the saves of consumer `key` that landed, and the consumer once none is
    /// left and no one waits for them (after each save, on the saver's thread).
    pub fn forget_landed(&self, key: &DurableKey) {
        let mut retiring = self.retiring();
        let Some(entry) = retiring.get_mut(key) else {
            return;
        };
        entry.saves.retain_mut(|save| match save.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => true,
            landed => {
                settled(&key.1, landed.ok());
                false
            }
        });
        if entry.saves.is_empty() && entry.waiting == 0 {
            retiring.remove(key);
        }
    }

    /// Waits for the last saves of consumer `key` (it stays listed meanwhile). Dropped
    /// before they all landed (the request went away), it leaves the rest to be waited
    /// for by the next one.
    pub async fn settle(&self, key: &DurableKey) {
        let saves = match self.retiring().get_mut(key) {
            Some(entry) => {
                entry.waiting += 1;
                std::mem::take(&mut entry.saves)
            }
            None => return,
        };
        let mut waiting = Waiting {
            settling: self,
            key,
            saves,
        };
        while let Some(save) = waiting.saves.front_mut() {
            let result = save.await;
            waiting.saves.pop_front();
            settled(&key.1, result.ok());
        }
    }

    /// Waits for every last save (at shutdown).
    pub async fn settle_all(&self) {
        let keys: Vec<DurableKey> = self.retiring().keys().cloned().collect();
        for key in keys {
            self.settle(&key).await;
        }
    }

    /// The consumers of `namespace` whose last save has not been waited for: name,
    /// pattern and figures.
    pub fn listed(&self, namespace: &str) -> Vec<(ConsumerName, String, Arc<ConsumerStats>)> {
        self.retiring()
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|((_, name), entry)| {
                (
                    name.clone(),
                    entry.pattern.clone(),
                    Arc::clone(&entry.stats),
                )
            })
            .collect()
    }
}

/// Saves being waited for by [`Settling::settle`]. When it ends, the consumer is
/// forgotten unless saves were added meanwhile; those not landed yet go back first if it
/// was dropped.
struct Waiting<'a> {
    settling: &'a Settling,
    key: &'a DurableKey,
    saves: VecDeque<Save>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut retiring = self.settling.retiring();
        let Some(entry) = retiring.get_mut(self.key) else {
            return;
        };
        entry.waiting = entry.waiting.saturating_sub(1);
        // Older than any added since.
        for save in self.saves.drain(..).rev() {
            entry.saves.push_front(save);
        }
        if entry.saves.is_empty() && entry.waiting == 0 {
            retiring.remove(self.key);
        }
    }
}

/// How a last save went (`None`: no saver thread took it): a failure is logged (the
/// consumer's next start resumes from the save before, so acknowledged events may come
/// again).
fn settled(name: &ConsumerName, result: Option<Result<(), StorageError>>) {
    let error = match result {
        Some(Ok(())) => return,
        Some(Err(e)) => e.to_string(),
        None => "no thread took the save".to_owned(),
    };
    tracing::error!(consumer = %name, error, "storing an idle consumer's progress failed; it resumes from its previous save");
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[tokio::test]
    async fn a_landed_save_is_forgotten_and_a_wait_dropped_early_leaves_it_for_the_next() {
        let settling = Settling::default();
        let key = ("orders".to_owned(), ConsumerName::parse("c").expect("name"));
        let stats = Arc::new(ConsumerStats::default());
        let listed = |settling: &Settling| settling.listed("orders").len();

        let (done, save) = oneshot::channel();
        settling.add(&key, save, "orders.>", &stats);
        assert_eq!(listed(&settling), 1);
        done.send(Ok(())).expect("send");
        settling.forget_landed(&key);
        assert_eq!(listed(&settling), 0);

        // Answered before it was handed over: nothing to wait for.
        let (done, save) = oneshot::channel();
        done.send(Ok(())).expect("send");
        settling.add(&key, save, "orders.>", &stats);
        assert_eq!(listed(&settling), 0);

        let (done, save) = oneshot::channel();
        settling.add(&key, save, "orders.>", &stats);
        assert!(settling.settle(&key).now_or_never().is_none());
        assert_eq!(listed(&settling), 1, "given back when the wait was dropped");
        done.send(Ok(())).expect("send");
        settling.settle(&key).await;
        assert_eq!(listed(&settling), 0);
    }
}
