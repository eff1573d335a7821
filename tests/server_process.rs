//! `bus server` as a process: it opens every declared namespace, stops cleanly on SIGTERM
//! and SIGINT (exit 0, logs marked cleanly closed), reads its settings from flags and
//! `BUS_*` variables, and refuses bad settings with a message naming them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn bus() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bus"));
    for (key, _) in std::env::vars() {
        if key.starts_with("BUS_") {
            command.env_remove(key);
        }
    }
    command
}

/// Starts the server and waits until it says it is ready; returns its stderr lines.
fn start(mut command: Command) -> (Child, mpsc::Receiver<String>) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.contains("bus server started") => return (child, rx),
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not start: {e}");
            }
        }
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..200 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    child.kill().unwrap();
    panic!("server did not exit within 5 s");
}

fn clean_end(data: &Path, namespace: &str) -> Option<u64> {
    let text = std::fs::read_to_string(data.join(namespace).join("meta.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    meta["clean_end"].as_u64()
}

#[test]
fn sigterm_and_sigint_stop_the_server_cleanly() {
    let data = tempfile::tempdir().unwrap();
    for signal_name in ["TERM", "INT"] {
        let mut command = bus();
        command.args(["server", "--namespaces", "app,orders", "--path"]);
        command.arg(data.path());
        let (mut child, lines) = start(command);
        assert_eq!(
            clean_end(data.path(), "app"),
            None,
            "marked open while running"
        );
        signal(&child, signal_name);
        let status = wait_exit(&mut child);
        assert!(status.success(), "SIG{signal_name}: exit status {status}");
        let log: Vec<String> = lines.try_iter().collect();
        assert!(
            log.iter().any(|l| l.contains("bus server stopped")),
            "{log:?}"
        );
        for namespace in ["app", "orders"] {
            assert_eq!(clean_end(data.path(), namespace), Some(0));
        }
    }
}

#[test]
fn settings_come_from_the_environment_and_flags_win() {
    let data = tempfile::tempdir().unwrap();
    let env_path = data.path().join("from-env");
    let flag_path = data.path().join("from-flag");
    let mut command = bus();
    command
        .args(["server"])
        .env("BUS_PATH", &env_path)
        .env("BUS_NAMESPACES", "alpha,beta")
        .env("BUS_FSYNC", "interval=50ms")
        .env("BUS_SEGMENT_SIZE", "1MiB");
    let (mut child, _) = start(command);
    signal(&child, "TERM");
    assert!(wait_exit(&mut child).success());
    assert!(env_path.join("alpha").join("meta.json").exists());
    assert!(env_path.join("beta").join("meta.json").exists());

    let mut command = bus();
    command
        .args(["server", "--path"])
        .arg(&flag_path)
        .env("BUS_PATH", &env_path)
        .env("BUS_NAMESPACES", "gamma");
    let (mut child, _) = start(command);
    signal(&child, "TERM");
    assert!(wait_exit(&mut child).success());
    assert!(flag_path.join("gamma").join("meta.json").exists());
    assert!(!env_path.join("gamma").exists());
}

#[test]
fn bad_settings_are_refused_with_a_clear_message() {
    let data = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["server"], "--namespaces"),
        (
            &["server", "--namespaces", "app", "--fsync", "sometimes"],
            "invalid fsync policy",
        ),
        (
            &["server", "--namespaces", "app", "--segment-size", "12x"],
            "unknown unit",
        ),
        (&["server", "--namespaces", "_bus_"], "reserved"),
        (&["server", "--namespaces", "a.b"], "invalid namespace"),
        (&["server", "--namespaces", "app,app"], "declared twice"),
    ];
    for (args, expected) in cases {
        let output = bus()
            .args(*args)
            .arg("--path")
            .arg(data.path())
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let output = bus()
        .args(["server", "--namespaces", "app", "--path"])
        .arg(data.path())
        .env("BUS_LOG_LEVEL", "LOUD")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("BUS_LOG_LEVEL"));
}

#[test]
fn a_second_server_on_the_same_directory_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let mut command = bus();
    command
        .args(["server", "--namespaces", "app", "--path"])
        .arg(data.path());
    let (mut first, _) = start(command);
    let output = bus()
        .args(["server", "--namespaces", "app", "--path"])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("in use"));
    signal(&first, "TERM");
    assert!(wait_exit(&mut first).success());
}
