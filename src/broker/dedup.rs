//! Deduplication by `key`: per subject, the most recent keys published with it.
//!
//! Each subject keeps up to `size` keys (its oldest forgotten first) and, if `ttl` is set,
//! a key is forgotten that long after it was published. Across all subjects the window
//! holds at most `budget` bytes (keys, subjects and bookkeeping, counted as
//! [`ENTRY_OVERHEAD`] per key): beyond it the oldest keys of any subject go first, and a
//! subject whose last key went is forgotten, so that many subjects with a key or two each
//! cannot grow the server without end.
//!
//! A publish is checked and its keys reserved in one step under one lock, so two
//! concurrent publishes of the same key cannot both pass; a batch is checked whole before
//! any of its keys is reserved, so a refused batch registers nothing. A reservation is a
//! guard: it gives its keys back when it is dropped, unless [`Reservation::commit`] says
//! the events were stored. At start-up the window is rebuilt from the newest events of
//! each log ([`Dedup::restore`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What one registered key costs beyond its own bytes: its places in the maps and queues
/// below (measured, rounded up).
pub const ENTRY_OVERHEAD: usize = 160;
/// The window's budget unless configured: 64 MiB, about 300,000 keys of 50 bytes.
pub const DEFAULT_BUDGET: usize = 64 << 20;
/// What a subject costs beyond its name while it has keys.
const SUBJECT_OVERHEAD: usize = 128;
/// Where new keys' sequence numbers start; keys restored at start-up count down from it,
/// so that they sort before every key registered later.
const FIRST_SEQUENCE: u64 = 1 << 62;

/// The dedup window of all namespaces.
pub struct Dedup {
    size: usize,
    ttl: Option<Duration>,
    budget: usize,
    state: Shared,
}

type Shared = Arc<Mutex<State>>;

/// One registered key, in the window's global order.
struct Entry {
    subject: Arc<str>,
    key: Arc<str>,
    at: Instant,
}

/// The keys of one subject.
#[derive(Default)]
struct SubjectKeys {
    /// Key to its sequence number.
    keys: HashMap<Arc<str>, u64>,
    /// Sequence numbers, oldest first; may hold numbers of released keys (skipped).
    order: VecDeque<u64>,
}

struct State {
    /// Every registered key by sequence number: oldest first.
    entries: BTreeMap<u64, Entry>,
    subjects: HashMap<Arc<str>, SubjectKeys>,
    /// What the window holds, counted as the module docs say.
    bytes: usize,
    next: u64,
    /// The next (older) sequence number for a restored key.
    next_restored: u64,
}

impl Default for State {
    fn default() -> State {
        State {
            entries: BTreeMap::new(),
            subjects: HashMap::new(),
            bytes: 0,
            next: FIRST_SEQUENCE,
            next_restored: FIRST_SEQUENCE - 1,
        }
    }
}

impl State {
    fn contains(&self, subject: &str, key: &str) -> bool {
        self.subjects
            .get(subject)
            .is_some_and(|s| s.keys.contains_key(key))
    }

    /// Registers `key` on `subject` under `sequence`; `front`: as the subject's oldest.
    fn insert(&mut self, subject: &str, key: &str, sequence: u64, at: Instant, front: bool) {
        let subject: Arc<str> = match self.subjects.get_key_value(subject) {
            Some((name, _)) => Arc::clone(name),
            None => {
                self.bytes += subject.len() + SUBJECT_OVERHEAD;
                let name: Arc<str> = subject.into();
                self.subjects
                    .insert(Arc::clone(&name), SubjectKeys::default());
                name
            }
        };
        let key: Arc<str> = key.into();
        if let Some(keys) = self.subjects.get_mut(&subject) {
            keys.keys.insert(Arc::clone(&key), sequence);
            if front {
                keys.order.push_front(sequence);
            } else {
                keys.order.push_back(sequence);
            }
        }
        self.bytes += key.len() + ENTRY_OVERHEAD;
        self.entries.insert(sequence, Entry { subject, key, at });
    }

    /// Forgets the key registered under `sequence`; what it was.
    fn remove(&mut self, sequence: u64) -> Option<(Arc<str>, Arc<str>)> {
        let entry = self.entries.remove(&sequence)?;
        self.bytes -= entry.key.len() + ENTRY_OVERHEAD;
        let forgotten = Some((Arc::clone(&entry.subject), Arc::clone(&entry.key)));
        let Some(keys) = self.subjects.get_mut(&entry.subject) else {
            return forgotten;
        };
        if keys.keys.get(&entry.key) == Some(&sequence) {
            keys.keys.remove(&entry.key);
        }
        // Its place in the subject's order: usually at one end.
        if keys.order.front() == Some(&sequence) {
            keys.order.pop_front();
        } else if keys.order.back() == Some(&sequence) {
            keys.order.pop_back();
        }
        if keys.keys.is_empty() {
            self.subjects.remove(&entry.subject);
            self.bytes -= entry.subject.len() + SUBJECT_OVERHEAD;
        }
        forgotten
    }

    /// The subject's oldest live key, if it has more than `size`.
    fn over_size(&mut self, subject: &str, size: usize) -> Option<u64> {
        let keys = self.subjects.get_mut(subject)?;
        if keys.keys.len() <= size {
            return None;
        }
        while let Some(&oldest) = keys.order.front() {
            if self.entries.contains_key(&oldest) {
                return Some(oldest);
            }
            keys.order.pop_front(); // a released key's leftover
        }
        None
    }

    /// Forgets keys older than `ttl`, then the oldest while over `budget`; adds them to
    /// `forgotten`.
    fn prune(
        &mut self,
        ttl: Option<Duration>,
        budget: usize,
        now: Instant,
        forgotten: &mut Vec<(Arc<str>, Arc<str>)>,
    ) {
        while let Some((&sequence, entry)) = self.entries.first_key_value() {
            let expired = ttl.is_some_and(|ttl| now.duration_since(entry.at) >= ttl);
            if !expired && self.bytes <= budget {
                break;
            }
            forgotten.extend(self.remove(sequence));
        }
    }
}

/// Keys a publish reserved, held until its events are stored ([`Reservation::commit`]);
/// dropped before that (the append failed, or the publish was abandoned), it releases
/// them, so that a retry is not refused for events that were never stored.
#[must_use = "dropping a reservation releases its keys"]
#[derive(Default)]
pub struct Reservation {
    state: Option<Shared>,
    sequences: Vec<u64>,
    /// (subject, key) of the keys the window forgot to make room or as they expired.
    forgotten: Vec<(Arc<str>, Arc<str>)>,
}

impl Reservation {
    /// The keys the window forgot while reserving (pushed out by these, or expired): a
    /// store that also holds keys (across nodes) lets them go too.
    pub fn take_forgotten(&mut self) -> Vec<(Arc<str>, Arc<str>)> {
        std::mem::take(&mut self.forgotten)
    }

    /// Whether it holds no key (a publish without keys, or deduplication off).
    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    /// The events were stored: the keys stay registered.
    pub fn commit(mut self) {
        self.sequences.clear();
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let Some(state) = &self.state else {
            return;
        };
        if self.sequences.is_empty() {
            return;
        }
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        for sequence in self.sequences.drain(..) {
            state.remove(sequence);
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
    /// `size` keys per subject (0 disables deduplication), each kept for `ttl` (`None`:
    /// until pushed out), `budget` bytes in all.
    pub fn new(size: usize, ttl: Option<Duration>, budget: usize) -> Dedup {
        Dedup {
            size,
            ttl,
            budget,
            state: Shared::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.size > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes the window may hold.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Bytes the window holds now (as counted for the budget).
    pub fn bytes(&self) -> usize {
        self.lock().bytes
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
        let mut state = self.lock();
        let mut forgotten = Vec::new();
        state.prune(self.ttl, self.budget, now, &mut forgotten);
        let mut in_batch = HashSet::new();
        for (event, (subject, key)) in batch.clone().into_iter().enumerate() {
            if key.is_empty() {
                continue;
            }
            if state.contains(subject, key) || !in_batch.insert((subject, key)) {
                return Err(Duplicate {
                    key: key.to_owned(),
                    event,
                });
            }
        }
        let mut reservation = Reservation {
            state: Some(Arc::clone(&self.state)),
            sequences: Vec::new(),
            forgotten,
        };
        for (subject, key) in batch {
            if key.is_empty() {
                continue;
            }
            let sequence = state.next;
            state.next += 1;
            state.insert(subject, key, sequence, now, false);
            reservation.sequences.push(sequence);
            while let Some(oldest) = state.over_size(subject, self.size) {
                reservation.forgotten.extend(state.remove(oldest));
            }
        }
        state.prune(self.ttl, self.budget, now, &mut reservation.forgotten);
        Ok(reservation)
    }

    /// Registers a key found in the log at start-up, `age` after it was published.
    /// Called newest first: a subject's window that is already full, or a window at its
    /// budget, is left alone.
    pub fn restore(&self, subject: &str, key: &str, age: Duration) -> bool {
        if !self.enabled() || self.ttl.is_some_and(|ttl| age >= ttl) {
            return false;
        }
        let mut state = self.lock();
        let full = state
            .subjects
            .get(subject)
            .is_some_and(|s| s.keys.len() >= self.size);
        let room = state.bytes + key.len() + ENTRY_OVERHEAD <= self.budget;
        if full || !room || state.contains(subject, key) {
            return false;
        }
        let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let sequence = state.next_restored;
        state.next_restored -= 1;
        // Newest first: each older key goes before the others.
        state.insert(subject, key, sequence, at, true);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_repeats_per_subject() {
        let dedup = Dedup::new(2, None, usize::MAX);
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
        let dedup = Dedup::new(10, None, usize::MAX);
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
        let dedup = Dedup::new(10, None, usize::MAX);
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
        let dedup = Dedup::new(10, Some(Duration::from_millis(30)), usize::MAX);
        dedup.reserve([("a.b", "k")]).unwrap().commit();
        assert!(dedup.reserve([("a.b", "k")]).is_err());
        std::thread::sleep(Duration::from_millis(40));
        dedup.reserve([("a.b", "k")]).unwrap().commit();
    }

    #[test]
    fn disabled_with_size_zero() {
        let dedup = Dedup::new(0, None, usize::MAX);
        dedup.reserve([("a.b", "k")]).unwrap().commit();
        dedup.reserve([("a.b", "k")]).unwrap().commit();
    }

    #[test]
    fn restore_fills_windows_newest_first() {
        let dedup = Dedup::new(2, Some(Duration::from_secs(60)), usize::MAX);
        assert!(dedup.restore("a.b", "newest", Duration::from_secs(1)));
        assert!(dedup.restore("a.b", "older", Duration::from_secs(2)));
        assert!(
            !dedup.restore("a.b", "oldest", Duration::from_secs(3)),
            "window full"
        );
        assert!(
            !dedup.restore("a.c", "stale", Duration::from_secs(61)),
            "expired"
        );
        assert!(dedup.reserve([("a.b", "newest")]).is_err());
        assert!(dedup.reserve([("a.b", "older")]).is_err());
        dedup.reserve([("a.b", "oldest")]).unwrap().commit();
        // "older" is pushed out first: it is the oldest registered key.
        dedup.reserve([("a.b", "older")]).unwrap().commit();
    }

    #[test]
    fn the_budget_holds_across_subjects_oldest_first() {
        let per_key = 3 + ENTRY_OVERHEAD;
        let per_subject = "s.00000".len() + SUBJECT_OVERHEAD;
        // Room for 100 subjects of one key each.
        let dedup = Dedup::new(1000, None, 100 * (per_key + per_subject));
        for n in 0..1000 {
            dedup
                .reserve([(format!("s.{n:05}").as_str(), "key")])
                .unwrap()
                .commit();
            assert!(dedup.bytes() <= 100 * (per_key + per_subject), "after {n}");
        }
        assert_eq!(
            dedup.lock().subjects.len(),
            100,
            "emptied subjects are forgotten"
        );
        // The newest are remembered, the oldest were pushed out.
        assert!(dedup.reserve([("s.00999", "key")]).is_err());
        assert!(dedup.reserve([("s.00900", "key")]).is_err());
        dedup.reserve([("s.00000", "key")]).unwrap().commit();
    }

    #[test]
    fn everything_forgotten_costs_nothing() {
        let dedup = Dedup::new(2, Some(Duration::from_millis(20)), usize::MAX);
        for n in 0..50 {
            dedup
                .reserve([("a.b", format!("k{n}").as_str()), ("a.c", "x")])
                .map(Reservation::commit)
                .ok();
        }
        let released = dedup.reserve([("a.d", "k")]).unwrap();
        drop(released);
        std::thread::sleep(Duration::from_millis(30));
        dedup.reserve([("a.e", "")]).unwrap().commit();
        drop(dedup.reserve([("a.f", "k")]).unwrap());
        assert_eq!(dedup.bytes(), 0, "expired and released keys leave nothing");
        assert!(dedup.lock().subjects.is_empty());
        assert!(dedup.lock().entries.is_empty());
    }
}
