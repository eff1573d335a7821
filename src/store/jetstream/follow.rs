//! Following what other writers append to a log's stream (other `bus` nodes on the same
//! JetStream), so that live subscribers on every node see every event.
//!
//! After each group commit, a node announces the stream's new end on a core NATS subject
//! of the namespace (`$BUS.committed.<namespace>`: one small message per commit, never
//! stored). The other nodes move their watermark to it, and their readers fetch the new
//! events from JetStream in shared runs ([`super::reads`]): one fetch per node for all its
//! subscribers. An announcement can be lost (a node killed between its commit and the
//! announcement, a connection that drops), so each node also asks JetStream for the
//! stream's end every second: a missed announcement delays events by that much, never
//! loses them.
//!
//! The same check watches the connection: while NATS is out of reach, the log reports an
//! outage, which ends live streams with an error (their clients resume from their last
//! id once it is back).
//!
//! Why not a JetStream consumer that delivers every message to every node: measured on one
//! node, it cost nats-server 45% more CPU per published event and single publishes fell
//! by a fifth, for events the node already holds. The announcement is per commit, not per
//! event, and says only where the end is.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::task::JoinHandle;

use super::reads::Reads;

/// How often a node asks JetStream for the stream's end, in case it missed announcements.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The core NATS subject on which the ends of a namespace's commits are announced.
pub fn subject(namespace: &str) -> String {
    format!("$BUS.committed.{namespace}")
}

/// An announcement: who committed (so a node skips its own) and the stream's end after it.
pub fn announcement(writer: &str, end: u64) -> Bytes {
    Bytes::from(format!("{writer} {end}"))
}

/// Starts following the stream of `namespace` for the log `writer` (its own
/// announcements are skipped).
pub fn start(
    client: async_nats::Client,
    context: jetstream::Context,
    namespace: &str,
    stream: String,
    writer: String,
    reads: Arc<Reads>,
) -> JoinHandle<()> {
    let subject = subject(namespace);
    tokio::spawn(async move {
        let mut announcements = match client.subscribe(subject.clone()).await {
            Ok(subscription) => Some(subscription),
            Err(e) => {
                tracing::warn!(stream, error = %e, "cannot hear other nodes' commits; checking the stream's end every second instead");
                None
            }
        };
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                heard = async {
                    match announcements.as_mut() {
                        Some(subscription) => subscription.next().await,
                        None => std::future::pending().await,
                    }
                } => match heard {
                    Some(message) => {
                        if let Some(end) = other_writers_end(&message.payload, &writer) {
                            reads.learn_end(end);
                        }
                    }
                    // The client ended the subscription: the checks carry on alone.
                    None => announcements = None,
                },
                _ = check.tick() => {
                    if client.connection_state() != async_nats::connection::State::Connected {
                        reads.set_outage(Some(format!(
                            "the connection to NATS is down: stream {stream} cannot be read until it is back"
                        )));
                        continue;
                    }
                    reads.set_outage(None);
                    match context.get_stream(&stream).await {
                        Ok(handle) => reads.learn_end(handle.cached_info().state.last_sequence),
                        Err(e) => tracing::debug!(stream, error = %e, "checking the stream's end failed"),
                    }
                }
            }
        }
    })
}

/// The end announced by another writer than `writer`.
fn other_writers_end(payload: &[u8], writer: &str) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    let (from, end) = text.split_once(' ')?;
    if from == writer {
        return None;
    }
    end.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_skips_its_own_announcements() {
        let heard = announcement("w1", 42);
        assert_eq!(other_writers_end(&heard, "w2"), Some(42));
        assert_eq!(other_writers_end(&heard, "w1"), None);
        assert_eq!(other_writers_end(b"w1", "w2"), None);
        assert_eq!(other_writers_end(b"w1 x", "w2"), None);
    }
}
