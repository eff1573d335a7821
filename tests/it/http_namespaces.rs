//! `GET /namespaces` and `GET /namespaces/{namespace}` over real HTTP: what each log keeps
//! (range, counts, size, segments, the times of its first and last events) and who reads
//! it (open streams, durable consumers); refusals under authentication.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::http::*;

async fn get(server: &TestServer, path: &str, token: Option<&str>) -> (u16, String) {
    let mut request = server.client.get(format!("{}{path}", server.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// Polls `namespace` until `done` holds of it (a stream's end is noticed when the server
/// next writes to it or reads its connection).
async fn wait_for(server: &TestServer, name: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = server.get_json(&format!("namespaces/{name}")).await;
        if done(&info) {
            return info;
        }
        assert!(Instant::now() < deadline, "never came: {info}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_tells_its_range_size_subscribers_and_consumers() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;

    // Empty: nothing kept, nothing to date.
    let (status, body) = get(&server, "namespaces", None).await;
    assert_eq!(status, 200, "{body}");
    let all: Vec<Value> = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = all
        .iter()
        .map(|n| n["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["app", "orders"]);
    let app = &all[0];
    assert_eq!(app["events"], 0);
    assert_eq!(app["first_index"], 0);
    assert_eq!(app["next_index"], 0);
    assert_eq!(app["last_index"], Value::Null);
    assert_eq!(app["first_created_at"], Value::Null);
    assert_eq!(app["subscribers"], 0);
    assert_eq!(app["consumers"], 0);

    for i in 0..3 {
        server
            .publish(&json!({"subject": "app.signup", "payload": i}))
            .await;
    }
    server.publish(&json!({"subject": "orders.created"})).await;
    let mut replay = server
        .subscribe("subject=app.>&start=oldest&until=now")
        .await;
    let stored: Vec<Value> = replay.take(3).await.iter().map(Frame::json).collect();

    // Two streams of `app`, one of both namespaces, one durable consumer of `orders`.
    let _one = server.subscribe("subject=app.signup").await;
    let _two = server.subscribe("subject=app.>").await;
    let both = server.subscribe("subject=app.x&subject=orders.>").await;
    let durable = server
        .subscribe("subject=orders.>&consumer=billing&ack=manual")
        .await;
    drop(replay);

    let app = wait_for(&server, "app", |app| app["subscribers"] == 3).await;
    assert_eq!(app["namespace"], "app");
    assert_eq!(app["events"], 3);
    assert_eq!(app["first_index"], 0);
    assert_eq!(app["last_index"], 2);
    assert_eq!(app["next_index"], 3);
    assert_eq!(app["first_created_at"], stored[0]["created_at"]);
    assert_eq!(app["last_created_at"], stored[2]["created_at"]);
    assert_eq!(app["consumers"], 0);
    assert!(app["bytes"].as_u64().unwrap() > 0, "{app}");
    if on_jetstream() {
        assert_eq!(
            app["segments"],
            Value::Null,
            "JetStream keeps no segments of ours"
        );
    } else {
        assert_eq!(app["segments"], 1, "{app}");
    }

    let orders = server.get_json("namespaces/orders").await;
    assert_eq!(orders["events"], 1);
    assert_eq!(orders["subscribers"], 2, "{orders}");
    assert_eq!(orders["consumers"], 1, "{orders}");

    // Streams that end are no longer counted; the durable consumer stays.
    drop(both);
    drop(durable);
    let orders = wait_for(&server, "orders", |o| o["subscribers"] == 0).await;
    assert_eq!(orders["consumers"], 1);
    wait_for(&server, "app", |app| app["subscribers"] == 2).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_namespace_is_a_404_naming_the_served_ones() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    let (status, body) = get(&server, "namespaces/nowhere", None).await;
    assert_eq!(status, 404);
    assert!(body.contains("unknown namespace \"nowhere\""), "{body}");
    assert!(body.contains("app, orders"), "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_need_the_admin_grant() {
    let data = tempfile::tempdir().unwrap();
    let auth = data.path().join("auth");
    std::fs::write(
        &auth,
        "orders-admin  orders  admin\nreader  *  subscribe\nroot  *  admin\n",
    )
    .unwrap();
    let auth = auth.display().to_string();
    let mut server = TestServer::start(&data.path().join("data"), &["--auth-file", &auth]).await;

    assert_eq!(get(&server, "namespaces", None).await.0, 401);
    assert_eq!(get(&server, "namespaces/app", None).await.0, 401);

    let (status, body) = get(&server, "namespaces", Some("reader")).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("admin"),
        "the refusal names the grant: {body}"
    );
    assert_eq!(get(&server, "namespaces/app", Some("reader")).await.0, 403);

    // An admin of one namespace sees that one only.
    let (status, body) = get(&server, "namespaces", Some("orders-admin")).await;
    assert_eq!(status, 200, "{body}");
    let listed: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(listed.len(), 1, "{body}");
    assert_eq!(listed[0]["namespace"], "orders");
    assert_eq!(
        get(&server, "namespaces/orders", Some("orders-admin"))
            .await
            .0,
        200
    );
    assert_eq!(
        get(&server, "namespaces/app", Some("orders-admin")).await.0,
        403
    );

    let (status, body) = get(&server, "namespaces", Some("root")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Vec<Value>>(&body).unwrap().len(), 2);
    server.stop().await;
}
