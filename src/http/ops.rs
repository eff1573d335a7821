//! Endpoints for operators, on paths that the event API (all of it at `/`) never uses:
//!
//! - `GET /healthz` — liveness: `200 ok` while the process serves HTTP (`/health` is the
//!   same, kept for earlier clients and health checks).
//! - `GET /readyz` — readiness: `200 ready` while every namespace's log takes appends;
//!   `503` with the reason when one has halted after a storage failure or the server is
//!   shutting down.
//! - `GET /metrics` — Prometheus text format (version 0.0.4); every family is listed in
//!   HTTP_API.md, "Metrics" (a test fails when one is exported and not listed there);
//!   with `--auth-file`, for tokens granted `metrics`. Every sample carries the label
//!   `node` (`--node-name`), so that the nodes of one JetStream can be told apart.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};

use super::auth::{Operation, Target};
use super::error::unavailable;
use super::query::Params;
use super::AppState;
use crate::memory::Work;
use crate::metrics::{family, label, Histogram};
use crate::process_metrics::ProcessStats;
use crate::wire::ConsumerInfo;

pub async fn healthz() -> &'static str {
    "ok\n"
}

pub async fn readyz(State(app): State<AppState>) -> Response {
    match readiness(&app) {
        Ok(()) => "ready\n".into_response(),
        Err(reason) => unavailable(reason).into_response(),
    }
}

/// Whether the server takes events now: `Err` with the reason when it is shutting down or
/// a namespace's log halted after a storage failure (`/readyz`, and the console's stats).
pub fn readiness(app: &AppState) -> Result<(), String> {
    if *app.shutdown.borrow() {
        return Err("the server is shutting down".to_owned());
    }
    for log in app.broker.logs() {
        if let Some(cause) = log.halted() {
            return Err(format!(
                "namespace {} refuses appends after a storage failure ({cause}); restart the server",
                log.namespace()
            ));
        }
    }
    Ok(())
}

pub async fn metrics(State(app): State<AppState>, params: Params, headers: HeaderMap) -> Response {
    if let Err(denied) = app.admit(&headers, &params, Operation::Metrics, Target::Any) {
        return denied.into_response();
    }
    let broker = Arc::clone(&app.broker);
    // Sizes on disk, stored consumers and the process's figures come from reading files
    // and directories: off the async workers.
    let (disk_bytes, consumers, process) = tokio::task::spawn_blocking(move || {
        let disk_bytes = broker
            .logs()
            .map(|log| {
                (
                    log.namespace().to_owned(),
                    log.usage().ok().map(|usage| usage.bytes),
                )
            })
            .collect::<Vec<_>>();
        let consumers = broker
            .logs()
            .filter_map(|log| {
                let namespace = log.namespace().to_owned();
                Some((namespace.clone(), broker.consumers(&namespace).ok()?))
            })
            .collect::<Vec<_>>();
        (disk_bytes, consumers, ProcessStats::read())
    })
    .await
    .unwrap_or_default();
    let mut text = render(&app, &disk_bytes);
    render_consumers(&mut text, &consumers);
    app.traffic.render(&mut text);
    app.retention.render(&mut text);
    process.render(&mut text);
    let text = crate::metrics::with_label(&text, "node", &app.node);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn render(app: &AppState, disk_bytes: &[(String, Option<u64>)]) -> String {
    let mut out = String::new();
    let logs: Vec<_> = app.broker.logs().collect();
    let counts = app.broker.counts();

    family(
        &mut out,
        "bus_build_info",
        "gauge",
        "Always 1; the labels say which build runs: the crate version and the git commit it was built from (\"unknown\" outside a git checkout).",
    );
    let _ = writeln!(
        out,
        "bus_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        label(env!("CARGO_PKG_VERSION")),
        label(crate::metrics::BUILD_COMMIT)
    );

    family(
        &mut out,
        "bus_events_published_total",
        "counter",
        "Events stored since the server started, by namespace (inbox events are bus_inbox_relayed_total).",
    );
    for log in &logs {
        let namespace = label(log.namespace());
        let appended = log.commit_timings().group_events.sum();
        let _ = writeln!(
            out,
            "bus_events_published_total{{namespace=\"{namespace}\"}} {appended}"
        );
    }
    family(
        &mut out,
        "bus_inbox_relayed_total",
        "counter",
        "Inbox events (_bus_.… subjects: replies, confirmations) relayed in memory to their subscribers; never stored.",
    );
    let _ = writeln!(out, "bus_inbox_relayed_total {}", counts.inbox_published);

    family(
        &mut out,
        "bus_events_delivered_total",
        "counter",
        "Events sent to subscribers since the server started, redeliveries included.",
    );
    for (namespace, delivered) in &counts.delivered {
        let _ = writeln!(
            out,
            "bus_events_delivered_total{{namespace=\"{}\"}} {delivered}",
            label(namespace)
        );
    }

    family(
        &mut out,
        "bus_log_events",
        "gauge",
        "Events in the namespace's log.",
    );
    for log in &logs {
        let _ = writeln!(
            out,
            "bus_log_events{{namespace=\"{}\"}} {}",
            label(log.namespace()),
            log.committed()
        );
    }

    family(
        &mut out,
        "bus_log_disk_bytes",
        "gauge",
        "Bytes of the namespace's files on disk.",
    );
    for (namespace, bytes) in disk_bytes {
        if let Some(bytes) = bytes {
            let _ = writeln!(
                out,
                "bus_log_disk_bytes{{namespace=\"{}\"}} {bytes}",
                label(namespace)
            );
        }
    }

    histogram_family(
        &mut out,
        "bus_publish_duration_seconds",
        "Time from the start of a publish request to its answer.",
        [("", app.publish_micros.as_ref())],
        1e-6,
    );
    let labelled: Vec<(String, &Arc<dyn crate::store::EventLog>)> = logs
        .iter()
        .map(|log| (format!("namespace=\"{}\"", label(log.namespace())), *log))
        .collect();
    histogram_family(
        &mut out,
        "bus_fsync_duration_seconds",
        "Duration of each fdatasync of a log segment.",
        labelled
            .iter()
            .map(|(l, log)| (l.as_str(), log.commit_timings().sync_micros)),
        1e-6,
    );
    histogram_family(
        &mut out,
        "bus_group_commit_events",
        "Events written and synced together in one group commit.",
        labelled
            .iter()
            .map(|(l, log)| (l.as_str(), log.commit_timings().group_events)),
        1.0,
    );

    let gauges = [
        (
            "bus_subscriptions_active",
            "Event streams open.",
            app.limits.max_subscriptions - app.subscriptions.available_permits(),
        ),
        (
            "bus_connections_active",
            "HTTP connections being served.",
            app.limits.max_connections - app.connections.available_permits(),
        ),
    ];
    for (name, help, value) in gauges {
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
    let counters = [
        (
            "bus_redeliveries_total",
            "Events delivered again because no ack came within the redelivery time.",
            counts.redeliveries,
        ),
        (
            "bus_inbox_dropped_total",
            "Inbox events not delivered to a subscriber that was too far behind.",
            counts.inbox_dropped,
        ),
        (
            "bus_dead_letters_total",
            "Events durable consumers gave up after their last delivery and appended to their dead-letter subject.",
            counts.dead_letters,
        ),
        (
            "bus_deliveries_given_up_total",
            "Events ephemeral manual-ack consumers gave up after their last delivery (dropped: they have no dead-letter subject).",
            counts.given_up,
        ),
        (
            "bus_duplicates_refused_total",
            "Publishes refused 409 as duplicates: a deduplication key already seen, or an event id already stored.",
            counts.duplicates,
        ),
    ];
    for (name, help, value) in counters {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }

    let memory = &app.memory;
    let memory_gauges = [
        (
            "bus_memory_budget_bytes",
            "The memory budget (--max-memory): beyond it new publishes and subscriptions are answered 503.",
            memory.budget(),
        ),
        (
            "bus_memory_used_bytes",
            "The server's anonymous resident memory at the last sample (every 100 ms).",
            memory.used(),
        ),
    ];
    for (name, help, value) in memory_gauges {
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(
        &mut out,
        "bus_memory_refusals_total",
        "counter",
        "Requests answered 503 because the memory budget was spent, by request.",
    );
    for (request, work) in [("publish", Work::Publish), ("subscribe", Work::Subscribe)] {
        let _ = writeln!(
            out,
            "bus_memory_refusals_total{{request=\"{request}\"}} {}",
            memory.refusals(work)
        );
    }
    family(
        &mut out,
        "bus_memory_trims_total",
        "counter",
        "Times the allocator was asked to return freed memory to the system.",
    );
    let _ = writeln!(out, "bus_memory_trims_total {}", memory.trims());
    out
}

fn render_consumers(out: &mut String, consumers: &[(String, Vec<ConsumerInfo>)]) {
    type Gauge = (&'static str, &'static str, fn(&ConsumerInfo) -> u64);
    let gauges: [Gauge; 2] = [
        (
            "bus_consumer_lag",
            "Events in the log from a durable consumer's acked floor on.",
            |c| c.lag,
        ),
        (
            "bus_consumer_pending",
            "Events a durable consumer has read and not had acknowledged.",
            |c| c.pending,
        ),
    ];
    for (name, help, value) in gauges {
        family(out, name, "gauge", help);
        for (namespace, list) in consumers {
            for consumer in list {
                let _ = writeln!(
                    out,
                    "{name}{{namespace=\"{}\",consumer=\"{}\"}} {}",
                    label(namespace),
                    label(&consumer.name),
                    value(consumer)
                );
            }
        }
    }
}

fn histogram_family<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (&'a str, &'a Histogram)>,
    scale: f64,
) {
    family(out, name, "histogram", help);
    for (labels, histogram) in series {
        histogram.render(out, name, labels, scale);
    }
}
