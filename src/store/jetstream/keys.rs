//! Deduplication keys across writers: on one stream, several nodes append, and each node's
//! own window (the broker's) sees only its publishes. A keyed event is appended only after
//! its (subject, key) is claimed in the bucket `BUS_KEYS_<namespace>`, which JetStream
//! changes atomically: of two nodes publishing the same key at once, one claims it and the
//! other finds it claimed.
//!
//! An entry says either `claiming <unix ms>` (an append in flight) or `at <position>` (the
//! event stored there). A node that finds a key claimed:
//! - `at p`: refuses the publish if the event at `p` has that subject and key; otherwise
//!   the entry is left over from a failed append and is taken over;
//! - `claiming`: waits for the other append to end (it becomes `at p`, or disappears),
//!   and takes the entry over if it is older than [`STALE`] (its node died).
//!
//! The bucket is kept in memory (with the stream's replicas): on disk, with
//! `sync_interval: always`, every claim would cost a sync of its own, and keyed publishes
//! ran at a quarter of the rate (BENCHMARKS.md). The price: if every nats-server of the
//! cluster restarts at once, the claims are gone, and until the nodes' windows are rebuilt
//! (at their own restart, from the streams) a key published through one node may be
//! published again through another.
//!
//! A key is let go when the window of the node that took it forgets it (pushed out by
//! newer keys of its subject, `--dup-size`, or expired, `--dup-ttl`), so that across
//! nodes a key is refused while it is in that window, as on one node; entries also expire
//! with the bucket's age limit (`--dup-ttl`, 24 hours when it is not set), for keys whose
//! node went away. The broker's own window still answers first.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::future::join_all;
use sha2::{Digest, Sha256};

use super::connection::{body_at, unavailable};
use super::sealing::Sealing;
use crate::event::{EventDraft, JsonLayout, PendingEvent};
use crate::store::api::{ErrorKind, StorageError};
use crate::timestamp::Timestamp;

/// How old a `claiming` entry is when its append is taken to have died with its node.
const STALE: Duration = Duration::from_secs(10);
/// How often a node looks again at a key another append is claiming.
const RECHECK: Duration = Duration::from_millis(20);
/// The window across nodes when `--dup-ttl` is not set.
pub const DEFAULT_KEY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// A key this node claimed: its entry and the entry's revision.
pub struct Claim {
    entry: String,
    revision: u64,
}

/// The keys of one namespace's stream.
pub struct Keys {
    bucket: kv::Store,
    client: async_nats::Client,
    stream: String,
    sealing: Sealing,
}

/// The bucket entry of an encoded subject and key.
fn entry_name(subject: &[u8], key: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(subject);
    hash.update([0]);
    hash.update(key);
    hash.finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// What an entry says.
enum Entry {
    Claiming { since_ms: u64 },
    At(u64),
}

fn parse(value: &[u8]) -> Option<Entry> {
    let text = std::str::from_utf8(value).ok()?;
    if let Some(since) = text.strip_prefix("claiming ") {
        return Some(Entry::Claiming {
            since_ms: since.parse().ok()?,
        });
    }
    Some(Entry::At(text.strip_prefix("at ")?.parse().ok()?))
}

impl Keys {
    pub fn new(
        bucket: kv::Store,
        client: async_nats::Client,
        stream: &str,
        sealing: Sealing,
    ) -> Keys {
        Keys {
            bucket,
            client,
            stream: stream.to_owned(),
            sealing,
        }
    }

    /// Claims the keys of an append (before it is appended); a conflict, naming the key,
    /// if one of them was published before. Claims already taken are given back then.
    pub async fn claim(&self, batch: &[PendingEvent]) -> Result<Vec<Claim>, StorageError> {
        // All at once: each is a round trip to JetStream.
        let claimed = join_all(
            batch
                .iter()
                .filter_map(PendingEvent::encoded_key)
                .map(|(subject, key)| self.claim_one(subject, key)),
        )
        .await;
        let mut claims = Vec::with_capacity(claimed.len());
        let mut refused = None;
        for claim in claimed {
            match claim {
                Ok(claim) => claims.push(claim),
                Err(e) => {
                    refused.get_or_insert(e);
                }
            }
        }
        match refused {
            None => Ok(claims),
            Some(e) => {
                self.release(claims).await;
                Err(e)
            }
        }
    }

    async fn claim_one(&self, subject: &[u8], key: &[u8]) -> Result<Claim, StorageError> {
        let entry = entry_name(subject, key);
        let failed = |e: &dyn std::fmt::Display| unavailable("claiming a deduplication key", e);
        loop {
            let claiming = Bytes::from(format!("claiming {}", Timestamp::now().unix_millis()));
            match self.bucket.create(&entry, claiming.clone()).await {
                Ok(revision) => return Ok(Claim { entry, revision }),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(failed(&e)),
            }
            let Some(found) = self.bucket.entry(&entry).await.map_err(|e| failed(&e))? else {
                continue;
            };
            if found.operation != kv::Operation::Put {
                // Deleted or purged meanwhile: claimed by the next create.
                if let Ok(revision) = self.bucket.update(&entry, claiming, found.revision).await {
                    return Ok(Claim { entry, revision });
                }
                continue;
            }
            let take_over = match parse(&found.value) {
                Some(Entry::At(position)) => {
                    if self.holds(position, subject, key).await? {
                        return Err(StorageError::new(
                            ErrorKind::Conflict,
                            format!(
                                "key was processed before: {} was already published to {}",
                                String::from_utf8_lossy(key),
                                String::from_utf8_lossy(subject)
                            ),
                        ));
                    }
                    true
                }
                Some(Entry::Claiming { since_ms }) => {
                    Timestamp::now().unix_millis().saturating_sub(since_ms)
                        > STALE.as_millis() as u64
                }
                None => true,
            };
            if !take_over {
                tokio::time::sleep(RECHECK).await;
                continue;
            }
            if let Ok(revision) = self.bucket.update(&entry, claiming, found.revision).await {
                return Ok(Claim { entry, revision });
            }
        }
    }

    /// The claimed keys' events are stored at these positions (one per claim, in order).
    pub async fn stored(&self, claims: Vec<Claim>, positions: &[u64]) {
        let updates = claims.into_iter().zip(positions).map(|(claim, position)| async move {
            let at = Bytes::from(format!("at {position}"));
            if let Err(e) = self.bucket.update(&claim.entry, at, claim.revision).await {
                tracing::warn!(stream = self.stream, error = %e, "recording where a keyed event is failed; its key is free again after 10 s");
            }
        });
        join_all(updates).await;
    }

    /// Gives claims back: their events were not stored.
    pub async fn release(&self, claims: Vec<Claim>) {
        join_all(claims.iter().map(|claim| {
            self.bucket
                .delete_expect_revision(&claim.entry, Some(claim.revision))
        }))
        .await;
    }

    /// Lets keys go: the broker's window forgot them.
    pub async fn forget(&self, keys: Vec<(String, String)>) {
        for (subject, key) in keys {
            let draft = EventDraft {
                subject: &subject,
                key: &key,
                ..EventDraft::default()
            };
            let Ok(event) = PendingEvent::new(&draft) else {
                continue;
            };
            let Some((subject, key)) = event.encoded_key() else {
                continue;
            };
            if let Err(e) = self.bucket.delete(entry_name(subject, key)).await {
                tracing::debug!(stream = self.stream, error = %e, "forgetting a deduplication key failed; it expires with the bucket's age limit");
            }
        }
    }

    /// Whether the event stored at `position` has this subject and key.
    async fn holds(&self, position: u64, subject: &[u8], key: &[u8]) -> Result<bool, StorageError> {
        let Some(body) = body_at(&self.client, &self.stream, position).await? else {
            return Ok(false);
        };
        let json = self.sealing.open(body)?;
        Ok(JsonLayout::parse(&json)
            .and_then(|layout| {
                layout
                    .subject_and_key(&json)
                    .map(|(s, k)| (s.to_vec(), k.to_vec()))
            })
            .is_some_and(|(s, k)| s == subject && k == key))
    }
}
