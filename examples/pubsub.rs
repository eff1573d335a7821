//! Publish and subscribe with `bus::client`.
//!
//! Needs a server with the `app` namespace (`bus server --namespaces app,orders`);
//! `BUS_HOST` names it (default `http://localhost:2021`).
//!
//! ```sh
//! cargo run --example pubsub
//! ```

use bus::client::{Client, NewEvent, Received, SubscribeOptions};
use futures_util::StreamExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let host = std::env::var("BUS_HOST").unwrap_or_else(|_| bus::client::DEFAULT_HOST.into());
    let client = Client::new(&host)?;

    // Subscribe first (new events only), then publish: the subscription sees every event.
    let subscription = client
        .subscribe(SubscribeOptions::new("app.examples.pubsub.>"))
        .await?;

    for n in 1..=3 {
        let event = NewEvent::new(format!("app.examples.pubsub.item{n}"))
            .with_payload(&serde_json::json!({ "n": n }))?;
        let published = client.publish(&event).await?;
        println!("published {} at index {}", published.id, published.index);
    }

    // A subscription is a Stream: take the first three events.
    let mut events = subscription
        .filter_map(|received| async move {
            match received {
                Ok(Received::Event(event)) => Some(Ok(event)),
                Ok(change) => {
                    eprintln!("{change:?}");
                    None
                }
                Err(e) => Some(Err(e)),
            }
        })
        .take(3)
        .boxed();
    while let Some(event) = events.next().await {
        let event = event?;
        println!("received {} on {}: {}", event.id, event.subject, event.json);
    }
    Ok(())
}
