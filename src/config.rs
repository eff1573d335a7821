//! Server settings: command-line flags, each with a `BUS_*` environment variable.
//!
//! Precedence: an explicit flag beats the environment, which beats the default. Values
//! are checked here, before anything is opened, so that a typo fails at start-up with a
//! message naming the setting.

use std::path::PathBuf;
use std::time::Duration;

use axum::http::HeaderValue;
use clap::{Args, Parser};

use crate::broker::BrokerConfig;
use crate::duration::parse_go_duration;
use crate::store::cipher::DEFAULT_BLOCK_SIZE;
use crate::store::jetstream::JetStreamConfig;
use crate::store::{Cipher, FsyncPolicy, StoreConfig};
use crate::units::{parse_duration, parse_size};

/// Settings of `bus server`.
#[derive(Debug, Clone, Args)]
pub struct ServerConfig {
    /// Address to listen on (`host:port`; `:2021` means all interfaces).
    #[arg(long, env = "BUS_ADDR", default_value = "0.0.0.0:2021")]
    pub addr: String,

    /// Data directory; each namespace keeps its log in a subdirectory.
    #[arg(long, env = "BUS_PATH", default_value = "./bus_data")]
    pub path: PathBuf,

    /// Namespaces to serve, comma-separated. The namespace is the first segment of a
    /// subject (`orders` in `orders.created`); every namespace must be declared.
    #[arg(long, env = "BUS_NAMESPACES", value_delimiter = ',', required = true)]
    pub namespaces: Vec<String>,

    /// Where events are kept: `file` (a log per namespace in --path, the default) or
    /// `jetstream` (a NATS JetStream stream per namespace, see --nats-url).
    #[arg(long, env = "BUS_STORE", default_value = "file")]
    pub store: StoreKind,

    /// With --store jetstream: the NATS servers to connect to (comma-separated URLs).
    #[arg(long, env = "BUS_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,

    /// With --store jetstream: copies JetStream keeps of each namespace's stream (1, 3 or 5;
    /// more than 1 needs a JetStream cluster).
    #[arg(long, env = "BUS_JETSTREAM_REPLICAS", default_value_t = 1, value_parser = parse_replicas)]
    pub jetstream_replicas: usize,

    /// With --store jetstream: a token to authenticate to NATS with.
    #[arg(long, env = "BUS_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,

    /// With --store jetstream: a NATS credentials file (JWT and seed) to authenticate with.
    #[arg(long, env = "BUS_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,

    /// The name this server goes by: the `node` label of every metric and a field of its
    /// start-up log, to tell the nodes of one JetStream apart. Default: the host name.
    #[arg(long, env = "BUS_NODE_NAME")]
    pub node_name: Option<String>,

    /// When appends reach the disk: `always` (acknowledged only once synced),
    /// `interval=<duration>` (synced at least that often) or `never` (left to the OS).
    #[arg(long, env = "BUS_FSYNC", default_value = "always")]
    pub fsync: FsyncPolicy,

    /// Size at which a log segment is sealed and a new one started (bytes, or with a
    /// KiB/MiB/GiB suffix).
    #[arg(long, env = "BUS_SEGMENT_SIZE", default_value = "128MiB", value_parser = parse_size)]
    pub segment_size: u64,

    /// Memory each namespace keeps for its most recent events, so that live subscribers
    /// never read the disk (bytes, or with a KiB/MiB/GiB suffix).
    #[arg(long, env = "BUS_TAIL_SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub tail_size: u64,

    /// Keys remembered per subject to reject duplicate publishes (0 turns it off).
    #[arg(long, env = "BUS_DUP_SIZE", default_value_t = 1000)]
    pub dup_size: usize,

    /// How long a key is remembered (a duration like 10m; 0 means until pushed out).
    #[arg(long, env = "BUS_DUP_TTL", default_value = "0", value_parser = parse_duration)]
    pub dup_ttl: Duration,

    /// Memory the deduplication window may use across all subjects (bytes, or with a
    /// KiB/MiB/GiB suffix); beyond it the oldest keys of any subject are forgotten first.
    #[arg(long, env = "BUS_DUP_MEMORY", default_value = "64MiB", value_parser = parse_size)]
    pub dup_memory: u64,

    /// Longest deduplication key accepted, in bytes; a longer one is answered 400.
    #[arg(long, env = "BUS_MAX_KEY_LEN", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_key_len: u32,

    /// Most events in one batch; a larger batch is answered 413.
    #[arg(long, env = "BUS_MAX_BATCH", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch: u32,

    /// Memory the server may use (bytes, or with a KiB/MiB/GiB suffix); beyond it new
    /// publishes and subscriptions are answered 503 with `Retry-After` until memory is
    /// freed. `auto`: half of the machine's memory, or of the container's limit.
    #[arg(long, env = "BUS_MAX_MEMORY", default_value = "auto", value_parser = parse_memory_budget)]
    pub max_memory: MemoryLimit,

    /// Durable consumers a namespace may have; creating one more is answered 409.
    #[arg(long, env = "BUS_MAX_CONSUMERS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_consumers: u32,

    /// Durable consumers one token may own (with --auth-file); creating one more is
    /// answered 409.
    #[arg(long, env = "BUS_MAX_CONSUMERS_PER_TOKEN", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_consumers_per_token: u32,

    /// Bytes of unacknowledged events one manual-ack connection may hold, whatever its
    /// `max_inflight` (at least one event is always delivered).
    #[arg(long, env = "BUS_MAX_INFLIGHT_BYTES", default_value = "16MiB", value_parser = parse_size)]
    pub max_inflight_bytes: u64,

    /// Interval of the `: ping` keep-alive comment on event streams.
    #[arg(long, env = "BUS_PING_INTERVAL", default_value = "30s", value_parser = parse_positive_duration)]
    pub ping_interval: Duration,

    /// Encrypt the data files with this secret (XSalsa20-Poly1305, key = SHA-256 of the
    /// secret). A data directory must always be opened with the key it was written with.
    #[arg(long, env = "BUS_SECRET_KEY", hide_env_values = true)]
    pub secret_key: Option<String>,

    /// Plaintext bytes sealed together when encrypting (256 to 1048576).
    #[arg(long, env = "BUS_BLOCK_SIZE", default_value_t = DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,

    /// Largest request body accepted (bytes, or with a KiB/MiB/GiB suffix, at most
    /// 2147483647 bytes); a larger one is answered 413.
    #[arg(long, env = "BUS_MAX_BODY", default_value = "8MiB", value_parser = parse_max_body)]
    pub max_body: u64,

    /// Longest subject or subject pattern accepted, in bytes (1 to 65535); a longer one is
    /// answered 400.
    #[arg(long, env = "BUS_MAX_SUBJECT_LEN", default_value_t = 1024, value_parser = parse_max_subject_len)]
    pub max_subject_len: u32,

    /// Connections served at once; beyond it a new connection is answered 503 with
    /// `Retry-After` and closed.
    #[arg(long, env = "BUS_MAX_CONNECTIONS", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Event streams open at once; beyond it a subscription is answered 503 with
    /// `Retry-After`.
    #[arg(long, env = "BUS_MAX_SUBSCRIPTIONS", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_subscriptions: u32,

    /// A connection that has not sent a whole request head for this long is closed: an
    /// idle keep-alive connection, or a client sending its head too slowly.
    #[arg(long, env = "BUS_IDLE_TIMEOUT", default_value = "2m", value_parser = parse_positive_duration)]
    pub idle_timeout: Duration,

    /// File of tokens and what each may do (see HTTP_API.md); without it the server is
    /// open to anyone who can reach it, as the reference.
    #[arg(long, env = "BUS_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,

    /// Also accept a token from this cookie (for browsers: EventSource with
    /// `withCredentials`, no token in the URL); needs --auth-file or a --jwt-… key.
    #[arg(long, env = "BUS_AUTH_COOKIE", value_parser = parse_cookie_name)]
    pub auth_cookie: Option<String>,

    /// Accept JWTs signed with HS256 (or HS384/HS512) with the secret in this file (its
    /// content, surrounding whitespace trimmed; at least 32 bytes).
    #[arg(long, env = "BUS_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// Accept JWTs signed with the private key of this PEM public key: RSA (RS256…, PS256…),
    /// EC P-256 (ES256) or P-384 (ES384), Ed25519 (EdDSA); the algorithm follows the key.
    #[arg(long, env = "BUS_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// Accept JWTs signed with a key of this JWKS file (`{"keys":[…]}`), chosen by the
    /// token's `kid`.
    #[arg(long, env = "BUS_JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,

    /// With JWTs: their `aud` must contain this.
    #[arg(long, env = "BUS_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// With JWTs: their `iss` must be this.
    #[arg(long, env = "BUS_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Origins whose browser pages may use the server, comma-separated
    /// (`https://app.example.com`), or `*` for any.
    #[arg(
        long,
        env = "BUS_CORS_ORIGINS",
        value_delimiter = ',',
        default_value = "*"
    )]
    pub cors_origins: Vec<String>,

    /// Keep events for at least this long, then delete them with their sealed segment: a
    /// duration (`72h`) for every namespace and/or `namespace:duration` overrides,
    /// comma-separated. Unset: keep everything.
    #[arg(long, env = "BUS_RETENTION_AGE", value_delimiter = ',')]
    pub retention_age: Vec<String>,

    /// Keep at most about this many bytes per namespace, deleting the oldest sealed
    /// segments: a size (`10GiB`) and/or `namespace:size` overrides, comma-separated.
    #[arg(long, env = "BUS_RETENTION_BYTES", value_delimiter = ',')]
    pub retention_bytes: Vec<String>,

    /// How often retention limits are enforced.
    #[arg(long, env = "BUS_RETENTION_INTERVAL", default_value = "1m", value_parser = parse_positive_duration)]
    pub retention_interval: Duration,

    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs --tls-key.
    #[arg(long, env = "BUS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "BUS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Time allowed to receive a request's body once its head has arrived; a slower one
    /// is answered 408.
    #[arg(long, env = "BUS_BODY_TIMEOUT", default_value = "1m", value_parser = parse_positive_duration)]
    pub body_timeout: Duration,

    /// Log one line per answered request (target `bus::access`, at INFO): method, route,
    /// status, body bytes, duration, namespace; never a token or the query string. An
    /// event stream's line is written when it ends. BUS_ACCESS_LOG takes true/false, 1/0,
    /// yes/no, on/off.
    #[arg(
        long,
        env = "BUS_ACCESS_LOG",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub access_log: bool,

    /// Do not serve the web console (`/console`: a page of the namespaces, live events,
    /// publishing and durable consumers); `/console…` is then a 404. BUS_NO_CONSOLE takes
    /// true/false, 1/0, yes/no, on/off.
    #[arg(
        long,
        env = "BUS_NO_CONSOLE",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub no_console: bool,
}

impl ServerConfig {
    /// Parses server flags as `bus server` would (environment variables included).
    pub fn from_args<I, T>(args: I) -> Result<ServerConfig, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(Parser)]
        struct Command {
            #[command(flatten)]
            config: ServerConfig,
        }
        let args = std::iter::once(std::ffi::OsString::from("bus-server"))
            .chain(args.into_iter().map(Into::into));
        Command::try_parse_from(args).map(|c| c.config)
    }

    /// The store's settings; fails on an unusable block size.
    pub fn store_config(&self) -> Result<StoreConfig, String> {
        let cipher = match self.secret_key.as_deref() {
            None | Some("") => None,
            Some(secret) => Some(
                Cipher::new(secret, self.block_size)
                    .map_err(|e| format!("--secret-key/--block-size: {e}"))?,
            ),
        };
        Ok(StoreConfig {
            path: self.path.clone(),
            segment_size: self.segment_size,
            fsync: self.fsync,
            tail_bytes: usize::try_from(self.tail_size).unwrap_or(usize::MAX),
            cipher,
        })
    }

    /// The node's name: `--node-name`, else the host name (`bus` if it has none).
    pub fn node_name(&self) -> String {
        match self.node_name.as_deref().map(str::trim) {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => host_name().unwrap_or_else(|| "bus".to_owned()),
        }
    }

    /// How to reach JetStream, with `--store jetstream`.
    pub fn jetstream_config(&self) -> JetStreamConfig {
        JetStreamConfig {
            url: self.nats_url.clone(),
            replicas: self.jetstream_replicas,
            token: self.nats_token.clone().filter(|t| !t.is_empty()),
            creds: self.nats_creds.clone(),
        }
    }

    /// The retention limits, checked against the declared namespaces.
    pub fn retention(&self) -> Result<Retention, String> {
        let namespaces = self.namespaces();
        Ok(Retention {
            age: PerNamespace::parse(
                "--retention-age",
                &self.retention_age,
                &namespaces,
                |text| match parse_go_duration(text) {
                    Ok(d) if !d.is_zero() => Ok(d),
                    Ok(_) => Err("must be greater than zero".into()),
                    Err(e) => Err(e.to_string()),
                },
            )?,
            bytes: PerNamespace::parse(
                "--retention-bytes",
                &self.retention_bytes,
                &namespaces,
                parse_size,
            )?,
            interval: self.retention_interval,
        })
    }

    /// The allowed CORS origins; `None` for any.
    pub fn cors_origins(&self) -> Result<Option<Vec<HeaderValue>>, String> {
        let origins: Vec<&str> = self
            .cors_origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/'))
            .filter(|o| !o.is_empty())
            .collect();
        if origins.is_empty() || origins.contains(&"*") {
            return Ok(None);
        }
        origins
            .iter()
            .map(|origin| {
                let valid = (origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin[origin.find("://").unwrap_or(0) + 3..].contains('/');
                if !valid {
                    return Err(format!(
                        "--cors-origins: {origin:?} is not an origin; write scheme://host[:port], like https://app.example.com"
                    ));
                }
                HeaderValue::from_str(origin)
                    .map_err(|_| format!("--cors-origins: {origin:?} is not a valid header value"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    pub fn broker_config(&self) -> BrokerConfig {
        BrokerConfig {
            dup_size: self.dup_size,
            dup_ttl: (!self.dup_ttl.is_zero()).then_some(self.dup_ttl),
            dup_memory: usize::try_from(self.dup_memory).unwrap_or(usize::MAX),
            max_key_len: self.max_key_len as usize,
            max_consumers: self.max_consumers as usize,
            max_consumers_per_owner: self.max_consumers_per_token as usize,
            max_inflight_bytes: usize::try_from(self.max_inflight_bytes).unwrap_or(usize::MAX),
        }
    }

    /// The listening address with Go's `:port` shorthand expanded.
    pub fn listen_addr(&self) -> String {
        match self.addr.strip_prefix(':') {
            Some(port) => format!("0.0.0.0:{port}"),
            None => self.addr.clone(),
        }
    }

    /// The authentication flags, checked together: `--auth-cookie`, `--jwt-audience` and
    /// `--jwt-issuer` mean nothing without credentials to go with them.
    pub fn check_auth_flags(&self) -> Result<(), String> {
        let jwt = self.jwt_secret_file.is_some()
            || self.jwt_public_key.is_some()
            || self.jwt_jwks.is_some();
        if self.auth_cookie.is_some() && !jwt && self.auth_file.is_none() {
            return Err("--auth-cookie needs tokens to read: add --auth-file or a JWT key (--jwt-secret-file, --jwt-public-key, --jwt-jwks)".into());
        }
        for (flag, set) in [
            ("--jwt-audience", self.jwt_audience.is_some()),
            ("--jwt-issuer", self.jwt_issuer.is_some()),
        ] {
            if set && !jwt {
                return Err(format!(
                    "{flag} checks JWTs: add a key to verify them (--jwt-secret-file, --jwt-public-key or --jwt-jwks)"
                ));
            }
        }
        Ok(())
    }

    /// The declared namespaces, trimmed, without empty entries (`a,,b` or a trailing comma).
    pub fn namespaces(&self) -> Vec<String> {
        self.namespaces
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect()
    }
}

/// Retention limits by age and by size, each with per-namespace overrides.
#[derive(Debug, Clone, Default)]
pub struct Retention {
    pub age: PerNamespace<Duration>,
    pub bytes: PerNamespace<u64>,
    pub interval: Duration,
}

impl Retention {
    pub fn is_set(&self) -> bool {
        self.age.is_set() || self.bytes.is_set()
    }
}

/// A setting with a default and per-namespace overrides (`value,ns:value,…`).
#[derive(Debug, Clone)]
pub struct PerNamespace<T> {
    default: Option<T>,
    overrides: std::collections::HashMap<String, T>,
}

impl<T> Default for PerNamespace<T> {
    fn default() -> Self {
        PerNamespace {
            default: None,
            overrides: std::collections::HashMap::new(),
        }
    }
}

impl<T: Copy> PerNamespace<T> {
    fn parse(
        flag: &str,
        items: &[String],
        namespaces: &[String],
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<PerNamespace<T>, String> {
        let mut setting = PerNamespace::default();
        for item in items.iter().map(|i| i.trim()).filter(|i| !i.is_empty()) {
            match item.split_once(':') {
                Some((namespace, value)) => {
                    let namespace = namespace.trim();
                    if !namespaces.iter().any(|n| n == namespace) {
                        return Err(format!(
                            "{flag}: {namespace:?} is not a declared namespace ({})",
                            namespaces.join(", ")
                        ));
                    }
                    let value = parse(value.trim()).map_err(|e| format!("{flag} {item}: {e}"))?;
                    setting.overrides.insert(namespace.to_owned(), value);
                }
                None => {
                    if setting.default.is_some() {
                        return Err(format!("{flag}: more than one value without a namespace"));
                    }
                    setting.default = Some(parse(item).map_err(|e| format!("{flag} {item}: {e}"))?);
                }
            }
        }
        Ok(setting)
    }

    /// The value for `namespace`: its override, else the default.
    pub fn get(&self, namespace: &str) -> Option<T> {
        self.overrides.get(namespace).copied().or(self.default)
    }

    pub fn is_set(&self) -> bool {
        self.default.is_some() || !self.overrides.is_empty()
    }
}

/// `--max-body`: a size no larger than one event's record can be (its length field has
/// 31 bits), so that a body the server accepts is never one it cannot store.
fn parse_max_body(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    let max = crate::store::segment::MAX_BODY_LEN as u64;
    if size > max {
        return Err(format!(
            "{text:?} is too large: at most {max} bytes (2 GiB minus one byte), the largest event the log can store"
        ));
    }
    Ok(size)
}

/// `--max-subject-len`: 1 to 65535, the longest subject a stored event can hold (its
/// length is kept in 16 bits).
fn parse_max_subject_len(text: &str) -> Result<u32, String> {
    let max = crate::event::MAX_SUBJECT_LEN;
    let digits = text.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} is not a number of bytes (1 to {max})"));
    }
    match digits.parse::<u32>() {
        Ok(len) if (1..=max).contains(&(len as usize)) => Ok(len),
        _ => Err(format!(
            "{text:?} is out of range: use 1 to {max} bytes (the longest subject an event can be stored with)"
        )),
    }
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_go_duration(text) {
        Ok(d) if d.is_zero() => Err("must be greater than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// `--store`: where events are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// A log per namespace in the data directory.
    File,
    /// A NATS JetStream stream per namespace.
    Jetstream,
}

fn parse_replicas(text: &str) -> Result<usize, String> {
    match text.trim() {
        "1" => Ok(1),
        "3" => Ok(3),
        "5" => Ok(5),
        _ => Err(format!(
            "{text:?}: JetStream keeps 1, 3 or 5 copies of a stream"
        )),
    }
}

/// `--max-memory`: decided from the machine at start-up, or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLimit {
    Auto,
    Bytes(u64),
}

fn parse_memory_budget(text: &str) -> Result<MemoryLimit, String> {
    match text.trim() {
        "auto" | "" => Ok(MemoryLimit::Auto),
        size => match parse_size(size)? {
            0 => Err("must be greater than zero (or auto)".into()),
            bytes => Ok(MemoryLimit::Bytes(bytes)),
        },
    }
}

/// The machine's host name (`gethostname`, a system call: no file read).
fn host_name() -> Option<String> {
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most `name.len()` bytes into the buffer it is given.
    let written = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) };
    if written != 0 {
        return None;
    }
    let end = name.iter().position(|&b| b == 0)?;
    let name = std::str::from_utf8(&name[..end]).ok()?.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// A cookie name as RFC 6265 allows it: an HTTP token.
fn parse_cookie_name(text: &str) -> Result<String, String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if text.is_empty() || !text.bytes().all(token) {
        return Err(format!(
            "{text:?} is not a cookie name: use letters, digits and !#$%&'*+-.^_`|~, like bus_token"
        ));
    }
    Ok(text.to_owned())
}
