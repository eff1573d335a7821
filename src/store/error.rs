//! Errors of the storage layer. Each carries the file, offset or id a person needs to act.

use std::io;
use std::path::PathBuf;

use super::api::{ErrorKind, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation failed; `context` says what was being done to which file. The
    /// message holds the cause, which is therefore not also given as the error's source
    /// (an error chain would print it twice).
    #[error("{context}: {cause}")]
    Io { context: String, cause: io::Error },

    /// Stored bytes are damaged somewhere a crash cannot explain. The log refuses to serve
    /// or overwrite them; nothing is skipped silently.
    #[error("corrupt data in {file} at byte offset {offset}: {reason}")]
    Corrupt {
        file: PathBuf,
        offset: u64,
        reason: String,
    },

    /// The data directory cannot be used as it is (missing metadata, a lock held by
    /// another process, an invalid namespace name…).
    #[error("{0}")]
    Unusable(String),

    /// A client-supplied id is already taken in this namespace.
    #[error("event id {0} already exists in this namespace")]
    DuplicateId(String),

    /// A client-supplied id has the form of ids this namespace assigns itself and could
    /// collide with one of them.
    #[error("event id {0} has the form of ids this namespace assigns itself; choose another id")]
    ReservedId(String),

    /// An event of the batch would take more bytes in the log than one record can hold
    /// (its length field has 31 bits). The whole batch is refused; nothing of it is
    /// written.
    #[error("an event of {len} bytes is too large to store: one event takes at most {max} bytes in the log")]
    EventTooLarge { len: u64, max: u64 },

    /// An earlier write or sync failed in a way that leaves the log's on-disk state
    /// uncertain; appends are refused until the server restarts and recovers it.
    #[error("the log of namespace {namespace} stopped accepting events after a storage failure ({cause}); restart the server to recover it")]
    Halted { namespace: String, cause: String },

    /// The log was closed (the server is shutting down).
    #[error("the log of namespace {0} is closed")]
    Closed(String),
}

/// What the file store's failures are, for the rest of the server.
impl From<StoreError> for StorageError {
    fn from(error: StoreError) -> StorageError {
        let kind = match &error {
            StoreError::Io { cause, .. } if cause.kind() == io::ErrorKind::StorageFull => {
                ErrorKind::Full
            }
            StoreError::Io { .. } | StoreError::Unusable(_) => ErrorKind::Internal,
            StoreError::Corrupt { .. } => ErrorKind::Corrupt,
            StoreError::DuplicateId(_) | StoreError::ReservedId(_) => ErrorKind::Conflict,
            StoreError::EventTooLarge { .. } => ErrorKind::TooLarge,
            StoreError::Halted { .. } | StoreError::Closed(_) => ErrorKind::Unavailable,
        };
        StorageError::new(kind, error.to_string())
    }
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> StoreError {
        StoreError::Io {
            context: context.into(),
            cause: source,
        }
    }

    /// A copy of this error for each of several waiters; I/O errors keep their kind (a
    /// full disk stays recognisable).
    pub(crate) fn copy(&self) -> StoreError {
        match self {
            StoreError::Io { context, cause } => StoreError::Io {
                context: context.clone(),
                cause: io::Error::new(cause.kind(), cause.to_string()),
            },
            StoreError::Corrupt {
                file,
                offset,
                reason,
            } => StoreError::Corrupt {
                file: file.clone(),
                offset: *offset,
                reason: reason.clone(),
            },
            StoreError::Unusable(m) => StoreError::Unusable(m.clone()),
            StoreError::DuplicateId(id) => StoreError::DuplicateId(id.clone()),
            StoreError::ReservedId(id) => StoreError::ReservedId(id.clone()),
            StoreError::EventTooLarge { len, max } => StoreError::EventTooLarge {
                len: *len,
                max: *max,
            },
            StoreError::Halted { namespace, cause } => StoreError::Halted {
                namespace: namespace.clone(),
                cause: cause.clone(),
            },
            StoreError::Closed(ns) => StoreError::Closed(ns.clone()),
        }
    }

    pub(crate) fn corrupt(
        file: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> StoreError {
        StoreError::Corrupt {
            file: file.into(),
            offset,
            reason: reason.into(),
        }
    }
}

/// Adds "what was being done" to an I/O result.
pub(crate) trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, StoreError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::io(what(), source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_names_its_cause_once_in_a_chain() {
        let error = StoreError::io(
            "writing meta.tmp",
            io::Error::from(io::ErrorKind::StorageFull),
        );
        let chain = format!("{:#}", anyhow::Error::from(error));
        assert_eq!(chain.matches("no storage space").count(), 1, "{chain}");
        assert!(chain.starts_with("writing meta.tmp: "), "{chain}");
    }
}
