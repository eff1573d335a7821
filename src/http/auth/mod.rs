//! Optional authentication: who a request comes from, and whether they may do what it
//! asks. Off unless the server has credentials: a token file (`--auth-file`, see
//! [`token_file`]) and/or JWT keys (`--jwt-…`, see [`jwt`]).
//!
//! Clients present a token as `Authorization: Bearer <token>`, else as the `access_token`
//! query parameter (for browsers' EventSource, which cannot set headers), else, with
//! `--auth-cookie NAME`, in that cookie. A token shaped like a JWT (three base64url parts)
//! is verified as one when JWT keys are configured; any other is looked up in the token
//! file. No token, or one the server does not accept, is a 401 that says what to fix; a
//! token without the grant is a 403 that names the operation and what it was refused on
//! ([`grants`]: one model, subject patterns per operation, for both kinds of token).
//!
//! The credentials can be re-read while the server runs ([`Authenticator::reload`], on
//! SIGHUP and `POST /admin/reload`): a bad file leaves the old credentials in place. Each
//! reload counts a generation; an open event stream re-checks its token only when the
//! generation changed or the token's expiry passed ([`StreamAuth`]), so the check costs
//! nothing per event otherwise.
//!
//! Tokens are never logged, and neither is a request target that may hold one.

pub mod grants;
pub mod jwt;
pub mod ring_provider;
pub mod token_file;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::http::{header, HeaderMap, StatusCode};

pub use self::grants::{Grants, Operation, Target};
use self::jwt::{JwtKeys, JwtSettings};
use self::token_file::AuthTable;
use super::error::ApiError;
use super::query::Params;
use crate::broker::Owner;
use crate::reload::ReloadStep;

/// Which credentials the server reads (plain settings, from its flags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialFiles {
    /// `--auth-file`.
    pub auth_file: Option<PathBuf>,
    /// `--jwt-…`.
    pub jwt: JwtSettings,
}

impl CredentialFiles {
    /// Whether requests are to be authenticated at all.
    pub fn is_set(&self) -> bool {
        self.auth_file.is_some() || self.jwt.is_set()
    }
}

/// A token as presented, kept to authenticate it again after a reload.
#[derive(Clone, PartialEq, Eq)]
enum Presented {
    /// A token of the file, by its SHA-256.
    File([u8; 32]),
    /// A JWT, whole (it is verified again with the new keys).
    Jwt(Arc<str>),
}

/// Who made a request: the grants of the token it presented, and its identity as an owner.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenId {
    grants: Arc<Grants>,
    owner: Owner,
    /// For a JWT: the last second (Unix time) it is accepted, its `exp` plus the leeway.
    expires: Option<u64>,
    presented: Presented,
}

impl std::fmt::Debug for TokenId {
    // Never the token itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenId")
            .field("owner", &self.owner)
            .field("grants", &self.grants)
            .field("expires", &self.expires)
            .finish()
    }
}

impl TokenId {
    /// The token as the owner of what it opens and creates: subscriptions (only it acks
    /// their deliveries) and durable consumers (only it, or an admin, attaches to them).
    /// For a file token, a fingerprint of its SHA-256 (the same whether the file writes
    /// the token literally or hashed, and when the file's lines move); for a JWT, of its
    /// `iss` and `sub` (the same for a renewed token of the same subject).
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// When the token stops being accepted (Unix seconds), for a JWT.
    pub fn expires(&self) -> Option<u64> {
        self.expires
    }

    /// A 403 unless the token may do `operation` on `target`.
    pub fn authorize(&self, operation: Operation, target: Target<'_>) -> Result<(), ApiError> {
        self.grants
            .check(operation, target)
            .map_err(ApiError::forbidden)
    }
}

/// One set of credentials, as read at start-up or by a reload.
pub struct Credentials {
    table: Option<AuthTable>,
    jwt: Option<JwtKeys>,
}

impl Credentials {
    /// Reads every configured file (blocking I/O); the first error names its file.
    pub fn load(files: &CredentialFiles) -> Result<Credentials, String> {
        let table = files
            .auth_file
            .as_deref()
            .map(AuthTable::load)
            .transpose()?;
        let jwt = if files.jwt.is_set() {
            Some(JwtKeys::load(&files.jwt)?)
        } else {
            None
        };
        Ok(Credentials { table, jwt })
    }

    /// What was read, in a few words (no secrets).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(table) = &self.table {
            parts.push(format!("auth file: {} grants", table.len()));
        }
        if let Some(jwt) = &self.jwt {
            parts.push(jwt.describe());
        }
        parts.join("; ")
    }

    /// The token's identity; a 401 that says what to fix if there is none or the server
    /// does not accept it.
    pub fn authenticate(&self, token: Option<&str>) -> Result<TokenId, ApiError> {
        let unauthorized = |message: String| ApiError::new(StatusCode::UNAUTHORIZED, message);
        let Some(token) = token else {
            return Err(unauthorized(
                "this server requires a token: send Authorization: Bearer <token> \
                 (or ?access_token=<token> from a browser's EventSource)"
                    .into(),
            ));
        };
        if let Some(jwt) = &self.jwt {
            if jwt::looks_like_jwt(token) {
                let verified = jwt.verify(token).map_err(unauthorized)?;
                return Ok(TokenId {
                    grants: Arc::new(verified.grants),
                    owner: verified.owner,
                    expires: Some(verified.expires),
                    presented: Presented::Jwt(Arc::from(token)),
                });
            }
        }
        match &self.table {
            Some(table) => table.authenticate(token),
            None => Err(unauthorized(
                "the token is not a JWT (header.claims.signature, each base64url), and this \
                 server accepts only JWTs"
                    .into(),
            )),
        }
    }

    /// `token` authenticated again, with these credentials.
    fn reauthenticate(&self, token: &TokenId) -> Result<TokenId, ApiError> {
        match (&token.presented, &self.table) {
            (Presented::File(digest), Some(table)) => table.authenticate_digest(*digest),
            (Presented::File(_), None) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the token is not valid on this server",
            )),
            (Presented::Jwt(jwt), _) => self.authenticate(Some(jwt)),
        }
    }
}

/// The server's credentials, swapped whole by a reload.
pub struct Authenticator {
    files: CredentialFiles,
    current: RwLock<Arc<Credentials>>,
    /// Counts the reloads that changed the credentials.
    generation: AtomicU64,
}

impl Authenticator {
    /// Reads the credentials (blocking I/O).
    pub fn load(files: CredentialFiles) -> Result<Authenticator, String> {
        let credentials = Credentials::load(&files)?;
        Ok(Authenticator {
            files,
            current: RwLock::new(Arc::new(credentials)),
            generation: AtomicU64::new(0),
        })
    }

    /// The credentials in force.
    pub fn current(&self) -> Arc<Credentials> {
        // A poisoned lock still holds a whole `Arc` (it is only ever replaced whole).
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// How many reloads have replaced the credentials.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// See [`Credentials::authenticate`].
    pub fn authenticate(&self, token: Option<&str>) -> Result<TokenId, ApiError> {
        self.current().authenticate(token)
    }

    /// Re-reads every file (blocking I/O): the new credentials replace the old whole, or,
    /// if a file cannot be read or parsed, the old stay and the error names the file.
    pub fn reload(&self) -> Result<String, String> {
        let credentials = Credentials::load(&self.files)?;
        let described = credentials.describe();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(credentials);
        // After the swap: whoever sees the new generation reads the new credentials.
        self.generation.fetch_add(1, Ordering::Release);
        Ok(described)
    }
}

impl ReloadStep for Authenticator {
    fn name(&self) -> &'static str {
        "credentials"
    }

    fn reload(&self) -> Result<String, String> {
        Authenticator::reload(self)
    }
}

/// What an open event stream checks its token for: still accepted (not expired; after a
/// reload, still valid and still granted what the stream was opened with).
pub struct StreamAuth {
    auth: Arc<Authenticator>,
    token: TokenId,
    /// What the stream needs: each (operation, pattern or namespace) it was admitted for.
    needs: Vec<(Operation, Need)>,
    generation: u64,
}

/// An owned [`Target`], of the kinds a stream is admitted on.
enum Need {
    Pattern(String),
    Namespace(String),
}

impl StreamAuth {
    /// For a stream admitted with `token` (at `generation`, read before the token was
    /// authenticated).
    pub fn new(auth: Arc<Authenticator>, token: TokenId, generation: u64) -> StreamAuth {
        StreamAuth {
            auth,
            token,
            needs: Vec::new(),
            generation,
        }
    }

    /// The stream needs `subscribe` on `pattern`.
    pub fn needs_pattern(&mut self, operation: Operation, pattern: &str) {
        self.needs
            .push((operation, Need::Pattern(pattern.to_owned())));
    }

    /// The stream needs `operation` in `namespace`.
    pub fn needs_namespace(&mut self, operation: Operation, namespace: &str) {
        self.needs
            .push((operation, Need::Namespace(namespace.to_owned())));
    }

    /// `Ok` while the stream may go on; else why it ends (for its `error` frame). Cheap
    /// unless the token's expiry passed or the credentials were reloaded.
    pub fn check(&mut self) -> Result<(), String> {
        if let Some(expires) = self.token.expires {
            if unix_now() > expires {
                return Err("the token has expired; open the stream again with a new token".into());
            }
        }
        let generation = self.auth.generation();
        if generation == self.generation {
            return Ok(());
        }
        let token = self
            .auth
            .current()
            .reauthenticate(&self.token)
            .map_err(|e| format!("the server's credentials were reloaded: {}", e.message))?;
        for (operation, need) in &self.needs {
            let target = match need {
                Need::Pattern(pattern) => Target::Pattern(pattern),
                Need::Namespace(namespace) => Target::Namespace(namespace),
            };
            token
                .authorize(*operation, target)
                .map_err(|e| format!("the server's credentials were reloaded: {}", e.message))?;
        }
        self.token = token;
        self.generation = generation;
        // The renewed token may expire at another time: checked from the next frame on.
        Ok(())
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The token a request presents: `Authorization: Bearer`, else the `access_token` query
/// parameter (a 400 if it is given twice), else (with `--auth-cookie`) the cookie of that
/// name.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &std::path::Path, auth: Option<&str>, secret: Option<&str>) -> CredentialFiles {
        let mut files = CredentialFiles::default();
        if let Some(text) = auth {
            let path = dir.join("auth");
            std::fs::write(&path, text).unwrap();
            files.auth_file = Some(path);
        }
        if let Some(secret) = secret {
            let path = dir.join("secret");
            std::fs::write(&path, secret).unwrap();
            files.jwt.secret_file = Some(path);
        }
        files
    }

    const SECRET: &str = "an HS256 secret of at least 32 bytes, for tests\n";

    fn jwt(claims: serde_json::Value) -> String {
        ring_provider::install();
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.trim().as_bytes()).unwrap();
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
    }

    fn in_an_hour() -> u64 {
        unix_now() + 3600
    }

    #[test]
    fn jwts_and_file_tokens_side_by_side() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Authenticator::load(files(
            dir.path(),
            Some("file-token chat publish"),
            Some(SECRET),
        ))
        .unwrap();
        let by_file = auth.authenticate(Some("file-token")).unwrap();
        assert!(by_file
            .authorize(Operation::Publish, Target::Subject("chat.room2"))
            .is_ok());
        let token = jwt(serde_json::json!({
            "sub": "alice", "exp": in_an_hour(),
            "bus": {"publish": ["chat.room1"], "subscribe": ["chat.>"], "metrics": [">"]}
        }));
        let alice = auth.authenticate(Some(&token)).unwrap();
        assert!(alice
            .authorize(Operation::Publish, Target::Subject("chat.room1"))
            .is_ok());
        let refused = alice
            .authorize(Operation::Publish, Target::Subject("chat.room2"))
            .unwrap_err();
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert!(alice
            .authorize(Operation::Subscribe, Target::Pattern("chat.*.x"))
            .is_ok());
        assert!(alice.authorize(Operation::Metrics, Target::Any).is_ok());
        // A renewed token of the same subject owns the same things.
        let renewed = jwt(serde_json::json!({"sub": "alice", "exp": in_an_hour() + 60}));
        assert_ne!(renewed, token);
        assert_eq!(
            auth.authenticate(Some(&renewed)).unwrap().owner(),
            alice.owner()
        );
        let bob = jwt(serde_json::json!({"sub": "bob", "exp": in_an_hour()}));
        assert_ne!(
            auth.authenticate(Some(&bob)).unwrap().owner(),
            alice.owner()
        );
    }

    #[test]
    fn refused_jwts_say_what_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Authenticator::load(files(dir.path(), None, Some(SECRET))).unwrap();
        for (claims, expected) in [
            (
                serde_json::json!({"sub": "a", "exp": unix_now() - 3600}),
                "has expired",
            ),
            (serde_json::json!({"sub": "a"}), "no exp claim"),
            (serde_json::json!({"exp": in_an_hour()}), "no sub claim"),
            (
                serde_json::json!({"sub": "a", "exp": in_an_hour(), "nbf": in_an_hour()}),
                "not valid yet",
            ),
            (
                serde_json::json!({"sub": "a", "exp": in_an_hour(), "bus": {"pub": ["a.b"]}}),
                "unknown field `pub`",
            ),
            (
                serde_json::json!({"sub": "a", "exp": in_an_hour(), "bus": {"publish": ["a"]}}),
                "\"bus\" claim, publish",
            ),
        ] {
            let refused = auth.authenticate(Some(&jwt(claims))).unwrap_err();
            assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
            assert!(refused.message.contains(expected), "{}", refused.message);
        }
        // Within the leeway, an expired token still passes.
        let lately = jwt(serde_json::json!({"sub": "a", "exp": unix_now() - 5}));
        assert!(auth.authenticate(Some(&lately)).is_ok());
        // A token that is not a JWT, on a server with only JWT keys.
        let refused = auth.authenticate(Some("plain-token")).unwrap_err();
        assert!(
            refused.message.contains("accepts only JWTs"),
            "{}",
            refused.message
        );
    }

    #[test]
    fn a_reload_swaps_everything_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path(), Some("old-token * subscribe"), None);
        let auth = Arc::new(Authenticator::load(files.clone()).unwrap());
        let old = auth.authenticate(Some("old-token")).unwrap();
        let mut stream = StreamAuth::new(Arc::clone(&auth), old, auth.generation());
        stream.needs_pattern(Operation::Subscribe, "chat.>");
        assert!(stream.check().is_ok());

        let path = files.auth_file.clone().unwrap();
        std::fs::write(&path, "old-token * publish,delete").unwrap();
        let error = auth.reload().unwrap_err();
        assert!(
            error.contains("unknown operation") && error.contains("auth file"),
            "{error}"
        );
        assert_eq!(auth.generation(), 0);
        assert!(auth.authenticate(Some("old-token")).is_ok());

        std::fs::write(&path, "old-token * subscribe\nnew-token chat subscribe").unwrap();
        assert_eq!(auth.reload().unwrap(), "auth file: 2 grants");
        assert!(stream.check().is_ok(), "still valid, still granted");

        std::fs::write(&path, "old-token app subscribe\nnew-token chat subscribe").unwrap();
        auth.reload().unwrap();
        let ended = stream.check().unwrap_err();
        assert!(ended.contains("subscribe in namespace \"chat\""), "{ended}");

        std::fs::write(&path, "new-token chat subscribe").unwrap();
        auth.reload().unwrap();
        let revoked = auth.authenticate(Some("old-token")).unwrap_err();
        assert_eq!(revoked.status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn an_expired_jwt_ends_its_stream() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Arc::new(Authenticator::load(files(dir.path(), None, Some(SECRET))).unwrap());
        let token = jwt(serde_json::json!({"sub": "a", "exp": unix_now() - 5}));
        let mut id = auth.authenticate(Some(&token)).unwrap();
        assert_eq!(id.expires(), Some(unix_now() - 5 + jwt::LEEWAY_SECS));
        id.expires = Some(unix_now() - 1);
        let mut stream = StreamAuth::new(Arc::clone(&auth), id, auth.generation());
        assert!(stream.check().unwrap_err().contains("expired"));
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
