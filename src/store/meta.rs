//! `meta.json`, the small per-namespace file that says which id generations the log has
//! used and whether it was closed cleanly.
//!
//! It is rewritten atomically (write a temporary file, sync it, rename it over the old one,
//! sync the directory), so a crash leaves either the old or the new version. The log marks
//! itself unclean when it opens and clean, with its event count, when it closes; finding
//! it unclean at the next open means the process did not shut down properly.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{IoContext, StoreError};
use super::ids;

pub const META_FILE: &str = "meta.json";
const FORMAT: u32 = 1;

/// Ids of generation `id` are valid for positions from `first` up to the next
/// generation's `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    pub id: u64,
    pub first: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Sorted by `first`, strictly increasing.
    pub generations: Vec<Generation>,
    /// `Some(number of events)` if the log was closed cleanly.
    pub clean_end: Option<u64>,
    /// Of an encrypted log: a constant sealed with its key (see
    /// [`super::cipher::Cipher::key_check`]).
    pub key_check: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct MetaFile {
    format: u32,
    generations: Vec<GenerationFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    clean_end: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_check: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct GenerationFile {
    id: String,
    first: u64,
}

impl Meta {
    pub fn read(dir: &Path) -> Result<Option<Meta>, StoreError> {
        let path = dir.join(META_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(format!("reading {}", path.display()), e)),
        };
        let bad = |reason: String| StoreError::corrupt(&path, 0, reason);
        let file: MetaFile =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid metadata: {e}")))?;
        if file.format != FORMAT {
            return Err(bad(format!(
                "format {} is not supported by this version (expected {FORMAT})",
                file.format
            )));
        }
        let mut generations = Vec::with_capacity(file.generations.len());
        for g in &file.generations {
            let id = ids::parse_generation(&g.id)
                .ok_or_else(|| bad(format!("invalid generation id {:?}", g.id)))?;
            if generations
                .last()
                .is_some_and(|prev: &Generation| prev.first >= g.first)
            {
                return Err(bad("generations are not in increasing order".into()));
            }
            generations.push(Generation { id, first: g.first });
        }
        if generations.is_empty() {
            return Err(bad("no generations".into()));
        }
        Ok(Some(Meta {
            generations,
            clean_end: file.clean_end,
            key_check: file.key_check,
        }))
    }

    pub fn write(&self, dir: &Path) -> Result<(), StoreError> {
        let file = MetaFile {
            format: FORMAT,
            generations: self
                .generations
                .iter()
                .map(|g| GenerationFile {
                    id: ids::generation_text(g.id),
                    first: g.first,
                })
                .collect(),
            clean_end: self.clean_end,
            key_check: self.key_check.clone(),
        };
        let mut text = serde_json::to_vec_pretty(&file)
            .map_err(|e| StoreError::Unusable(format!("encoding metadata: {e}")))?;
        text.push(b'\n');
        write_atomically(&dir.join(META_FILE), &text)
    }

    /// Starts a new generation at `first`. Generations that began at or after `first`
    /// covered only positions that are gone, so their ids must stop resolving.
    pub fn start_generation(&mut self, id: u64, first: u64) {
        self.generations.retain(|g| g.first < first);
        self.generations.push(Generation { id, first });
    }

    /// The generation whose id is `id`, with the range of positions it covers.
    pub fn generation_range(&self, id: u64) -> Option<std::ops::Range<u64>> {
        let i = self.generations.iter().position(|g| g.id == id)?;
        let end = self
            .generations
            .get(i + 1)
            .map_or(u64::MAX, |next| next.first);
        Some(self.generations[i].first..end)
    }

    /// The generation that was current when `position` was written.
    pub fn generation_of(&self, position: u64) -> u64 {
        self.generations
            .iter()
            .rev()
            .find(|g| g.first <= position)
            .unwrap_or(&self.generations[0])
            .id
    }

    pub fn current_generation(&self) -> u64 {
        self.generations.last().map_or(0, |g| g.id)
    }
}

/// Replaces `path` with `contents` so that a crash leaves either the old or the new file.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    let tmp: PathBuf = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp).context(|| format!("creating {}", tmp.display()))?;
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .context(|| format!("writing {}", tmp.display()))
        .and_then(|()| {
            fs::rename(&tmp, path)
                .context(|| format!("renaming {} to {}", tmp.display(), path.display()))
        });
    if written.is_err() {
        // A full disk, say: leave nothing half written behind.
        let _ = fs::remove_file(&tmp);
    }
    written?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Makes a directory's entries (created, renamed files) durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .context(|| format!("syncing directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_generation_ranges() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Meta::read(dir.path()).unwrap(), None);
        let mut meta = Meta {
            generations: vec![Generation { id: 5, first: 0 }],
            clean_end: None,
            key_check: None,
        };
        meta.start_generation(9, 100);
        meta.start_generation(11, 150);
        // A crash lost positions from 120 on: generation 11 never produced a kept event.
        meta.start_generation(13, 120);
        assert_eq!(
            meta.generations,
            vec![
                Generation { id: 5, first: 0 },
                Generation { id: 9, first: 100 },
                Generation { id: 13, first: 120 }
            ]
        );
        assert_eq!(meta.generation_range(9), Some(100..120));
        assert_eq!(meta.generation_range(11), None);
        assert_eq!(meta.generation_of(119), 9);
        assert_eq!(meta.generation_of(500), 13);
        meta.clean_end = Some(321);
        meta.write(dir.path()).unwrap();
        assert_eq!(Meta::read(dir.path()).unwrap(), Some(meta));
    }

    #[test]
    fn damaged_metadata_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(META_FILE), "{not json").unwrap();
        let err = Meta::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains(META_FILE), "{err}");
    }
}
