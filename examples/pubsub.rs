//! Publish and subscribe with `bus::client`.
//!
//! Needs a server with the `app` namespace (`bus server --namespaces app,orders`);
//! `BUS_HOST` names it (default `http://localhost:2021`).
//!
//! ```sh
//! cargo run --example pubsub
//! ```

use bus::client::{Client, NewEvent, Received, Start, SubscribeOptions};
use serde_json::value::to_raw_value;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let host = std::env::var("BUS_HOST").unwrap_or_else(|_| bus::client::DEFAULT_HOST.into());
    let client = Client::new(&host)?;

    // Subscribe first (from now on), then publish: the subscription sees every event.
    let mut options = SubscribeOptions::new("app.examples.pubsub.>");
    options.start = Start::Newest;
    let mut subscription = client.subscribe(options).await?;

    for n in 1..=3 {
        let published = client
            .publish(&NewEvent {
                subject: format!("app.examples.pubsub.item{n}"),
                payload: Some(to_raw_value(&serde_json::json!({ "n": n }))?),
                ..NewEvent::default()
            })
            .await?;
        println!("published {} at index {}", published.id, published.index);
    }

    let mut received = 0;
    while received < 3 {
        match subscription.next().await {
            Some(Ok(Received::Event(event))) => {
                received += 1;
                println!("received {} on {}: {}", event.id, event.subject, event.json);
            }
            Some(Ok(other)) => println!("{other:?}"),
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("the subscription ended"),
        }
    }
    Ok(())
}
