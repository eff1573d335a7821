//! `bus put`, `bus get` and `bus ack` as real processes against a real server: the round
//! trip, payload sources, confirmations and request/reply with `get --ack auto` workers,
//! manual acks, reconnecting across a server restart, and exit codes.

use std::time::Duration;

use serde_json::Value;

use crate::common;
use crate::common::cli::*;
use crate::common::process::ServerProcess;

fn host(server: &ServerProcess) -> String {
    server.url.trim_end_matches('/').to_owned()
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
}

#[test]
fn put_then_get_round_trip_with_every_payload_source() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_on(data.path(), &["--namespaces", "app"]);
    let host = host(&server);
    let file = data.path().join("payload.json");
    std::fs::write(&file, "{\n  \"from\": \"file\"\n}\n").unwrap();
    let file_arg = format!("@{}", file.display());

    let puts: Vec<(Vec<&str>, Option<&str>, Value)> = vec![
        (
            vec!["--data", r#"{"n": 1}"#],
            None,
            serde_json::json!({"n": 1}),
        ),
        (
            vec!["--data", "plain text"],
            None,
            Value::from("plain text"),
        ),
        (
            vec!["--data", &file_arg],
            None,
            serde_json::json!({"from": "file"}),
        ),
        (
            vec!["--data", "-"],
            Some("[1, 2, 3]"),
            serde_json::json!([1, 2, 3]),
        ),
        (
            vec![
                "--data",
                "null",
                "--trace-id",
                "t-1",
                "--key",
                "k-1",
                "--id",
                "e_mine",
            ],
            None,
            Value::Null,
        ),
    ];
    let mut published = Vec::new();
    for (extra, stdin, _) in &puts {
        let mut args = vec!["put", "--host", &host, "--subject", "app.round"];
        args.extend(extra);
        let out = run(&args, *stdin);
        let line = json(out.ok().trim());
        assert!(line["id"].as_str().unwrap().starts_with("e_"), "{line}");
        assert!(
            line["created_at"].as_str().unwrap().ends_with('Z'),
            "{line}"
        );
        published.push(line);
    }
    assert_eq!(published[4]["id"], "e_mine");
    for (i, line) in published.iter().enumerate() {
        assert_eq!(line["index"], i as i64);
    }

    // BUS_HOST works as well as --host.
    let out = run_with_env(
        &[
            "get",
            "--subject",
            "app.*",
            "--start",
            "oldest",
            "--count",
            "5",
        ],
        None,
        &[("BUS_HOST", &host)],
    );
    let lines = out.lines();
    assert_eq!(lines.len(), 5, "{out:?}");
    for ((line, (_, _, payload)), put) in lines.iter().zip(&puts).zip(&published) {
        let event = json(line);
        assert_eq!(event["id"], put["id"]);
        assert_eq!(event["created_at"], put["created_at"]);
        assert_eq!(event["subject"], "app.round");
        assert_eq!(&event["payload"], payload);
    }
    let last = json(lines[4]);
    assert_eq!(last["trace_id"], "t-1");
    assert_eq!(last["key"], "k-1");

    // Starting after an id, in the readable format.
    let first_id = published[0]["id"].as_str().unwrap();
    let out = run(
        &[
            "get",
            "--host",
            &host,
            "--subject",
            "app.round",
            "--start",
            first_id,
            "--count",
            "1",
            "--format",
            "pretty",
        ],
        None,
    );
    let text = out.ok();
    assert!(
        text.starts_with(published[1]["id"].as_str().unwrap()),
        "{text}"
    );
    assert!(
        text.contains("app.round") && text.contains("\"plain text\""),
        "{text}"
    );
}

#[test]
fn errors_are_one_line_with_reliable_exit_codes() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_on(data.path(), &["--namespaces", "app"]);
    let host = host(&server);

    assert_eq!(run(&["health", "--host", &host], None).code, 0);
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["health", "--host", "http://127.0.0.1:1"],
            1,
            "cannot reach the bus server",
        ),
        // The server's own reason comes through.
        (
            vec!["put", "--host", &host, "--subject", "nowhere.x"],
            1,
            "nowhere",
        ),
        (
            vec![
                "put",
                "--host",
                &host,
                "--subject",
                "app.x",
                "--data",
                "{broken",
            ],
            1,
            "not valid JSON",
        ),
        (
            vec!["put", "--host", "http://127.0.0.1:1", "--subject", "app.x"],
            1,
            "cannot reach the bus server",
        ),
        (
            vec!["put", "--host", "ftp://x", "--subject", "app.x"],
            1,
            "invalid server address",
        ),
        (
            vec![
                "put",
                "--host",
                &host,
                "--subject",
                "app.x",
                "--confirm",
                "1",
                "--timeout",
                "300ms",
            ],
            1,
            "timed out after 300ms: 0 of 1",
        ),
        (
            vec![
                "put",
                "--host",
                &host,
                "--subject",
                "app.x",
                "--request-reply",
                "--timeout",
                "200ms",
            ],
            1,
            "timed out",
        ),
        (
            vec![
                "get",
                "--host",
                &host,
                "--subject",
                "app.x",
                "--start",
                "e_missing",
            ],
            1,
            "e_missing",
        ),
        (
            vec!["get", "--host", &host, "--subject", "app..x"],
            1,
            "invalid subject",
        ),
        (
            vec!["get", "--host", &host, "--subject", "app.x", "--reply", "1"],
            2,
            "--reply needs --ack auto",
        ),
        (vec!["put", "--subject"], 2, "--subject"),
        (
            vec![
                "get",
                "--host",
                &host,
                "--subject",
                "app.x",
                "--ack",
                "sometimes",
            ],
            2,
            "sometimes",
        ),
    ];
    for (args, code, message) in cases {
        let out = run(&args, None);
        assert_eq!(out.code, code, "{args:?}: {out:?}");
        assert!(out.stderr.contains(message), "{args:?}: {out:?}");
        if code != 2 {
            // clap's usage errors are several lines; ours are one (after what `get` says
            // about its subscription).
            let errors: Vec<&str> = out
                .stderr
                .lines()
                .filter(|line| !line.contains("subscribed to"))
                .collect();
            assert_eq!(errors.len(), 1, "{args:?}: {out:?}");
            assert!(errors[0].starts_with("bus: "), "{out:?}");
            assert!(out.stdout.is_empty(), "{out:?}");
        }
    }
}

#[test]
fn confirmations_and_replies_come_from_get_workers() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_on(data.path(), &["--namespaces", "app"]);
    let host = host(&server);

    let mut workers: Vec<Background> = (0..2)
        .map(|_| {
            Background::start(&[
                "get",
                "--host",
                &host,
                "--subject",
                "app.jobs",
                "--ack",
                "auto",
            ])
        })
        .collect();
    for worker in &mut workers {
        worker.wait_for_stderr("subscribed to app.jobs");
    }
    let out = run(
        &[
            "put",
            "--host",
            &host,
            "--subject",
            "app.jobs",
            "--data",
            "1",
            "--confirm",
            "2",
            "--timeout",
            "10s",
        ],
        None,
    );
    let published = json(out.ok().trim());
    assert!(out.stderr.contains("confirmed by 2 consumers"), "{out:?}");
    for worker in &mut workers {
        let line = json(&worker.take_lines(1)[0]);
        assert_eq!(line["id"], published["id"]);
        assert!(line["response_subject"]
            .as_str()
            .unwrap()
            .starts_with("_bus_."));
    }

    // Three confirmations from two workers: the wait ends at the timeout.
    let out = run(
        &[
            "put",
            "--host",
            &host,
            "--subject",
            "app.jobs",
            "--data",
            "2",
            "--confirm",
            "3",
            "--timeout",
            "1s",
        ],
        None,
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("2 of 3"), "{out:?}");
    drop(workers);

    // A worker that replies.
    let mut worker = Background::start(&[
        "get",
        "--host",
        &host,
        "--subject",
        "app.questions",
        "--ack",
        "auto",
        "--reply",
        r#"{"answer": 42}"#,
    ]);
    worker.wait_for_stderr("subscribed to app.questions");
    for question in ["a", "b"] {
        let out = run(
            &[
                "put",
                "--host",
                &host,
                "--subject",
                "app.questions",
                "--data",
                question,
                "--request-reply",
                "--timeout",
                "10s",
            ],
            None,
        );
        assert_eq!(json(out.ok().trim()), serde_json::json!({"answer": 42}));
        assert_eq!(json(&worker.take_lines(1)[0])["payload"], question);
    }
}

#[test]
fn manual_acks_with_bus_ack() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_on(data.path(), &["--namespaces", "app"]);
    let host = host(&server);
    for n in 0..2 {
        run(
            &[
                "put",
                "--host",
                &host,
                "--subject",
                "app.m",
                "--data",
                &n.to_string(),
            ],
            None,
        )
        .ok();
    }
    let mut consumer = Background::start(&[
        "get",
        "--host",
        &host,
        "--subject",
        "app.m",
        "--start",
        "oldest",
        "--ack",
        "manual",
        "--redelivery",
        "30s",
    ]);
    consumer.wait_for_stderr("bus ack --consumer-id");
    let consumer_id = consumer.errors[0]
        .split_whitespace()
        .skip_while(|word| *word != "consumer")
        .nth(1)
        .unwrap()
        .to_owned();
    let first = json(&consumer.take_lines(1)[0]);
    assert_eq!(first["payload"], 0);
    // Stop-and-wait: the second event waits for the ack.
    assert!(consumer
        .stdout
        .recv_timeout(Duration::from_millis(500))
        .is_err());
    run(
        &[
            "ack",
            "--host",
            &host,
            "--consumer-id",
            &consumer_id,
            "--event-id",
            first["id"].as_str().unwrap(),
        ],
        None,
    )
    .ok();
    assert_eq!(json(&consumer.take_lines(1)[0])["payload"], 1);
}

#[test]
fn get_survives_a_server_restart_without_loss_or_repeat() {
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let start = || {
        let mut command = common::process::bus();
        command.args(["server", "--namespaces", "app", "--addr", &addr, "--path"]);
        command.arg(data.path());
        ServerProcess::start(command)
    };
    let mut server = start();
    let host = host(&server);
    let publish = |from: usize, to: usize| {
        for n in from..to {
            run(
                &[
                    "put",
                    "--host",
                    &host,
                    "--subject",
                    "app.r",
                    "--data",
                    &n.to_string(),
                ],
                None,
            )
            .ok();
        }
    };
    publish(0, 20);
    let mut reader = Background::start(&[
        "get",
        "--host",
        &host,
        "--subject",
        "app.r",
        "--start",
        "oldest",
        "--count",
        "60",
    ]);
    let mut payloads: Vec<i64> = reader
        .take_lines(20)
        .iter()
        .map(|l| json(l)["payload"].as_i64().unwrap())
        .collect();

    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    reader.wait_for_stderr("connection lost");
    drop(server);
    let _server = start();
    publish(20, 60);
    payloads.extend(
        reader
            .take_lines(40)
            .iter()
            .map(|l| json(l)["payload"].as_i64().unwrap()),
    );
    assert_eq!(payloads, (0..60).collect::<Vec<i64>>());
    assert_eq!(reader.wait(), 0);
    assert!(
        reader.errors.iter().any(|l| l.contains("reconnected")),
        "{:?}",
        reader.errors
    );
}

#[test]
fn durable_consumers_from_the_command_line() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_on(data.path(), &["--namespaces", "app"]);
    let host = host(&server);
    for n in 0..4 {
        run(
            &[
                "put",
                "--host",
                &host,
                "--subject",
                "app.job",
                "--data",
                &n.to_string(),
            ],
            None,
        )
        .ok();
    }
    let get = |count: &str| {
        run(
            &[
                "get",
                "--host",
                &host,
                "--subject",
                "app.job",
                "--start",
                "oldest",
                "--ack",
                "auto",
                "--consumer",
                "cli-workers",
                "--max-inflight",
                "2",
                "--count",
                count,
            ],
            None,
        )
    };
    let first: Vec<i64> = get("2")
        .lines()
        .iter()
        .map(|l| json(l)["payload"].as_i64().unwrap())
        .collect();
    assert_eq!(first, [0, 1]);
    // The consumer remembers: the next worker continues where the first stopped.
    let second: Vec<i64> = get("2")
        .lines()
        .iter()
        .map(|l| json(l)["payload"].as_i64().unwrap())
        .collect();
    assert_eq!(second, [2, 3]);

    let listed = run(
        &["consumers", "list", "--host", &host, "--namespace", "app"],
        None,
    );
    let consumer = json(listed.ok().lines().next().expect("one consumer"));
    assert_eq!(consumer["name"], "cli-workers");
    assert_eq!(consumer["pattern"], "app.job");
    assert_eq!(consumer["acked_floor"], 4);
    run(
        &[
            "consumers",
            "delete",
            "--host",
            &host,
            "--namespace",
            "app",
            "--name",
            "cli-workers",
        ],
        None,
    )
    .ok();
    let again = run(
        &[
            "consumers",
            "delete",
            "--host",
            &host,
            "--namespace",
            "app",
            "--name",
            "cli-workers",
        ],
        None,
    );
    assert_eq!(again.code, 1);
    assert!(again.stderr.contains("no consumer"), "{}", again.stderr);
    assert!(run(
        &["consumers", "list", "--host", &host, "--namespace", "app"],
        None
    )
    .ok()
    .is_empty());
}

#[test]
fn info_shows_the_namespaces_as_a_table_or_json() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_on(data.path(), &["--namespaces", "app,orders"]);
    let host = host(&server);
    for n in 0..2 {
        run(
            &["put", "app.signup", &n.to_string(), "--host", &host],
            None,
        )
        .ok();
    }

    let table = run(&["info", "--host", &host], None).ok().to_owned();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    let cells = |line: &str| {
        line.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        cells(lines[0]),
        [
            "NAMESPACE",
            "EVENTS",
            "FIRST",
            "LAST",
            "SIZE",
            "SEGMENTS",
            "OLDEST",
            "NEWEST",
            "SUBSCRIBERS",
            "CONSUMERS"
        ]
    );
    let app = cells(lines[1]);
    assert_eq!(app[..4], ["app", "2", "0", "1"], "{table}");
    let orders = cells(lines[2]);
    assert_eq!(orders[..4], ["orders", "0", "0", "-"], "{table}");

    let app = json(
        run(&["info", "app", "--json", "--host", &host], None)
            .ok()
            .trim(),
    );
    assert_eq!(app["namespace"], "app");
    assert_eq!(app["events"], 2);
    assert_eq!(app["last_index"], 1);

    let unknown = run(&["info", "nowhere", "--host", &host], None);
    assert_eq!(unknown.code, 1);
    assert!(
        unknown.stderr.contains("unknown namespace"),
        "{}",
        unknown.stderr
    );
}

#[test]
fn put_takes_arguments_and_get_reads_from_a_position_or_a_time_until_now() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_on(data.path(), &["--namespaces", "app"]);
    let host = host(&server);

    // SUBJECT and DATA as arguments, as `nats pub` takes them; no DATA: standard input.
    let first = json(
        run(&["put", "--host", &host, "app.args", r#"{"n":0}"#], None)
            .ok()
            .trim(),
    );
    let second = json(
        run(&["put", "--host", &host, "app.args"], Some(r#"{"n":1}"#))
            .ok()
            .trim(),
    );
    assert_eq!(
        (first["index"].as_i64(), second["index"].as_i64()),
        (Some(0), Some(1))
    );
    // The reference's flags keep their meaning: --subject without --data, no payload.
    let third = json(
        run(&["put", "--host", &host, "--subject", "app.args"], None)
            .ok()
            .trim(),
    );
    assert_eq!(third["index"], 2);
    // Both forms of one thing is a usage error.
    let both = run(
        &["put", "--host", &host, "app.args", "--subject", "app.args"],
        None,
    );
    assert_eq!(both.code, 2, "{both:?}");

    let get = |extra: &[&str]| {
        let mut args = vec!["get", "--host", &host, "--subject", "app.>"];
        args.extend(extra);
        let out = run(&args, None);
        assert_eq!(out.code, 0, "{out:?}");
        out.lines().iter().map(|l| json(l)).collect::<Vec<_>>()
    };
    // From a position, until what was stored when it opened: the command ends by itself.
    let from_one = get(&["--start-index", "1", "--until-now"]);
    let payloads: Vec<&Value> = from_one.iter().map(|e| &e["payload"]).collect();
    assert_eq!(payloads, [&serde_json::json!({"n": 1}), &Value::Null]);
    // From a time: the second event's creation time starts at it.
    let created = second["created_at"].as_str().unwrap();
    let from_time = get(&["--start-time", created, "--until-now"]);
    assert_eq!(from_time.len(), 2, "{from_time:?}");
    assert_eq!(from_time[0]["id"], second["id"]);
    // Everything, until now.
    assert_eq!(get(&["--start", "oldest", "--until-now"]).len(), 3);

    let bad = run(
        &[
            "get",
            "--host",
            &host,
            "--subject",
            "app.>",
            "--start-time",
            "yesterday",
        ],
        None,
    );
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("--start-time"), "{bad:?}");
    let both = run(
        &[
            "get",
            "--host",
            &host,
            "--subject",
            "app.>",
            "--start-index",
            "1",
            "--start",
            "oldest",
        ],
        None,
    );
    assert_eq!(both.code, 2, "{both:?}");
}
