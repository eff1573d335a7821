//! Request/reply with `bus::client`: a worker answers requests; a requester publishes one
//! and waits for the answer (through an inbox subject, as the Go SDK does).
//!
//! Needs a server with the `app` namespace; `BUS_HOST` names it (default
//! `http://localhost:2021`).
//!
//! ```sh
//! cargo run --example request_reply
//! ```

use std::time::Duration;

use bus::client::{AckMode, Client, NewEvent, Received, SubscribeOptions};
use serde_json::value::to_raw_value;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let host = std::env::var("BUS_HOST").unwrap_or_else(|_| bus::client::DEFAULT_HOST.into());
    let client = Client::new(&host)?;

    // The worker: acknowledges each request and replies with a price.
    let mut options = SubscribeOptions::new("app.examples.quotes");
    options.ack = AckMode::Manual {
        redelivery: None,
        redelivery_count: None,
    };
    let mut requests = client.subscribe(options).await?;
    let worker_client = client.clone();
    let worker = tokio::spawn(async move {
        while let Some(received) = requests.next().await {
            let Received::Event(request) = received? else {
                continue;
            };
            println!("worker got {}", request.json);
            requests.ack(&request).await?;
            let reply = to_raw_value(&serde_json::json!({ "price": 12.5 }))?;
            worker_client.respond(&request, Some(reply)).await?;
        }
        anyhow::Ok(())
    });

    let request = NewEvent {
        subject: "app.examples.quotes".into(),
        payload: Some(to_raw_value(&serde_json::json!({ "item": "book" }))?),
        ..NewEvent::default()
    };
    let (published, replies) = client
        .publish_and_collect(request, 1, Duration::from_secs(10))
        .await?;
    let answer = replies[0].payload.as_deref().map_or("null", |p| p.get());
    println!("request {} answered: {answer}", published.id);
    worker.abort();
    Ok(())
}
