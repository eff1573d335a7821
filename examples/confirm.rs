//! Confirmations with `bus::client`: two consumers acknowledge an event, and the publisher
//! waits until both have. The server counts the acknowledgements (`confirm=2`).
//!
//! Needs a server with the `app` namespace; `BUS_HOST` names it (default
//! `http://localhost:2021`).
//!
//! ```sh
//! cargo run --example confirm
//! ```

use std::time::Duration;

use bus::client::{Client, NewEvent, Received, SubscribeOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let host = std::env::var("BUS_HOST").unwrap_or_else(|_| bus::client::DEFAULT_HOST.into());
    let client = Client::new(&host)?;

    let mut consumers = Vec::new();
    for name in ["billing", "shipping"] {
        let options = SubscribeOptions::new("app.examples.orders").with_manual_ack();
        let mut subscription = client.subscribe(options).await?;
        consumers.push(tokio::spawn(async move {
            while let Some(received) = subscription.next().await {
                let Received::Event(event) = received? else {
                    continue;
                };
                println!("{name} handled {}", event.id);
                event.ack().await?;
            }
            anyhow::Ok(())
        }));
    }

    let order = NewEvent::new("app.examples.orders");
    let confirmation = client
        .publish_confirmed(&order, 2, 0, Duration::from_secs(10))
        .await?;
    anyhow::ensure!(
        confirmation.reached,
        "only {} consumers confirmed",
        confirmation.consumers
    );
    println!("confirmed by {} consumers", confirmation.consumers);
    for consumer in consumers {
        consumer.abort();
    }
    Ok(())
}
