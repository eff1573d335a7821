//! Opening subscriptions: following a log (`ack=none`), an inbox, or a manual-ack consumer
//! — an ephemeral one here, a durable one through [`super::durable`]. A manual-ack
//! connection's stream holds its registration: when it is dropped, the connection leaves
//! its consumer.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::consumer::{self, Dispatcher, Input};
use super::listening::Listening;
use super::{
    random_id, AckMode, Broker, BrokerError, ConsumerBackend, Delivery, Pattern, Registration,
    Start, SubscribeRequest, Subscription, INBOX_NAMESPACE, MAX_INFLIGHT,
};
use super::{relayed, served, subscription};
use crate::store::EventLog;

impl Broker {
    /// Opens a subscription. Its stream starts right away; a start id that does not exist
    /// is reported as the stream's only delivery, an [`Delivery::Error`]. Attaching to a
    /// durable consumer that is not running reads its stored progress first (on the
    /// blocking pool), since whether the caller may attach, and with which pattern, is
    /// stored there.
    pub async fn subscribe(&self, request: SubscribeRequest) -> Result<Subscription, BrokerError> {
        let consumer_id = random_id("c_");
        let namespace = if request.pattern.is_inbox() {
            INBOX_NAMESPACE
        } else {
            request.pattern.namespace()
        };
        let count = self.count_delivered(namespace);
        if request.pattern.is_inbox() {
            let inbox = self.subscribe_inbox(request.pattern.as_str()).await;
            return Ok(Subscription {
                consumer_id,
                deliveries: Box::pin(
                    subscription::inbox(inbox, self.shutdown.subscribe()).inspect(count),
                ),
            });
        }
        let log = Arc::clone(
            self.log(request.pattern.namespace())
                .map_err(BrokerError::Invalid)?,
        );
        let start = subscription::From::of(&request.start, log.as_ref());
        let stop_at = request.until_now.then(|| log.committed());
        let AckMode::Manual {
            redelivery,
            max_deliveries,
            max_inflight,
        } = request.ack
        else {
            let deliveries = subscription::follow(
                log,
                request.pattern,
                Vec::new(),
                start,
                stop_at,
                self.readers(),
            );
            return Ok(Subscription {
                consumer_id,
                deliveries: Box::pin(deliveries.inspect(count)),
            });
        };
        let redelivery = consumer::Redelivery {
            every: redelivery,
            max_deliveries,
        };
        let max_inflight = max_inflight.clamp(1, MAX_INFLIGHT);
        let member = self.next_member.fetch_add(1, Ordering::Relaxed);
        let (member_tx, member_rx) = mpsc::channel(max_inflight);
        let join = Input::Join {
            member,
            max_inflight,
            deliveries: member_tx.clone(),
        };
        if request.consumer.is_some() && request.until_now {
            return Err(BrokerError::Invalid(
                "until=now cannot be combined with consumer=: a durable consumer has no end".into(),
            ));
        }
        let inputs = match (&self.consumers, &request.consumer) {
            (ConsumerBackend::Served(served), _) => {
                let joining = served::Joining {
                    member,
                    max_inflight,
                    redelivery,
                    deliveries: member_tx,
                    stop_at,
                };
                self.join_served(served, &log, &request, start, joining)
                    .await?
            }
            (ConsumerBackend::Dispatched { .. }, None) => {
                let (inputs, receiver) = mpsc::channel(consumer::INPUT_QUEUE);
                let _ = inputs.try_send(join);
                self.spawn_ephemeral(
                    log,
                    request.pattern.clone(),
                    start,
                    stop_at,
                    redelivery,
                    receiver,
                    member_tx,
                );
                inputs
            }
            (ConsumerBackend::Dispatched { store, saver }, Some(name)) => {
                self.attach(
                    store, saver, &log, name, &request, start, redelivery, join, member_tx,
                )
                .await?
            }
        };
        let registration = self.acks.register(
            &consumer_id,
            member,
            namespace,
            request.owner.clone(),
            request.zone.clone(),
            inputs.clone(),
        );
        // On a shared backend, acks sent to another node come here too.
        let listening = match &self.relay {
            Some(relay) => match relayed::listen(relay, &self.acks, &consumer_id).await {
                Ok(listening) => Some(listening),
                Err(e) => {
                    tracing::warn!(consumer_id, error = %e, "acks sent to other nodes will not reach this connection");
                    None
                }
            },
            None => None,
        };
        let leave = LeaveOnDrop {
            inputs,
            member,
            _registration: registration,
            _listening: listening,
        };
        let deliveries =
            futures_util::stream::unfold((member_rx, leave), |(mut rx, leave)| async move {
                let delivery = rx.recv().await?;
                Some((delivery, (rx, leave)))
            });
        Ok(Subscription {
            consumer_id,
            deliveries: Box::pin(deliveries.inspect(count)),
        })
    }

    /// Starts an ephemeral consumer's dispatcher; an error opening it (an unknown start
    /// id) goes to its member.
    #[allow(clippy::too_many_arguments)]
    fn spawn_ephemeral(
        &self,
        log: Arc<dyn EventLog>,
        pattern: Pattern,
        from: subscription::From,
        stop_at: Option<u64>,
        redelivery: consumer::Redelivery,
        inputs: mpsc::Receiver<Input>,
        member: mpsc::Sender<Delivery>,
    ) {
        let readers = self.readers();
        let counts = Arc::clone(&self.delivery_counts);
        let confirmations = Arc::clone(&self.confirmations);
        let max_bytes = self.max_inflight_bytes;
        self.run_dispatcher(async move {
            let opened = Dispatcher::open(
                log,
                pattern,
                from,
                stop_at,
                redelivery,
                max_bytes,
                inputs,
                readers,
                None,
                counts,
                confirmations,
            )
            .await;
            match opened {
                Ok(dispatcher) => dispatcher.run().await,
                Err(message) => {
                    let _ = member.send(Delivery::Error(message)).await;
                }
            }
        });
    }

    /// A log subscription (`ack=none`) for several patterns of one namespace: every event
    /// matching any of them, once, in log order (one cursor, so an event that matches two
    /// is read once). Unlike [`Broker::subscribe`] it resolves its start before it
    /// returns, and says which position that is, so that a stream of several namespaces
    /// can say where it stands in each before any event arrives.
    pub async fn follow_patterns(
        &self,
        patterns: Vec<Pattern>,
        start: Start,
        until_now: bool,
    ) -> Result<(Subscription, u64), BrokerError> {
        let mut patterns = patterns.into_iter();
        let Some(pattern) = patterns.next() else {
            return Err(BrokerError::Invalid("no subject pattern to follow".into()));
        };
        let also: Vec<Pattern> = patterns.collect();
        let namespace = pattern.namespace().to_owned();
        if pattern.is_inbox() || also.iter().any(|p| p.namespace() != namespace) {
            return Err(BrokerError::Invalid(
                "patterns followed together must be of one namespace, not an inbox".into(),
            ));
        }
        let log = Arc::clone(self.log(&namespace).map_err(BrokerError::Invalid)?);
        let from = subscription::From::of(&start, log.as_ref());
        let by_id = matches!(from, subscription::From::After(_));
        let position = subscription::resolve(log.as_ref(), from)
            .await
            .map_err(|message| match by_id {
                true => BrokerError::NotFound(message),
                false => BrokerError::Storage(message),
            })?;
        let stop_at = until_now.then(|| log.committed());
        let count = self.count_delivered(&namespace);
        let deliveries = subscription::follow(
            log,
            pattern,
            also,
            subscription::From::Position(position),
            stop_at,
            self.readers(),
        )
        .inspect(count);
        let subscription = Subscription {
            consumer_id: random_id("c_"),
            deliveries: Box::pin(deliveries),
        };
        Ok((subscription, position))
    }

    /// Counts the events a subscription of `namespace` delivers, for the metrics.
    fn count_delivered(&self, namespace: &str) -> impl Fn(&Delivery) + Send + Sync + 'static {
        let delivered = self.delivered.get(namespace).cloned().unwrap_or_default();
        move |delivery: &Delivery| {
            if let Delivery::Events(events) = delivery {
                delivered.fetch_add(events.len() as u64, Ordering::Relaxed);
            }
        }
    }

    /// What a new cursor of this broker shares with the others.
    pub(super) fn readers(&self) -> subscription::Readers {
        subscription::Readers::new(self.shutdown.subscribe(), Arc::clone(&self.reads))
    }

    /// Runs a dispatcher on its own task, awaited at shutdown.
    pub(super) fn run_dispatcher(
        &self,
        dispatcher: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let task = tokio::spawn(dispatcher);
        let mut dispatchers = self.dispatchers.lock().unwrap_or_else(|p| p.into_inner());
        dispatchers.retain(|task| !task.is_finished());
        dispatchers.push(task);
    }
}

/// Held by a manual-ack connection's stream: when the stream is dropped (the client left
/// or the server shut down), its consumer id stops taking acks and its dispatcher hands
/// what it held to others.
struct LeaveOnDrop {
    inputs: mpsc::Sender<Input>,
    member: u64,
    _registration: Registration,
    _listening: Option<Listening>,
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        // A full queue means a busy dispatcher, which notices the closed stream on its
        // next delivery to it.
        let _ = self.inputs.try_send(Input::Leave {
            member: self.member,
        });
    }
}
