//! Retention: deleting a log's oldest sealed segments when the log is too large or they
//! are too old.
//!
//! A sealed segment is judged by its last event's commit time (for segments without
//! commit times, written by older versions: their newest event's `created_at`); the
//! segment being written is never deleted. Readers find a segment gone from the list
//! before its files go; one that still holds it gets a not-found error on its next read.

use std::sync::Arc;

use super::error::StoreError;
use super::segment::Segment;
use super::shared::Shared;
use crate::timestamp::Timestamp;

/// Deletes the oldest sealed segments while the log holds more than `max_bytes` or
/// their last event was committed more than `max_age` ago (for segments without
/// commit times, written by older versions: their newest event's `created_at`); never
/// the segment being written. Returns the (first position, events) of each segment
/// deleted. Blocking.
pub(super) fn enforce_retention(
    shared: &Shared,
    max_age: Option<std::time::Duration>,
    max_bytes: Option<u64>,
) -> Result<Vec<(u64, u64)>, StoreError> {
    let segments: Vec<Arc<Segment>> = shared
        .segments
        .read()
        .map_err(|_| StoreError::Unusable("segment list lock poisoned".into()))?
        .clone();
    // Sizes are read once; each deletion subtracts what it frees.
    let mut total: u64 = match max_bytes {
        Some(_) => segments.iter().map(|s| s.disk_bytes()).sum(),
        None => 0,
    };
    let oldest_kept = max_age.map(|age| {
        Timestamp::now()
            .unix_nanos()
            .saturating_sub(i64::try_from(age.as_nanos()).unwrap_or(i64::MAX))
    });
    let mut deleted = Vec::new();
    // Never the last segment: it is the one being written.
    for oldest in segments.iter().take(segments.len().saturating_sub(1)) {
        let too_big = max_bytes.is_some_and(|max| total > max);
        let too_old = match oldest_kept {
            Some(limit) if oldest.count() > 0 => {
                let last = oldest.base + oldest.count() - 1;
                let time = shared.time_of(oldest, last)?;
                time.is_some_and(|t| t.unix_nanos() < limit)
            }
            _ => false,
        };
        if !(too_big || too_old) {
            break;
        }
        // Readers find the segment gone from the list first, then its files.
        {
            let mut list = shared
                .segments
                .write()
                .map_err(|_| StoreError::Unusable("segment list lock poisoned".into()))?;
            if list.first().map(|s| s.base) != Some(oldest.base) || list.len() < 2 {
                break;
            }
            list.remove(0);
        }
        total = total.saturating_sub(oldest.disk_bytes());
        oldest.remove_files()?;
        deleted.push((oldest.base, oldest.count()));
    }
    Ok(deleted)
}
