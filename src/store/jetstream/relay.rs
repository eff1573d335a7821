//! Messages between the nodes on one JetStream: NATS core messages and requests, for what
//! is never stored. A node listens on subjects under `$BUS.` for what it holds (a
//! manual-ack connection's consumer id, an inbox subject with subscribers); another node
//! sends there, and hears nothing back (no responders) when no node holds it. A node's
//! messages carry its name, so that it does not hear its own.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

use super::connection::unavailable;
use crate::store::api::{BoxFuture, Relay, RelayListener, StorageError};

/// How long a node waits for another's answer: they are on the same NATS, so a node that
/// has not answered by then is going away (or its listener just did).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a gathering waits for one more answer after the last (or the first): the
/// nodes that answer do so within milliseconds of each other.
const GATHER_STALL: Duration = Duration::from_millis(50);

/// The header naming the node a relayed message comes from, so that it does not hear its
/// own.
const FROM_NODE: &str = "Bus-Node";

/// NATS core messaging between the nodes.
pub struct JetStreamRelay {
    client: async_nats::Client,
    /// Who this node is in the messages it sends.
    node: String,
}

impl JetStreamRelay {
    pub fn new(client: async_nats::Client) -> JetStreamRelay {
        JetStreamRelay {
            client,
            node: crate::random::token(16),
        }
    }

    /// The headers of a message this node sends: its name, so that it does not hear it.
    fn node_headers(&self) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(FROM_NODE, self.node.as_str());
        headers
    }
}

impl Relay for JetStreamRelay {
    fn publish<'a>(
        &'a self,
        subject: &'a str,
        body: Bytes,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            self.client
                .publish_with_headers(subject.to_owned(), self.node_headers(), body)
                .await
                .map_err(|e| unavailable(&format!("sending to {subject}"), e))
        })
    }

    fn request<'a>(
        &'a self,
        subject: &'a str,
        body: Bytes,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StorageError>> {
        Box::pin(async move {
            let asked = self.client.request(subject.to_owned(), body);
            match tokio::time::timeout(ANSWER_TIMEOUT, asked).await {
                Ok(Ok(answer)) => Ok(Some(answer.payload)),
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(None),
                Ok(Err(e)) => Err(unavailable(&format!("asking {subject}"), e)),
                Err(_) => Err(unavailable(
                    &format!("asking {subject}"),
                    "no answer in time",
                )),
            }
        })
    }

    fn gather<'a>(
        &'a self,
        subject: &'a str,
        body: Bytes,
    ) -> BoxFuture<'a, Result<Vec<Bytes>, StorageError>> {
        Box::pin(async move {
            let inbox = self.client.new_inbox();
            let mut answers = self
                .client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| unavailable(&format!("asking {subject}"), e))?;
            self.client
                .publish_with_reply_and_headers(
                    subject.to_owned(),
                    inbox,
                    self.node_headers(),
                    body,
                )
                .await
                .map_err(|e| unavailable(&format!("asking {subject}"), e))?;
            let until = tokio::time::Instant::now() + ANSWER_TIMEOUT;
            let mut gathered = Vec::new();
            loop {
                let stall =
                    GATHER_STALL.min(until.saturating_duration_since(tokio::time::Instant::now()));
                match tokio::time::timeout(stall, answers.next()).await {
                    // A status (no responders) is no node's answer.
                    Ok(Some(answer)) if answer.status.is_none() => gathered.push(answer.payload),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return Ok(gathered),
                }
            }
        })
    }

    fn listen<'a>(
        &'a self,
        subject: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn RelayListener>, StorageError>> {
        Box::pin(async move {
            let subscriber = self
                .client
                .subscribe(subject.to_owned())
                .await
                .map_err(|e| unavailable(&format!("listening on {subject}"), e))?;
            Ok(Box::new(Listener {
                client: self.client.clone(),
                node: self.node.clone(),
                subscriber,
            }) as Box<dyn RelayListener>)
        })
    }
}

struct Listener {
    client: async_nats::Client,
    node: String,
    subscriber: async_nats::Subscriber,
}

impl RelayListener for Listener {
    fn next(&mut self) -> BoxFuture<'_, Option<(Bytes, Option<String>)>> {
        Box::pin(async move {
            loop {
                let message = self.subscriber.next().await?;
                let from = message.headers.as_ref().and_then(|h| h.get(FROM_NODE));
                if from.is_some_and(|from| from.as_str() == self.node) {
                    continue;
                }
                return Some((message.payload, message.reply.map(|r| r.to_string())));
            }
        })
    }

    fn answer(&self, to: String, body: Bytes) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.client.publish(to, body).await;
        })
    }
}
