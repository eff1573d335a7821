//! The reference server's data on disk (ella.to/bus), read for `bus import`.
//!
//! The reference keeps one file per namespace, `<dir>/<namespace>.log`, written by its
//! storage library ella.to/immuta ([`log_file`] reads its framing); each record is one
//! event, the JSON the reference streams back for it, byte for byte. A server started
//! with a secret key seals every record with ella.to/crypto's stream encryption
//! ([`cipher`] opens it). Nothing else is stored: the reference keeps no consumer state,
//! no acknowledgements and no index on disk, and its `_bus_` inbox events (in the versions
//! that stored them) are not events `bus` stores.
//!
//! This module only reads. It knows nothing of `bus`'s own store: the import command
//! (`cli/import.rs`) turns the records into events and appends them through the store.

pub mod cipher;
pub mod log_file;

pub use self::cipher::ReferenceCipher;
pub use self::log_file::{LogEnd, LogFile, Record, ReferenceError};

/// The name of the reference's reserved inbox namespace, whose events `bus` never stores.
pub const INBOX_NAMESPACE: &str = "_bus_";

/// The namespaces of a reference data directory: the names of its `*.log` files, sorted,
/// the inbox namespace left out.
pub fn namespaces(dir: &std::path::Path) -> Result<Vec<String>, ReferenceError> {
    let io = |source| ReferenceError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(namespace) = name.strip_suffix(".log") {
            if !namespace.is_empty() && namespace != INBOX_NAMESPACE {
                names.push(namespace.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}
