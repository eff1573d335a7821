//! The file store of durable consumers' progress: one JSON file per consumer,
//! `<path>/<namespace>/consumers/<name>.json`, replaced atomically (a new file written,
//! synced and renamed over the old one, then the directory synced). A [`ConsumerName`] is
//! the only thing that can name such a file, so no name from a client can reach outside
//! its namespace's directory. Every call blocks: the broker makes them from threads of its
//! own or the blocking pool, never from an async worker.

use std::path::{Path, PathBuf};

use super::api::{ConsumerStore, ErrorKind, StorageError};
use super::consumers::{ConsumerName, ConsumerProgress};

/// Progress files under a data directory, one subdirectory per namespace.
#[derive(Debug, Clone)]
pub struct FileConsumers {
    root: PathBuf,
}

impl FileConsumers {
    /// The progress of the namespaces under `root` (the store's data directory).
    pub fn new(root: impl Into<PathBuf>) -> FileConsumers {
        FileConsumers { root: root.into() }
    }

    fn dir(&self, namespace: &str) -> PathBuf {
        self.root.join(namespace).join("consumers")
    }

    fn path(&self, namespace: &str, name: &ConsumerName) -> PathBuf {
        self.dir(namespace).join(format!("{name}.json"))
    }
}

/// A failure with the file it concerns, for the server's log (never for a client).
fn failed(kind: ErrorKind, path: &Path, what: &str, cause: impl std::fmt::Display) -> StorageError {
    StorageError::new(
        kind,
        format!("consumer progress {}: {what}: {cause}", path.display()),
    )
}

fn io_failed(path: &Path, what: &str, cause: std::io::Error) -> StorageError {
    let kind = match cause.kind() {
        std::io::ErrorKind::StorageFull => ErrorKind::Full,
        _ => ErrorKind::Internal,
    };
    failed(kind, path, what, cause)
}

impl ConsumerStore for FileConsumers {
    fn load(
        &self,
        namespace: &str,
        name: &ConsumerName,
    ) -> Result<Option<ConsumerProgress>, StorageError> {
        let path = self.path(namespace, name);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| failed(ErrorKind::Corrupt, &path, "damaged", e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_failed(&path, "reading failed", e)),
        }
    }

    fn save(
        &self,
        namespace: &str,
        name: &ConsumerName,
        progress: &ConsumerProgress,
    ) -> Result<(), StorageError> {
        let dir = self.dir(namespace);
        let path = self.path(namespace, name);
        let temporary = dir.join(format!(".{name}.json.new"));
        let bytes = serde_json::to_vec(progress)
            .map_err(|e| failed(ErrorKind::Internal, &path, "encoding failed", e))?;
        let written = std::fs::create_dir_all(&dir)
            .and_then(|()| {
                let file = std::fs::File::create(&temporary)?;
                std::io::Write::write_all(&mut &file, &bytes)?;
                file.sync_data()
            })
            .and_then(|()| std::fs::rename(&temporary, &path))
            .and_then(|()| std::fs::File::open(&dir)?.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temporary);
            return Err(io_failed(&path, "saving failed", e));
        }
        Ok(())
    }

    fn remove(&self, namespace: &str, name: &ConsumerName) -> Result<(), StorageError> {
        let path = self.path(namespace, name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_failed(&path, "removing failed", e))
            }
            _ => Ok(()),
        }
    }

    fn list(&self, namespace: &str) -> Result<Vec<(ConsumerName, ConsumerProgress)>, StorageError> {
        let dir = self.dir(namespace);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_failed(&dir, "listing failed", e)),
        };
        let mut all: Vec<(ConsumerName, ConsumerProgress)> = entries
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                let name = path.file_name()?.to_str()?.strip_suffix(".json")?;
                // Only files a consumer can have written (not the temporary `.name.json.new`).
                let name = ConsumerName::parse(name).ok()?;
                match self.load(namespace, &name) {
                    Ok(progress) => Some((name, progress?)),
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring a consumer's stored progress");
                        None
                    }
                }
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_saved_listed_and_removed_per_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileConsumers::new(dir.path());
        let name = ConsumerName::parse("billing").unwrap();
        assert_eq!(store.load("orders", &name).unwrap(), None);
        let progress = ConsumerProgress {
            pattern: "orders.>".into(),
            next: 7,
            unacked: vec![3, 5],
            ..ConsumerProgress::default()
        };
        store.save("orders", &name, &progress).unwrap();
        assert_eq!(store.load("orders", &name).unwrap(), Some(progress.clone()));
        assert_eq!(store.load("app", &name).unwrap(), None, "per namespace");
        assert_eq!(
            store.list("orders").unwrap(),
            vec![(name.clone(), progress)]
        );
        assert!(store.list("app").unwrap().is_empty());
        std::fs::write(dir.path().join("orders/consumers/broken.json"), b"{").unwrap();
        let broken = ConsumerName::parse("broken").unwrap();
        assert_eq!(
            store.load("orders", &broken).unwrap_err().kind,
            ErrorKind::Corrupt
        );
        assert_eq!(
            store.list("orders").unwrap().len(),
            1,
            "the damaged one is skipped"
        );
        store.remove("orders", &name).unwrap();
        store.remove("orders", &name).unwrap();
        assert_eq!(store.load("orders", &name).unwrap(), None);
    }
}
