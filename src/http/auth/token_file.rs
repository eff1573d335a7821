//! Optional token authentication (`--auth-file`): who may publish, subscribe, ack and read
//! metrics, in which namespaces.
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
//! Clients present a token as `Authorization: Bearer <token>` or, for browsers' EventSource
//! which cannot set headers, as the `access_token` query parameter. No token, or one not
//! in the file, is a 401; a token without the operation on the namespace is a 403. Tokens
//! are compared as SHA-256 digests, in constant time, and never logged.

use std::collections::BTreeSet;
use std::path::Path;

use axum::http::{header, HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::query::Params;
use crate::broker::Owner;

/// What a token may be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    Publish,
    Subscribe,
    Ack,
    Metrics,
    Admin,
}

impl Operation {
    fn parse(text: &str) -> Option<Operation> {
        match text {
            "publish" => Some(Operation::Publish),
            "subscribe" => Some(Operation::Subscribe),
            "ack" => Some(Operation::Ack),
            "metrics" => Some(Operation::Metrics),
            "admin" => Some(Operation::Admin),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Operation::Publish => "publish",
            Operation::Subscribe => "subscribe",
            Operation::Ack => "ack",
            Operation::Metrics => "metrics",
            Operation::Admin => "admin",
        }
    }
}

/// Which token made a request: the grant line it matched, and its identity as an owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenId {
    line: u32,
    owner: Owner,
}

impl TokenId {
    /// The token as the owner of what it opens and creates: subscriptions (only it acks
    /// their deliveries) and durable consumers (only it, or an admin, attaches to them).
    /// It is a fingerprint of the token's SHA-256, the same whether the file writes the
    /// token literally or hashed, and stays the same when the file's lines move.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }
}

#[derive(Debug)]
struct Grant {
    digest: [u8; 32],
    /// `None`: every namespace.
    namespaces: Option<BTreeSet<String>>,
    operations: BTreeSet<Operation>,
    line: u32,
}

/// The grants of an auth file.
#[derive(Debug)]
pub struct AuthTable {
    grants: Vec<Grant>,
}

impl AuthTable {
    pub fn load(path: &Path) -> Result<AuthTable, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the auth file {}: {e}", path.display()))?;
        AuthTable::parse(&text).map_err(|e| format!("auth file {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<AuthTable, String> {
        let mut grants = Vec::new();
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
            let namespaces = match namespaces {
                "*" => None,
                list => Some(
                    list.split(',')
                        .map(str::trim)
                        .filter(|n| !n.is_empty())
                        .map(str::to_owned)
                        .collect(),
                ),
            };
            let operations = operations
                .split(',')
                .map(|op| {
                    Operation::parse(op.trim()).ok_or_else(|| {
                        format!(
                            "line {number}: unknown operation {op:?}; use publish, subscribe, ack, metrics or admin"
                        )
                    })
                })
                .collect::<Result<BTreeSet<_>, _>>()?;
            grants.push(Grant {
                digest,
                namespaces,
                operations,
                line: u32::try_from(number).unwrap_or(u32::MAX),
            });
        }
        if grants.is_empty() {
            return Err("no grants: add a line `token namespaces operations`".into());
        }
        Ok(AuthTable { grants })
    }

    /// Which grant `token` matches; a 401 if none does.
    pub fn authenticate(&self, token: Option<&str>) -> Result<TokenId, ApiError> {
        let Some(token) = token else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this server requires a token: send Authorization: Bearer <token> \
                 (or ?access_token=<token> from a browser's EventSource)",
            ));
        };
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every grant is compared in full, so the time taken says nothing about the token.
        let mut found = None;
        for grant in &self.grants {
            if digests_equal(&grant.digest, &digest) && found.is_none() {
                found = Some(grant.line);
            }
        }
        let line = found.ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the token is not valid on this server",
            )
        })?;
        Ok(TokenId {
            line,
            owner: owner_of(&digest),
        })
    }

    /// A 403 unless the token's grant allows `operation` on `namespace`.
    pub fn authorize(
        &self,
        token: &TokenId,
        operation: Operation,
        namespace: Option<&str>,
    ) -> Result<(), ApiError> {
        let allowed = self.grants.iter().any(|grant| {
            grant.line == token.line
                && grant.operations.contains(&operation)
                && match (&grant.namespaces, namespace) {
                    (None, _) | (_, None) => true,
                    (Some(allowed), Some(namespace)) => allowed.contains(namespace),
                }
        });
        if allowed {
            return Ok(());
        }
        let what = match namespace {
            Some(namespace) => format!("{} in namespace {namespace:?}", operation.name()),
            None => operation.name().to_owned(),
        };
        Err(ApiError::forbidden(format!(
            "this token may not {what}; ask for a grant in the server's auth file"
        )))
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

/// The token a request presents: `Authorization: Bearer …`, else `access_token` in the
/// query string (a 400 if it is given twice).
/// The token a request presents: `Authorization: Bearer`, else the `access_token` query
/// parameter, else (with `--auth-cookie`) the cookie of that name.
pub fn presented_token(
    headers: &HeaderMap,
    params: &Params,
    cookie: Option<&str>,
) -> Result<Option<String>, ApiError> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let token = value
            .trim()
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim().to_owned());
        return Ok(token);
    }
    if let Some(token) = params.get("access_token")? {
        return Ok(Some(token.to_owned()));
    }
    Ok(cookie.and_then(|name| cookie_value(headers, name)))
}

/// The value of the first cookie called `name` in the request's `Cookie` headers
/// (RFC 6265: `name=value` pairs separated by `; `, a value optionally in double quotes).
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| {
            let value = value.trim();
            value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value)
                .to_owned()
        })
        .filter(|value| !value.is_empty())
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

    const FILE: &str = "\
# token namespaces operations
pub-token   orders,_bus_   publish
sub-token   orders         subscribe,ack   # a comment
sha256:0b8b9b9f3ef9a7b0e3a35e8a40f4d8f1d2e3a1e7c2b1f6a7f8e9d0c1b2a39485 * metrics
";

    #[test]
    fn grants_by_token_operation_and_namespace() {
        let table = AuthTable::parse(FILE).unwrap();
        let publisher = table.authenticate(Some("pub-token")).unwrap();
        let subscriber = table.authenticate(Some("sub-token")).unwrap();
        assert_ne!(publisher, subscriber);
        assert_ne!(publisher.owner(), subscriber.owner());
        assert!(table
            .authorize(&publisher, Operation::Publish, Some("orders"))
            .is_ok());
        assert!(table
            .authorize(&publisher, Operation::Publish, Some("_bus_"))
            .is_ok());
        let denied = table
            .authorize(&publisher, Operation::Publish, Some("billing"))
            .unwrap_err();
        assert_eq!(denied.status, StatusCode::FORBIDDEN);
        assert!(denied.message.contains("publish in namespace \"billing\""));
        assert!(table
            .authorize(&publisher, Operation::Subscribe, Some("orders"))
            .is_err());
        assert!(table
            .authorize(&subscriber, Operation::Ack, Some("orders"))
            .is_ok());
        for bad in [None, Some("nope"), Some("pub-token ")] {
            let denied = table.authenticate(bad).unwrap_err();
            assert_eq!(denied.status, StatusCode::UNAUTHORIZED, "{bad:?}");
        }
    }

    #[test]
    fn hashed_tokens_match_their_digest() {
        let digest: [u8; 32] = Sha256::digest(b"scraper").into();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let table = AuthTable::parse(&format!("sha256:{hex} * metrics")).unwrap();
        let id = table.authenticate(Some("scraper")).unwrap();
        assert!(table.authorize(&id, Operation::Metrics, None).is_ok());
        assert!(table.authenticate(Some(&format!("sha256:{hex}"))).is_err());
        // The same token owns the same things whether the file hashes it or not.
        let literal = AuthTable::parse("scraper * metrics").unwrap();
        let literal_id = literal.authenticate(Some("scraper")).unwrap();
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

    #[test]
    fn tokens_come_from_the_header_or_the_query() {
        use axum::http::HeaderValue;
        let query = |text| Params::parse(Some(text)).unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(
            presented_token(&headers, &query("subject=a&access_token=x%2By"), None).unwrap(),
            Some("x+y".into())
        );
        assert_eq!(
            presented_token(&headers, &query("subject=a"), None).unwrap(),
            None
        );
        let twice = presented_token(&headers, &query("access_token=a&access_token=b"), None);
        assert_eq!(twice.unwrap_err().status, StatusCode::BAD_REQUEST);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(
            presented_token(&headers, &query("access_token=x"), None).unwrap(),
            Some("abc".into())
        );
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(
            presented_token(&headers, &Params::default(), None).unwrap(),
            None
        );
    }

    #[test]
    fn with_a_cookie_name_the_token_may_come_from_that_cookie() {
        use axum::http::HeaderValue;
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("theme=dark; bus_token_x=no; bus_token=abc"),
        );
        headers.append(header::COOKIE, HeaderValue::from_static("bus_token=later"));
        let none = Params::default();
        assert_eq!(
            presented_token(&headers, &none, Some("bus_token")).unwrap(),
            Some("abc".into())
        );
        // Only when the server was told the cookie's name.
        assert_eq!(presented_token(&headers, &none, None).unwrap(), None);
        let quoted =
            HeaderMap::from_iter([(header::COOKIE, HeaderValue::from_static("bus_token=\"q\""))]);
        assert_eq!(
            presented_token(&quoted, &none, Some("bus_token")).unwrap(),
            Some("q".into())
        );
        // A header or a query parameter comes first.
        let query = Params::parse(Some("access_token=fromquery")).unwrap();
        assert_eq!(
            presented_token(&headers, &query, Some("bus_token")).unwrap(),
            Some("fromquery".into())
        );
    }
}
