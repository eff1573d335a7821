//! Crash safety with a real process: a child process appends from many tasks under
//! `fsync always` and prints every acknowledgement; the test SIGKILLs it mid-load,
//! reopens the log and checks that every acknowledged event is there exactly once, at
//! its acknowledged position, in its publisher's order, and that batches are whole.
//! Repeated on the same directory, so recovery also runs on recovered logs; and again
//! with the log encrypted.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::common::*;

const RUNS: u64 = 4;
const TASKS: u64 = 8;
const SEGMENT: u64 = 64 << 10;

/// The appending child process. Not a test of its own: `crash_recovery` runs it.
#[test]
#[ignore = "helper process of crash_recovery"]
fn crash_child() {
    let (Ok(dir), Ok(run)) = (
        std::env::var("BUS_CRASH_DIR"),
        std::env::var("BUS_CRASH_RUN"),
    ) else {
        return;
    };
    let run: u64 = run.parse().unwrap();
    let data = std::path::PathBuf::from(dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let secret = std::env::var("BUS_CRASH_SECRET").ok();
    runtime.block_on(async move {
        let log = Arc::new(open_log(&data, secret.as_deref()));
        println!("ready");
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let log = Arc::clone(&log);
            tasks.push(tokio::spawn(async move {
                for batch in 0u64.. {
                    let size = 1 + (batch + task) % 3;
                    let events = (0..size)
                        .map(|i| {
                            event(&json!({"r": run, "t": task, "k": batch, "n": size, "i": i}))
                        })
                        .collect();
                    let appended = log.append(events).await.unwrap();
                    let ids: Vec<&str> = appended.iter().map(|a| a.id.as_str()).collect();
                    // One write per line: a kill cannot leave half an acknowledgement.
                    let line = format!(
                        "ack {run} {task} {batch} {size} {} {}\n",
                        appended[0].position,
                        ids.join(",")
                    );
                    let mut out = std::io::stdout().lock();
                    out.write_all(line.as_bytes()).unwrap();
                    out.flush().unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
}

struct Ack {
    run: u64,
    task: u64,
    batch: u64,
    size: u64,
    position: u64,
    ids: Vec<String>,
}

fn parse_ack(line: &str) -> Option<Ack> {
    let mut f = line.strip_prefix("ack ")?.split(' ');
    let mut num = || f.next().and_then(|x| x.parse::<u64>().ok());
    let (run, task, batch, size, position) = (num()?, num()?, num()?, num()?, num()?);
    let ids = f.next()?.split(',').map(str::to_owned).collect();
    Some(Ack {
        run,
        task,
        batch,
        size,
        position,
        ids,
    })
}

fn jitter_ms(max: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    u64::from(nanos) % max
}

/// The log, encrypted with `secret` if there is one.
fn open_log(data: &std::path::Path, secret: Option<&str>) -> bus::store::Log {
    let mut config = config(data, SEGMENT);
    config.cipher = secret.map(|s| bus::store::Cipher::new(s, 1024).unwrap());
    bus::store::Log::open(&log_dir(data), NAMESPACE, &config).expect("open log")
}

#[test]
fn crash_recovery() {
    crash_and_verify(None);
}

#[test]
fn crash_recovery_encrypted() {
    crash_and_verify(Some("crash test key"));
}

fn crash_and_verify(secret: Option<&str>) {
    let data = tempfile::tempdir().unwrap();
    let mut acks: Vec<Ack> = Vec::new();
    for run in 0..RUNS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "store_crash::crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("BUS_CRASH_DIR", data.path())
            .env("BUS_CRASH_RUN", run.to_string())
            .envs(secret.map(|s| ("BUS_CRASH_SECRET", s)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines_tx, lines) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });

        // Kill at a random moment once the load is well under way.
        let wanted = 200 + jitter_ms(400) as usize;
        let started = Instant::now();
        let mut seen = 0;
        while seen < wanted {
            match lines.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    if let Some(ack) = parse_ack(&line) {
                        acks.push(ack);
                        seen += 1;
                    }
                }
                Err(e) => panic!(
                    "child produced no acknowledgements ({e}) after {:?}",
                    started.elapsed()
                ),
            }
        }
        std::thread::sleep(Duration::from_millis(jitter_ms(30)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        // Acknowledgements printed before the kill still count.
        acks.extend(lines.try_iter().filter_map(|l| parse_ack(&l)));

        verify(data.path(), secret, &acks, run);
    }
}

/// Reopens the log and checks it against every acknowledgement so far.
fn verify(data: &std::path::Path, secret: Option<&str>, acks: &[Ack], run: u64) {
    let log = open_log(data, secret);
    assert!(
        !log.recovery().clean_shutdown,
        "run {run}: the child was killed"
    );
    let events = read_all(&log, 500);

    // (run, task, batch) → positions of its events, by index in the batch.
    let mut stored: HashMap<(u64, u64, u64), BTreeMap<u64, u64>> = HashMap::new();
    let mut sizes: HashMap<(u64, u64, u64), u64> = HashMap::new();
    for (position, event) in events.iter().enumerate() {
        let value = json(event);
        assert_eq!(value["index"], position as u64);
        let p = &value["payload"];
        let key = (
            p["r"].as_u64().unwrap(),
            p["t"].as_u64().unwrap(),
            p["k"].as_u64().unwrap(),
        );
        let duplicate = stored
            .entry(key)
            .or_default()
            .insert(p["i"].as_u64().unwrap(), position as u64);
        assert_eq!(duplicate, None, "run {run}: event {key:?} stored twice");
        sizes.insert(key, p["n"].as_u64().unwrap());
    }

    // Every batch in the log is whole and contiguous (acknowledged or not).
    for (key, members) in &stored {
        let size = sizes[key];
        assert_eq!(
            members.len() as u64,
            size,
            "run {run}: batch {key:?} is partial"
        );
        let first = members[&0];
        for (i, position) in members {
            assert_eq!(
                *position,
                first + i,
                "run {run}: batch {key:?} is not contiguous"
            );
        }
    }

    // Every acknowledged event is there, at its acknowledged position, with its id.
    for ack in acks {
        let key = (ack.run, ack.task, ack.batch);
        let members = stored
            .get(&key)
            .unwrap_or_else(|| panic!("run {run}: acknowledged batch {key:?} is missing"));
        assert_eq!(members.len() as u64, ack.size);
        for (i, id) in ack.ids.iter().enumerate() {
            let position = ack.position + i as u64;
            assert_eq!(members[&(i as u64)], position, "run {run}: {key:?} moved");
            assert_eq!(
                events[position as usize].id(),
                id,
                "run {run}: {key:?} changed id"
            );
        }
    }

    // Each publisher's batches are in its order, with no gap: a task appends batch k+1
    // only after batch k was acknowledged.
    let mut by_task: HashMap<(u64, u64), Vec<(u64, u64)>> = HashMap::new();
    for ((r, t, k), members) in &stored {
        by_task.entry((*r, *t)).or_default().push((members[&0], *k));
    }
    for (task, mut batches) in by_task {
        batches.sort_unstable();
        for (expected, (_, k)) in batches.iter().enumerate() {
            assert_eq!(
                *k, expected as u64,
                "run {run}: task {task:?} out of order or gapped"
            );
        }
    }
    drop(log);
}
