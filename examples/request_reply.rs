//! Request/reply with `bus::client`: a worker answers requests; a requester publishes one
//! and waits for the answer. The server does the waiting (`POST /?reply=1`); the worker
//! acknowledges and replies in one call.
//!
//! Needs a server with the `app` namespace; `BUS_HOST` names it (default
//! `http://localhost:2021`).
//!
//! ```sh
//! cargo run --example request_reply
//! ```

use std::time::Duration;

use bus::client::{Client, NewEvent, Received, SubscribeOptions};

#[derive(serde::Deserialize)]
struct QuoteRequest {
    item: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let host = std::env::var("BUS_HOST").unwrap_or_else(|_| bus::client::DEFAULT_HOST.into());
    let client = Client::new(&host)?;

    // The worker: replies to each request with a price (which acknowledges it too).
    let options = SubscribeOptions::new("app.examples.quotes").with_manual_ack();
    let mut requests = client.subscribe(options).await?;
    let worker = tokio::spawn(async move {
        while let Some(received) = requests.next().await {
            let Received::Event(request) = received? else {
                continue;
            };
            let asked: QuoteRequest = request.payload_as()?;
            println!("worker got a request for {}", asked.item);
            request.reply(&serde_json::json!({ "price": 12.5 })).await?;
        }
        anyhow::Ok(())
    });

    let request = NewEvent::new("app.examples.quotes")
        .with_payload(&serde_json::json!({ "item": "book" }))?;
    let answer = client.request(&request, Duration::from_secs(10)).await?;
    println!("request answered: {}", String::from_utf8_lossy(&answer));
    worker.abort();
    Ok(())
}
