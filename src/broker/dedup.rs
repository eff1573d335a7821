//! Deduplication by `key`: per subject, the most recent keys published with it.
//!
//! Each subject keeps up to `size` keys (oldest forgotten first) and, if `ttl` is set,
//! forgets a key that long after it was published. A publish is checked and its keys
//! reserved in one step under one lock, so two concurrent publishes of the same key
//! cannot both pass; a batch is checked whole before any of its keys is reserved, so a
//! refused batch registers nothing. A reservation is a guard: it gives its keys back when
//! it is dropped, unless [`Reservation::commit`] says the events were stored.
//! At start-up the window is rebuilt from the newest events of each log.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Subjects = Arc<Mutex<HashMap<String, Window>>>;

/// The dedup window of one namespace.
pub struct Dedup {
    size: usize,
    ttl: Option<Duration>,
    subjects: Subjects,
}

#[derive(Default)]
struct Window {
    /// Keys in the order they were registered, with when.
    order: VecDeque<(String, Instant)>,
    keys: HashSet<String>,
}

impl Window {
    fn forget_expired(&mut self, ttl: Option<Duration>, now: Instant) {
        let Some(ttl) = ttl else { return };
        while let Some((key, at)) = self.order.front() {
            if now.duration_since(*at) < ttl {
                break;
            }
            self.keys.remove(key);
            self.order.pop_front();
        }
    }

    fn insert(&mut self, key: String, at: Instant, size: usize) {
        if !self.keys.insert(key.clone()) {
            return;
        }
        self.order.push_back((key, at));
        while self.order.len() > size {
            if let Some((old, _)) = self.order.pop_front() {
                self.keys.remove(&old);
            }
        }
    }

    fn remove(&mut self, key: &str) {
        if self.keys.remove(key) {
            self.order.retain(|(k, _)| k != key);
        }
    }
}

/// Keys a publish reserved, held until its events are stored ([`Reservation::commit`]);
/// dropped before that (the append failed, or the publish was abandoned), it releases
/// them, so that a retry is not refused for events that were never stored.
#[must_use = "dropping a reservation releases its keys"]
#[derive(Default)]
pub struct Reservation {
    subjects: Option<Subjects>,
    keys: Vec<(String, String)>,
}

impl Reservation {
    /// Whether it holds no key (a publish without keys, or deduplication off).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The events were stored: the keys stay registered.
    pub fn commit(mut self) {
        self.keys.clear();
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let Some(subjects) = &self.subjects else {
            return;
        };
        if self.keys.is_empty() {
            return;
        }
        let mut subjects = subjects.lock().unwrap_or_else(|p| p.into_inner());
        for (subject, key) in self.keys.drain(..) {
            if let Some(window) = subjects.get_mut(&subject) {
                window.remove(&key);
            }
        }
    }
}

/// A key that was published to its subject before: the key, and the event of the batch
/// that carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    pub key: String,
    pub event: usize,
}

impl Dedup {
    /// `size` 0 disables deduplication; `ttl` `None` keeps keys until pushed out.
    pub fn new(size: usize, ttl: Option<Duration>) -> Dedup {
        Dedup {
            size,
            ttl,
            subjects: Subjects::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.size > 0
    }

    /// Reserves the keys of a batch of (subject, key) pairs, or returns the first key that
    /// is already taken (by an earlier publish or earlier in the same batch).
    pub fn reserve<'a>(
        &self,
        batch: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
    ) -> Result<Reservation, Duplicate> {
        if !self.enabled() || batch.clone().into_iter().all(|(_, key)| key.is_empty()) {
            return Ok(Reservation::default());
        }
        let now = Instant::now();
        let mut subjects = self.subjects.lock().unwrap_or_else(|p| p.into_inner());
        let mut in_batch = HashSet::new();
        for (event, (subject, key)) in batch.clone().into_iter().enumerate() {
            if key.is_empty() {
                continue;
            }
            let taken = subjects.get_mut(subject).is_some_and(|window| {
                window.forget_expired(self.ttl, now);
                window.keys.contains(key)
            });
            if taken || !in_batch.insert((subject, key)) {
                return Err(Duplicate {
                    key: key.to_owned(),
                    event,
                });
            }
        }
        let mut reservation = Reservation {
            subjects: Some(Arc::clone(&self.subjects)),
            keys: Vec::new(),
        };
        for (subject, key) in batch {
            if key.is_empty() {
                continue;
            }
            subjects
                .entry(subject.to_owned())
                .or_default()
                .insert(key.to_owned(), now, self.size);
            reservation.keys.push((subject.to_owned(), key.to_owned()));
        }
        Ok(reservation)
    }

    /// Registers a key found in the log at start-up, `age` after it was published.
    /// Called newest first: a subject's window that is already full is left alone.
    pub fn restore(&self, subject: &str, key: String, age: Duration) -> bool {
        if !self.enabled() || self.ttl.is_some_and(|ttl| age >= ttl) {
            return false;
        }
        let mut subjects = self.subjects.lock().unwrap_or_else(|p| p.into_inner());
        let window = subjects.entry(subject.to_owned()).or_default();
        if window.order.len() >= self.size || window.keys.contains(&key) {
            return false;
        }
        let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        // Newest first: each older key goes to the front.
        window.keys.insert(key.clone());
        window.order.push_front((key, at));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_repeats_per_subject() {
        let dedup = Dedup::new(2, None);
        dedup.reserve([("a.b", "k1")]).unwrap().commit();
        assert_eq!(
            dedup.reserve([("a.b", "k1")]).err(),
            Some(Duplicate {
                key: "k1".into(),
                event: 0
            })
        );
        dedup
            .reserve([("a.c", "k1")])
            .expect("other subject")
            .commit();
        dedup.reserve([("a.b", "")]).expect("no key").commit();
        dedup
            .reserve([("a.b", "")])
            .expect("no key, twice")
            .commit();
        dedup.reserve([("a.b", "k2")]).unwrap().commit();
        dedup.reserve([("a.b", "k3")]).unwrap().commit();
        dedup
            .reserve([("a.b", "k1")])
            .expect("k1 pushed out by k2, k3")
            .commit();
    }

    #[test]
    fn a_refused_batch_registers_nothing() {
        let dedup = Dedup::new(10, None);
        dedup.reserve([("a.b", "old")]).unwrap().commit();
        let refused = dedup.reserve([("a.b", "new"), ("a.b", "old")]).err();
        assert_eq!(refused.map(|d| d.event), Some(1));
        dedup
            .reserve([("a.b", "new")])
            .expect("new was not registered")
            .commit();
        assert!(dedup.reserve([("a.b", "x"), ("a.b", "x")]).is_err());
        dedup
            .reserve([("a.b", "x")])
            .expect("x was not registered")
            .commit();
    }

    #[test]
    fn a_reservation_dropped_uncommitted_releases_its_keys() {
        let dedup = Dedup::new(10, None);
        let reservation = dedup.reserve([("a.b", "k"), ("a.c", "k")]).unwrap();
        assert!(
            dedup.reserve([("a.b", "k")]).is_err(),
            "held while it lives"
        );
        drop(reservation);
        let reservation = dedup.reserve([("a.b", "k"), ("a.c", "k")]).unwrap();
        reservation.commit();
        assert!(
            dedup.reserve([("a.b", "k")]).is_err(),
            "kept once committed"
        );
        assert!(dedup.reserve([("a.c", "k")]).is_err());
    }

    #[test]
    fn keys_expire_after_the_ttl() {
        let dedup = Dedup::new(10, Some(Duration::from_millis(30)));
        dedup.reserve([("a.b", "k")]).unwrap().commit();
        assert!(dedup.reserve([("a.b", "k")]).is_err());
        std::thread::sleep(Duration::from_millis(40));
        dedup.reserve([("a.b", "k")]).unwrap().commit();
    }

    #[test]
    fn disabled_with_size_zero() {
        let dedup = Dedup::new(0, None);
        dedup.reserve([("a.b", "k")]).unwrap().commit();
        dedup.reserve([("a.b", "k")]).unwrap().commit();
    }

    #[test]
    fn restore_fills_windows_newest_first() {
        let dedup = Dedup::new(2, Some(Duration::from_secs(60)));
        assert!(dedup.restore("a.b", "newest".into(), Duration::from_secs(1)));
        assert!(dedup.restore("a.b", "older".into(), Duration::from_secs(2)));
        assert!(
            !dedup.restore("a.b", "oldest".into(), Duration::from_secs(3)),
            "window full"
        );
        assert!(
            !dedup.restore("a.c", "stale".into(), Duration::from_secs(61)),
            "expired"
        );
        assert!(dedup.reserve([("a.b", "newest")]).is_err());
        assert!(dedup.reserve([("a.b", "older")]).is_err());
        dedup.reserve([("a.b", "oldest")]).unwrap().commit();
        // "older" is pushed out first: it is the oldest registered key.
        dedup.reserve([("a.b", "older")]).unwrap().commit();
    }
}
