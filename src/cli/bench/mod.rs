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
    Store(store::StoreBench),
    /// Publish over keep-alive connections: events/s and latency.
    Publish(publish::PublishBench),
    /// Subscribers on one subject, publishers at a rate: deliveries/s, end-to-end latency.
    Fanout(fanout::FanoutBench),
    /// One writer appending and syncing a file: this disk's fdatasync time, without bus.
    Fsync(fsync::FsyncBench),
    /// One subscriber reading a namespace from the oldest event.
    Replay(replay::ReplayBench),
    /// Time to the first event when resuming from an id, Last-Event-ID or newest.
    Resume(resume::ResumeBench),
    /// A manual-ack consumer, stop-and-wait or with a window.
    Ack(ack::AckBench),
    /// Request/reply round trips through the server (`POST /?reply=1`).
    Reply(reply::ReplyBench),
    /// Hold idle subscriptions and read the server's memory.
    Idle(idle::IdleBench),
    /// Single-event publish latency while durable consumers ack (and store progress).
    DurableAcks(durable_acks::DurableAcksBench),
    /// A durable consumer catching up a log from disk while acking, against a replay.
    DurableCatchup(durable_catchup::DurableCatchupBench),
    /// JetStream's own publish rate from Rust, without bus: the JetStream store's ceiling.
    Jetstream(jetstream::JetStreamBench),
    /// Two nodes on one JetStream, one killed: time until its subscriber gets events again.
    Failover(failover::FailoverBench),
    /// Cache invalidations through a sync bus, one publisher to N nodes: rate, latency.
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
