//! The web console over real HTTP: its three files (types, Content-Security-Policy, nothing
//! from another origin), `--no-console`, the live figures of `/console/live` (at once, what
//! was published and delivered, durable consumers; a stream slot; the end at shutdown) and
//! who may see them under authentication. The page itself is tested in a browser
//! (`tests/browser/console.mjs`).

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::http::*;

const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'";

/// `GET path` with an optional bearer token: status, content type and body.
async fn get(server: &TestServer, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = server.client.get(format!("{}{path}", server.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// Opens `/console/live` (with `query`), expecting a 200 event stream.
async fn live(server: &TestServer, query: &str, token: Option<&str>) -> Sse {
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        get(server, &format!("console/live{query}"), token),
    )
    .await
    .expect("the head comes before any figure");
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), "text/event-stream");
    Sse::new(response)
}

/// The next `stats` frame's figures.
async fn next_stats(stream: &mut Sse) -> Value {
    let frame = stream
        .next(Duration::from_secs(10))
        .await
        .expect("a stats frame");
    assert_eq!(frame.event.as_deref(), Some("stats"), "{frame:?}");
    frame.json()
}

fn namespace<'a>(stats: &'a Value, name: &str) -> &'a Value {
    stats["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["namespace"] == name)
        .unwrap_or_else(|| panic!("no namespace {name} in {stats}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_files_are_served_with_their_types_and_a_strict_policy() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    let assets = [
        ("console", "text/html; charset=utf-8"),
        ("console/", "text/html; charset=utf-8"),
        ("console/console.js", "text/javascript; charset=utf-8"),
        ("console/console.css", "text/css; charset=utf-8"),
    ];
    let mut page = String::new();
    for (path, content_type) in assets {
        let response = get(&server, path, None).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(header(&response, "content-type"), content_type, "{path}");
        assert_eq!(header(&response, "content-security-policy"), CSP, "{path}");
        assert_eq!(header(&response, "x-content-type-options"), "nosniff");
        assert_eq!(header(&response, "cache-control"), "no-cache");
        let body = response.text().await.unwrap();
        // Nothing is loaded from, linked to or sent to another origin.
        for scheme in ["http://", "https://", "//cdn", "@import"] {
            assert!(!body.contains(scheme), "{path} mentions {scheme}");
        }
        if path == "console" {
            page = body;
        }
    }
    // The page's own files, by the paths served above; no inline script or style, which
    // the policy would block anyway.
    assert!(page.contains(r#"<script src="/console/console.js" defer></script>"#));
    assert!(page.contains(r#"<link rel="stylesheet" href="/console/console.css">"#));
    assert_eq!(page.matches("<script").count(), 1, "one script, its file");
    assert!(!page.contains("<style"), "no inline style element");
    assert!(!page.contains(" style="), "no inline style attribute");
    let handler = page.split(" on").skip(1).find(|rest| {
        rest.split_once('=').is_some_and(|(name, _)| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase())
        })
    });
    assert_eq!(handler, None, "no inline event handler");

    // Counted under their own route.
    let metrics = server.metrics().await;
    let served = metric(
        &metrics,
        "bus_http_requests_total",
        &["route=\"console\"", "code=\"200\""],
    );
    assert_eq!(served, Some(4.0), "{metrics}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_console_answers_the_usual_404() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &["--no-console"]).await;
    for path in [
        "console",
        "console/",
        "console/console.js",
        "console/console.css",
        "console/live",
    ] {
        let response = get(&server, path, None).await;
        assert_eq!(response.status(), 404, "{path}");
        assert!(response.text().await.unwrap().starts_with("not found"));
    }
    // The API is there as ever.
    server.publish(&json!({"subject": "app.a"})).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_stream_sends_the_figures_at_once_and_as_they_change() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &["--max-subscriptions", "2"]).await;
    for i in 0..3 {
        server
            .publish(&json!({"subject": "app.signup", "payload": i}))
            .await;
    }
    server.publish(&json!({"subject": "orders.created"})).await;
    // Three events delivered in `app`; a durable consumer of `orders` that read one and
    // did not ack it.
    let mut reader = server
        .subscribe("subject=app.>&start=oldest&until=now")
        .await;
    assert_eq!(reader.take(3).await.len(), 3);
    reader.next(Duration::from_secs(10)).await; // `done`
    drop(reader);
    let mut worker = server
        .subscribe("subject=orders.>&start=oldest&consumer=billing&ack=manual")
        .await;
    assert_eq!(worker.take(1).await.len(), 1);

    // The reader's place is free again (its stream ended with `done`).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(&server.metrics().await, "bus_subscriptions_active", &[]) != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the reader's stream stays open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut stream = live(&server, "", None).await;
    let first = next_stats(&mut stream).await;
    assert_eq!(first["version"], env!("CARGO_PKG_VERSION"));
    assert!(first["commit"].is_string(), "{first}");
    assert!(first["uptime_seconds"].is_u64(), "{first}");
    assert_eq!(first["ready"], true);
    assert_eq!(first["ready_reason"], Value::Null);
    assert_eq!(first["errors"], json!([]));
    let app = namespace(&first, "app");
    assert_eq!(
        (&app["events"], &app["next_index"], &app["last_index"]),
        (&json!(3), &json!(3), &json!(2))
    );
    let orders = namespace(&first, "orders");
    assert_eq!(
        (&orders["events"], &orders["consumers"]),
        (&json!(1), &json!(1))
    );
    assert_eq!(first["delivered"]["app"], 3, "{first}");
    assert_eq!(first["delivered"]["orders"], 1, "{first}");
    let billing = &first["consumers"]["orders"][0];
    assert_eq!(billing["name"], "billing", "{first}");
    assert_eq!(billing["pending"], 1, "{first}");
    assert_eq!(billing["members"], 1, "{first}");
    assert_eq!(first["consumers"]["app"], json!([]));

    // The next figures show what was published since.
    server.publish(&json!({"subject": "app.signup"})).await;
    let next = next_stats(&mut stream).await;
    assert_eq!(namespace(&next, "app")["next_index"], 4, "{next}");

    // The stream holds one of the two places for streams: the worker has the other.
    let third = server
        .client
        .get(format!("{}?subject=app.>", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), 503);

    // Shutting down ends it.
    drop(worker);
    let stop = tokio::spawn(async move {
        server.stop().await;
    });
    loop {
        match stream.next_frame(Duration::from_secs(10)).await {
            None => break,
            Some(frame) => assert_eq!(frame.event.as_deref(), Some("stats"), "{frame:?}"),
        }
    }
    stop.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_files_are_open_and_the_figures_need_the_admin_grant() {
    let data = tempfile::tempdir().unwrap();
    let auth = data.path().join("auth");
    std::fs::write(
        &auth,
        "root  *  admin,publish\nreader  *  subscribe\norders-admin  orders  admin\n",
    )
    .unwrap();
    let auth = auth.display().to_string();
    let mut server = TestServer::start(&data.path().join("data"), &["--auth-file", &auth]).await;
    server
        .publish_with_token(&json!({"subject": "app.a"}), "root")
        .await;

    // The files hold no data: anyone gets them.
    for path in ["console", "console/console.js", "console/console.css"] {
        assert_eq!(get(&server, path, None).await.status(), 200, "{path}");
    }
    // The figures do not.
    let anonymous = get(&server, "console/live", None).await;
    assert_eq!(anonymous.status(), 401);
    let reader = get(&server, "console/live", Some("reader")).await;
    assert_eq!(reader.status(), 403);
    assert!(reader.text().await.unwrap().contains("admin"));
    let wrong = get(&server, "console/live?access_token=nobody", None).await;
    assert_eq!(wrong.status(), 401);

    // An admin of everything, as a header or as EventSource sends it (in the query).
    let mut root = live(&server, "", Some("root")).await;
    let stats = next_stats(&mut root).await;
    assert_eq!(namespace(&stats, "app")["events"], 1);
    assert_eq!(stats["namespaces"].as_array().unwrap().len(), 2);
    let mut by_query = live(&server, "?access_token=root", None).await;
    assert_eq!(
        next_stats(&mut by_query).await["namespaces"],
        stats["namespaces"]
    );

    // An admin of one namespace sees that one only.
    let mut one = live(&server, "", Some("orders-admin")).await;
    let stats = next_stats(&mut one).await;
    let names: Vec<&Value> = stats["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| &n["namespace"])
        .collect();
    assert_eq!(names, [&json!("orders")], "{stats}");
    assert_eq!(
        stats["consumers"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["orders"]
    );
    assert!(stats["delivered"].get("app").is_none(), "{stats}");
    drop((root, by_query, one));
    server.stop().await;
}
