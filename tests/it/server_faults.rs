//! Faults with the real server process: SIGKILL at random moments under load, and a full
//! disk. After every restart, every event that got a 202 is there exactly once and in its
//! publisher's order, and subscribers resuming with Last-Event-ID see no gap and no
//! duplicate.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::common::cli::{free_port, Background};
use crate::common::http::{Frame, Sse};

const PUBLISHERS: u64 = 8;
const SUBSCRIBERS: usize = 4;
const KILLS: usize = 4;

/// A pseudo-random number below `max` (the kill moments vary from run to run).
fn jitter(max: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    u64::from(nanos) % max
}

fn start_server(addr: &str, path: &str, extra: &[&str]) -> Background {
    let mut args = vec![
        "server",
        "--addr",
        addr,
        "--path",
        path,
        "--namespaces",
        "app",
        "--fsync",
        "always",
    ];
    args.extend_from_slice(extra);
    let mut server = Background::start(&args);
    server.wait_for_stderr("listening");
    server
}

/// What a subscriber received: (index, id) of each event.
type Seen = Arc<Mutex<Vec<(u64, String)>>>;

/// What the publishers were told: (publisher, sequence number) → event id.
type Acked = Arc<Mutex<BTreeMap<(u64, u64), String>>>;

/// Publishes one event at a time until the server goes away; returns the next sequence
/// number to use.
async fn publish_until_gone(url: String, publisher: u64, mut seq: u64, acked: Acked) -> u64 {
    let client = reqwest::Client::new();
    loop {
        let event = json!({"subject": format!("app.p{publisher}"), "payload": {"p": publisher, "seq": seq}});
        let sent = client.post(&url).body(event.to_string()).send().await;
        // Whatever happened, this number is used: an unanswered event may be stored.
        let this = seq;
        seq += 1;
        match sent {
            Ok(response) if response.status() == 202 => {
                let id = response.headers()["x-bus-event-id"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                acked.lock().unwrap().insert((publisher, this), id);
            }
            Ok(response) => panic!("publish answered {}", response.status()),
            Err(_) => return seq,
        }
    }
}

/// Reads a stream until it breaks, appending (index, id) of every event.
async fn follow_until_gone(mut sse: Sse, seen: Seen) {
    while let Some(frame) = sse.next(Duration::from_secs(30)).await {
        if frame.event.as_deref() != Some("msg") {
            continue;
        }
        let index = frame.json()["index"].as_u64().unwrap();
        seen.lock()
            .unwrap()
            .push((index, frame.id.clone().unwrap()));
    }
}

async fn open_stream(url: &str, last_event_id: Option<&str>) -> Sse {
    let client = reqwest::Client::new();
    let mut request = client.get(format!("{url}?subject=app.>&start=oldest"));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    Sse::new(response)
}

/// Every stored event, in log order.
async fn read_log(url: &str) -> Vec<Frame> {
    let response = reqwest::get(format!("{url}?subject=app.>&start=oldest&until=now"))
        .await
        .unwrap();
    let mut sse = Sse::new(response);
    let mut events = Vec::new();
    while let Some(frame) = sse.next(Duration::from_secs(30)).await {
        match frame.event.as_deref() {
            Some("msg") => events.push(frame),
            Some("done") => return events,
            other => panic!("unexpected frame {other:?}"),
        }
    }
    panic!("the read of the log did not end");
}

fn verify(
    run: usize,
    log: &[Frame],
    acked: &BTreeMap<(u64, u64), String>,
    seen: &[Vec<(u64, String)>],
) {
    let mut stored: HashMap<(u64, u64), String> = HashMap::new();
    let mut last_seq: HashMap<u64, u64> = HashMap::new();
    for (position, frame) in log.iter().enumerate() {
        let event = frame.json();
        assert_eq!(
            event["index"], position as u64,
            "run {run}: positions have no gaps"
        );
        let key = (
            event["payload"]["p"].as_u64().unwrap(),
            event["payload"]["seq"].as_u64().unwrap(),
        );
        let id = frame.id.clone().unwrap();
        assert!(
            stored.insert(key, id).is_none(),
            "run {run}: {key:?} stored twice"
        );
        if let Some(previous) = last_seq.insert(key.0, key.1) {
            assert!(
                previous < key.1,
                "run {run}: publisher {} out of order",
                key.0
            );
        }
    }
    for (key, id) in acked {
        assert_eq!(
            stored.get(key),
            Some(id),
            "run {run}: acknowledged {key:?} is missing"
        );
    }
    for (s, events) in seen.iter().enumerate() {
        for (i, (index, id)) in events.iter().enumerate() {
            assert_eq!(
                *index, i as u64,
                "run {run}: subscriber {s} has a gap or a duplicate"
            );
            assert_eq!(
                Some(id),
                log.get(i).and_then(|f| f.id.as_ref()),
                "run {run}: subscriber {s} saw what is not in the log"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_event() {
    let data = tempfile::tempdir().unwrap();
    let path = data.path().display().to_string();
    let addr = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{addr}/");
    let acked: Acked = Arc::default();
    let seen: Vec<Seen> = (0..SUBSCRIBERS).map(|_| Arc::default()).collect();
    let mut next_seq = vec![0u64; PUBLISHERS as usize];

    for run in 0..=KILLS {
        let mut server = start_server(&addr, &path, &[]);
        let streams: Vec<_> = futures_util::future::join_all(seen.iter().map(|seen| {
            let last = seen.lock().unwrap().last().map(|(_, id)| id.clone());
            let url = url.clone();
            async move { open_stream(&url, last.as_deref()).await }
        }))
        .await;
        let followers: Vec<_> = streams
            .into_iter()
            .zip(&seen)
            .map(|(sse, seen)| tokio::spawn(follow_until_gone(sse, Arc::clone(seen))))
            .collect();
        let publishers: Vec<_> = (0..PUBLISHERS)
            .map(|p| {
                tokio::spawn(publish_until_gone(
                    url.clone(),
                    p,
                    next_seq[p as usize],
                    Arc::clone(&acked),
                ))
            })
            .collect();

        tokio::time::sleep(Duration::from_millis(300 + jitter(700))).await;
        if run < KILLS {
            server.child.kill().unwrap(); // SIGKILL
        } else {
            unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
        }
        server.child.wait().unwrap();
        for (p, publisher) in publishers.into_iter().enumerate() {
            next_seq[p] = publisher.await.unwrap();
        }
        for follower in followers {
            follower.await.unwrap();
        }

        let mut check = start_server(&addr, &path, &[]);
        let log = read_log(&url).await;
        let acked_now = acked.lock().unwrap().clone();
        let seen_now: Vec<_> = seen.iter().map(|s| s.lock().unwrap().clone()).collect();
        verify(run, &log, &acked_now, &seen_now);
        eprintln!(
            "run {run}: {} events stored, {} acknowledged so far",
            log.len(),
            acked_now.len()
        );
        assert!(
            acked_now.len() > run * 10,
            "run {run}: too little load to mean anything"
        );
        assert!(
            seen_now.iter().all(|events| !events.is_empty()),
            "run {run}: a subscriber received nothing"
        );
        unsafe { libc::kill(check.child.id() as i32, libc::SIGTERM) };
        assert_eq!(check.wait(), 0);
    }
}

/// Mounts a tmpfs of `size` at `dir` (needs root), or resizes it.
fn mount_tmpfs(dir: &std::path::Path, size: &str, remount: bool) -> bool {
    let options = if remount {
        format!("remount,size={size}")
    } else {
        format!("size={size}")
    };
    std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|status| status.success())
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_publishes_clearly_and_publishing_resumes_with_space() {
    let root = tempfile::tempdir().unwrap();
    let mount = root.path().join("disk");
    std::fs::create_dir(&mount).unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !mount_tmpfs(&mount, "2m", false) {
        eprintln!("skipped: mounting a small tmpfs needs root (CI runs as root)");
        return;
    }
    let _unmount = Unmount(mount.clone());
    let path = mount.display().to_string();
    let addr = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{addr}/");
    // Small segments, so that the disk also fills up while one is sealed and the next
    // created.
    let segments = ["--segment-size", "64KiB"];
    let mut server = start_server(&addr, &path, &segments);
    let client = reqwest::Client::new();
    let payload = "x".repeat(1000);

    let mut acked = Vec::new();
    let mut refusal = None;
    for n in 0..10_000 {
        let event = json!({"subject": "app.fill", "payload": [n, payload]});
        let response = client
            .post(&url)
            .body(event.to_string())
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            202 => acked.push(
                response.headers()["x-bus-event-id"]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            ),
            status => {
                refusal = Some((status, response.text().await.unwrap()));
                break;
            }
        }
    }
    let (status, message) = refusal.expect("a 2 MiB disk fills up");
    assert_eq!(status, 507, "{message}");
    assert!(message.contains("disk is full"), "{message}");
    assert!(acked.len() > 100, "only {} events fit", acked.len());
    // Still serving, and still refusing while the disk is full.
    let health = client.get(format!("{url}healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let again = client
        .post(&url)
        .body(json!({"subject": "app.fill", "payload": payload}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 507);

    assert!(mount_tmpfs(&mount, "16m", true), "growing the tmpfs");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = client
            .post(&url)
            .body(json!({"subject": "app.fill", "payload": "after"}).to_string())
            .send()
            .await
            .unwrap();
        if response.status() == 202 {
            acked.push(
                response.headers()["x-bus-event-id"]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "publishing did not resume: {}",
            response.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every acknowledged event, once, in order, before and after a restart.
    for round in 0..2 {
        let ids: Vec<String> = read_log(&url)
            .await
            .into_iter()
            .map(|f| f.id.unwrap())
            .collect();
        assert_eq!(ids, acked, "round {round}");
        unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
        assert_eq!(server.wait(), 0);
        server = start_server(&addr, &path, &segments);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_starts_on_a_full_disk_serves_reads_and_refuses_publishes_until_space_returns() {
    let root = tempfile::tempdir().unwrap();
    let mount = root.path().join("disk");
    std::fs::create_dir(&mount).unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !mount_tmpfs(&mount, "4m", false) {
        eprintln!("skipped: mounting a small tmpfs needs root (CI runs as root)");
        return;
    }
    let _unmount = Unmount(mount.clone());
    let path = mount.join("data");
    let path = path.display().to_string();
    let addr = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{addr}/");
    bus::client::install_tls_provider();
    let client = reqwest::Client::new();
    let publish = |n: u64| {
        client
            .post(&url)
            .body(json!({"subject": "app.disk", "payload": n}).to_string())
            .send()
    };

    let mut server = start_server(&addr, &path, &[]);
    for n in 0..10 {
        assert_eq!(publish(n).await.unwrap().status(), 202);
    }
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert_eq!(server.wait(), 0);

    // Fill the disk to the last byte.
    let filler = mount.join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while file.write_all(&block).is_ok() {}
        let _ = file.write_all(&[0u8]);
        let _ = file.sync_all();
    }

    // It starts, writing nothing, and serves what is stored.
    let mut server = start_server(&addr, &path, &[]);
    assert_eq!(read_log(&url).await.len(), 10);
    let refused = publish(10).await.unwrap();
    assert_eq!(refused.status(), 507);
    assert!(refused.text().await.unwrap().contains("disk is full"));
    let leftovers: Vec<_> = std::fs::read_dir(mount.join("data/app"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Space returns: publishing resumes, and a restart keeps everything.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(publish(10).await.unwrap().status(), 202);
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert_eq!(server.wait(), 0);
    let mut server = start_server(&addr, &path, &[]);
    let events = read_log(&url).await;
    let payloads: Vec<i64> = events
        .iter()
        .map(|f| f.json()["payload"].as_i64().unwrap())
        .collect();
    assert_eq!(payloads, (0..=10).collect::<Vec<_>>());
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert_eq!(server.wait(), 0);
}
