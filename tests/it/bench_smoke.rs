//! `bus bench` against an embedded server, at toy sizes: each measurement runs, checks its
//! work and prints its JSON object. (The figures themselves are in BENCHMARKS.md; tests
//! never assert timings.)

use serde_json::Value;

use crate::common::cli::run;

fn bench(args: &[&str]) -> Value {
    let mut all = vec!["bench"];
    all.extend(args);
    all.extend(["--embedded", "--json"]);
    let out = run(&all, None);
    let line = out.ok().lines().last().unwrap_or_default().to_owned();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{args:?}: {line:?}: {e}"))
}

#[test]
fn every_http_benchmark_runs_and_checks_its_work() {
    let publish = bench(&["publish", "--events", "300", "--connections", "4"]);
    assert_eq!(publish["events"], 300);
    let batches = bench(&[
        "publish",
        "--events",
        "1000",
        "--batch",
        "100",
        "--connections",
        "2",
    ]);
    assert_eq!(batches["events"], 1000);

    let fanout = bench(&[
        "fanout",
        "--subscribers",
        "3",
        "--events",
        "60",
        "--publishers",
        "2",
    ]);
    assert_eq!(fanout["deliveries"], 180);
    assert_eq!(fanout["missing"], 0);
    assert_eq!(fanout["duplicates"], 0);
    assert_eq!(fanout["out_of_order"], 0);

    let replay = bench(&["replay", "--events", "2500"]);
    assert_eq!(replay["events"], 2500);

    let resume = bench(&["resume", "--events", "3000", "--rounds", "2"]);
    assert_eq!(resume["events_in_namespace"], 3001);
    assert!(resume["start=<id> first event median ms"].is_number());

    let ack = bench(&["ack", "--events", "40"]);
    assert_eq!(ack["events"], 40);
    let window = bench(&["ack", "--events", "300", "--window", "50"]);
    assert_eq!(window["events"], 300);

    let reply = bench(&["reply", "--requests", "20"]);
    assert_eq!(reply["requests"], 20);
    assert!(reply["latency_p50_ms"].as_f64().unwrap() > 0.0);

    let idle = bench(&["idle", "--subscribers", "20"]);
    assert_eq!(idle["subscriptions"], 20);
    assert!(idle["server_rss_open_mib"].as_f64().unwrap() > 0.0);

    let acks = bench(&[
        "durable-acks",
        "--consumers",
        "3",
        "--backlog",
        "2000",
        "--window",
        "10",
        "--ack-interval-ms",
        "20",
        "--seconds",
        "0.3",
        "--warmup-ms",
        "100",
        "--connections",
        "2",
    ]);
    assert_eq!(acks["consumers"], 3);
    assert!(acks["events"].as_u64().unwrap() > 0);
    assert!(acks["acks_while_publishing"].as_u64().unwrap() > 0);

    let catchup = bench(&["durable-catchup", "--events", "3000", "--window", "100"]);
    assert_eq!(catchup["events"], 3000);
    assert_eq!(catchup["durable_consumer_disk_reads"], 0);
}

/// `bus bench syncbus <args> --json`: its JSON objects, one per line (no server: memory
/// and mesh).
fn syncbus_bench(args: &[&str]) -> Vec<Value> {
    let mut all = vec!["bench", "syncbus"];
    all.extend(args);
    all.push("--json");
    let out = run(&all, None);
    out.ok()
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

#[test]
fn the_syncbus_benchmark_runs_and_checks_its_work() {
    let memory = &syncbus_bench(&["--backend", "memory", "--events", "2000"])[0];
    assert_eq!(memory["backend"], "memory");
    assert_eq!(memory["deliveries"], 2000 * 4);
    assert_eq!(memory["nodes_delivered"], 2000 * 4);
    assert!(memory["latency_p50_ms"].is_number());

    let mesh = syncbus_bench(&[
        "--backend",
        "mesh",
        "--events",
        "2000",
        "--subscribers",
        "2",
        "--loss",
        "0.05",
    ]);
    assert_eq!(mesh[0]["backend"], "mesh");
    assert_eq!(mesh[0]["deliveries"], 2000 * 2);
    assert_eq!(mesh[0]["nodes_delivered"], 2000 * 2);
    // Then what the mesh sent, the retransmissions that made up for the loss among it.
    assert!(mesh[1]["data"].as_u64().unwrap() > 0, "{:?}", mesh[1]);
    assert!(mesh[1]["dropped"].as_u64().unwrap() > 0, "{:?}", mesh[1]);

    // Lanes own their keys: fewer keys than publishes in flight is refused.
    let refused = run(
        &["bench", "syncbus", "--backend", "memory", "--keys", "8"],
        None,
    );
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("--keys"), "{refused:?}");
}

#[test]
fn the_fsync_benchmark_syncs_each_write() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        &[
            "bench",
            "fsync",
            "--syncs",
            "50",
            "--dir",
            dir.path().to_str().unwrap(),
            "--json",
        ],
        None,
    );
    let line = out.ok().lines().last().unwrap_or_default().to_owned();
    let fsync: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert_eq!(fsync["syncs"], 50);
    assert!(fsync["sync_p50_ms"].as_f64().unwrap() > 0.0, "{fsync}");
    // Its file is gone afterwards.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
