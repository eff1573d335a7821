//! Confirmations with `bus::client`: two consumers acknowledge an event, and the publisher
//! waits until both have (through an inbox subject, as the Go SDK's `WithConfirm` does).
//!
//! Needs a server with the `app` namespace; `BUS_HOST` names it (default
//! `http://localhost:2021`).
//!
//! ```sh
//! cargo run --example confirm
//! ```

use std::time::Duration;

use bus::client::{AckMode, Client, NewEvent, Received, SubscribeOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let host = std::env::var("BUS_HOST").unwrap_or_else(|_| bus::client::DEFAULT_HOST.into());
    let client = Client::new(&host)?;

    let mut consumers = Vec::new();
    for name in ["billing", "shipping"] {
        let mut options = SubscribeOptions::new("app.examples.orders");
        options.ack = AckMode::Manual {
            redelivery: None,
            redelivery_count: None,
        };
        let mut subscription = client.subscribe(options).await?;
        let client = client.clone();
        consumers.push(tokio::spawn(async move {
            while let Some(received) = subscription.next().await {
                let Received::Event(event) = received? else {
                    continue;
                };
                println!("{name} handled {}", event.id);
                subscription.ack(&event).await?;
                // A bare response is a confirmation.
                client.respond(&event, None).await?;
            }
            anyhow::Ok(())
        }));
    }

    let order = NewEvent {
        subject: "app.examples.orders".into(),
        ..NewEvent::default()
    };
    let (published, confirmations) = client
        .publish_and_collect(order, 2, Duration::from_secs(10))
        .await?;
    println!(
        "{} confirmed by {} consumers",
        published.id,
        confirmations.len()
    );
    for consumer in consumers {
        consumer.abort();
    }
    Ok(())
}
