//! Query parameters: their names, and the encodings of the values that both sides read
//! or write (a client building a URL, the server reading one).
//!
//! Each parser refuses a value with the exact message the server answers with (a 400):
//! clients, tests and the Go SDK match on those texts. Limits that are the server's own
//! (the longest redelivery interval, the largest `max_inflight`) are checked by the
//! server, not here.

use std::fmt;
use std::time::Duration;

use crate::timestamp::Timestamp;

// `GET /`: subscribe.
/// The subject or pattern to subscribe to.
pub const SUBJECT: &str = "subject";
/// Where to start: `oldest`, `newest` (the default) or an event id to start after.
pub const START: &str = "start";
/// Where to start: a log position.
pub const START_INDEX: &str = "start_index";
/// Where to start: the first event created at or after an RFC 3339 time.
pub const START_TIME: &str = "start_time";
/// Whether events need acknowledgements: `none` (the default) or `manual`.
pub const ACK: &str = "ack";
/// With manual acks: how long an ack may take before the event is delivered again.
pub const REDELIVERY: &str = "redelivery";
/// With manual acks: the most deliveries of one event ([`MaxDeliveries`]).
pub const REDELIVERY_COUNT: &str = "redelivery_count";
/// With manual acks: how many unacknowledged events one connection may hold.
pub const MAX_INFLIGHT: &str = "max_inflight";
/// With manual acks: the durable consumer to attach to (or create).
pub const CONSUMER: &str = "consumer";
/// With manual acks: the zone the consumer is in (for `confirm_zones`).
pub const ZONE: &str = "zone";
/// `until=now` ([`UNTIL_NOW`]): end the stream once the events stored when it opened
/// have been sent.
pub const UNTIL: &str = "until";
/// The one value of [`UNTIL`].
pub const UNTIL_NOW: &str = "now";

// `PUT /`: acknowledge.
/// The consumer the events were delivered to (its `X-BUS-CONSUMER-ID`).
pub const CONSUMER_ID: &str = "consumer_id";
/// The events acknowledged: one id, or several separated by commas.
pub const EVENT_ID: &str = "event_id";
/// A flag ([`parse_flag`]): ask for the events again instead of acknowledging them.
pub const NAK: &str = "nak";
/// With `nak`: how long to wait before delivering them again.
pub const DELAY: &str = "delay";

// `POST /`: publish and wait.
/// How many distinct consumers must acknowledge the event.
pub const CONFIRM: &str = "confirm";
/// In how many distinct zones.
pub const CONFIRM_ZONES: &str = "confirm_zones";
/// A flag ([`parse_flag`]): wait for the first reply and answer with it.
pub const REPLY: &str = "reply";
/// How long to wait for confirmations or a reply.
pub const TIMEOUT: &str = "timeout";

/// A query parameter's value the server cannot take; the message is the server's 400.
///
/// ```
/// let error = bus::wire::AckParam::parse("yes").unwrap_err();
/// assert!(error.to_string().starts_with("ack: "));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParamError(pub String);

/// Where a subscription starts, and which parameter says so: `start=oldest`,
/// `start=newest` (or nothing), `start=<id>`, `start_index=<position>` or
/// `start_time=<RFC 3339>`. At most one of the three parameters may be given.
///
/// ```
/// use bus::wire::StartParam;
///
/// let start = StartParam::Index(1000);
/// assert_eq!((start.name(), start.to_string().as_str()), ("start_index", "1000"));
///
/// let query = [("start", ""), ("start_time", "2026-01-02T03:04:05Z")];
/// let read = |name: &str| -> Result<&str, bus::wire::ParamError> {
///     Ok(query.iter().find(|(n, _)| *n == name).map_or("", |(_, v)| *v))
/// };
/// assert!(matches!(StartParam::from_query(read)?, StartParam::Time(_)));
/// # Ok::<(), bus::wire::ParamError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartParam {
    /// `start=oldest`: the oldest event kept.
    Oldest,
    /// `start=newest`, or no start at all: only events published from now on.
    Newest,
    /// `start=<id>`: strictly after this event (the server checks the id).
    After(String),
    /// `start_index=<position>`: at this log position.
    Index(u64),
    /// `start_time=<time>`: at the first event created at or after this time.
    Time(Timestamp),
}

impl StartParam {
    /// The parameter that carries this start.
    ///
    /// ```
    /// use bus::wire::StartParam;
    ///
    /// assert_eq!(StartParam::Oldest.name(), "start");
    /// assert_eq!(StartParam::Index(7).name(), "start_index");
    /// ```
    pub fn name(&self) -> &'static str {
        match self {
            StartParam::Oldest | StartParam::Newest | StartParam::After(_) => START,
            StartParam::Index(_) => START_INDEX,
            StartParam::Time(_) => START_TIME,
        }
    }

    /// Reads the start of a subscription request; `read(name)` gives a parameter's value,
    /// `""` when it is absent. Parameters are read, and faults reported, in this order: a
    /// malformed `start_index`, a malformed `start_time`, more than one of the three.
    ///
    /// ```
    /// use bus::wire::{ParamError, StartParam};
    ///
    /// let read = |name: &str| -> Result<&str, ParamError> {
    ///     Ok(if name == "start" { "oldest" } else { "" })
    /// };
    /// assert_eq!(StartParam::from_query(read)?, StartParam::Oldest);
    ///
    /// let both = |name: &str| -> Result<&str, ParamError> {
    ///     Ok(if name == "start_time" { "x" } else { "" })
    /// };
    /// assert!(StartParam::from_query(both).unwrap_err().0.starts_with("start_time: "));
    /// # Ok::<(), ParamError>(())
    /// ```
    pub fn from_query<'q, E: From<ParamError>>(
        mut read: impl FnMut(&'static str) -> Result<&'q str, E>,
    ) -> Result<StartParam, E> {
        let index = match read(START_INDEX)? {
            "" => None,
            text => Some(StartParam::Index(text.parse().map_err(|_| {
                ParamError(format!(
                    "{START_INDEX}: {text:?} is not a log position (0, 1, …)"
                ))
            })?)),
        };
        let time = match read(START_TIME)? {
            "" => None,
            text => Some(StartParam::Time(
                Timestamp::parse(text).map_err(|e| ParamError(format!("{START_TIME}: {e}")))?,
            )),
        };
        let start = read(START)?;
        let explicit = usize::from(index.is_some()) + usize::from(time.is_some());
        if explicit > 1 || (explicit == 1 && !start.is_empty()) {
            return Err(ParamError(format!(
                "give one of {START}, {START_INDEX} and {START_TIME}"
            ))
            .into());
        }
        Ok(match (index.or(time), start) {
            (Some(explicit), _) => explicit,
            (None, "" | "newest") => StartParam::Newest,
            (None, "oldest") => StartParam::Oldest,
            (None, id) => StartParam::After(id.to_owned()),
        })
    }
}

impl fmt::Display for StartParam {
    /// The parameter's value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartParam::Oldest => f.write_str("oldest"),
            StartParam::Newest => f.write_str("newest"),
            StartParam::After(id) => f.write_str(id),
            StartParam::Index(position) => write!(f, "{position}"),
            StartParam::Time(time) => write!(f, "{time}"),
        }
    }
}

/// `ack=none` (or nothing): events stream without acknowledgements; `ack=manual`: each
/// waits for its ack, and is delivered again when the ack does not come.
///
/// ```
/// use bus::wire::AckParam;
///
/// assert_eq!(AckParam::parse("")?, AckParam::None);
/// assert_eq!(AckParam::parse("manual")?.to_string(), "manual");
/// assert_eq!(
///     AckParam::parse("auto").unwrap_err().to_string(),
///     r#"ack: "auto" is not an ack mode; use none or manual"#
/// );
/// # Ok::<(), bus::wire::ParamError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckParam {
    /// `ack=none`.
    None,
    /// `ack=manual`.
    Manual,
}

impl AckParam {
    /// Reads the value of `ack` (`""` when absent).
    ///
    /// ```
    /// use bus::wire::AckParam;
    ///
    /// assert_eq!(AckParam::parse("none")?, AckParam::parse("")?);
    /// # Ok::<(), bus::wire::ParamError>(())
    /// ```
    pub fn parse(text: &str) -> Result<AckParam, ParamError> {
        match text {
            "" | "none" => Ok(AckParam::None),
            "manual" => Ok(AckParam::Manual),
            other => Err(ParamError(format!(
                "{ACK}: {other:?} is not an ack mode; use none or manual"
            ))),
        }
    }
}

impl fmt::Display for AckParam {
    /// The parameter's value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AckParam::None => "none",
            AckParam::Manual => "manual",
        })
    }
}

/// `redelivery_count=N`: how many deliveries of one event in all before the server gives
/// up on it; 0 or less: no limit.
///
/// ```
/// use bus::wire::MaxDeliveries;
///
/// assert_eq!(MaxDeliveries::parse("3")?.limit(), Some(3));
/// assert_eq!(MaxDeliveries::parse("-1")?.limit(), None);
/// assert!(MaxDeliveries::parse("three").is_err());
/// # Ok::<(), bus::wire::ParamError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxDeliveries(pub i64);

impl MaxDeliveries {
    /// Reads a value of `redelivery_count` (not empty: an absent one is the server's
    /// default).
    ///
    /// ```
    /// use bus::wire::MaxDeliveries;
    ///
    /// assert_eq!(MaxDeliveries::parse("5")?, MaxDeliveries(5));
    /// assert!(MaxDeliveries::parse("").is_err());
    /// # Ok::<(), bus::wire::ParamError>(())
    /// ```
    pub fn parse(text: &str) -> Result<MaxDeliveries, ParamError> {
        text.parse().map(MaxDeliveries).map_err(|_| {
            ParamError(format!(
                "{REDELIVERY_COUNT}: {text:?} is not an integer (<= 0 means unlimited)"
            ))
        })
    }

    /// The most deliveries, `None` for no limit (a count beyond `u32` is taken as
    /// `u32::MAX`).
    ///
    /// ```
    /// use bus::wire::MaxDeliveries;
    ///
    /// assert_eq!(MaxDeliveries(0).limit(), None);
    /// assert_eq!(MaxDeliveries(i64::MAX).limit(), Some(u32::MAX));
    /// ```
    pub fn limit(self) -> Option<u32> {
        (self.0 > 0).then(|| u32::try_from(self.0).unwrap_or(u32::MAX))
    }
}

impl fmt::Display for MaxDeliveries {
    /// The parameter's value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Reads a flag (`reply`, `nak`): absent, `0` or `false` is off, `1` or `true` on. A
/// client sends `1`.
///
/// ```
/// use bus::wire::param::{parse_flag, REPLY};
///
/// assert!(parse_flag(REPLY, "1")?);
/// assert!(!parse_flag(REPLY, "")?);
/// assert_eq!(parse_flag(REPLY, "yes").unwrap_err().to_string(), r#"reply: "yes" is not 1 or 0"#);
/// # Ok::<(), bus::wire::ParamError>(())
/// ```
pub fn parse_flag(name: &str, text: &str) -> Result<bool, ParamError> {
    match text {
        "" | "0" | "false" => Ok(false),
        "1" | "true" => Ok(true),
        other => Err(ParamError(format!("{name}: {other:?} is not 1 or 0"))),
    }
}

/// A duration as a client writes it (`redelivery`, `timeout`, `delay`): whole
/// milliseconds, `1500ms`, which the server (and Go's `time.ParseDuration`) reads.
///
/// ```
/// use std::time::Duration;
///
/// assert_eq!(bus::wire::param::millis(Duration::from_secs(5)), "5000ms");
/// ```
pub fn millis(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(query: &[(&str, &str)]) -> Result<StartParam, ParamError> {
        StartParam::from_query(|name| {
            Ok::<_, ParamError>(
                query
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or("", |(_, v)| *v),
            )
        })
    }

    #[test]
    fn every_start_reads_back_from_what_it_writes() {
        let time = Timestamp::parse("2026-01-02T03:04:05.5Z").unwrap();
        for written in [
            StartParam::Oldest,
            StartParam::Newest,
            StartParam::After("e_01".into()),
            StartParam::Index(0),
            StartParam::Index(u64::MAX),
            StartParam::Time(time),
        ] {
            let value = written.to_string();
            assert_eq!(start(&[(written.name(), &value)]), Ok(written));
        }
        assert_eq!(start(&[]), Ok(StartParam::Newest));
    }

    #[test]
    fn start_faults_are_reported_in_the_servers_words_and_order() {
        let fault = |query: &[(&str, &str)]| start(query).unwrap_err().0;
        assert_eq!(
            fault(&[(START_INDEX, "-1"), (START_TIME, "x")]),
            r#"start_index: "-1" is not a log position (0, 1, …)"#
        );
        assert!(fault(&[(START_TIME, "yesterday")]).starts_with("start_time: invalid RFC 3339"));
        for conflict in [
            &[(START_INDEX, "1"), (START_TIME, "2026-01-02T03:04:05Z")][..],
            &[(START_INDEX, "1"), (START, "oldest")][..],
            &[(START_TIME, "2026-01-02T03:04:05Z"), (START, "e_1")][..],
        ] {
            assert_eq!(
                fault(conflict),
                "give one of start, start_index and start_time"
            );
        }
    }

    #[test]
    fn ack_modes_flags_and_counts() {
        for mode in [AckParam::None, AckParam::Manual] {
            assert_eq!(AckParam::parse(&mode.to_string()), Ok(mode));
        }
        assert_eq!(AckParam::parse("none"), Ok(AckParam::None));
        assert_eq!(
            MaxDeliveries::parse("x").unwrap_err().0,
            r#"redelivery_count: "x" is not an integer (<= 0 means unlimited)"#
        );
        assert_eq!(MaxDeliveries::parse("0").unwrap().limit(), None);
        assert_eq!(MaxDeliveries(i64::MAX).limit(), Some(u32::MAX));
        assert_eq!(
            MaxDeliveries::parse(&MaxDeliveries(7).to_string())
                .unwrap()
                .limit(),
            Some(7)
        );
        assert_eq!(parse_flag(NAK, "true"), Ok(true));
        assert_eq!(parse_flag(NAK, "false"), Ok(false));
        assert_eq!(
            parse_flag(NAK, "2").unwrap_err().0,
            r#"nak: "2" is not 1 or 0"#
        );
    }
}
