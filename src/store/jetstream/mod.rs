//! The JetStream store: each namespace's log kept in a NATS JetStream stream, and its
//! manual-ack consumers as JetStream consumers, so that the bus's data and its consumers'
//! progress live in a replicated, existing distributed log instead of a local directory.
//!
//! The mapping, and what it promises:
//! - **One stream per namespace**, `BUS_<namespace>`, taking the namespace's subjects
//!   (`<ns>` and `<ns>.>`, the same syntax as NATS). A position is the stream sequence
//!   minus one, so positions are gapless from 0 as on the file store (the stream never
//!   deletes single messages; its limits remove the oldest ones only).
//! - **The message is the event**: its body is the event's JSON exactly as the file store
//!   keeps it (id, creation time and `index` included), so a read hands it out without
//!   re-encoding — sealed first when the store is encrypted ([`sealing`]). Server-assigned
//!   ids encode the position under the stream's generation
//!   (drawn at creation, kept in the stream's metadata), which makes `start=<id>` a read
//!   at a sequence, never a search.
//! - **Positions are claimed, not guessed**: every append carries
//!   `Nats-Expected-Last-Sequence`, so JetStream refuses it if anything else was written
//!   since; the log then learns the stream's end and tries again. A batch is one atomic
//!   batch publish (`Nats-Batch-*` headers, nats-server 2.12 or later): all of it is
//!   stored, or none.
//! - **An append returns once JetStream acknowledged it**: with replicas, once a quorum
//!   has it; with the server's `sync_interval: always`, once it is on disk — the promise
//!   of the file store's `--fsync always`.
//! - **Commit times** are the log's own, in a header of every message, so a search by time
//!   (a binary search of single direct gets) is never misled by a `created_at` a client
//!   chose.
//! - **Reads are shared** by a node's readers of a namespace ([`reads`]): recent events
//!   from memory, older ones in runs fetched once and ahead of the readers.
//! - **Manual-ack consumers are JetStream consumers** ([`consumers`]): what each was
//!   delivered and has acknowledged lives in JetStream; a node's connections pull from
//!   them within their own windows.
//! - **Every node sees every event**: nodes announce the ends of their commits, and check
//!   the streams' ends every second ([`follow`]); readers fetch what others appended.
//! - **Ids chosen by clients** (the restore and copy tools) are indexed in a key-value
//!   bucket per namespace, `BUS_IDS_<namespace>`: the id's position is put there before
//!   the append, and a lookup checks that the event at that position has the id. A
//!   crash between the two writes leaves an entry that points at another event (or at
//!   nothing): it is ignored, so an id is never found at the wrong event, and never taken
//!   twice.
//!
//!
//! Files: `connection.rs` (reaching JetStream, shared requests), `log.rs` (the log:
//! appends, group commits, ids, time, retention), `reads.rs`, `follow.rs`, `sealing.rs`, and
//! `consumers.rs` (manual-ack consumers as JetStream consumers), `relay.rs` (requests
//! between nodes over NATS core, for what is never stored).

mod connection;
mod consumers;
mod follow;
mod keys;
mod log;
mod reads;
mod relay;
mod sealing;

pub use self::connection::{connect, stream_name, JetStreamConfig};
pub use self::consumers::JetStreamConsumers;
pub use self::keys::DEFAULT_KEY_WINDOW;
pub use self::log::JetStreamLog;
pub use self::relay::JetStreamRelay;
pub use self::sealing::Sealing;
