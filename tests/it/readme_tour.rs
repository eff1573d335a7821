//! The curl tour of README.md, run as written against a real server: every command in it
//! must work.

use std::process::Command;

use crate::common::process::ServerProcess;

#[test]
fn the_readme_curl_tour_works() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme
        .split("<!-- tour:begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- tour:end -->").next())
        .expect("README.md marks its tour");
    let script = block
        .trim()
        .strip_prefix("```sh")
        .and_then(|s| s.strip_suffix("```"))
        .expect("the tour is one sh block");

    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_on(data.path(), &["--namespaces", "app,orders"]);
    let addr = server
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let script = script.replace("localhost:2021", addr);
    let work = tempfile::tempdir().unwrap();
    let output = Command::new("bash")
        .args(["-c", &script])
        .current_dir(work.path())
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.trim().is_empty(),
        "the tour printed errors: {stderr}\n{stdout}"
    );

    // Publishing answered 202 with the event's headers.
    assert!(stdout.contains("HTTP/1.1 202 Accepted"), "{stdout}");
    assert!(
        stdout.to_ascii_lowercase().contains("x-bus-event-id: e_"),
        "{stdout}"
    );
    // The replay shows both events; the manual-ack stream shows the second one only
    // because the first was acknowledged.
    assert_eq!(
        stdout.matches(r#""subject":"orders.created""#).count(),
        2,
        "{stdout}"
    );
    assert_eq!(
        stdout.matches(r#""subject":"orders.paid""#).count(),
        2,
        "{stdout}"
    );
    // The ack and the reply.
    assert_eq!(
        stdout.matches("HTTP/1.1 202 Accepted").count(),
        2,
        "{stdout}"
    );
    assert!(stdout.contains(r#""subject":"_bus_.quote-42""#), "{stdout}");
    assert!(stdout.contains(r#""payload":{"price":12.5}"#), "{stdout}");
}
