//! Routing of acknowledgements (`PUT /`) to the consumers waiting for them.
//!
//! Every connection of a manual-ack consumer registers its consumer id while it is open,
//! with the dispatcher its acks go to. An ack for an unknown consumer, or for an event
//! the consumer is not waiting for, is accepted and ignored: acks that arrive after a
//! redelivery or after the consumer left are normal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::consumer::Input;
use crate::store::Owner;

/// Where a connection's acks go, and who may send them.
struct Route {
    inputs: mpsc::Sender<Input>,
    /// The connection's member id in its consumer's dispatcher.
    member: u64,
    namespace: String,
    owner: Option<Owner>,
    /// The zone the connection declared, for topology-aware confirmations.
    zone: Option<String>,
}

type Routes = HashMap<String, Route>;

#[derive(Default)]
pub struct Acks {
    routes: Arc<Mutex<Routes>>,
}

/// A registered consumer id; dropping it unregisters the id.
pub struct Registration {
    routes: Arc<Mutex<Routes>>,
    consumer_id: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.consumer_id);
    }
}

impl Acks {
    /// Routes the acks of `consumer_id` (member `member` of a consumer of `namespace`,
    /// opened by `owner`, an identity the HTTP layer gives when it authenticates) to
    /// `inputs`.
    pub fn register(
        &self,
        consumer_id: &str,
        member: u64,
        namespace: &str,
        owner: Option<Owner>,
        zone: Option<String>,
        inputs: mpsc::Sender<Input>,
    ) -> Registration {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                consumer_id.to_owned(),
                Route {
                    inputs,
                    member,
                    namespace: namespace.to_owned(),
                    owner,
                    zone,
                },
            );
        Registration {
            routes: Arc::clone(&self.routes),
            consumer_id: consumer_id.to_owned(),
        }
    }

    /// The namespace and owner of a connected consumer.
    pub fn consumer(&self, consumer_id: &str) -> Option<(String, Option<Owner>)> {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes
            .get(consumer_id)
            .map(|r| (r.namespace.clone(), r.owner.clone()))
    }

    /// Where a connected consumer's inputs go, and its member id there.
    pub fn dispatcher(&self, consumer_id: &str) -> Option<(mpsc::Sender<Input>, u64)> {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes
            .get(consumer_id)
            .map(|r| (r.inputs.clone(), r.member))
    }

    /// Passes acks to their consumer, if it is connected.
    pub fn ack(&self, consumer_id: &str, event_ids: Vec<String>) -> bool {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes.get(consumer_id).is_some_and(|route| {
            let input = Input::Ack {
                event_ids,
                consumer_id: consumer_id.to_owned(),
                zone: route.zone.clone(),
            };
            route.inputs.try_send(input).is_ok()
        })
    }

    /// Asks for a delivered event again after `delay`.
    pub fn nak(&self, consumer_id: &str, event_id: String, delay: Duration) -> bool {
        self.send(consumer_id, Input::Nak { event_id, delay })
    }

    fn send(&self, consumer_id: &str, input: Input) -> bool {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes
            .get(consumer_id)
            .is_some_and(|r| r.inputs.try_send(input).is_ok())
    }
}
