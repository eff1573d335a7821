//! Reaching JetStream: the connection, the names of what the store keeps there, and the
//! requests every part of the store makes.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::store::api::{ErrorKind, StorageError};

/// How a node reaches JetStream.
#[derive(Debug, Clone)]
pub struct JetStreamConfig {
    /// `nats://host:port`, or several separated by commas.
    pub url: String,
    /// Copies of each stream and bucket JetStream keeps (1, 3 or 5).
    pub replicas: usize,
    /// A token to authenticate with.
    pub token: Option<String>,
    /// A credentials file (JWT and NKey seed) to authenticate with.
    pub creds: Option<std::path::PathBuf>,
}

/// How long a request to JetStream may take before the operation fails as unavailable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A failure to reach JetStream for `what`.
pub fn unavailable(what: &str, cause: impl std::fmt::Display) -> StorageError {
    StorageError::new(
        ErrorKind::Unavailable,
        format!("JetStream: {what}: {cause}"),
    )
}

/// The stream that holds a namespace's log.
pub fn stream_name(namespace: &str) -> String {
    format!("BUS_{namespace}")
}

/// Connects to NATS and opens JetStream.
pub async fn connect(
    config: &JetStreamConfig,
) -> Result<(async_nats::Client, jetstream::Context), StorageError> {
    let mut options = async_nats::ConnectOptions::new()
        .name("bus")
        .retry_on_initial_connect()
        .request_timeout(Some(REQUEST_TIMEOUT));
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(creds) = &config.creds {
        options = options
            .credentials_file(creds)
            .await
            .map_err(|e| unavailable(&format!("reading {}", creds.display()), e))?;
    }
    let servers = server_addrs(&config.url)?;
    let client = tokio::time::timeout(REQUEST_TIMEOUT, options.connect(servers))
        .await
        .map_err(|_| unavailable(&format!("connecting to {}", config.url), "timed out"))?
        .map_err(|e| unavailable(&format!("connecting to {}", config.url), e))?;
    let context = jetstream::new(client.clone());
    Ok((client, context))
}

/// The servers of `--nats-url`: URLs separated by commas (the client tries each, and
/// moves to another when the one it uses goes away).
fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>, StorageError> {
    let servers = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<async_nats::ServerAddr>().map_err(|e| {
                StorageError::new(
                    ErrorKind::Internal,
                    format!("--nats-url: {url:?} is not a NATS server URL (nats://host:port): {e}"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err(StorageError::new(
            ErrorKind::Internal,
            "--nats-url names no server; give nats://host:port, or several separated by commas",
        ));
    }
    Ok(servers)
}

/// A key-value bucket, created with `replicas` copies if it does not exist, whose entries
/// expire after `max_age` (never if zero), kept on disk or in memory (`storage`).
pub async fn open_bucket(
    context: &jetstream::Context,
    name: &str,
    replicas: usize,
    max_age: Duration,
    storage: stream::StorageType,
) -> Result<kv::Store, StorageError> {
    match context.get_key_value(name).await {
        Ok(bucket) => Ok(bucket),
        Err(_) => context
            .create_key_value(kv::Config {
                bucket: name.to_owned(),
                history: 1,
                max_age,
                num_replicas: replicas,
                storage,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(&format!("creating bucket {name}"), e)),
    }
}

/// A header of a message, as a number.
pub fn header_u64(message: &async_nats::Message, name: &str) -> Option<u64> {
    message.headers.as_ref()?.get(name)?.as_str().parse().ok()
}

/// The body of the message at `position` of `stream` (sequence `position + 1`), if there
/// is one.
pub async fn body_at(
    client: &async_nats::Client,
    stream: &str,
    position: u64,
) -> Result<Option<Bytes>, StorageError> {
    let messages = direct_get(client, stream, serde_json::json!({ "seq": position + 1 })).await?;
    Ok(messages
        .into_iter()
        .next()
        .filter(|message| header_u64(message, "Nats-Sequence") == Some(position + 1))
        .map(|message| message.payload))
}

/// A direct get from `stream`; the messages it answers with, none when there are none.
pub async fn direct_get(
    client: &async_nats::Client,
    stream: &str,
    request: serde_json::Value,
) -> Result<Vec<async_nats::Message>, StorageError> {
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| unavailable("subscribing to a read's answers", e))?;
    client
        .publish_with_reply(
            format!("$JS.API.DIRECT.GET.{stream}"),
            inbox,
            Bytes::from(request.to_string()),
        )
        .await
        .map_err(|e| unavailable("asking for events", e))?;
    let mut messages = Vec::new();
    loop {
        let message = match tokio::time::timeout(REQUEST_TIMEOUT, answers.next()).await {
            Ok(Some(message)) => message,
            Ok(None) => return Err(unavailable("reading events", "the connection closed")),
            Err(_) => return Err(unavailable("reading events", "no answer in time")),
        };
        match message.status.map(|s| s.as_u16()) {
            None | Some(200) => messages.push(message),
            // End of the batch, or nothing at or after the start.
            Some(204) | Some(404) => break,
            Some(status) => {
                return Err(unavailable(
                    "reading events",
                    format!(
                        "status {status} {}",
                        message.description.unwrap_or_default()
                    ),
                ))
            }
        }
        // A single-message get (no batch) ends with its message.
        if request.get("batch").is_none() {
            break;
        }
    }
    let _ = answers.unsubscribe().await;
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_url_lists_servers_separated_by_commas() {
        let servers = server_addrs("nats://127.0.0.1:4222, nats://h2:4223,").unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[1].port(), 4223);
        let bad = server_addrs("nats://h:notaport").unwrap_err();
        assert!(bad.to_string().contains("--nats-url"), "{bad}");
        assert!(server_addrs(" , ").is_err());
    }
}
