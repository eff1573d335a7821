//! Authentication and CORS over real HTTP: tokens from the auth file, by header and by
//! query parameter, checked on every endpoint; only a consumer's own token acks for it;
//! tokens never reach the log; allowed origins. JWTs (HS256 secret, PEM public keys, a
//! JWKS; the test keys are in tests/fixtures/jwt) with grants by subject pattern; the
//! credentials reloaded by SIGHUP (a real `bus server` process) and `POST /admin/reload`;
//! open streams ended by an `error` frame when their token is revoked or expires.

use std::time::Duration;

use serde_json::json;

use crate::common::cli::{free_port, run_with_env, Background};
use crate::common::http::*;

const AUTH_FILE: &str = "\
# token          namespaces     operations
publisher-tok    orders,_bus_   publish
reader-tok       orders         subscribe,ack
other-reader     orders         subscribe,ack
admin-tok        *              publish,subscribe,ack,metrics
";

async fn server_with_auth() -> (tempfile::TempDir, TestServer) {
    let data = tempfile::tempdir().unwrap();
    let auth = data.path().join("auth");
    std::fs::write(&auth, AUTH_FILE).unwrap();
    let auth = auth.display().to_string();
    let server = TestServer::start(&data.path().join("data"), &["--auth-file", &auth]).await;
    (data, server)
}

async fn send(
    server: &TestServer,
    method: reqwest::Method,
    query: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (u16, String) {
    let mut request = server
        .client
        .request(method, format!("{}?{query}", server.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let www = header(&response, "www-authenticate");
    if status == 401 {
        assert_eq!(www, "Bearer realm=\"bus\"");
    }
    // Event streams stay open: only read the body of refusals.
    let text = if status == 200 && method_is_get(&response) {
        String::new()
    } else {
        response.text().await.unwrap()
    };
    (status, text)
}

fn method_is_get(response: &reqwest::Response) -> bool {
    header(response, "content-type") == "text/event-stream"
}

fn event(subject: &str) -> Option<String> {
    Some(json!({"subject": subject, "payload": 1}).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_checks_the_token_and_its_grants() {
    let (_data, mut server) = server_with_auth().await;
    use reqwest::Method;

    // Publishing.
    let (status, text) = send(&server, Method::POST, "", None, event("orders.a")).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("Authorization: Bearer"), "{text}");
    let (status, text) = send(&server, Method::POST, "", Some("guess"), event("orders.a")).await;
    assert_eq!(status, 401, "{text}");
    assert_eq!(
        send(
            &server,
            Method::POST,
            "",
            Some("publisher-tok"),
            event("orders.a")
        )
        .await
        .0,
        202
    );
    let (status, text) = send(
        &server,
        Method::POST,
        "",
        Some("publisher-tok"),
        event("app.a"),
    )
    .await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("publish in namespace \"app\""), "{text}");
    assert_eq!(
        send(
            &server,
            Method::POST,
            "",
            Some("reader-tok"),
            event("orders.a")
        )
        .await
        .0,
        403
    );
    assert_eq!(
        send(
            &server,
            Method::POST,
            "",
            Some("publisher-tok"),
            event("_bus_.inbox")
        )
        .await
        .0,
        202
    );
    assert_eq!(
        send(
            &server,
            Method::POST,
            "access_token=publisher-tok",
            None,
            event("orders.b")
        )
        .await
        .0,
        202,
        "the query parameter works for publishing too"
    );

    // Subscribing, by header and by query parameter (EventSource cannot set headers).
    assert_eq!(
        send(&server, Method::GET, "subject=orders.>", None, None)
            .await
            .0,
        401
    );
    assert_eq!(
        send(
            &server,
            Method::GET,
            "subject=orders.>",
            Some("publisher-tok"),
            None
        )
        .await
        .0,
        403
    );
    assert_eq!(
        send(
            &server,
            Method::GET,
            "subject=app.>",
            Some("reader-tok"),
            None
        )
        .await
        .0,
        403
    );
    let mut by_query = server
        .subscribe("subject=orders.>&start=oldest&access_token=reader-tok")
        .await;
    assert_eq!(by_query.take(2).await.len(), 2);

    // Metrics: only for a token granted them; health and readiness stay open.
    assert_eq!(send(&server, Method::GET, "", None, None).await.0, 401);
    let metrics = |token: Option<&'static str>| {
        let mut request = server.client.get(format!("{}metrics", server.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(metrics(None).await.unwrap().status(), 401);
    assert_eq!(metrics(Some("reader-tok")).await.unwrap().status(), 403);
    assert_eq!(metrics(Some("admin-tok")).await.unwrap().status(), 200);
    for open in ["healthz", "readyz", "health"] {
        let response = reqwest::get(format!("{}{open}", server.url)).await.unwrap();
        assert_eq!(response.status(), 200, "{open}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_consumers_own_token_acks_its_deliveries() {
    let (_data, mut server) = server_with_auth().await;
    use reqwest::Method;
    for subject in ["orders.first", "orders.second"] {
        let (status, _) = send(
            &server,
            Method::POST,
            "",
            Some("publisher-tok"),
            event(subject),
        )
        .await;
        assert_eq!(status, 202);
    }
    let mut consumer = server
        .subscribe_with(
            "subject=orders.>&start=oldest&ack=manual&redelivery=10s",
            &[("authorization", "Bearer reader-tok")],
        )
        .await;
    let first = consumer.next(Duration::from_secs(5)).await.unwrap();
    let ack_query = format!(
        "consumer_id={}&event_id={}",
        consumer.consumer_id,
        first.id.clone().unwrap()
    );

    assert_eq!(
        send(&server, Method::PUT, &ack_query, None, None).await.0,
        401
    );
    let (status, text) = send(&server, Method::PUT, &ack_query, Some("other-reader"), None).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("another token"), "{text}");
    // Refused acks did not count: nothing new arrives.
    assert!(consumer.next(Duration::from_millis(300)).await.is_none());

    assert_eq!(
        send(&server, Method::PUT, &ack_query, Some("reader-tok"), None)
            .await
            .0,
        202
    );
    let second = consumer.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(second.json()["subject"], "orders.second");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_origins_only() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(
        data.path(),
        &[
            "--cors-origins",
            "https://app.example.com,http://localhost:5173",
        ],
    )
    .await;
    let from = |origin: &'static str| {
        server
            .client
            .post(&server.url)
            .header("origin", origin)
            .body(json!({"subject": "app.x"}).to_string())
            .send()
    };
    let allowed = from("https://app.example.com").await.unwrap();
    assert_eq!(allowed.status(), 202);
    assert_eq!(
        header(&allowed, "access-control-allow-origin"),
        "https://app.example.com"
    );
    assert_eq!(header(&allowed, "vary"), "Origin");
    // A listed origin (never `*`) may send credentials: cookies, `withCredentials`.
    assert_eq!(header(&allowed, "access-control-allow-credentials"), "true");
    let refused = from("https://evil.example.net").await.unwrap();
    assert_eq!(refused.status(), 403);
    assert!(refused.text().await.unwrap().contains("--cors-origins"));
    // Clients that are not browsers send no Origin and are served as before.
    let plain = server.post(json!({"subject": "app.y"}).to_string()).await;
    assert_eq!(plain.status(), 202);
    assert_eq!(header(&plain, "access-control-allow-origin"), "");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_cookie_a_browser_presents_its_token_in_a_cookie() {
    let data = tempfile::tempdir().unwrap();
    let auth = data.path().join("auth");
    std::fs::write(&auth, AUTH_FILE).unwrap();
    let auth = auth.display().to_string();
    let mut server = TestServer::start(
        &data.path().join("data"),
        &["--auth-file", &auth, "--auth-cookie", "bus_token"],
    )
    .await;
    let publish = |cookie: &'static str| {
        server
            .client
            .post(&server.url)
            .header("cookie", cookie)
            .body(json!({"subject": "orders.new"}).to_string())
            .send()
    };
    assert_eq!(
        publish("theme=dark; bus_token=publisher-tok")
            .await
            .unwrap()
            .status(),
        202
    );
    // A token of the wrong kind, a missing one, another cookie: refused as without cookies.
    assert_eq!(publish("bus_token=reader-tok").await.unwrap().status(), 403);
    assert_eq!(publish("other=publisher-tok").await.unwrap().status(), 401);
    // Subscribing: the cookie alone opens the stream.
    let stream = server
        .client
        .get(format!("{}?subject=orders.>", server.url))
        .header("cookie", "bus_token=reader-tok")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    drop(stream);
    // With the default CORS (`*`, any origin), answers never grant credentials.
    let any = publish("bus_token=publisher-tok").await.unwrap();
    assert_eq!(header(&any, "access-control-allow-origin"), "*");
    assert_eq!(header(&any, "access-control-allow-credentials"), "");
    server.stop().await;

    // The flag needs tokens to read (an auth file or a JWT key), and a cookie name.
    let path = data.path().join("other").display().to_string();
    let refused = crate::common::cli::run(
        &[
            "server",
            "--namespaces",
            "orders",
            "--path",
            &path,
            "--auth-cookie",
            "bus_token",
        ],
        None,
    );
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("--auth-file") && refused.stderr.contains("--jwt-secret-file"),
        "{refused:?}"
    );
    let bad = crate::common::cli::run(
        &["server", "--auth-file", &auth, "--auth-cookie", "a b"],
        None,
    );
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("not a cookie name"), "{bad:?}");
}

#[test]
fn tokens_never_reach_the_log_and_the_cli_presents_them() {
    let data = tempfile::tempdir().unwrap();
    let auth = data.path().join("auth");
    std::fs::write(&auth, AUTH_FILE).unwrap();
    let secret = data.path().join("jwt-secret");
    std::fs::write(&secret, JWT_SECRET).unwrap();
    let secret = secret.display().to_string();
    let port = free_port();
    let host = format!("127.0.0.1:{port}");
    let path = data.path().join("data").display().to_string();
    let auth = auth.display().to_string();
    let mut server = Background::start_with_env(
        &[
            "server",
            "--addr",
            &host,
            "--path",
            &path,
            "--namespaces",
            "orders",
            "--auth-file",
            &auth,
            "--jwt-secret-file",
            &secret,
            // Access lines too: they never hold a token either.
            "--access-log",
        ],
        &[("BUS_LOG_LEVEL", "DEBUG")],
    );
    server.wait_for_stderr("listening");

    let url = format!("http://{host}");
    let refused = run_with_env(
        &[
            "put",
            "--host",
            &url,
            "--subject",
            "orders.cli",
            "--data",
            "1",
        ],
        None,
        &[],
    );
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("token"), "{}", refused.stderr);
    let put = run_with_env(
        &[
            "put",
            "--host",
            &url,
            "--token",
            "publisher-tok",
            "--subject",
            "orders.cli",
            "--data",
            "1",
        ],
        None,
        &[],
    );
    assert_eq!(put.code, 0, "{}", put.stderr);
    let get = run_with_env(
        &[
            "get",
            "--host",
            &url,
            "--subject",
            "orders.>",
            "--start",
            "oldest",
            "--count",
            "1",
        ],
        None,
        &[("BUS_TOKEN", "reader-tok")],
    );
    assert_eq!(get.code, 0, "{}", get.stderr);
    assert!(get.stdout.contains("orders.cli"), "{}", get.stdout);
    // Wrong tokens, in a header and in a query string.
    let _ = run_with_env(
        &[
            "get",
            "--host",
            &url,
            "--subject",
            "orders.>",
            "--count",
            "1",
            "--token",
            "wrong-secret-1",
        ],
        None,
        &[],
    );
    {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&host).unwrap();
        stream
            .write_all(
                b"GET /?subject=orders.%3E&access_token=wrong-secret-2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    }
    // JWTs in the query string: accepted, expired (401) and without the grant (403).
    let jwt = |exp: u64| {
        hs256(json!({"sub": "logged-not", "exp": exp, "bus": {"subscribe": ["orders.cli"]}}))
    };
    let (valid, expired) = (jwt(unix_now() + 600), jwt(unix_now() - 600));
    let get = |query: &str| {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&host).unwrap();
        let request = format!("GET /?{query} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut answer = vec![0; 4096];
        let n = stream.read(&mut answer).unwrap_or(0);
        String::from_utf8_lossy(&answer[..n]).into_owned()
    };
    for (query, status) in [
        (
            format!("subject=orders.cli&until=now&access_token={valid}"),
            "200",
        ),
        (format!("subject=orders.cli&access_token={expired}"), "401"),
        (format!("subject=orders.%3E&access_token={valid}"), "403"),
    ] {
        let answer = get(&query);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
    }

    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGTERM);
    }
    assert_eq!(server.wait(), 0);
    let log = server.errors.join("\n");
    let signatures = [&valid, &expired].map(|jwt| jwt.rsplit('.').next().unwrap().to_owned());
    for secret in [
        "publisher-tok",
        "reader-tok",
        "wrong-secret-1",
        "wrong-secret-2",
        JWT_SECRET,
        &valid,
        &expired,
        &signatures[0],
        &signatures[1],
        "access_token",
    ] {
        assert!(!log.contains(secret), "{secret} logged:\n{log}");
    }
    // The refusals were seen (the log is not empty of them for lack of logging).
    assert!(log.contains("stream opened"), "{log}");
}

// ---- JWT: keys, claims, grants by pattern; reloading credentials ----

/// An HS256 secret for tests (32 bytes and more, as the server requires).
const JWT_SECRET: &str = "a test secret for HS256, longer than 32 bytes";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A key of tests/fixtures/jwt (test keys only).
fn jwt_fixture(name: &str) -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
        .display()
        .to_string()
}

/// A JWT with `claims`, signed by `key` with `algorithm`, naming `kid` if given.
fn sign_jwt(
    algorithm: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    kid: Option<&str>,
    claims: serde_json::Value,
) -> String {
    bus::http::auth::ring_provider::install();
    let mut header = jsonwebtoken::Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, key).expect("sign a JWT")
}

fn hs256(claims: serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()).unwrap();
    sign_jwt(jsonwebtoken::Algorithm::HS256, &key, None, claims)
}

fn pem_key(name: &str) -> Vec<u8> {
    std::fs::read(jwt_fixture(name)).unwrap()
}

/// A server of the namespaces `chat` and `app` with `args`, and the HS256 secret in a file.
async fn jwt_server(args: &[&str]) -> (tempfile::TempDir, TestServer) {
    let data = tempfile::tempdir().unwrap();
    let secret = data.path().join("jwt-secret");
    // With a trailing newline, as `echo` writes it: the server trims it.
    std::fs::write(&secret, format!("{JWT_SECRET}\n")).unwrap();
    let secret = secret.display().to_string();
    let mut all = vec!["--namespaces", "chat,app", "--jwt-secret-file", &secret];
    all.extend_from_slice(args);
    let server = TestServer::start(&data.path().join("data"), &all).await;
    (data, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_grants_subject_patterns_per_operation() {
    let (_data, mut server) = jwt_server(&[]).await;
    use reqwest::Method;
    let alice = hs256(json!({
        "sub": "alice",
        "exp": unix_now() + 3600,
        "bus": {"publish": ["chat.room1"], "subscribe": ["chat.room1", "app.*"]}
    }));
    let token = Some(alice.as_str());

    // Publishing: the subject must match a publish pattern.
    let (status, text) = send(&server, Method::POST, "", token, event("chat.room1")).await;
    assert_eq!(status, 202, "{text}");
    let (status, text) = send(&server, Method::POST, "", token, event("chat.room2")).await;
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("publish to \"chat.room2\"") && text.contains("[\"chat.room1\"]"),
        "{text}"
    );

    // Subscribing: the pattern must lie within a subscribe pattern.
    let (status, text) = send(&server, Method::GET, "subject=chat.>", token, None).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("subscribe to \"chat.>\""), "{text}");
    assert_eq!(
        send(&server, Method::GET, "subject=app.>", token, None)
            .await
            .0,
        403,
        "app.> is wider than app.*"
    );
    let mut stream = server
        .subscribe(&format!(
            "subject=chat.room1&start=oldest&access_token={alice}"
        ))
        .await;
    assert_eq!(stream.take(1).await[0].json()["subject"], "chat.room1");
    drop(stream);
    assert_eq!(
        send(&server, Method::GET, "subject=app.x", token, None)
            .await
            .0,
        200
    );
    // Several subjects in one stream: each is checked.
    assert_eq!(
        send(
            &server,
            Method::GET,
            "subject=chat.room1&subject=app.x",
            token,
            None
        )
        .await
        .0,
        200
    );
    let (status, text) = send(
        &server,
        Method::GET,
        "subject=chat.room1&subject=chat.room2",
        token,
        None,
    )
    .await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("\"chat.room2\""), "{text}");

    // No metrics, admin or ack grant: none of those.
    let metrics = server
        .client
        .get(format!("{}metrics", server.url))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 403);
    let (status, _) = send(
        &server,
        Method::GET,
        "subject=chat.room1&ack=manual",
        token,
        None,
    )
    .await;
    assert_eq!(status, 403);
    // A token that is not a JWT, on a server without a token file.
    let (status, text) = send(
        &server,
        Method::POST,
        "",
        Some("plain"),
        event("chat.room1"),
    )
    .await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("accepts only JWTs"), "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_jwts_are_401_saying_what_to_fix() {
    let (_data, mut server) = jwt_server(&["--jwt-audience", "bus-test"]).await;
    use reqwest::Method;
    let grants = json!({"publish": [">"]});
    let now = unix_now();
    for (claims, expected) in [
        (
            json!({"sub": "a", "aud": "bus-test", "exp": now - 120, "bus": grants}),
            "has expired",
        ),
        (
            json!({"sub": "a", "aud": "bus-test", "exp": now + 600, "nbf": now + 300, "bus": grants}),
            "not valid yet",
        ),
        (
            json!({"sub": "a", "aud": ["other"], "exp": now + 600, "bus": grants}),
            "aud does not include \"bus-test\"",
        ),
        (
            json!({"sub": "a", "exp": now + 600, "bus": grants}),
            "no aud claim",
        ),
        (
            json!({"sub": "a", "aud": "bus-test", "bus": grants}),
            "no exp claim",
        ),
    ] {
        let token = hs256(claims.clone());
        let (status, text) = send(&server, Method::POST, "", Some(&token), event("chat.a")).await;
        assert_eq!(status, 401, "{claims}: {text}");
        assert!(text.contains(expected), "{claims}: {text}");
    }
    let good =
        hs256(json!({"sub": "a", "aud": ["x", "bus-test"], "exp": now + 600, "bus": grants}));
    assert_eq!(
        send(&server, Method::POST, "", Some(&good), event("chat.a"))
            .await
            .0,
        202
    );
    // Another secret; an altered token; `alg: none`.
    let other =
        jsonwebtoken::EncodingKey::from_secret(b"another secret, 32 bytes or more!!").unwrap();
    let forged = sign_jwt(
        jsonwebtoken::Algorithm::HS256,
        &other,
        None,
        json!({"sub": "a", "aud": "bus-test", "exp": now + 600, "bus": grants}),
    );
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJtYWxsb3J5IiwiZXhwIjo0MTAyNDQ0ODAwLCJidXMiOnsicHVibGlzaCI6WyI-Il19fQ.AAAA";
    for (token, expected) in [
        (forged.as_str(), "signature"),
        (none, "none is never accepted"),
    ] {
        let (status, text) = send(&server, Method::POST, "", Some(token), event("chat.a")).await;
        assert_eq!(status, 401, "{text}");
        assert!(text.contains(expected), "{text}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_keys_and_jwks_verify_rs256_es256_and_eddsa() {
    use jsonwebtoken::{Algorithm, EncodingKey};
    use reqwest::Method;
    let claims = || json!({"sub": "svc", "exp": unix_now() + 600, "bus": {"publish": ["app.>"]}});
    let rsa = EncodingKey::from_rsa_pem(&pem_key("rsa.pem")).unwrap();
    let ec = EncodingKey::from_ec_pem(&pem_key("ec.pem")).unwrap();
    let ed = EncodingKey::from_ed_pem(&pem_key("ed25519.pem")).unwrap();
    let data = tempfile::tempdir().unwrap();
    let start = |name: &str, args: Vec<String>| {
        let path = data.path().join(name);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            TestServer::start(&path, &args).await
        }
    };
    let flag = |flag: &str, file: &str| vec![flag.to_owned(), jwt_fixture(file)];

    // A PEM public key: its type decides the algorithm.
    let mut by_rsa = start("rsa", flag("--jwt-public-key", "rsa.pub.pem")).await;
    let rs256 = sign_jwt(Algorithm::RS256, &rsa, None, claims());
    assert_eq!(
        send(&by_rsa, Method::POST, "", Some(&rs256), event("app.a"))
            .await
            .0,
        202
    );
    let es256 = sign_jwt(Algorithm::ES256, &ec, None, claims());
    let (status, text) = send(&by_rsa, Method::POST, "", Some(&es256), event("app.a")).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("signed with ES256"), "{text}");
    // Algorithm confusion: HS256 "signed" with the public key as the secret.
    let public_as_secret = EncodingKey::from_secret(&pem_key("rsa.pub.pem")).unwrap();
    let confused = sign_jwt(Algorithm::HS256, &public_as_secret, None, claims());
    let (status, text) = send(&by_rsa, Method::POST, "", Some(&confused), event("app.a")).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("HS256"), "{text}");
    by_rsa.stop().await;

    let mut by_ed = start("ed", flag("--jwt-public-key", "ed25519.pub.pem")).await;
    let eddsa = sign_jwt(Algorithm::EdDSA, &ed, None, claims());
    assert_eq!(
        send(&by_ed, Method::POST, "", Some(&eddsa), event("app.a"))
            .await
            .0,
        202
    );
    assert_eq!(
        send(&by_ed, Method::POST, "", Some(&rs256), event("app.a"))
            .await
            .0,
        401
    );
    by_ed.stop().await;

    // A JWKS: the key is chosen by the token's kid.
    let mut by_jwks = start("jwks", flag("--jwt-jwks", "jwks.json")).await;
    for (token, expected) in [
        (
            sign_jwt(Algorithm::RS256, &rsa, Some("rsa-1"), claims()),
            202,
        ),
        (sign_jwt(Algorithm::ES256, &ec, Some("ec-1"), claims()), 202),
        (sign_jwt(Algorithm::EdDSA, &ed, Some("ed-1"), claims()), 202),
        // The EC key under the RSA key's kid; a kid the set lacks; no kid at all.
        (
            sign_jwt(Algorithm::ES256, &ec, Some("rsa-1"), claims()),
            401,
        ),
        (sign_jwt(Algorithm::ES256, &ec, Some("ec-2"), claims()), 401),
        (sign_jwt(Algorithm::ES256, &ec, None, claims()), 401),
    ] {
        let (status, text) = send(&by_jwks, Method::POST, "", Some(&token), event("app.a")).await;
        assert_eq!(status, expected, "{text}");
        if status == 401 {
            assert!(
                text.contains("kid") || text.contains("takes only"),
                "{text}"
            );
        }
    }
    by_jwks.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_ends_with_an_error_frame_when_its_jwt_expires() {
    let (_data, mut server) = jwt_server(&["--ping-interval", "200ms"]).await;
    // Expired 28 s ago: still accepted for the 30 s of leeway, so for about 2 s more.
    let token = hs256(json!({
        "sub": "a", "exp": unix_now() - 28, "bus": {"subscribe": ["chat.>"]}
    }));
    let mut stream = server
        .subscribe_with(
            "subject=chat.>",
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
    let frame = stream
        .next(Duration::from_secs(10))
        .await
        .expect("an error frame");
    assert_eq!(frame.event.as_deref(), Some("error"), "{frame:?}");
    assert!(frame.data.concat().contains("expired"), "{frame:?}");
    stream.expect_end(Duration::from_secs(5)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_admin_reload_needs_admin_and_keeps_the_old_on_a_bad_file() {
    let (data, mut server) = server_with_auth().await;
    let reload = |token: Option<&str>| {
        let mut request = server.client.post(format!("{}admin/reload", server.url));
        if let Some(token) = token {
            request = request.bearer_auth(token.to_owned());
        }
        request.send()
    };
    // The auth file has no admin: give one.
    let auth = data.path().join("auth");
    std::fs::write(&auth, format!("{AUTH_FILE}root-tok orders admin\n")).unwrap();
    assert_eq!(reload(None).await.unwrap().status(), 401);
    assert_eq!(reload(Some("admin-tok")).await.unwrap().status(), 403);
    // Nothing reloaded yet: root-tok is still unknown.
    assert_eq!(reload(Some("root-tok")).await.unwrap().status(), 401);

    // A SIGHUP would do; here the reload comes from the server's own entry point.
    let report = server.server.as_ref().unwrap().reload("test").await;
    assert!(report.ok(), "{report:?}");
    let answer = reload(Some("root-tok")).await.unwrap();
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
    assert_eq!(body["ok"], true, "{body}");
    assert_eq!(body["steps"][0]["name"], "credentials", "{body}");
    assert!(
        body["steps"][0]["message"]
            .as_str()
            .unwrap()
            .contains("5 grants"),
        "{body}"
    );

    // A bad file: 500 saying why, and the old credentials stay.
    std::fs::write(&auth, "root-tok orders admin,sudo\n").unwrap();
    let answer = reload(Some("root-tok")).await.unwrap();
    assert_eq!(answer.status(), 500);
    let body: serde_json::Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
    assert_eq!(body["ok"], false, "{body}");
    assert!(
        body["steps"][0]["message"]
            .as_str()
            .unwrap()
            .contains("line 1: unknown operation"),
        "{body}"
    );
    assert_eq!(reload(Some("root-tok")).await.unwrap().status(), 500);
    server
        .publish_with_token(&json!({"subject": "orders.x"}), "publisher-tok")
        .await;
    server.stop().await;

    // Without authentication there is nothing to reload, and no token to ask for.
    let open = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(open.path(), &[]).await;
    let answer = server
        .client
        .post(format!("{}admin/reload", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), r#"{"ok":true,"steps":[]}"#);
    server.stop().await;
}

/// Waits (on a blocking thread) for a line of the server's standard error.
async fn wait_for_log(server: &mut Background, text: &str) {
    tokio::task::block_in_place(|| server.wait_for_stderr(text));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_token_file_and_ends_the_streams_of_revoked_tokens() {
    bus::client::install_tls_provider();
    let data = tempfile::tempdir().unwrap();
    let auth = data.path().join("auth");
    std::fs::write(
        &auth,
        "old-tok orders publish,subscribe\nkeep-tok orders subscribe\nnarrowed-tok orders,app subscribe\n",
    )
    .unwrap();
    let host = format!("127.0.0.1:{}", free_port());
    let path = data.path().join("data").display().to_string();
    let auth_arg = auth.display().to_string();
    let mut server = Background::start(&[
        "server",
        "--addr",
        &host,
        "--path",
        &path,
        "--namespaces",
        "orders,app",
        "--auth-file",
        &auth_arg,
        "--ping-interval",
        "200ms",
    ]);
    wait_for_log(&mut server, "listening").await;
    let url = format!("http://{host}/");
    let client = reqwest::Client::new();
    let open = |token: &str, subject: &str| {
        client
            .get(format!("{url}?subject={subject}"))
            .bearer_auth(token)
            .send()
    };
    let publish = |token: &str| {
        client
            .post(&url)
            .bearer_auth(token)
            .body(json!({"subject": "orders.x", "payload": 1}).to_string())
            .send()
    };
    let mut revoked = Sse::new(open("old-tok", "orders.>").await.unwrap());
    let mut narrowed = Sse::new(open("narrowed-tok", "orders.>").await.unwrap());
    let mut kept = Sse::new(open("keep-tok", "orders.>").await.unwrap());
    assert_eq!(publish("old-tok").await.unwrap().status(), 202);
    assert_eq!(kept.take(1).await.len(), 1);

    // old-tok leaves the file; narrowed-tok loses `orders`; keep-tok stays as it was.
    std::fs::write(
        &auth,
        "new-tok orders publish,subscribe\nkeep-tok orders subscribe\nnarrowed-tok app subscribe\n",
    )
    .unwrap();
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGHUP);
    }
    wait_for_log(&mut server, "reloaded").await;
    assert_eq!(publish("old-tok").await.unwrap().status(), 401);
    assert_eq!(publish("new-tok").await.unwrap().status(), 202);

    // The streams of revoked grants end at their next event or ping, saying why.
    for (stream, why) in [
        (&mut revoked, "not valid on this server"),
        (&mut narrowed, "subscribe in namespace \"orders\""),
    ] {
        let frame = loop {
            let frame = stream
                .next(Duration::from_secs(10))
                .await
                .expect("an error frame");
            if frame.event.as_deref() == Some("error") {
                break frame;
            }
        };
        assert!(
            frame.data.concat().contains("reloaded") && frame.data.concat().contains(why),
            "{frame:?}"
        );
        stream.expect_end(Duration::from_secs(5)).await;
    }
    // The other streams go on.
    assert_eq!(kept.take(1).await[0].json()["subject"], "orders.x");

    // A bad file: an error naming it, and the credentials in force stay.
    std::fs::write(&auth, "new-tok orders publish,subscribe extra\n").unwrap();
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGHUP);
    }
    wait_for_log(&mut server, "reload failed").await;
    let failure = server
        .errors
        .iter()
        .find(|line| line.contains("reload failed"))
        .unwrap()
        .clone();
    assert!(
        failure.contains(&auth_arg) && failure.contains("line 1"),
        "{failure}"
    );
    assert_eq!(publish("new-tok").await.unwrap().status(), 202);
    assert_eq!(kept.take(1).await.len(), 1);

    drop((revoked, narrowed, kept));
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGTERM);
    }
    assert_eq!(tokio::task::block_in_place(|| server.wait()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_failures_are_counted_by_reason() {
    let (_data, mut server) = server_with_auth().await;
    let event = Some(json!({"subject": "orders.a"}).to_string());
    let (status, _) = send(&server, reqwest::Method::POST, "", None, event.clone()).await;
    assert_eq!(status, 401);
    let (status, _) = send(
        &server,
        reqwest::Method::POST,
        "",
        Some("wrong"),
        event.clone(),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = send(
        &server,
        reqwest::Method::POST,
        "",
        Some("reader-tok"),
        event,
    )
    .await;
    assert_eq!(status, 403);
    let metrics = server
        .client
        .get(format!("{}metrics", server.url))
        .bearer_auth("admin-tok")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let failures = |reason: &str| {
        let label = format!("reason=\"{reason}\"");
        metric(&metrics, "bus_auth_failures_total", &[&label])
    };
    assert_eq!(failures("unauthenticated"), Some(2.0), "{metrics}");
    assert_eq!(failures("forbidden"), Some(1.0));
    let requests = |code: &str| {
        let code = format!("code=\"{code}\"");
        metric(
            &metrics,
            "bus_http_requests_total",
            &["route=\"publish\"", &code],
        )
    };
    assert_eq!(requests("401"), Some(2.0));
    assert_eq!(requests("403"), Some(1.0));
    server.stop().await;
}
