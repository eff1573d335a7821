//! The token file (`--auth-file`): which tokens the server knows, and what each may do in
//! which namespaces.
//!
//! The file has one grant per line, fields separated by spaces; `#` starts a comment:
//!
//! ```text
//! # token                  namespaces        operations
//! orders-service-7f3a9c    orders            publish,ack
//! dashboard-2b81e0         orders,billing    subscribe
//! sha256:5e88489…(64 hex)  *                 publish,subscribe,ack,metrics
//! ```
//!
//! A token is given literally or as `sha256:` and the hex SHA-256 of the token, so that
//! the file need not hold secrets. `*` means every namespace; inbox subjects (`_bus_.…`,
//! request/reply and confirmations) belong to the namespace `_bus_`, which a grant lists
//! like any other (or covers with `*`). Operations: `publish` (POST), `subscribe` (GET),
//! `ack` (PUT), `metrics` (GET /metrics), `admin` (the /consumers endpoints); `/healthz`
//! and `/readyz` stay open.
//!
//! A line's namespaces become the grant patterns `ns.>` (`*`: `>`) of its operations (see
//! [`super::grants`]), so a file token and a JWT are authorized alike. A token not in the
//! file is a 401. Tokens are compared as SHA-256 digests, in constant time, and never
//! logged.

use std::path::Path;
use std::sync::Arc;

use axum::http::StatusCode;
use sha2::{Digest, Sha256};

use super::grants::{Grants, Operation, Source};
use super::{Presented, TokenId};
use crate::broker::Owner;
use crate::http::error::ApiError;

#[derive(Debug)]
struct Entry {
    digest: [u8; 32],
    grants: Arc<Grants>,
}

/// The grants of an auth file.
#[derive(Debug)]
pub struct AuthTable {
    entries: Vec<Entry>,
}

impl AuthTable {
    /// Reads and parses the file; the error names the file and the line.
    pub fn load(path: &Path) -> Result<AuthTable, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the auth file {}: {e}", path.display()))?;
        AuthTable::parse(&text).map_err(|e| format!("auth file {}: {e}", path.display()))
    }

    /// Parses the text of an auth file (see the module docs).
    pub fn parse(text: &str) -> Result<AuthTable, String> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let number = i + 1;
            let content = line.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [token, namespaces, operations] = fields[..] else {
                return Err(format!(
                    "line {number}: expected three fields, `token namespaces operations` \
                     (like `s3cret orders publish,subscribe`), found {}",
                    fields.len()
                ));
            };
            let digest = match token.strip_prefix("sha256:") {
                Some(hex) => parse_digest(hex).ok_or_else(|| {
                    format!("line {number}: sha256: must be followed by 64 hex digits")
                })?,
                None => Sha256::digest(token.as_bytes()).into(),
            };
            // A namespace is a pattern's first segment: `ns.>` covers all of it.
            let patterns: Vec<String> = match namespaces {
                "*" => vec![">".to_owned()],
                list => list
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(|n| format!("{n}.>"))
                    .collect(),
            };
            let mut grants = Grants::new(Source::TokenFile);
            for op in operations.split(',') {
                let operation = Operation::parse(op.trim()).ok_or_else(|| {
                    format!(
                        "line {number}: unknown operation {op:?}; use publish, subscribe, ack, metrics or admin"
                    )
                })?;
                for pattern in &patterns {
                    grants.add(operation, pattern).map_err(|_| {
                        format!(
                            "line {number}: {:?} is not a namespace",
                            pattern.trim_end_matches(".>")
                        )
                    })?;
                }
            }
            entries.push(Entry {
                digest,
                grants: Arc::new(grants),
            });
        }
        if entries.is_empty() {
            return Err("no grants: add a line `token namespaces operations`".into());
        }
        Ok(AuthTable { entries })
    }

    /// How many grant lines the file has.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the file has no grants (never, once parsed).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The token of the file that `token` is; a 401 if none.
    pub fn authenticate(&self, token: &str) -> Result<TokenId, ApiError> {
        self.authenticate_digest(Sha256::digest(token.as_bytes()).into())
    }

    /// As [`AuthTable::authenticate`], from the token's SHA-256.
    pub(super) fn authenticate_digest(&self, digest: [u8; 32]) -> Result<TokenId, ApiError> {
        // Every grant is compared in full, so the time taken says nothing about the token.
        let mut found = None;
        for entry in &self.entries {
            if digests_equal(&entry.digest, &digest) && found.is_none() {
                found = Some(&entry.grants);
            }
        }
        let grants = found.ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the token is not valid on this server",
            )
        })?;
        Ok(TokenId {
            grants: Arc::clone(grants),
            owner: owner_of(&digest),
            expires: None,
            presented: Presented::File(digest),
        })
    }
}

/// A token's identity as an owner: 16 hex digits of a hash of its SHA-256 (with a label of
/// its own, so that it is not the `sha256:` form an auth file may hold).
fn owner_of(digest: &[u8; 32]) -> Owner {
    let mut hasher = Sha256::new();
    hasher.update(b"bus token owner\0");
    hasher.update(digest);
    let fingerprint: String = hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Owner(fingerprint)
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(digest)
}

/// Compares two digests without stopping at the first difference.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::auth::Target;

    const FILE: &str = "\
# token namespaces operations
pub-token   orders,_bus_   publish
sub-token   orders         subscribe,ack   # a comment
sha256:0b8b9b9f3ef9a7b0e3a35e8a40f4d8f1d2e3a1e7c2b1f6a7f8e9d0c1b2a39485 * metrics
";

    #[test]
    fn grants_by_token_operation_and_namespace() {
        let table = AuthTable::parse(FILE).unwrap();
        let publisher = table.authenticate("pub-token").unwrap();
        let subscriber = table.authenticate("sub-token").unwrap();
        assert_ne!(publisher, subscriber);
        assert_ne!(publisher.owner(), subscriber.owner());
        assert!(publisher
            .authorize(Operation::Publish, Target::Subject("orders.a"))
            .is_ok());
        assert!(publisher
            .authorize(Operation::Publish, Target::Subject("_bus_.inbox"))
            .is_ok());
        let denied = publisher
            .authorize(Operation::Publish, Target::Subject("billing.a"))
            .unwrap_err();
        assert_eq!(denied.status, StatusCode::FORBIDDEN);
        assert!(denied.message.contains("publish in namespace \"billing\""));
        assert!(publisher
            .authorize(Operation::Subscribe, Target::Pattern("orders.>"))
            .is_err());
        assert!(subscriber
            .authorize(Operation::Ack, Target::Namespace("orders"))
            .is_ok());
        assert!(subscriber
            .authorize(Operation::Subscribe, Target::Pattern("orders.*.x"))
            .is_ok());
        for bad in ["nope", "pub-token "] {
            let denied = table.authenticate(bad).unwrap_err();
            assert_eq!(denied.status, StatusCode::UNAUTHORIZED, "{bad:?}");
        }
    }

    #[test]
    fn hashed_tokens_match_their_digest() {
        let digest: [u8; 32] = Sha256::digest(b"scraper").into();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let table = AuthTable::parse(&format!("sha256:{hex} * metrics")).unwrap();
        let id = table.authenticate("scraper").unwrap();
        assert!(id.authorize(Operation::Metrics, Target::Any).is_ok());
        assert!(table.authenticate(&format!("sha256:{hex}")).is_err());
        // The same token owns the same things whether the file hashes it or not.
        let literal = AuthTable::parse("scraper * metrics").unwrap();
        let literal_id = literal.authenticate("scraper").unwrap();
        assert_eq!(literal_id.owner(), id.owner());
        assert!(!id.owner().0.contains(&hex[..16]));
    }

    #[test]
    fn bad_files_name_the_line() {
        for (text, expected) in [
            ("a b", "line 1: expected three fields"),
            (
                "\n\nt ns publish,delete",
                "line 3: unknown operation \"delete\"",
            ),
            ("sha256:abc * publish", "line 1: sha256: must be followed"),
            ("# nothing\n", "no grants"),
        ] {
            let error = AuthTable::parse(text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}
