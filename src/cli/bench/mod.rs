//! `bus bench`: measurements of the bus on this machine, one file per benchmark.
//!
//! `store` drives the storage engine directly (no HTTP); the others go end to end over
//! HTTP, against a running server (`--host`) or one started for the run (`--embedded`).
//! Every run checks what it measures (events acknowledged, delivered once and in order,
//! read back whole), so a figure is only printed for correct work.
//!
//! - `store.rs`: appends to a fresh log and reads it back, without HTTP.
//! - `publish.rs`: publishes over keep-alive connections.
//! - `fanout.rs`: many subscribers on one subject while publishers run.
//! - `replay.rs`: one subscriber reading a namespace from the oldest event.
//! - `resume.rs`: time to the first event when resuming from an id, Last-Event-ID or newest.
//! - `ack.rs`: a manual-ack consumer, stop-and-wait or with `max_inflight`.
//! - `reply.rs`: request/reply round trips.
//! - `idle.rs`: idle subscriptions and the server's memory.
//! - `durable_acks.rs`: publish latency while durable consumers ack.
//! - `durable_catchup.rs`: a durable consumer catching up a log, against a replay.
//! - `jetstream.rs`: JetStream's own publish rate (no `bus`), the JetStream store's ceiling.
//! - `failover.rs`: two nodes on one JetStream, one killed: time until its subscriber
//!   gets events again through the other.
//! - `syncbus.rs`: cache invalidations through a sync bus (memory, bus, NATS, Redis, Kafka
//!   or mesh), one publisher to N subscriber nodes: invalidations/s, delivery latency.
//!
//! Shared by the HTTP benchmarks, and importing none of them:
//! - `target.rs`: the server under test (`--host`, or a `bus server` child process).
//! - `load.rs`: what the load generator sends and reads (publishes, acks, event streams).
//! - `measure.rs`: percentiles, timing, memory and the printed report.

mod ack;
mod durable_acks;
mod durable_catchup;
mod failover;
mod fanout;
mod fsync;
mod idle;
mod jetstream;
mod load;
mod measure;
mod publish;
mod replay;
mod reply;
mod resume;
mod store;
mod syncbus;
mod target;

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub kind: BenchKind,
}

#[derive(Debug, Subcommand)]
pub enum BenchKind {
    /// Append to and read back a log directly, without HTTP.
    #[command(after_help = "Example:
  bus bench store --events 1000000")]
    Store(store::StoreBench),
    /// Publish over keep-alive connections: events/s and latency.
    #[command(after_help = "Examples:
  bus bench publish --embedded --events 100000 --connections 32
  bus bench publish --host http://127.0.0.1:2021 --events 200000 --batch 100")]
    Publish(publish::PublishBench),
    /// Subscribers on one subject, publishers at a rate: deliveries/s, end-to-end latency.
    #[command(after_help = "Examples:
  bus bench fanout --embedded --subscribers 100 --events 20000
  bus bench fanout --embedded --subscribers 100 --events 5000 --rate 1000 --publishers 1")]
    Fanout(fanout::FanoutBench),
    /// One writer appending and syncing a file: this disk's fdatasync time, without bus.
    #[command(after_help = "Example:
  bus bench fsync")]
    Fsync(fsync::FsyncBench),
    /// One subscriber reading a namespace from the oldest event.
    #[command(after_help = "Example:
  bus bench replay --embedded --events 1000000")]
    Replay(replay::ReplayBench),
    /// Time to the first event when resuming from an id, Last-Event-ID or newest.
    #[command(after_help = "Example:
  bus bench resume --embedded --events 2000000")]
    Resume(resume::ResumeBench),
    /// A manual-ack consumer, stop-and-wait or with a window.
    #[command(after_help = "Examples:
  bus bench ack --embedded --events 20000 --window 1
  bus bench ack --embedded --events 500000 --window 100")]
    Ack(ack::AckBench),
    /// Request/reply round trips through the server (`POST /?reply=1`).
    #[command(after_help = "Example:
  bus bench reply --embedded --requests 5000")]
    Reply(reply::ReplyBench),
    /// Hold idle subscriptions and read the server's memory.
    #[command(after_help = "Examples:
  bus bench idle --embedded --subscribers 10000
  bus bench idle --embedded --subscribers 10000 --http2")]
    Idle(idle::IdleBench),
    /// Single-event publish latency while durable consumers ack (and store progress).
    #[command(after_help = "Example:
  bus bench durable-acks --embedded --consumers 200")]
    DurableAcks(durable_acks::DurableAcksBench),
    /// A durable consumer catching up a log from disk while acking, against a replay.
    #[command(after_help = "Example:
  bus bench durable-catchup --embedded --events 1000000 --window 100")]
    DurableCatchup(durable_catchup::DurableCatchupBench),
    /// JetStream's own publish rate from Rust, without bus: the JetStream store's ceiling.
    #[command(after_help = "Example:
  bus bench jetstream --nats-url nats://127.0.0.1:4222 --events 50000 --connections 32")]
    Jetstream(jetstream::JetStreamBench),
    /// Two nodes on one JetStream, one killed: time until its subscriber gets events again.
    #[command(after_help = "Example:
  bus bench failover --nats-url nats://127.0.0.1:4222 --rounds 10")]
    Failover(failover::FailoverBench),
    /// Cache invalidations through a sync bus, one publisher to N nodes: rate, latency.
    #[command(after_help = "Example:
  bus bench syncbus --backend memory --events 2000")]
    Syncbus(syncbus::SyncbusBench),
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.kind {
        BenchKind::Store(bench) => store::run(bench).await,
        BenchKind::Publish(bench) => publish::run(bench).await,
        BenchKind::Fanout(bench) => fanout::run(bench).await,
        BenchKind::Fsync(bench) => fsync::run(bench).await,
        BenchKind::Replay(bench) => replay::run(bench).await,
        BenchKind::Resume(bench) => resume::run(bench).await,
        BenchKind::Ack(bench) => ack::run(bench).await,
        BenchKind::Reply(bench) => reply::run(bench).await,
        BenchKind::Idle(bench) => idle::run(bench).await,
        BenchKind::DurableAcks(bench) => durable_acks::run(bench).await,
        BenchKind::Jetstream(bench) => jetstream::run(bench).await,
        BenchKind::DurableCatchup(bench) => durable_catchup::run(bench).await,
        BenchKind::Failover(bench) => failover::run(bench).await,
        BenchKind::Syncbus(bench) => syncbus::run(bench).await,
    }
}
