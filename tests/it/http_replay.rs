//! Replay from a log position (`start_index`) and from a time (`start_time`), over real
//! HTTP, including times before the first and after the last event.

use std::time::Duration;

use serde_json::json;

use crate::common::http::*;

/// Payload numbers of what `query` (with `until=now`) delivers.
async fn replay(server: &TestServer, query: &str) -> Vec<i64> {
    let mut sse = server
        .subscribe(&format!("subject=app.>&until=now&{query}"))
        .await;
    let mut seen = Vec::new();
    while let Some(frame) = sse.next(Duration::from_secs(5)).await {
        match frame.event.as_deref() {
            Some("msg") => seen.push(frame.json()["payload"].as_i64().unwrap()),
            Some("done") => return seen,
            other => panic!("unexpected {other:?}: {frame:?}"),
        }
    }
    panic!("no done frame");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_a_position_or_a_time() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    let mut times = Vec::new();
    for n in 0..6 {
        let published = server
            .publish(&json!({"subject": "app.t", "payload": n}))
            .await;
        times.push(published.created_at);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }

    assert_eq!(replay(&server, "start_index=0").await, [0, 1, 2, 3, 4, 5]);
    assert_eq!(replay(&server, "start_index=4").await, [4, 5]);
    assert_eq!(replay(&server, "start_index=99").await, Vec::<i64>::new());

    let at = |i: usize| format!("start_time={}", times[i].replace('+', "%2B"));
    assert_eq!(
        replay(&server, &at(3)).await,
        [3, 4, 5],
        "at an event's own time"
    );
    assert_eq!(replay(&server, &at(0)).await, [0, 1, 2, 3, 4, 5]);
    assert_eq!(
        replay(&server, "start_time=2000-01-01T00:00:00Z").await,
        [0, 1, 2, 3, 4, 5],
        "before the first event"
    );
    assert_eq!(
        replay(&server, "start_time=2200-01-01T00:00:00Z").await,
        Vec::<i64>::new(),
        "after the last event"
    );
    // Between two events, with an offset: from the next one.
    let third = bus::timestamp::Timestamp::parse(&times[2]).unwrap();
    let just_after = bus::timestamp::Timestamp::from_unix_nanos(third.unix_nanos() + 1_000);
    let shifted = just_after.to_string().replace('Z', "+00:00");
    assert_eq!(
        replay(
            &server,
            &format!("start_time={}", shifted.replace('+', "%2B"))
        )
        .await,
        [3, 4, 5]
    );

    for bad in [
        "start_index=-1",
        "start_time=yesterday",
        "start=oldest&start_index=1",
        "start_index=1&start_time=2000-01-01T00:00:00Z",
    ] {
        let response = server
            .request(reqwest::Method::GET, &format!("subject=app.>&{bad}"))
            .await;
        assert_eq!(response.status(), 400, "{bad}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_time_is_not_misled_by_an_event_the_client_dated() {
    const EVENTS: i64 = 150;
    const CLIENT_DATED: i64 = 75;
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &["--fsync", "never"]).await;
    let mut times = Vec::new();
    for n in 0..EVENTS {
        let event = if n == CLIENT_DATED {
            // Restored from an old archive, say.
            json!({"subject": "app.t", "payload": n, "created_at": "1700-01-01T00:00:00Z"})
        } else {
            json!({"subject": "app.t", "payload": n})
        };
        times.push(server.publish(&event).await.created_at);
    }
    // A binary search over created_at probes the middle, event 75, first: dated 1700, it
    // sent the search past every event before it.
    let at = |i: usize| format!("start_time={}", times[i].replace('+', "%2B"));
    assert_eq!(
        replay(&server, &at(5)).await,
        (5..EVENTS).collect::<Vec<_>>(),
        "from event 5, the client-dated event included"
    );
    assert_eq!(
        replay(&server, &at(100)).await,
        (100..EVENTS).collect::<Vec<_>>()
    );
    server.stop().await;
}
