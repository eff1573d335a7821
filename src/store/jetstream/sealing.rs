//! What a JetStream message holds: the event's JSON, sealed by `bus` before it leaves the
//! node when the store is encrypted (`--secret-key`), so that whoever runs NATS reads
//! neither payloads nor subjects' data. Subjects, sizes and times stay visible to NATS:
//! it routes and limits by them.
//!
//! A stream records whether it is encrypted in its metadata, with a key check (a constant
//! sealed with the key), so that a wrong key, a missing key or a key given for a stream
//! that holds clear events is refused when the log opens, not met at the first read.

use std::collections::HashMap;

use bytes::Bytes;

use crate::event::{self, StoredEvent};

use crate::store::api::{ErrorKind, StorageError};
use crate::store::cipher::Cipher;

/// The stream metadata entry with the key check of an encrypted stream.
const KEY_CHECK_KEY: &str = "bus_key_check";

/// Seals and opens one log's messages.
#[derive(Clone)]
pub struct Sealing {
    cipher: Option<Cipher>,
    /// Bound into every sealed message: the log's id generation, drawn when its stream
    /// was created, so a message copied from another stream does not open.
    generation: u64,
    stream: String,
}

impl Sealing {
    pub fn new(cipher: Option<Cipher>, generation: u64, stream: &str) -> Sealing {
        Sealing {
            cipher,
            generation,
            stream: stream.to_owned(),
        }
    }

    /// Adds the key check of `cipher` (if any) to a stream's metadata: at creation, or to
    /// a stream that has never held an event.
    pub fn add_key_check(
        cipher: Option<&Cipher>,
        metadata: &mut HashMap<String, String>,
    ) -> Result<(), StorageError> {
        if let Some(cipher) = cipher {
            let check = cipher
                .key_check()
                .map_err(|e| StorageError::new(ErrorKind::Internal, e.to_string()))?;
            metadata.insert(KEY_CHECK_KEY.to_owned(), check);
        }
        Ok(())
    }

    /// Whether a stream's metadata says it is encrypted.
    pub fn is_encrypted(metadata: &HashMap<String, String>) -> bool {
        metadata.contains_key(KEY_CHECK_KEY)
    }

    /// Checks the cipher against a stream's metadata.
    pub fn check(
        cipher: Option<&Cipher>,
        stream: &str,
        metadata: &HashMap<String, String>,
    ) -> Result<(), StorageError> {
        let refuse = |message: String| Err(StorageError::new(ErrorKind::Internal, message));
        match (cipher, metadata.get(KEY_CHECK_KEY)) {
            (None, None) => Ok(()),
            (Some(cipher), Some(check)) if cipher.matches_key_check(check) => Ok(()),
            (Some(_), Some(_)) => refuse(format!(
                "stream {stream} is encrypted with another key: give the --secret-key it was created with"
            )),
            (None, Some(_)) => refuse(format!(
                "stream {stream} is encrypted: give its --secret-key"
            )),
            (Some(_), None) => refuse(format!(
                "stream {stream} holds events that are not encrypted: run without --secret-key, or copy them into an encrypted bus (bus copy)"
            )),
        }
    }

    /// The message body for an event's JSON.
    pub fn seal(&self, json: Bytes) -> Result<Bytes, StorageError> {
        match &self.cipher {
            None => Ok(json),
            Some(cipher) => cipher
                .seal_message(self.generation, &json)
                .map(Bytes::from)
                .map_err(|e| StorageError::new(ErrorKind::Internal, e.to_string())),
        }
    }

    /// The event's JSON in a message body.
    pub fn open(&self, body: Bytes) -> Result<Bytes, StorageError> {
        match &self.cipher {
            None => Ok(body),
            Some(cipher) => cipher
                .open_message(self.generation, &body)
                .map(Bytes::from)
                .map_err(|reason| {
                    StorageError::new(
                        ErrorKind::Corrupt,
                        format!("stream {}: an event does not open: {reason}", self.stream),
                    )
                }),
        }
    }

    /// The event a message body holds, with its frame (one message at a time: runs of
    /// them share a buffer, see the reads).
    pub fn event(&self, body: Bytes) -> Result<StoredEvent, StorageError> {
        let json = self.open(body)?;
        let corrupt = |what: &str| {
            StorageError::new(
                ErrorKind::Corrupt,
                format!("stream {}: a message {what}", self.stream),
            )
        };
        let position = event::index_of_json(&json).ok_or_else(|| corrupt("has no index"))?;
        StoredEvent::from_json(position, &json).ok_or_else(|| corrupt("is not an event of bus"))
    }
}
