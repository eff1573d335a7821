//! Authentication and CORS over real HTTP: tokens from the auth file, by header and by
//! query parameter, checked on every endpoint; only a consumer's own token acks for it;
//! tokens never reach the log; allowed origins.

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

    // The flag needs an auth file, and a cookie name.
    let refused = crate::common::cli::run(&["server", "--auth-cookie", "bus_token"], None);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("--auth-file"), "{refused:?}");
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

    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGTERM);
    }
    assert_eq!(server.wait(), 0);
    let log = server.errors.join("\n");
    for secret in [
        "publisher-tok",
        "reader-tok",
        "wrong-secret-1",
        "wrong-secret-2",
    ] {
        assert!(!log.contains(secret), "{secret} logged:\n{log}");
    }
}
