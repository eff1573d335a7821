//! The JetStream store against a real nats-server: positions, ids, atomic batches, reads,
//! time searches, deduplication keys, consumers, and what survives a restart
//! of nats-server and of the log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bus::event::{EventDraft, PendingEvent};
use bus::store::jetstream::{self, JetStreamConfig, JetStreamConsumers, JetStreamLog};
use bus::store::{
    Cipher, ConsumerName, ErrorKind, EventLog, Owner, Served, ServedConsumers, ServedMember,
    ServedSpec, Settle,
};
use bus::timestamp::Timestamp;

use crate::common::jetstream::JetStreamServer;

fn event(subject: &str, key: &str, payload: &str) -> PendingEvent {
    PendingEvent::new(&EventDraft {
        subject,
        key,
        payload: Some(payload.as_bytes()),
        ..EventDraft::default()
    })
    .unwrap()
}

/// Reads of these logs come from JetStream: their tails hold only 1 KiB.
const SMALL_TAIL: usize = 1 << 10;

async fn open(
    server: &JetStreamServer,
) -> (
    async_nats::Client,
    async_nats::jetstream::Context,
    JetStreamLog,
) {
    open_with(server, None, SMALL_TAIL)
        .await
        .expect("open the log")
}

async fn open_with(
    server: &JetStreamServer,
    cipher: Option<&Cipher>,
    tail_bytes: usize,
) -> Result<
    (
        async_nats::Client,
        async_nats::jetstream::Context,
        JetStreamLog,
    ),
    bus::store::StorageError,
> {
    let config = JetStreamConfig {
        url: server.url(),
        replicas: 1,
        token: None,
        creds: None,
    };
    let (client, context) = jetstream::connect(&config).await.unwrap();
    let log = JetStreamLog::open(
        &client,
        &context,
        "orders",
        1,
        cipher,
        tail_bytes,
        Some(jetstream::DEFAULT_KEY_WINDOW),
    )
    .await?;
    Ok((client, context, log))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_get_gapless_positions_and_ids_that_resolve_and_survive_restarts() {
    let Some(mut server) = JetStreamServer::start() else {
        return;
    };
    let (_client, _context, log) = open(&server).await;
    assert_eq!((log.first_position(), log.committed()), (0, 0));
    let watch = log.watch_committed();

    let one = log
        .append(vec![event("orders.created", "", "1")])
        .await
        .unwrap();
    assert_eq!(one[0].position, 0);
    assert!(watch.has_changed().unwrap());
    let batch = log
        .append(
            (2..=4)
                .map(|n| event("orders.paid", "", &n.to_string()))
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(
        batch.iter().map(|a| a.position).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(log.committed(), 4);

    let read = log.read(0, 100).await.unwrap();
    assert_eq!(read.len(), 4);
    for (n, stored) in read.iter().enumerate() {
        assert_eq!(stored.position(), n as u64);
        let json: serde_json::Value = serde_json::from_slice(&stored.json()).unwrap();
        assert_eq!(json["index"], n);
        assert_eq!(json["payload"], n + 1);
        assert_eq!(log.find_id(stored.id()).await.unwrap(), Some(n as u64));
    }
    assert_eq!(read[0].subject(), "orders.created");
    assert_eq!(read[0].id(), one[0].id);
    assert_eq!(log.read(2, 1).await.unwrap()[0].position(), 2);
    assert!(log.read(4, 10).await.unwrap().is_empty());
    assert_eq!(log.find_id("e_00000000000000000000").await.unwrap(), None);

    // nats-server killed and back: everything acknowledged is there, with its ids, and a
    // log opened afresh continues the positions.
    server.restart();
    let (_client, _context, reopened) = open(&server).await;
    assert_eq!(reopened.committed(), 4);
    let again = reopened.read(0, 100).await.unwrap();
    assert_eq!(
        again.iter().map(|e| e.id().to_owned()).collect::<Vec<_>>(),
        read.iter().map(|e| e.id().to_owned()).collect::<Vec<_>>()
    );
    let next = reopened
        .append(vec![event("orders.created", "", "5")])
        .await
        .unwrap();
    assert_eq!(next[0].position, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_is_noticed_and_positions_stay_gapless() {
    let Some(server) = JetStreamServer::start() else {
        return;
    };
    let (_c1, _j1, first) = open(&server).await;
    let (_c2, _j2, second) = open(&server).await;
    first
        .append(vec![event("orders.a", "", "1")])
        .await
        .unwrap();
    // The second log still believes the stream empty: its expected last sequence is
    // refused, it learns the end and appends after it.
    let appended = second
        .append(vec![event("orders.b", "", "2")])
        .await
        .unwrap();
    assert_eq!(appended[0].position, 1);
    let read = second.read(0, 10).await.unwrap();
    assert_eq!(
        read.iter()
            .map(|e| e.subject().to_owned())
            .collect::<Vec<_>>(),
        vec!["orders.a", "orders.b"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_searches_keys_and_closing() {
    let Some(server) = JetStreamServer::start() else {
        return;
    };
    let (_client, _context, log) = open(&server).await;
    // A client's creation time far in the past does not mislead a search by time.
    let old = PendingEvent::new(&EventDraft {
        subject: "orders.old",
        payload: Some(b"0"),
        created_at: Some(Timestamp::parse("2001-01-01T00:00:00Z").unwrap()),
        ..EventDraft::default()
    })
    .unwrap();
    log.append(vec![old]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let between = Timestamp::now();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    log.append(vec![
        event("orders.k", "key-1", "1"),
        event("orders.k", &"x".repeat(50), "2"),
    ])
    .await
    .unwrap();
    assert_eq!(log.first_committed_at_or_after(between).await.unwrap(), 1);
    assert_eq!(
        log.first_committed_at_or_after(Timestamp::parse("2000-01-01T00:00:00Z").unwrap())
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        log.first_committed_at_or_after(Timestamp::now())
            .await
            .unwrap(),
        3
    );

    let log = Arc::new(log);
    let keys = {
        let log = Arc::clone(&log);
        tokio::task::spawn_blocking(move || {
            let mut keys = Vec::new();
            log.visit_recent_keys(10, 20, &mut |k| keys.push((k.subject, k.key)))
                .unwrap();
            keys
        })
        .await
        .unwrap()
    };
    assert_eq!(keys, vec![("orders.k".to_owned(), "key-1".to_owned())]);

    log.close().await.unwrap();
    let refused = log
        .append(vec![event("orders.k", "", "3")])
        .await
        .unwrap_err();
    assert_eq!(refused.kind, ErrorKind::Unavailable);
    assert_eq!(log.read(0, 10).await.unwrap().len(), 3);
}

/// A served consumer is a JetStream consumer with the bus's settings: its filter is the
/// pattern, acks are explicit, the redelivery time is its ack wait, the pattern and owner
/// are in its metadata; a member pulls within its window, what it acknowledges is
/// JetStream's (the ack floor), a negative ack comes back as the next delivery, and a
/// deleted consumer ends its member's pulls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_are_jetstream_consumers() {
    let Some(server) = JetStreamServer::start() else {
        return;
    };
    let (client, context, log) = open(&server).await;
    for i in 0..5 {
        let subject = if i == 2 {
            "orders.other"
        } else {
            "orders.created"
        };
        log.append(vec![event(subject, "", &i.to_string())])
            .await
            .unwrap();
    }
    let sealings = HashMap::from([("orders".to_owned(), log.sealing().clone())]);
    let consumers = JetStreamConsumers::new(client, context.clone(), sealings);
    let name = ConsumerName::parse("billing").unwrap();
    let owner = Owner("token-a".into());
    let spec = ServedSpec {
        namespace: "orders",
        name: Some(&name),
        pattern: "orders.created",
        owner: Some(&owner),
        start: 1,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 100,
    };
    assert_eq!(consumers.find("orders", &name).await.unwrap(), None);
    let mut member = consumers.join(spec.clone()).await.unwrap();

    let stream = context.get_stream("BUS_orders").await.unwrap();
    let info = stream.consumer_info("billing").await.unwrap();
    assert_eq!(info.config.filter_subject, "orders.created");
    assert_eq!(info.config.ack_wait, Duration::from_secs(30));
    assert_eq!(
        info.config.ack_policy,
        async_nats::jetstream::consumer::AckPolicy::Explicit
    );
    assert_eq!(info.config.metadata["bus_pattern"], "orders.created");
    assert_eq!(info.config.metadata["bus_owner"], "token-a");

    // A window of two: two events, in order, from position 1, the other subject left out.
    member.want(2, 1 << 20, 0).await.unwrap();
    let [first, second]: [Served; 2] = pull(&mut *member, 2).await.try_into().unwrap();
    assert_eq!((first.event.position(), first.deliveries), (1, 1));
    assert_eq!((second.event.position(), second.deliveries), (3, 1));
    assert_eq!(first.event.payload_json(), &b"1"[..]);
    member.settle(&first.token, Settle::Ack).await.unwrap();
    member
        .settle(&second.token, Settle::Nak(Duration::ZERO))
        .await
        .unwrap();
    member.want(2, 1 << 20, 0).await.unwrap();
    let mut pulled = pull(&mut *member, 2).await;
    pulled.sort_by_key(|served| served.event.position());
    let seen: Vec<(u64, u32)> = pulled
        .iter()
        .map(|served| (served.event.position(), served.deliveries))
        .collect();
    assert_eq!(seen, [(3, 2), (4, 1)], "the nak'd event comes back");
    for served in &pulled {
        member.settle(&served.token, Settle::Ack).await.unwrap();
    }

    // Acks are JetStream's: the consumer as the broker reads it.
    let mut found = None;
    for _ in 0..50 {
        found = consumers.find("orders", &name).await.unwrap();
        if found
            .as_ref()
            .is_some_and(|c| c.floor == 5 && c.pending == 0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let found = found.expect("the consumer exists");
    assert_eq!(
        (
            found.pattern.as_str(),
            found.owner.as_ref(),
            found.floor,
            found.pending
        ),
        ("orders.created", Some(&owner), 5, 0)
    );
    assert_eq!(consumers.list("orders").await.unwrap(), [found]);

    // Deleted: the member's pulls go unanswered, which it notices within two heartbeats.
    assert!(consumers.delete("orders", &name).await.unwrap());
    assert!(!consumers.delete("orders", &name).await.unwrap());
    member.want(1, 1 << 20, 0).await.unwrap();
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(15), member.next())
            .await
            .expect("an answer in time")
        {
            Ok(served) if served.is_empty() => member.want(1, 1 << 20, 0).await.unwrap(),
            Ok(_) => panic!("an event from a deleted consumer"),
            Err(e) => break e,
        }
    };
    assert_eq!(ended.kind, ErrorKind::NotFound);
    member.close(Vec::new()).await;
    assert!(consumers.list("orders").await.unwrap().is_empty());
}

/// The next `n` events a member is handed.
async fn pull(member: &mut dyn ServedMember, n: usize) -> Vec<Served> {
    let mut pulled = Vec::new();
    while pulled.len() < n {
        let served = tokio::time::timeout(Duration::from_secs(10), member.next())
            .await
            .expect("a delivery in time")
            .unwrap();
        if served.is_empty() {
            member.want(1, 1 << 20, 1).await.unwrap();
        }
        pulled.extend(served);
    }
    assert_eq!(pulled.len(), n, "no more than asked for");
    pulled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_stored_whole_or_not_at_all_when_nats_server_is_killed_mid_batch() {
    let Some(mut server) = JetStreamServer::start() else {
        return;
    };
    let (_client, _context, log) = open(&server).await;
    let log = Arc::new(log);
    const BATCH: usize = 300;
    // Batches one after another, each of events {"b": batch, "i": 0..BATCH}, until
    // nats-server is gone; what was acknowledged is kept to compare.
    let writer = {
        let log = Arc::clone(&log);
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for b in 0.. {
                let payloads: Vec<String> = (0..BATCH)
                    .map(|i| format!(r#"{{"b":{b},"i":{i},"fill":"{}"}}"#, "x".repeat(200)))
                    .collect();
                let batch = payloads
                    .iter()
                    .map(|p| event("orders.batch", "", p))
                    .collect();
                match log.append(batch).await {
                    Ok(_) => acknowledged.push(b),
                    Err(_) => return acknowledged,
                }
            }
            unreachable!()
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    server.stop();
    let acknowledged = writer.await.unwrap();
    assert!(
        !acknowledged.is_empty(),
        "no batch was stored before the kill"
    );
    server.resume();

    let (_client, _context, reopened) = open(&server).await;
    let mut counts = std::collections::BTreeMap::<u64, usize>::new();
    let mut next = 0;
    while next < reopened.committed() {
        let read = reopened.read(next, 1000).await.unwrap();
        next = read.last().unwrap().position() + 1;
        for stored in read {
            let json: serde_json::Value = serde_json::from_slice(&stored.json()).unwrap();
            let b = json["payload"]["b"].as_u64().unwrap();
            assert_eq!(json["payload"]["i"], counts.get(&b).copied().unwrap_or(0));
            *counts.entry(b).or_default() += 1;
        }
    }
    for (b, count) in &counts {
        assert_eq!(*count, BATCH, "batch {b} is stored in part");
    }
    for b in &acknowledged {
        assert!(counts.contains_key(b), "acknowledged batch {b} was lost");
    }
    // At most the batch in flight at the kill may have been stored unacknowledged.
    assert!(counts.len() <= acknowledged.len() + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_committed_together_and_a_large_batch_whole() {
    let Some(server) = JetStreamServer::start() else {
        return;
    };
    let (_client, _context, log) = open(&server).await;
    let log = Arc::new(log);
    let tasks: Vec<_> = (0..64)
        .map(|n| {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                log.append(vec![event("orders.many", "", &n.to_string())])
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut positions = Vec::new();
    for task in tasks {
        positions.extend(task.await.unwrap().into_iter().map(|a| a.position));
    }
    positions.sort();
    assert_eq!(positions, (0..64).collect::<Vec<u64>>());
    assert!(
        log.stats().groups < 64,
        "appends in flight together share commits: {:?}",
        log.stats()
    );

    // JetStream's largest atomic batch is stored whole; a larger one is refused whole.
    let largest: Vec<PendingEvent> = (0..1000)
        .map(|i| event("orders.large", "", &i.to_string()))
        .collect();
    let appended = log.append(largest).await.unwrap();
    assert_eq!(appended[999].position, 64 + 999);
    assert_eq!(log.read(64 + 999, 1).await.unwrap()[0].position(), 1063);
    let too_large: Vec<PendingEvent> = (0..1001)
        .map(|i| event("orders.large", "", &i.to_string()))
        .collect();
    let refused = log.append(too_large).await.unwrap_err();
    assert_eq!(refused.kind, ErrorKind::TooLarge);
    assert!(
        refused.message.contains("1000 at most"),
        "{}",
        refused.message
    );
    assert_eq!(log.committed(), 1064);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_events_are_sealed_before_they_reach_nats_and_need_the_key() {
    let Some(mut server) = JetStreamServer::start() else {
        return;
    };
    let cipher = Cipher::new("a secret", 4096).unwrap();
    let (_client, context, log) = open_with(&server, Some(&cipher), SMALL_TAIL).await.unwrap();
    let batch = (0..20)
        .map(|i| {
            event(
                "orders.created",
                "",
                &format!(r#"{{"card":"4111-{i:04}"}}"#),
            )
        })
        .collect();
    log.append(batch).await.unwrap();
    log.append(vec![event("orders.paid", "", r#"{"card":"4111-9999"}"#)])
        .await
        .unwrap();

    // What NATS holds: neither the payload nor the event's JSON, though it routes by the
    // subject.
    let stream = context.get_stream("BUS_orders").await.unwrap();
    let raw = stream.get_raw_message(21).await.unwrap();
    assert_eq!(raw.subject.as_str(), "orders.paid");
    let body = String::from_utf8_lossy(&raw.payload);
    assert!(!body.contains("4111") && !body.contains("\"id\""), "{body}");

    // Through the log: the events, with their positions.
    let read = log.read(0, 100).await.unwrap();
    assert_eq!(read.len(), 21);
    assert!(read
        .iter()
        .enumerate()
        .all(|(i, e)| e.position() == i as u64));
    assert!(String::from_utf8_lossy(&read[20].json()).contains("4111-9999"));
    log.close().await.unwrap();
    drop(log);

    // Without the key, or with another, the log does not open; with it, after a restart of
    // nats-server, everything reads back.
    server.restart();
    let refused = open_with(&server, None, SMALL_TAIL).await.err().unwrap();
    assert!(
        refused.message.contains("is encrypted"),
        "{}",
        refused.message
    );
    let other = Cipher::new("another secret", 4096).unwrap();
    let refused = open_with(&server, Some(&other), SMALL_TAIL)
        .await
        .err()
        .unwrap();
    assert!(
        refused.message.contains("another key"),
        "{}",
        refused.message
    );
    let (_client, _context, log) = open_with(&server, Some(&cipher), SMALL_TAIL).await.unwrap();
    let again = log.read(0, 100).await.unwrap();
    assert_eq!(again, read, "the same events, frames and all");
    let id = read[7].id().to_owned();
    assert_eq!(log.find_id(&id).await.unwrap(), Some(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clear_stream_is_not_opened_with_a_key() {
    let Some(server) = JetStreamServer::start() else {
        return;
    };
    let (_client, _context, log) = open(&server).await;
    log.append(vec![event("orders.created", "", "1")])
        .await
        .unwrap();
    log.close().await.unwrap();
    drop(log);
    let cipher = Cipher::new("a secret", 4096).unwrap();
    let refused = open_with(&server, Some(&cipher), SMALL_TAIL)
        .await
        .err()
        .unwrap();
    assert!(
        refused.message.contains("not encrypted"),
        "{}",
        refused.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_share_fetches_and_live_readers_read_the_tail() {
    let Some(server) = JetStreamServer::start() else {
        return;
    };
    const EVENTS: u64 = 10_000;
    {
        let (_client, _context, log) = open(&server).await;
        for _ in 0..EVENTS / 500 {
            let batch = (0..500)
                .map(|_| event("orders.created", "", "{\"n\":1}"))
                .collect();
            log.append(batch).await.unwrap();
        }
        log.close().await.unwrap();
    }
    // A fresh log (nothing in its tail): 50 readers of the whole history at once.
    let (_client, _context, log) = open_with(&server, None, bus::store::DEFAULT_TAIL_BYTES)
        .await
        .unwrap();
    let log = Arc::new(log);
    let readers: Vec<_> = (0..50)
        .map(|_| {
            let log = log.clone();
            tokio::spawn(async move {
                let mut next = 0;
                while next < EVENTS {
                    let read = log.read(next, 256).await.unwrap();
                    assert_eq!(read[0].position(), next);
                    next = read.last().unwrap().position() + 1;
                }
                next
            })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await.unwrap(), EVENTS);
    }
    // Runs of up to 4,096 events: a handful of fetches serve all 50 readers (each reader
    // alone would need at least three).
    let fetches = log.stats().disk_reads;
    assert!(
        (3..=12).contains(&fetches),
        "{fetches} fetches for 50 readers of {EVENTS} events"
    );

    // What this node appends is read from memory, by any number of readers.
    log.append(vec![event("orders.paid", "", "2")])
        .await
        .unwrap();
    for _ in 0..100 {
        let read = log.read(EVENTS, 10).await.unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].subject(), "orders.paid");
    }
    assert_eq!(log.stats().disk_reads, fetches, "no fetch for the tail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_another_writer_appends_reaches_this_logs_readers_live() {
    let Some(server) = JetStreamServer::start() else {
        return;
    };
    let (_c1, _j1, writer) = open(&server).await;
    let (_c2, _j2, follower) = open_with(&server, None, bus::store::DEFAULT_TAIL_BYTES)
        .await
        .unwrap();
    let mut committed = follower.watch_committed();
    writer
        .append(vec![event("orders.a", "", "1")])
        .await
        .unwrap();
    let batch = (0..3)
        .map(|i| event("orders.b", "", &i.to_string()))
        .collect();
    let written = writer.append(batch).await.unwrap();

    // The follower's watermark moves without it appending or reading anything.
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        committed.wait_for(|&end| end == 4),
    )
    .await
    .expect("the other writer's events are followed")
    .unwrap();
    // Read by many readers at once: one fetch from JetStream serves them all.
    let follower = Arc::new(follower);
    let readers: Vec<_> = (0..20)
        .map(|_| {
            let follower = follower.clone();
            tokio::spawn(async move { follower.read(0, 10).await.unwrap() })
        })
        .collect();
    for reader in readers {
        let read = reader.await.unwrap();
        assert_eq!(read.len(), 4);
        assert_eq!(read[3].id(), written[2].id, "the same ids");
    }
    assert_eq!(follower.stats().disk_reads, 1, "one fetch for 20 readers");
    // Its own appends go after them, at the first attempt.
    let appended = follower
        .append(vec![event("orders.c", "", "4")])
        .await
        .unwrap();
    assert_eq!(appended[0].position, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_announcement_delays_events_by_a_check_never_loses_them() {
    let Some(server) = JetStreamServer::start() else {
        return;
    };
    let (_client, context, log) = open(&server).await;
    let mut committed = log.watch_committed();
    // A writer that announces nothing (as a node killed right after its commit would):
    // an event stored straight into the stream.
    let json =
        r#"{"id":"raw_1","subject":"orders.raw","created_at":"2026-12-01T00:00:00Z","index":0}"#;
    context
        .publish("orders.raw", json.into())
        .await
        .unwrap()
        .await
        .unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(3),
        committed.wait_for(|&end| end == 1),
    )
    .await
    .expect("the stream's end is checked every second")
    .unwrap();
    let read = log.read(0, 10).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].id(), "raw_1");
}
