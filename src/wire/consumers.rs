//! The durable-consumer listing of `GET /consumers/{namespace}`: a JSON array of
//! [`ConsumerInfo`]. The server's broker fills it, its HTTP layer writes it, the client
//! reads it and `bus consumers list` prints it.

use serde::{Deserialize, Serialize};

/// A durable consumer, as `GET /consumers/{namespace}` lists it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = bus::doc_support::server().await?; let host = server.host();
/// use bus::client::{Client, SubscribeOptions};
///
/// let client = Client::new(host)?;
/// let _billing = client
///     .subscribe(SubscribeOptions::new("orders.>").with_consumer("billing"))
///     .await?;
/// let consumers = client.consumers("orders").await?;
/// assert_eq!(consumers[0].name, "billing");
/// assert_eq!(consumers[0].members, 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ConsumerInfo {
    /// Its name.
    pub name: String,
    /// The subject pattern it consumes.
    pub pattern: String,
    /// The first position it is not done with (done: acknowledged, given up, or not
    /// matching its pattern).
    pub acked_floor: u64,
    /// Events it has read and not had acknowledged.
    pub pending: u64,
    /// Events in the log from its floor on, matching its pattern or not.
    pub lag: u64,
    /// Connections attached now.
    pub members: u64,
    /// Where events it gives up on go.
    pub dead_letter_subject: String,
}
