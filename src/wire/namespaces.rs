//! What `GET /namespaces` (a JSON array) and `GET /namespaces/{namespace}` (one object)
//! say about the namespaces a server serves: [`NamespaceInfo`]. The server's broker and
//! HTTP layer fill it, the client reads it and `bus info` prints it.

use serde::{Deserialize, Serialize};

/// One namespace: what its log keeps and who reads it, at the moment it was asked.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = bus::doc_support::server().await?; let host = server.host();
/// use bus::client::{Client, NewEvent};
///
/// let client = Client::new(host)?;
/// client.publish(&NewEvent::new("app.signup")).await?;
/// let app = client.namespace("app").await?;
/// assert_eq!((app.events, app.first_index, app.next_index), (1, 0, 1));
/// assert_eq!(app.last_index, Some(0));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct NamespaceInfo {
    /// Its name: the first segment of its subjects.
    pub namespace: String,
    /// The position of the oldest event kept (above 0 once retention removed older ones).
    pub first_index: u64,
    /// The position of the newest event, `None` while the log is empty.
    pub last_index: Option<u64>,
    /// The position the next event gets.
    pub next_index: u64,
    /// Events kept.
    pub events: u64,
    /// What the log takes in storage, in bytes.
    pub bytes: u64,
    /// Segment files the log is kept in; `None` on storage without segments of its own
    /// (in memory, JetStream).
    pub segments: Option<u64>,
    /// `created_at` of the oldest event kept (RFC 3339), `None` while the log is empty.
    pub first_created_at: Option<String>,
    /// `created_at` of the newest event (RFC 3339), `None` while the log is empty.
    pub last_created_at: Option<String>,
    /// Event streams open on the server that answered that read this namespace.
    pub subscribers: u64,
    /// Durable consumers of the namespace.
    pub consumers: u64,
}
