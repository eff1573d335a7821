//! Encryption at rest through the real binary: a server with `--secret-key` across
//! restarts and key mistakes, resuming by id, and `copy` plain → encrypted → plain with
//! `dump` and `debug` reading encrypted directories.

use std::path::Path;
use std::time::Duration;

use crate::common::cli::*;
use crate::common::process::{bus, ServerProcess};

const KEY: &str = "a secret of some length";

fn start(data: &Path, key: Option<&str>) -> ServerProcess {
    let mut command = bus();
    command.args([
        "server",
        "--addr",
        "127.0.0.1:0",
        "--namespaces",
        "app",
        "--segment-size",
        "4KiB",
        "--path",
    ]);
    command.arg(data);
    if let Some(key) = key {
        command.env("BUS_SECRET_KEY", key);
    }
    ServerProcess::start(command)
}

fn stop(mut server: ServerProcess) {
    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

fn host(server: &ServerProcess) -> String {
    server.url.trim_end_matches('/').to_owned()
}

fn publish(host: &str, count: usize) -> Vec<String> {
    (0..count)
        .map(|n| {
            let out = run(
                &[
                    "put",
                    "--host",
                    host,
                    "--subject",
                    "app.secret",
                    "--data",
                    &format!("{{\"n\":{n},\"text\":\"visible-only-to-key-holders\"}}"),
                ],
                None,
            );
            let line: serde_json::Value = serde_json::from_str(out.ok().trim()).unwrap();
            line["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[test]
fn an_encrypted_server_restarts_with_its_key_only() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path(), Some(KEY));
    let ids = publish(&host(&server), 60);
    let dumped = run(
        &["dump", "--host", &host(&server), "--namespace", "app"],
        None,
    )
    .ok()
    .to_owned();
    stop(server);

    for entry in std::fs::read_dir(data.path().join("app")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("visible-only-to-key-holders"));
    }

    let server = start(data.path(), Some(KEY));
    let host = host(&server);
    assert_eq!(
        run(&["dump", "--host", &host, "--namespace", "app"], None).ok(),
        dumped
    );
    // Resuming after an id reads from the encrypted segments.
    let out = run(
        &[
            "get",
            "--host",
            &host,
            "--subject",
            "app.secret",
            "--start",
            &ids[40],
            "--count",
            "3",
        ],
        None,
    );
    let resumed: Vec<String> = out
        .lines()
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(resumed, ids[41..44]);
    stop(server);

    for (key, expected) in [
        (Some("not the key"), "encrypted with a different secret key"),
        (None, "is encrypted: give its secret key"),
    ] {
        let mut command = bus();
        command.args([
            "server",
            "--addr",
            "127.0.0.1:0",
            "--namespaces",
            "app",
            "--path",
        ]);
        command.arg(data.path());
        if let Some(key) = key {
            command.args(["--secret-key", key]);
        }
        let output = command.output().unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
}

#[test]
fn copy_plain_to_encrypted_and_back_is_identical() {
    let plain = tempfile::tempdir().unwrap();
    let server = start(plain.path(), None);
    publish(&host(&server), 80);
    stop(server);
    let plain_path = plain.path().to_str().unwrap();
    let original = run(&["dump", "--path", plain_path], None).ok().to_owned();
    assert_eq!(original.lines().count(), 80);

    let encrypted = tempfile::tempdir().unwrap();
    let encrypted_path = encrypted.path().to_str().unwrap();
    run(
        &[
            "copy",
            "--from",
            plain_path,
            "--to",
            encrypted_path,
            "--dst-secret-key",
            KEY,
            "--block-size",
            "512",
        ],
        None,
    )
    .ok();
    assert_eq!(
        run(
            &["dump", "--path", encrypted_path, "--secret-key", KEY],
            None
        )
        .ok(),
        original
    );

    // The key mistakes, offline too.
    let no_key = run(&["dump", "--path", encrypted_path], None);
    assert_eq!(no_key.code, 1);
    assert!(
        no_key.stderr.contains("is encrypted: give its secret key"),
        "{no_key:?}"
    );
    let key_on_plain = run(&["debug", "--path", plain_path, "--secret-key", KEY], None);
    assert!(
        key_on_plain.stderr.contains("is not encrypted"),
        "{key_on_plain:?}"
    );

    let debug = run(
        &[
            "debug",
            "--path",
            encrypted_path,
            "--secret-key",
            KEY,
            "--verify",
        ],
        None,
    );
    let text = debug.ok();
    assert!(
        text.contains("events:    80") && text.contains("verify:    ok, 80 records"),
        "{text}"
    );

    // Re-encrypt under another key, then back to plain.
    let rekeyed = tempfile::tempdir().unwrap();
    let rekeyed_path = rekeyed.path().to_str().unwrap();
    run(
        &[
            "copy",
            "--from",
            encrypted_path,
            "--to",
            rekeyed_path,
            "--src-secret-key",
            KEY,
            "--dst-secret-key",
            "another key",
        ],
        None,
    )
    .ok();
    let back = tempfile::tempdir().unwrap();
    let back_path = back.path().to_str().unwrap();
    run(
        &[
            "copy",
            "--from",
            rekeyed_path,
            "--to",
            back_path,
            "--src-secret-key",
            "another key",
        ],
        None,
    )
    .ok();
    assert_eq!(run(&["dump", "--path", back_path], None).ok(), original);

    // A flipped byte in the encrypted copy: verify names the file and offset.
    let segment = encrypted.path().join("app/00000000000000000000.log");
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[200] ^= 0x40;
    std::fs::write(&segment, &bytes).unwrap();
    let verify = run(
        &[
            "debug",
            "--path",
            encrypted_path,
            "--secret-key",
            KEY,
            "--verify",
        ],
        None,
    );
    assert_eq!(verify.code, 1, "{verify:?}");
    let damage = verify
        .stdout
        .lines()
        .find(|l| l.starts_with("  DAMAGE:"))
        .unwrap_or_else(|| panic!("{verify:?}"));
    assert!(
        damage.contains("00000000000000000000.log at offset") && damage.contains("authentication"),
        "{damage}"
    );
}
