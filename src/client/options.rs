//! What a subscription asks for: [`SubscribeOptions`], with where it starts ([`Start`])
//! and whether its events need acknowledgements ([`AckMode`]), and how that is written
//! in a `GET /` query (in [`crate::wire::param`]'s names and encodings).

use std::time::{Duration, SystemTime};

use crate::timestamp::Timestamp;
use crate::wire::param;
use crate::wire::{AckParam, MaxDeliveries, StartParam};

/// Where a subscription starts.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use bus::client::{Start, SubscribeOptions};
///
/// // Everything stored from an hour ago on.
/// let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
/// let options = SubscribeOptions::new("orders.>").with_start(Start::Time(an_hour_ago));
/// assert_eq!(options.start, Start::Time(an_hour_ago));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The oldest event kept.
    Oldest,
    /// Only events published after the subscription opens.
    Newest,
    /// Strictly after the event with this id.
    After(String),
    /// At this log position (an event's `index`).
    Position(u64),
    /// At the first event created at or after this time.
    Time(SystemTime),
}

/// Whether the server waits for acknowledgements.
///
/// ```
/// use std::time::Duration;
/// use bus::client::{AckMode, SubscribeOptions};
///
/// let options = SubscribeOptions::new("orders.>").with_redelivery(Duration::from_secs(5), 3);
/// assert_eq!(
///     options.ack,
///     AckMode::Manual { redelivery: Some(Duration::from_secs(5)), max_deliveries: Some(3) }
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckMode {
    /// Events stream without acknowledgements.
    None,
    /// The server keeps `max_inflight` events (default 1: stop-and-wait) out until they
    /// are acknowledged, and delivers one again when its ack does not come in time.
    /// `None` leaves the server's defaults.
    Manual {
        /// How long to wait for an ack before delivering again.
        redelivery: Option<Duration>,
        /// How many deliveries of one event in all before the server gives up on it (0 or
        /// less: never); the wire's `redelivery_count`.
        max_deliveries: Option<i64>,
    },
}

/// What to subscribe to and how. Build it with [`SubscribeOptions::new`] and the `with_`
/// methods (the fields are public too).
///
/// ```
/// use std::time::Duration;
/// use bus::client::{Start, SubscribeOptions};
///
/// let options = SubscribeOptions::new("orders.>")
///     .with_start(Start::Oldest)
///     .with_consumer("billing")
///     .with_max_inflight(32)
///     .with_reconnect_for(Duration::from_secs(300));
/// assert_eq!(options.consumer.as_deref(), Some("billing"));
/// ```
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// A subject or pattern (`orders.*`, `orders.>`).
    pub subject: String,
    /// Where to start (default: [`Start::Newest`]).
    pub start: Start,
    /// Whether events need acknowledgements (default: [`AckMode::None`]).
    pub ack: AckMode,
    /// End once the events stored when the subscription opened have been delivered.
    pub until_now: bool,
    /// How long to keep trying to reconnect after the connection drops; zero ends the
    /// subscription with an error at the first drop (default: one minute).
    pub reconnect_for: Duration,
    /// With manual acks: attach to (or create) this durable consumer, whose progress the
    /// server keeps across reconnects and restarts, and which connections with the same
    /// name share (a queue group).
    pub consumer: Option<String>,
    /// With manual acks: how many unacknowledged events the server may have out to this
    /// connection at once (the server's default is 1).
    pub max_inflight: Option<usize>,
    /// With manual acks: the zone this consumer is in, for publishers that wait for
    /// acknowledgements from several zones.
    pub zone: Option<String>,
}

impl SubscribeOptions {
    /// New events of `subject` (a subject or pattern), without acks.
    ///
    /// ```
    /// use bus::client::{AckMode, Start, SubscribeOptions};
    ///
    /// let options = SubscribeOptions::new("orders.*");
    /// assert_eq!((options.start, options.ack), (Start::Newest, AckMode::None));
    /// ```
    pub fn new(subject: impl Into<String>) -> SubscribeOptions {
        SubscribeOptions {
            subject: subject.into(),
            start: Start::Newest,
            ack: AckMode::None,
            until_now: false,
            reconnect_for: Duration::from_secs(60),
            consumer: None,
            max_inflight: None,
            zone: None,
        }
    }

    /// Starts at `start`.
    ///
    /// ```
    /// use bus::client::{Start, SubscribeOptions};
    ///
    /// let options = SubscribeOptions::new("orders.*").with_start(Start::Position(1000));
    /// assert_eq!(options.start, Start::Position(1000));
    /// ```
    pub fn with_start(mut self, start: Start) -> SubscribeOptions {
        self.start = start;
        self
    }

    /// Events need acknowledgements (the server's redelivery defaults).
    ///
    /// ```
    /// use bus::client::{AckMode, SubscribeOptions};
    ///
    /// let options = SubscribeOptions::new("orders.*").with_manual_ack();
    /// assert!(matches!(options.ack, AckMode::Manual { redelivery: None, .. }));
    /// ```
    pub fn with_manual_ack(mut self) -> SubscribeOptions {
        if self.ack == AckMode::None {
            self.ack = AckMode::Manual {
                redelivery: None,
                max_deliveries: None,
            };
        }
        self
    }

    /// Events need acknowledgements; one not acknowledged within `every` is delivered
    /// again, up to `max_deliveries` deliveries in all (0 or less: forever).
    ///
    /// ```
    /// use std::time::Duration;
    /// use bus::client::SubscribeOptions;
    ///
    /// let options = SubscribeOptions::new("orders.*").with_redelivery(Duration::from_secs(2), -1);
    /// assert!(matches!(options.ack, bus::client::AckMode::Manual { max_deliveries: Some(-1), .. }));
    /// ```
    pub fn with_redelivery(mut self, every: Duration, max_deliveries: i64) -> SubscribeOptions {
        self.ack = AckMode::Manual {
            redelivery: Some(every),
            max_deliveries: Some(max_deliveries),
        };
        self
    }

    /// Attaches to durable consumer `name` (implies manual acks).
    ///
    /// ```
    /// let options = bus::client::SubscribeOptions::new("orders.*").with_consumer("billing");
    /// assert_eq!(options.consumer.as_deref(), Some("billing"));
    /// ```
    pub fn with_consumer(self, name: impl Into<String>) -> SubscribeOptions {
        let mut options = self.with_manual_ack();
        options.consumer = Some(name.into());
        options
    }

    /// Lets the server have up to `max_inflight` unacknowledged events out at once (implies
    /// manual acks).
    ///
    /// ```
    /// let options = bus::client::SubscribeOptions::new("orders.*").with_max_inflight(100);
    /// assert_eq!(options.max_inflight, Some(100));
    /// ```
    pub fn with_max_inflight(self, max_inflight: usize) -> SubscribeOptions {
        let mut options = self.with_manual_ack();
        options.max_inflight = Some(max_inflight);
        options
    }

    /// Places this consumer in `zone` (implies manual acks).
    ///
    /// ```
    /// let options = bus::client::SubscribeOptions::new("orders.*").with_zone("eu-west");
    /// assert_eq!(options.zone.as_deref(), Some("eu-west"));
    /// ```
    pub fn with_zone(self, zone: impl Into<String>) -> SubscribeOptions {
        let mut options = self.with_manual_ack();
        options.zone = Some(zone.into());
        options
    }

    /// Ends the subscription once the events stored when it opened are delivered.
    ///
    /// ```
    /// let options = bus::client::SubscribeOptions::new("orders.*").with_until_now();
    /// assert!(options.until_now);
    /// ```
    pub fn with_until_now(mut self) -> SubscribeOptions {
        self.until_now = true;
        self
    }

    /// Keeps reconnecting for `limit` after a drop (zero: never reconnect).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let options = bus::client::SubscribeOptions::new("orders.*").with_reconnect_for(Duration::ZERO);
    /// assert!(options.reconnect_for.is_zero());
    /// ```
    pub fn with_reconnect_for(mut self, limit: Duration) -> SubscribeOptions {
        self.reconnect_for = limit;
        self
    }
}

impl SubscribeOptions {
    /// The query of `GET /` that asks for this subscription, in [`crate::wire::param`]'s
    /// names and encodings.
    pub(super) fn query(&self) -> Vec<(&'static str, String)> {
        let start = self.start.wire();
        let mut query = vec![
            (param::SUBJECT, self.subject.clone()),
            (start.name(), start.to_string()),
        ];
        if let AckMode::Manual {
            redelivery,
            max_deliveries,
        } = &self.ack
        {
            query.push((param::ACK, AckParam::Manual.to_string()));
            if let Some(every) = redelivery {
                query.push((param::REDELIVERY, param::millis(*every)));
            }
            if let Some(count) = max_deliveries {
                query.push((param::REDELIVERY_COUNT, MaxDeliveries(*count).to_string()));
            }
            if let Some(name) = &self.consumer {
                query.push((param::CONSUMER, name.clone()));
            }
            if let Some(max_inflight) = self.max_inflight {
                query.push((param::MAX_INFLIGHT, max_inflight.to_string()));
            }
            if let Some(zone) = &self.zone {
                query.push((param::ZONE, zone.clone()));
            }
        }
        if self.until_now {
            query.push((param::UNTIL, param::UNTIL_NOW.to_owned()));
        }
        query
    }
}

impl Start {
    /// How the query says it (times before 1970 are taken as 1970).
    fn wire(&self) -> StartParam {
        match self {
            Start::Oldest => StartParam::Oldest,
            Start::Newest => StartParam::Newest,
            Start::After(id) => StartParam::After(id.clone()),
            Start::Position(index) => StartParam::Index(*index),
            Start::Time(time) => {
                StartParam::Time(Timestamp::from((*time).max(SystemTime::UNIX_EPOCH)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_ask_for_themselves_in_the_wire_encoding() {
        let pairs = |options: &SubscribeOptions| {
            options
                .query()
                .into_iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect::<Vec<_>>()
                .join("&")
        };
        assert_eq!(
            pairs(&SubscribeOptions::new("a.>")),
            "subject=a.>&start=newest"
        );
        let options = SubscribeOptions::new("a.*")
            .with_start(Start::Position(7))
            .with_redelivery(Duration::from_millis(1500), -1)
            .with_consumer("billing")
            .with_max_inflight(32)
            .with_zone("eu")
            .with_until_now();
        assert_eq!(
            pairs(&options),
            "subject=a.*&start_index=7&ack=manual&redelivery=1500ms&redelivery_count=-1\
             &consumer=billing&max_inflight=32&zone=eu&until=now"
        );
        // Without manual acks, what only goes with them is not sent.
        let mut plain = SubscribeOptions::new("a.b").with_start(Start::After("e_1".into()));
        plain.consumer = Some("ignored".into());
        assert_eq!(pairs(&plain), "subject=a.b&start=e_1");
        let before_1970 = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        let early = SubscribeOptions::new("a.b").with_start(Start::Time(before_1970));
        assert_eq!(
            pairs(&early),
            "subject=a.b&start_time=1970-01-01T00:00:00.000000000Z"
        );
    }
}
