//! How many members a durable consumer has on the other nodes: on a shared backend its
//! members may be connected to any node. A node with members of durable consumers listens
//! on `$BUS.members` and answers, for the namespace it is asked about, how many of its
//! connections are members of each consumer; a node listing the consumers gathers the
//! other nodes' answers and adds them to its own counts.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::listening::Listening;
use crate::store::{Relay, StorageError};
use crate::wire::ConsumerInfo;

/// Where nodes ask each other for their members.
const SUBJECT: &str = "$BUS.members";

/// Answers the other nodes' questions with `count(namespace)`: this node's members of
/// each durable consumer of the namespace, by consumer name.
pub(super) async fn listen(
    relay: &Arc<dyn Relay>,
    count: impl Fn(&str) -> HashMap<String, u64> + Send + 'static,
) -> Result<Listening, StorageError> {
    let mut listener = relay.listen(SUBJECT).await?;
    Ok(Listening(tokio::spawn(async move {
        while let Some((body, reply)) = listener.next().await {
            let (Some(reply), Ok(namespace)) = (reply, std::str::from_utf8(&body)) else {
                continue;
            };
            if let Ok(answer) = serde_json::to_vec(&count(namespace)) {
                listener.answer(reply, Bytes::from(answer)).await;
            }
        }
    })))
}

/// Adds to `consumers` (of `namespace`) their members on the other nodes.
pub(super) async fn add_members_elsewhere(
    relay: &dyn Relay,
    namespace: &str,
    consumers: &mut [ConsumerInfo],
) {
    let answers = match relay
        .gather(SUBJECT, Bytes::copy_from_slice(namespace.as_bytes()))
        .await
    {
        Ok(answers) => answers,
        Err(e) => {
            tracing::warn!(namespace, error = %e, "the members on other nodes are not counted");
            return;
        }
    };
    for answer in answers {
        let Ok(counts) = serde_json::from_slice::<HashMap<String, u64>>(&answer) else {
            tracing::warn!(
                namespace,
                "a node answered a count of members with nonsense"
            );
            continue;
        };
        for consumer in consumers.iter_mut() {
            consumer.members += counts.get(&consumer.name).copied().unwrap_or(0);
        }
    }
}
