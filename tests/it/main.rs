//! The integration tests, in one test binary: linking the whole dependency tree once
//! rather than once per file is most of what `cargo test` saves (see DESIGN.md).
//!
//! A module per area; its tests are named after it, so one area runs with
//!
//! ```sh
//! cargo test --all-features --test it http_publish::
//! ```
//!
//! and one test with `cargo test --all-features --test it http_publish::<name> -- --exact`.
//!
//! Every test runs in this one process, beside tests of other areas (`cargo test` runs as
//! many at once as the machine has cores). What a test changes in its process is then
//! seen by the others: it may install the TLS provider (idempotent) and raise the
//! open-file limit to the hard limit, and must not set environment variables, a global
//! tracing subscriber or anything else process-wide. A test that measures memory does so
//! on a server process it started (`common::process`), never on this one.
//!
//! The servers the tests start in this process run on the file store; with
//! `BUS_TEST_STORE=jetstream` they run on JetStream, each on a nats-server of its own
//! (`.ci/run` runs the HTTP, SDK and `bus` sync-bus tests both ways; the few about the
//! file store's own files say they skip).
//!
//! [`common`] holds the helpers; fixtures are in `tests/fixtures`, and proptest keeps the
//! cases that failed once in `tests/proptest-regressions/<module>.txt`.

mod common;

// The storage engine, used directly.
mod store_contract;
mod store_crash;
mod store_encryption;
mod store_jetstream;
mod store_model;
mod store_recovery;
mod store_roundtrip;
mod store_segments;

// The HTTP API of a server started in this process.
mod http_auth;
mod http_confirm_reply;
mod http_console;
mod http_consumers;
mod http_http2;
mod http_inbox_cors;
mod http_jetstream;
mod http_limits;
mod http_manual_ack;
mod http_namespaces;
mod http_ops;
mod http_publish;
mod http_replay;
mod http_retention;
mod http_security;
mod http_subscribe;
mod http_tls;

// `bus server` as a process: signals, faults, and its memory under load; several of them
// on one JetStream losing a machine.
mod cluster_failover;
mod memory_consumers;
mod memory_dedup_inbox;
mod memory_publish;
mod server_faults;
mod server_process;
mod server_slow_consumers;

// The `bus` commands, the client SDK, the sync bus, and what the docs and examples promise.
mod bench_smoke;
mod cli_archive;
mod cli_encryption;
mod cli_events;
mod cli_health;
mod cli_import;
mod client_sdk;
mod examples;
mod readme_tour;
mod syncbus_conformance;
mod syncbus_mesh;
