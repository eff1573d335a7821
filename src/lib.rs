//! `bus`: a persistent message bus spoken over plain HTTP, compatible with the
//! ella.to/bus server.
//!
//! Services publish events with `POST`, subscribe with Server-Sent Events and acknowledge
//! with `PUT`; events are kept in one append-only log per namespace. This crate is the
//! server and the command-line tools around it, and a library for programs that embed
//! them.
//!
//! Modules, from the disk up:
//! - [`store`]: the durable per-namespace logs (segments, indexes, group commit, recovery).
//! - [`event`]: the stored and streamed forms of an event; [`timestamp`] and [`duration`]
//!   the time formats of the wire contract; [`units`] sizes and durations as flags take
//!   them; [`random`] the random ids.
//! - [`subject`]: subjects and subscription patterns.
//! - [`broker`]: publish, subscribe, manual acks, inboxes and deduplication on the logs.
//! - [`http`]: the HTTP/SSE API; [`server`] its lifecycle; [`reload`] re-reading its
//!   files (credentials, certificate) while it runs; [`memory`] the memory budget that
//!   decides when new work must wait.
//! - [`config`]: server settings from flags and `BUS_*` environment variables.
//! - [`wire`]: what crosses the wire (event JSON, `X-BUS-*` header names, query
//!   parameters, consumer listings), defined once for the server, the tools and the client.
//! - [`client`]: an HTTP client for the server, which the CLI tools use; [`syncbus`] the
//!   cache-invalidation interface on top of it.
//! - [`cli`]: the `bus` subcommands; [`reference`] reads the reference server's data
//!   directory for `bus import`.
//!
//! With `default-features = false, features = ["client"]` only [`client`], [`syncbus`],
//! [`wire`], [`duration`], [`timestamp`], [`units`] and [`random`] are built: what an
//! application needs to talk to a server (feature `tls` adds `https://` servers; `nats`
//! and `redis` the sync-bus backends).

#[cfg(feature = "server")]
pub mod broker;
#[cfg(feature = "server")]
pub mod cli;
pub mod client;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod doc_support;
pub mod duration;
#[cfg(feature = "server")]
pub mod event;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod memory;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod process_metrics;
pub mod random;
#[cfg(feature = "server")]
pub mod reference;
#[cfg(feature = "server")]
pub mod reload;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod subject;
pub mod syncbus;
pub mod timestamp;
pub mod units;
pub mod wire;
