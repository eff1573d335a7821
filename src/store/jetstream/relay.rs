//! Messages between the nodes on one JetStream: NATS core requests, for what is never
//! stored. A node listens on subjects under `$BUS.` for what it holds (a manual-ack
//! connection's consumer id); another node asks there, and hears nothing back (no
//! responders) when no node holds it.

use bytes::Bytes;
use futures_util::StreamExt;

use super::connection::{unavailable, REQUEST_TIMEOUT};
use crate::store::api::{BoxFuture, Relay, RelayListener, StorageError};

/// NATS core messaging between the nodes.
pub struct JetStreamRelay {
    client: async_nats::Client,
}

impl JetStreamRelay {
    pub fn new(client: async_nats::Client) -> JetStreamRelay {
        JetStreamRelay { client }
    }
}

impl Relay for JetStreamRelay {
    fn request<'a>(
        &'a self,
        subject: &'a str,
        body: Bytes,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StorageError>> {
        Box::pin(async move {
            let asked = self.client.request(subject.to_owned(), body);
            match tokio::time::timeout(REQUEST_TIMEOUT, asked).await {
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
                subscriber,
            }) as Box<dyn RelayListener>)
        })
    }
}

struct Listener {
    client: async_nats::Client,
    subscriber: async_nats::Subscriber,
}

impl RelayListener for Listener {
    fn next(&mut self) -> BoxFuture<'_, Option<(Bytes, String)>> {
        Box::pin(async move {
            loop {
                let message = self.subscriber.next().await?;
                // A message nobody waits an answer for is not a request.
                if let Some(reply) = message.reply {
                    return Some((message.payload, reply.to_string()));
                }
            }
        })
    }

    fn answer(&self, to: String, body: Bytes) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.client.publish(to, body).await;
        })
    }
}
