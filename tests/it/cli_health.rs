//! `bus health`, the container health check, as a real process beside a real server: it
//! finds the server from the server's own settings (`BUS_ADDR`, `BUS_TLS_CERT`; another
//! port, HTTPS, all interfaces), verifies its certificate as a client would (also one for
//! a public name, on the loopback address), and checks readiness (`/readyz`), not only
//! that something answers.
//!
//! Fixtures in tests/fixtures/tls: `cert.pem` is for localhost and 127.0.0.1, signed by
//! `ca.pem`; `public-name-cert.pem` is for bus.example.com only, signed by
//! `public-name-ca.pem` (valid until 2126; their keys protect nothing).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use crate::common::cli::{free_port, run_with_env, Run};
use crate::common::process::{bus, ServerProcess};

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
        .display()
        .to_string()
}

/// `bus server` with these settings in its environment, as in a container.
fn server(env: &[(&str, &str)]) -> ServerProcess {
    let mut command = bus();
    command.arg("server").envs(env.iter().copied());
    ServerProcess::start(command)
}

/// `bus health` with `env` and `more`.
fn health(env: &[(&str, &str)], more: &[(&str, &str)]) -> Run {
    let all: Vec<(&str, &str)> = env.iter().chain(more).copied().collect();
    run_with_env(&["health"], None, &all)
}

fn stop(mut server: ServerProcess) {
    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(30)).success());
}

#[test]
fn the_check_follows_the_servers_address_and_tls_settings() {
    let data = tempfile::tempdir().unwrap();
    let path = data.path().display().to_string();
    let addr = format!("127.0.0.1:{}", free_port());
    let (cert, key, ca) = (fixture("cert.pem"), fixture("key.pem"), fixture("ca.pem"));
    let env = [
        ("BUS_ADDR", addr.as_str()),
        ("BUS_PATH", path.as_str()),
        ("BUS_NAMESPACES", "app"),
        ("BUS_TLS_CERT", cert.as_str()),
        ("BUS_TLS_KEY", key.as_str()),
    ];
    let running = server(&env);

    let ready = health(&env, &[("BUS_CA_CERT", &ca)]);
    assert_eq!(ready.code, 0, "{ready:?}");
    // The certificate is verified: without the CA that signed it, it is refused.
    let untrusted = health(&env, &[]);
    assert_eq!(untrusted.code, 1, "{untrusted:?}");
    assert!(
        untrusted.stderr.contains("certificate") || untrusted.stderr.contains("Issuer"),
        "{untrusted:?}"
    );

    stop(running);
    let down = health(&env, &[("BUS_CA_CERT", &ca)]);
    assert_eq!(down.code, 1, "{down:?}");
    assert!(
        down.stderr.contains("cannot reach the bus server"),
        "{down:?}"
    );
}

/// In a container the certificate is for the name clients use, which does not lead back
/// to the container: the check asks for that name on the loopback address.
#[test]
fn a_certificate_for_a_public_name_is_verified_on_the_loopback_address() {
    let data = tempfile::tempdir().unwrap();
    let path = data.path().display().to_string();
    // All interfaces, in Go's shorthand, as a container listens.
    let addr = format!(":{}", free_port());
    let (cert, key) = (
        fixture("public-name-cert.pem"),
        fixture("public-name-key.pem"),
    );
    let env = [
        ("BUS_ADDR", addr.as_str()),
        ("BUS_PATH", path.as_str()),
        ("BUS_NAMESPACES", "app"),
        ("BUS_TLS_CERT", cert.as_str()),
        ("BUS_TLS_KEY", key.as_str()),
    ];
    let running = server(&env);

    let ready = health(&env, &[("BUS_CA_CERT", &fixture("public-name-ca.pem"))]);
    assert_eq!(ready.code, 0, "{ready:?}");
    // Another CA's trust does not do.
    let other_ca = health(&env, &[("BUS_CA_CERT", &fixture("ca.pem"))]);
    assert_eq!(other_ca.code, 1, "{other_ca:?}");
    assert!(other_ca.stderr.contains("bus.example.com"), "{other_ca:?}");
    stop(running);
}

/// A server that is alive but not ready (`/healthz` and `/health` answer 200, `/readyz`
/// 503, as a server whose log halted after a storage failure): the check fails, by its
/// settings or with --host.
#[test]
fn the_check_is_readiness_not_liveness() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for mut connection in listener.incoming().map_while(Result::ok) {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match connection.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let (status, body) = if head.starts_with(b"GET /readyz ") {
                (
                    "503 Service Unavailable",
                    "namespace app refuses appends after a storage failure\n",
                )
            } else {
                ("200 OK", "ok\n")
            };
            let _ = write!(
                connection,
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });

    let env = [("BUS_ADDR", addr.as_str())];
    let by_settings = health(&env, &[]);
    assert_eq!(by_settings.code, 1, "{by_settings:?}");
    assert!(
        by_settings.stderr.contains("not ready") && by_settings.stderr.contains("storage failure"),
        "{by_settings:?}"
    );
    let host = format!("http://{addr}");
    let by_host = run_with_env(&["health", "--host", &host], None, &[]);
    assert_eq!(by_host.code, 1, "{by_host:?}");
    assert!(by_host.stderr.contains("503"), "{by_host:?}");
}

#[test]
fn a_server_that_does_not_answer_in_time_is_a_failure() {
    // Accepts the connection and reads the request, but never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = format!("http://{}", listener.local_addr().unwrap());
    let silent = std::thread::spawn(move || {
        let (mut connection, _) = listener.accept().unwrap();
        let mut request = [0u8; 1024];
        let _ = connection.read(&mut request);
        std::thread::sleep(Duration::from_secs(3));
    });
    let check = run_with_env(
        &["health", "--host", &host, "--timeout", "500ms"],
        None,
        &[],
    );
    assert_eq!(check.code, 1, "{check:?}");
    assert!(
        check.stderr.contains("500ms") || check.stderr.contains("time"),
        "{check:?}"
    );
    silent.join().unwrap();
}
