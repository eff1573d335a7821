//! `bus put`, `bus get` and `bus ack`: publishing, subscribing and acknowledging through a
//! running server, with the [`crate::client`] module.

use std::io::{Read, Write};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde_json::value::RawValue;

use super::{parse_duration, HostArgs};
use crate::client::{
    AckMode as ClientAck, Client, ClientError, Event, NewEvent, Received, Start, SubscribeOptions,
    Subscription,
};

#[derive(Debug, Args)]
pub struct PutArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Subject to publish to, e.g. orders.created (or --subject).
    #[arg(value_name = "SUBJECT", required_unless_present = "subject_flag")]
    pub subject: Option<String>,
    /// The payload: JSON, or text (sent as a JSON string); `@FILE` reads it from a file,
    /// `-` from standard input. Read from standard input when absent (with SUBJECT given
    /// as an argument).
    #[arg(value_name = "DATA", requires = "subject")]
    pub data: Option<String>,
    /// Subject to publish to, as a flag (as the reference's CLI takes it).
    #[arg(
        long = "subject",
        id = "subject_flag",
        value_name = "SUBJECT",
        conflicts_with = "subject"
    )]
    pub subject_flag: Option<String>,
    /// The payload, as a flag (as the reference's CLI takes it); without it and without
    /// DATA, `--subject` publishes an event with no payload.
    #[arg(
        long = "data",
        id = "data_flag",
        value_name = "DATA",
        conflicts_with = "data"
    )]
    pub data_flag: Option<String>,
    /// Trace id carried with the event (for tracing across services), e.g. a W3C
    /// traceparent's trace id.
    #[arg(long)]
    pub trace_id: Option<String>,
    /// Deduplication key: the server refuses a second event with the same key on the
    /// subject.
    #[arg(long)]
    pub key: Option<String>,
    /// The event's id (starting with e_); the server assigns one if absent.
    #[arg(long)]
    pub id: Option<String>,
    /// Wait until this many consumers have confirmed the event (acked it with
    /// `bus get --ack auto` or an SDK's ack).
    #[arg(long, default_value_t = 0, conflicts_with = "request_reply")]
    pub confirm: usize,
    /// Wait for one reply and print its payload.
    #[arg(long)]
    pub request_reply: bool,
    /// How long to wait for confirmations or a reply.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
}

pub async fn put(args: PutArgs) -> anyhow::Result<()> {
    // `bus put SUBJECT` reads its payload from standard input, as `nats pub` does;
    // `bus put --subject S` keeps the reference's meaning: no --data, no payload.
    let data = match (&args.subject, args.data.or(args.data_flag)) {
        (_, Some(data)) => Some(data),
        (Some(_), None) => Some("-".to_owned()),
        (None, None) => None,
    };
    let Some(subject) = args.subject.or(args.subject_flag) else {
        bail!("name the subject: bus put SUBJECT [DATA]");
    };
    let client = args.host.client()?;
    let event = NewEvent {
        id: args.id.unwrap_or_default(),
        trace_id: args.trace_id.unwrap_or_default(),
        key: args.key.unwrap_or_default(),
        subject,
        payload: data.as_deref().map(read_payload).transpose()?,
        ..NewEvent::default()
    };
    let wanted = if args.request_reply { 1 } else { args.confirm };
    if wanted == 0 {
        let published = client.publish(&event).await?;
        return print_line(&published_json(&published));
    }
    let (published, answers) = client
        .publish_and_collect(event, wanted, args.timeout)
        .await?;
    if args.request_reply {
        let reply = answers.first().and_then(|a| a.payload.as_deref());
        print_line(reply.map_or("null", RawValue::get))
    } else {
        print_line(&published_json(&published))?;
        eprintln!("confirmed by {} consumers", answers.len());
        Ok(())
    }
}

/// `{"id":…,"index":…,"created_at":…}`, in that order.
fn published_json(published: &crate::client::Published) -> String {
    let quote = |text: &str| serde_json::Value::from(text).to_string();
    format!(
        "{{\"id\":{},\"index\":{},\"created_at\":{}}}",
        quote(&published.id),
        published.index,
        quote(&published.created_at)
    )
}

/// The payload from `--data`: JSON as it is, other text as a JSON string.
pub(super) fn read_payload(data: &str) -> anyhow::Result<Box<RawValue>> {
    let text = if data == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the payload from standard input")?;
        text
    } else if let Some(path) = data.strip_prefix('@') {
        std::fs::read_to_string(path).with_context(|| format!("reading the payload from {path}"))?
    } else {
        data.to_owned()
    };
    let trimmed = text.trim();
    match serde_json::from_str::<Box<RawValue>>(trimmed) {
        Ok(json) => Ok(json),
        Err(e) if trimmed.starts_with(['{', '[']) => {
            bail!("the payload looks like JSON but is not valid JSON: {e}")
        }
        Err(_) => Ok(serde_json::value::to_raw_value(&text)?),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AckChoice {
    /// Events are delivered once, nothing to acknowledge.
    None,
    /// Stop-and-wait: acknowledge each event with `bus ack`.
    Manual,
    /// Acknowledge (and confirm) each event right after printing it.
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One event per line, its JSON as the server sent it.
    Json,
    /// Readable, several lines per event.
    Pretty,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Subject or pattern, e.g. orders.* or orders.>.
    #[arg(long)]
    pub subject: String,
    /// oldest, newest, or an event id to start after.
    #[arg(long, default_value = "newest", conflicts_with_all = ["start_index", "start_time"])]
    pub start: String,
    /// Start at this log position (an event's `index`) instead.
    #[arg(long, conflicts_with = "start_time")]
    pub start_index: Option<u64>,
    /// Start at the first event created at or after this time (RFC 3339, e.g.
    /// 2026-12-01T09:00:00Z) instead.
    #[arg(long, value_parser = parse_time)]
    pub start_time: Option<SystemTime>,
    /// Stop at the last event stored when the subscription opened, instead of waiting
    /// for new ones.
    #[arg(long)]
    pub until_now: bool,
    /// Acknowledgements: none (events just stream), manual (acknowledge each with
    /// `bus ack`; the next comes once it is), auto (acknowledged once printed).
    #[arg(long, value_enum, default_value_t = AckChoice::None)]
    pub ack: AckChoice,
    /// With manual or auto acks: redeliver an unacknowledged event after this long.
    #[arg(long, value_parser = parse_duration)]
    pub redelivery: Option<Duration>,
    /// With manual or auto acks: deliveries of an event before the server gives up on it
    /// (0 or less: never).
    #[arg(long, allow_negative_numbers = true)]
    pub redelivery_count: Option<i64>,
    /// With manual or auto acks: attach to this durable consumer (created on first use;
    /// the server keeps its progress; several `get`s with one name share its events).
    #[arg(long)]
    pub consumer: Option<String>,
    /// With manual or auto acks: unacknowledged events the server may send at once.
    #[arg(long)]
    pub max_inflight: Option<usize>,
    /// How events are printed: json (one object per line, as the server sent it) or
    /// pretty (for people).
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// With --ack auto: the payload (JSON or text) to reply with to events that carry a
    /// response subject, instead of a bare confirmation.
    #[arg(long)]
    pub reply: Option<String>,
    /// How long to keep trying to reconnect when the connection is lost.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    pub reconnect_for: Duration,
}

pub async fn get(args: GetArgs) -> anyhow::Result<()> {
    if args.reply.is_some() && args.ack != AckChoice::Auto {
        return Err(super::Exit {
            code: super::EXIT_USAGE,
            message: "--reply needs --ack auto: replies are sent when an event is acknowledged"
                .into(),
        }
        .into());
    }
    let reply = args.reply.as_deref().map(read_payload).transpose()?;
    let client = args.host.client()?;
    let subject = args.subject.clone();
    let mut options = SubscribeOptions::new(args.subject);
    options.start = match (args.start_index, args.start_time, args.start.as_str()) {
        (Some(index), _, _) => Start::Position(index),
        (None, Some(time), _) => Start::Time(time),
        (None, None, "oldest") => Start::Oldest,
        (None, None, "newest" | "") => Start::Newest,
        (None, None, id) => Start::After(id.to_owned()),
    };
    options.until_now = args.until_now;
    options.ack = match args.ack {
        AckChoice::None => ClientAck::None,
        AckChoice::Manual | AckChoice::Auto => ClientAck::Manual {
            redelivery: args.redelivery,
            max_deliveries: args.redelivery_count,
        },
    };
    if (args.consumer.is_some() || args.max_inflight.is_some()) && args.ack == AckChoice::None {
        bail!("--consumer and --max-inflight need --ack manual or --ack auto");
    }
    options.consumer = args.consumer;
    options.max_inflight = args.max_inflight;
    options.reconnect_for = args.reconnect_for;
    let mut subscription = client.subscribe(options).await?;
    let consumer = subscription.consumer_id().to_owned();
    if args.ack == AckChoice::Manual {
        eprintln!("bus: subscribed to {subject} as consumer {consumer} (acknowledge with bus ack --consumer-id {consumer} --event-id <id>)");
    } else {
        eprintln!("bus: subscribed to {subject} as consumer {consumer}");
    }
    let mut printed = 0u64;
    while args.count.is_none_or(|count| printed < count) {
        let Some(received) = subscription.next().await else {
            break;
        };
        match received? {
            Received::Event(event) => {
                let text = match args.format {
                    Format::Json => event.json.clone(),
                    Format::Pretty => pretty(&event),
                };
                print_line(&text)?;
                printed += 1;
                if args.ack == AckChoice::Auto {
                    acknowledge(&client, &mut subscription, &event, reply.clone()).await?;
                }
            }
            Received::Disconnected(e) => eprintln!("bus: connection lost ({e}); reconnecting"),
            Received::Reconnected { consumer_id } => eprintln!(
                "bus: reconnected as consumer {consumer_id}; resuming where the stream stopped"
            ),
        }
    }
    Ok(())
}

/// Acks an event and answers its publisher if it waits. A connection lost on the way is
/// not fatal: the subscription reconnects, and an event whose ack did not arrive is
/// delivered again.
async fn acknowledge(
    client: &Client,
    subscription: &mut Subscription,
    event: &Event,
    reply: Option<Box<RawValue>>,
) -> anyhow::Result<()> {
    match subscription.ack(event).await {
        Ok(()) => {}
        Err(e @ ClientError::Unreachable { .. }) => {
            eprintln!(
                "bus: could not acknowledge {} ({e}); it will come again",
                event.id
            );
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("acknowledging {}", event.id)),
    }
    match client.respond(event, reply).await {
        Ok(()) => Ok(()),
        Err(e @ ClientError::Unreachable { .. }) => {
            eprintln!("bus: could not confirm {} to its publisher ({e})", event.id);
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("confirming {} to its publisher", event.id)),
    }
}

fn pretty(event: &Event) -> String {
    let mut out = format!(
        "{}  #{}  {}  {}",
        event.id, event.index, event.created_at, event.subject
    );
    for (name, value) in [
        ("trace_id", &event.trace_id),
        ("key", &event.key),
        ("response_subject", &event.response_subject),
    ] {
        if !value.is_empty() {
            out.push_str(&format!("\n  {name}: {value}"));
        }
    }
    if let Some(payload) = &event.payload {
        let value: serde_json::Value = serde_json::from_str(payload.get()).unwrap_or_default();
        let text = serde_json::to_string_pretty(&value).unwrap_or_else(|_| payload.to_string());
        out.push_str("\n  payload: ");
        out.push_str(&text.replace('\n', "\n  "));
    }
    out.push('\n');
    out
}

/// Writes a line to standard output and flushes it, so that a reader of a pipe sees
/// each event as it comes. A closed pipe (`bus get | head`) ends the command quietly.
pub(super) fn print_line(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let result = writeln!(out, "{text}").and_then(|()| out.flush());
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(super::Exit::quiet().into()),
        Err(e) => Err(e).context("writing to standard output"),
    }
}

#[derive(Debug, Args)]
pub struct AckArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// The consumer the event was delivered to (the X-BUS-CONSUMER-ID of its stream).
    #[arg(long)]
    pub consumer_id: String,
    /// The id of the event to acknowledge (its `id`, as `bus get` printed it).
    #[arg(long)]
    pub event_id: String,
}

pub async fn ack(args: AckArgs) -> anyhow::Result<()> {
    let client = args.host.client()?;
    client.ack(&args.consumer_id, &args.event_id).await?;
    Ok(())
}

/// An RFC 3339 time, e.g. `2026-12-01T09:00:00Z`.
fn parse_time(text: &str) -> Result<SystemTime, String> {
    let timestamp = crate::timestamp::Timestamp::parse(text).map_err(|e| e.to_string())?;
    let nanos = u64::try_from(timestamp.unix_nanos())
        .map_err(|_| format!("{text}: before 1970 (no events are that old)"))?;
    Ok(std::time::UNIX_EPOCH + Duration::from_nanos(nanos))
}
