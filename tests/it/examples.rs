//! The Rust examples (`examples/*.rs`, which `cargo test` builds) run against a real
//! server and do what they say.

use std::path::PathBuf;
use std::process::Command;

use crate::common::backends::Backend;
use crate::common::process::ServerProcess;

/// An example's binary, next to this test's in the target directory.
fn example(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let path = deps
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(path.exists(), "{} is not built", path.display());
    path
}

#[test]
fn the_rust_examples_run() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_on(data.path(), &["--namespaces", "app,orders"]);
    let cases = [
        ("pubsub", "received e_"),
        ("request_reply", r#"answered: {"price":12.5}"#),
        ("confirm", "confirmed by 2 consumers"),
    ];
    for (name, expected) in cases {
        let output = Command::new(example(name))
            .env("BUS_HOST", &server.url)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{name}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains(expected), "{name}: {stdout}");
    }
    let nats = Backend::nats();
    let redis = Backend::redis();
    let kafka = Backend::kafka();
    let mut backends = vec![("memory", None), ("bus", None), ("mesh", None)];
    if let Some(nats) = &nats {
        let url = format!("nats://127.0.0.1:{}", nats.port);
        backends.push(("nats", Some(("NATS_URL", url))));
    }
    if let Some(redis) = &redis {
        let url = format!("redis://127.0.0.1:{}/", redis.port);
        backends.push(("redis", Some(("REDIS_URL", url))));
    }
    if let Some(kafka) = &kafka {
        let brokers = format!("127.0.0.1:{}", kafka.port);
        backends.push(("kafka", Some(("KAFKA_BROKERS", brokers))));
    }
    for (backend, url) in backends {
        let output = Command::new(example("cache_invalidation"))
            .arg(backend)
            .env("BUS_HOST", &server.url)
            .envs(url)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{backend}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains("node-b reads Some(\"Grace\") after node-a's set"),
            "{backend}: {stdout}"
        );
        assert!(stdout.contains("consistent"), "{backend}: {stdout}");
    }
    let pubsub = Command::new(example("pubsub"))
        .env("BUS_HOST", &server.url)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&pubsub.stdout)
            .matches("received")
            .count(),
        3
    );
}
