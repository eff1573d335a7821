//! The durable log: one append-only log per namespace, on local disk.
//!
//! What it promises:
//! - **Gapless positions.** Each namespace numbers its events 0, 1, 2, … in commit order;
//!   the position is the event's `index`. A position, once handed to a reader or
//!   acknowledged to a publisher, always names the same event.
//! - **Atomic batches.** The events of one [`EventLog::append`] call are committed together:
//!   after a crash either all of them are in the log or none is.
//! - **Durability per [`FsyncPolicy`].** With `always` (the default) an append returns only
//!   after its bytes are on disk (`fdatasync`), and readers see nothing that is not.
//! - **Nothing skipped silently.** Every record carries a CRC32C that is checked whenever it
//!   is read. Opening a namespace checks every record of its active segment: a damaged
//!   last write (a crash in the middle of an append) is truncated with a warning that
//!   names the file and the bytes dropped; damage anywhere else stops the open with an
//!   error naming file and byte offset.
//! - **Cheap open and seek.** Opening reads the metadata and sizes of sealed segments and
//!   the records of the active one (at most one segment's worth, not the whole log).
//!   Finding a position is a binary search over segments and one index read; finding a
//!   server-assigned id is a decode; finding a client-supplied id is a binary search per
//!   segment in its id index; finding a time is a binary search over commit times.
//! - **The server's own clock.** Every event has a commit time, assigned by the writer and
//!   never decreasing along the log, also across restarts. Retention by age and searches
//!   by time use it, never the `created_at` a client may set (segments written before
//!   commit times were stored fall back to `created_at`; see [`log`]).
//!
//! Everything outside this module reaches storage through [`api`]: the [`EventLog`] of a
//! namespace, the [`ConsumerStore`] of durable consumers' progress (or, for a backend
//! that runs consumers itself, its [`ServedConsumers`]) and one
//! [`StorageError`], so that another backend can take this one's place ([`memory`] is a
//! second one, for the broker's tests). This module does not know subjects or
//! subscriptions.
//!
//! Layout: [`api`] the interface, [`consumers`] durable consumers' progress,
//! [`progress_files`] its files. A namespace's log: [`log`] the handle (open, append, read,
//! close), [`shared`] the state its readers and its writer share (and the reads over it),
//! [`recovery`] opening and recovering its files, [`retention`] deleting old segments,
//! [`writer`] the single writer thread with group commit, [`tail`] the in-memory tail of
//! recent events, [`meta`] the per-namespace metadata, [`ids`] the event ids. Its files:
//! [`segment`] a segment and reads from it, [`log_header`] and [`record`] the `.log`
//! format, [`index_files`] the `.idx`, `.tim`, `.ids` and `.frm` files, [`scan`] reading a
//! whole segment for recovery, [`cipher`] encryption at rest. [`inspect`] reads a log's
//! files directly for the offline tools.

pub mod api;
pub mod cipher;
pub mod consumers;
pub mod error;
pub mod ids;
mod inbox;
pub mod index_files;
pub mod inspect;
pub mod jetstream;
pub mod log;
pub mod log_header;
pub mod memory;
pub mod meta;
pub mod progress_files;
pub mod record;
mod recovery;
mod retention;
pub mod scan;
pub mod segment;
mod shared;
pub mod tail;
mod writer;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub use self::api::{
    Appended, BoxFuture, CommitTimings, ConsumerStore, Consumers, ErrorKind, EventLog, KeyedEvent,
    LogStats, Relay, RelayListener, Served, ServedConsumer, ServedConsumers, ServedMember,
    ServedSpec, ServedState, Settle, Storage, StorageError, StorageUsage,
};
pub use self::cipher::Cipher;
pub use self::consumers::{ConsumerName, ConsumerProgress, Owner};
pub use self::error::StoreError;
pub use self::log::{Log, Recovery, Truncation};
pub use self::progress_files::FileConsumers;
use crate::duration::{format_go_duration, parse_go_duration};

/// When the log's writer calls `fdatasync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every append is on disk before it is acknowledged or visible to readers. Concurrent
    /// appends share one sync (group commit).
    Always,
    /// Appends are acknowledged once written to the operating system, which keeps them
    /// through a crash of the bus process; they reach the disk within the interval, so a
    /// power loss or kernel crash loses at most that much acknowledged data.
    Interval(Duration),
    /// Appends are acknowledged once written to the operating system; the bus syncs only
    /// when a segment is sealed and at shutdown. A crash of the process loses nothing; a
    /// power loss loses what the kernel had not yet written back.
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<FsyncPolicy, String> {
        match text {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            _ => {
                let Some(interval) = text.strip_prefix("interval=") else {
                    return Err(format!(
                        "invalid fsync policy {text:?}: use always, never or interval=<duration> (e.g. interval=100ms)"
                    ));
                };
                let interval = parse_go_duration(interval).map_err(|e| e.to_string())?;
                if interval.is_zero() {
                    return Err(
                        "fsync interval must be greater than zero; use always to sync every append"
                            .into(),
                    );
                }
                Ok(FsyncPolicy::Interval(interval))
            }
        }
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Never => f.write_str("never"),
            FsyncPolicy::Interval(d) => write!(f, "interval={}", format_go_duration(*d)),
        }
    }
}

/// How the logs of a store are kept.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The data directory; each namespace gets a subdirectory.
    pub path: PathBuf,
    /// A segment is sealed and a new one started at the first batch boundary at or after
    /// this many bytes.
    pub segment_size: u64,
    pub fsync: FsyncPolicy,
    /// Bytes of recent events each log keeps in memory for live readers.
    pub tail_bytes: usize,
    /// Encrypts the logs at rest; a log must always be opened with the key it was
    /// created with (or without one if it was created without).
    pub cipher: Option<Cipher>,
}

/// Default segment size: 128 MiB.
pub const DEFAULT_SEGMENT_SIZE: u64 = 128 << 20;
/// Default in-memory tail per namespace: 16 MiB.
pub const DEFAULT_TAIL_BYTES: usize = 16 << 20;

impl StoreConfig {
    pub fn new(path: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            path: path.into(),
            segment_size: DEFAULT_SEGMENT_SIZE,
            fsync: FsyncPolicy::Always,
            tail_bytes: DEFAULT_TAIL_BYTES,
            cipher: None,
        }
    }
}

/// The file store: the logs of all declared namespaces, and their consumers' progress,
/// under one data directory.
pub struct Store {
    logs: BTreeMap<String, Arc<Log>>,
    consumers: Arc<FileConsumers>,
}

impl Store {
    /// Opens (creating if needed) one log per namespace under `config.path`. Blocking: it
    /// checks the active segment of every namespace.
    pub fn open(config: &StoreConfig, namespaces: &[String]) -> Result<Store, StoreError> {
        let mut logs = BTreeMap::new();
        for namespace in namespaces {
            validate_namespace(namespace)?;
            if logs.contains_key(namespace) {
                return Err(StoreError::Unusable(format!(
                    "namespace {namespace:?} is declared twice"
                )));
            }
            let log = Log::open(&config.path.join(namespace), namespace, config)?;
            logs.insert(namespace.clone(), Arc::new(log));
        }
        Ok(Store {
            logs,
            consumers: Arc::new(FileConsumers::new(&config.path)),
        })
    }

    /// The store as the rest of the server uses it.
    pub fn storage(&self) -> Storage {
        Storage {
            logs: self
                .logs
                .values()
                .map(|log| Arc::clone(log) as Arc<dyn EventLog>)
                .collect(),
            consumers: Consumers::Dispatched(Arc::clone(&self.consumers) as Arc<dyn ConsumerStore>),
            relay: None,
        }
    }

    pub fn log(&self, namespace: &str) -> Option<&Arc<Log>> {
        self.logs.get(namespace)
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.logs.keys().map(String::as_str)
    }

    pub fn logs(&self) -> impl Iterator<Item = &Arc<Log>> {
        self.logs.values()
    }

    /// Commits what is queued, syncs every log and marks it cleanly closed.
    pub async fn close(&self) -> Result<(), StoreError> {
        let mut first_error = None;
        for log in self.logs.values() {
            if let Err(e) = log.close().await {
                tracing::error!(namespace = log.namespace(), error = %e, "closing log failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Namespace names become directory names and subject prefixes: letters, digits, `_`
/// and `-` only, and never the reserved `_bus_`.
pub fn validate_namespace(name: &str) -> Result<(), StoreError> {
    if name == "_bus_" {
        return Err(StoreError::Unusable(
            "\"_bus_\" is reserved for inbox subjects and cannot be a namespace".into(),
        ));
    }
    let valid = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(StoreError::Unusable(format!(
            "invalid namespace {name:?}: use letters, digits, '_' and '-'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses_and_prints() {
        assert_eq!("always".parse(), Ok(FsyncPolicy::Always));
        assert_eq!("never".parse(), Ok(FsyncPolicy::Never));
        let policy: FsyncPolicy = "interval=250ms".parse().unwrap();
        assert_eq!(policy, FsyncPolicy::Interval(Duration::from_millis(250)));
        assert_eq!(policy.to_string(), "interval=250ms");
        for bad in ["", "sometimes", "interval=", "interval=0s", "interval=5"] {
            assert!(bad.parse::<FsyncPolicy>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn namespace_names() {
        for good in ["app", "orders-eu", "a_1"] {
            assert!(validate_namespace(good).is_ok());
        }
        for bad in ["", "_bus_", "a.b", "a b", "../x", "*"] {
            assert!(validate_namespace(bad).is_err(), "{bad:?} accepted");
        }
    }
}
