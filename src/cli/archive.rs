//! `bus dump`, `bus restore` and `bus copy`: moving events out of and into a bus, through
//! a running server (`--host`) or directly in a data directory (`--path`) while no server
//! has it open.
//!
//! The exchange format is JSON Lines: one event per line, its JSON as the server stores
//! and streams it (`id`, `trace_id`, `key`, `subject`, `response_subject`, `created_at`,
//! `payload`, `index`: the wire's [`EventOut`](crate::wire::EventOut)). A line is read
//! back as a publish reads an event ([`EventIn`]), so `id` and `created_at` may be left
//! out (the receiving log assigns them). Restoring keeps ids, order and creation times;
//! `index` is reassigned by the receiving log (it is the same when restoring into an empty
//! one). An id the receiving log already holds stops the restore with an error: events are
//! never duplicated silently.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Args;

use super::progress;
use crate::client::Client;
use crate::client::{Received, Start, SubscribeOptions};
use crate::event::{compact_json, EventDraft, PendingEvent};
use crate::store::cipher::DEFAULT_BLOCK_SIZE;
use crate::store::inspect::{self, LogFiles};
use crate::store::{Cipher, Log, StoreConfig, StoreError};
use crate::subject::Subject;
use crate::timestamp::Timestamp;
use crate::wire::EventIn;

/// Events per batch when restoring or copying (one atomic append each).
pub(super) const BATCH_EVENTS: usize = 1000;
/// Bytes per batch sent to a server, well under its 8 MiB body limit.
pub(super) const BATCH_BYTES: usize = 4 << 20;

/// Where events come from or go to: a server, or a data directory.
#[derive(Debug, Args)]
pub struct Source {
    #[command(flatten)]
    pub server: super::HostArgs,
    /// Work on this data directory instead of a server (the server must be stopped).
    #[arg(long)]
    pub path: Option<PathBuf>,
    #[command(flatten)]
    pub key: KeyArgs,
}

/// The key of an encrypted data directory.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// With --path: the secret key the data directory is encrypted with.
    #[arg(long, env = "BUS_SECRET_KEY", hide_env_values = true)]
    pub secret_key: Option<String>,
}

impl KeyArgs {
    /// The cipher to read with (and to write with in blocks of `block_size`).
    pub fn cipher(&self, block_size: usize) -> anyhow::Result<Option<Cipher>> {
        cipher_for(self.secret_key.as_deref(), block_size)
    }
}

/// The cipher for a secret (none for an absent or empty one).
fn cipher_for(secret: Option<&str>, block_size: usize) -> anyhow::Result<Option<Cipher>> {
    match secret {
        None | Some("") => Ok(None),
        Some(secret) => Cipher::new(secret, block_size)
            .map(Some)
            .map_err(anyhow::Error::msg),
    }
}

#[derive(Debug, Args)]
pub struct DumpArgs {
    #[command(flatten)]
    pub source: Source,
    /// Namespaces to dump, comma-separated (required with a server; all of the data
    /// directory's by default).
    #[arg(long, value_delimiter = ',')]
    pub namespace: Vec<String>,
    /// File to write (default: standard output).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

pub async fn dump(args: DumpArgs) -> anyhow::Result<()> {
    let mut out: Box<dyn Write + Send> = match &args.output {
        Some(path) => Box::new(BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout())),
    };
    let bar = progress::events(None, "dumping");
    let written = match &args.source.path {
        Some(path) => {
            let namespaces = match args.namespace.is_empty() {
                true => inspect::namespaces(path)?,
                false => args.namespace.clone(),
            };
            // Readers take blocks of any size.
            let cipher = args.source.key.cipher(DEFAULT_BLOCK_SIZE)?;
            let path = path.clone();
            let bar = bar.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
                let mut written = 0;
                for namespace in namespaces {
                    let files = LogFiles::open(&path.join(&namespace), cipher.as_ref())
                        .with_context(|| format!("namespace {namespace}"))?;
                    let end = files.for_each_event(|record| -> anyhow::Result<()> {
                        out.write_all(record.json)?;
                        out.write_all(b"\n")?;
                        bar.inc(1);
                        Ok(())
                    })?;
                    written += end.events;
                    if let Some(torn) = end.torn_tail {
                        eprintln!("bus: {namespace}: ignored an interrupted last write ({torn})");
                    }
                }
                out.flush().context("writing the dump")?;
                Ok(written)
            })
            .await??
        }
        None => {
            if args.namespace.is_empty() {
                bail!("name the namespaces to dump with --namespace (a server does not list them)");
            }
            let client = args.source.server.client()?;
            let mut written = 0;
            for namespace in &args.namespace {
                let mut options = SubscribeOptions::new(format!("{namespace}.>"));
                options.start = Start::Oldest;
                options.until_now = true;
                let mut subscription = client
                    .subscribe(options)
                    .await
                    .with_context(|| format!("namespace {namespace}"))?;
                while let Some(received) = subscription.next().await {
                    match received? {
                        Received::Event(event) => {
                            out.write_all(event.json.as_bytes())?;
                            out.write_all(b"\n")?;
                            written += 1;
                            bar.inc(1);
                        }
                        Received::Disconnected(e) => {
                            eprintln!("bus: connection lost ({e}); reconnecting")
                        }
                        Received::Reconnected { .. } => eprintln!("bus: reconnected"),
                    }
                }
            }
            out.flush().context("writing the dump")?;
            written
        }
    };
    bar.finish_and_clear();
    eprintln!("dumped {written} events");
    Ok(())
}

/// An event line of a dump, read as a publish reads an event (`index` is ignored); also a
/// record of the reference's log files, which hold the same JSON (`bus import`).
pub(super) struct EventLine {
    event: EventIn,
}

impl EventLine {
    pub(super) fn parse(json: &[u8]) -> anyhow::Result<EventLine> {
        let line: EventIn = serde_json::from_slice(json).context("not an event")?;
        let subject = Subject::parse(&line.subject)?;
        if subject.is_inbox() {
            bail!("inbox subjects ({}) are not stored", line.subject);
        }
        Ok(EventLine { event: line })
    }

    pub(super) fn namespace(&self) -> &str {
        self.event.subject.split('.').next().unwrap_or_default()
    }

    pub(super) fn id(&self) -> &str {
        &self.event.id
    }

    pub(super) fn subject(&self) -> &str {
        &self.event.subject
    }

    pub(super) fn to_pending(&self) -> anyhow::Result<PendingEvent> {
        let line = &self.event;
        let payload = line
            .payload
            .as_ref()
            .map(|p| compact_json(p.get().as_bytes()));
        // A time left out, empty or Go's zero time is the log's to give, as on a publish.
        let created_at = line
            .given_created_at()
            .map(|text| Timestamp::parse(text).context("created_at"))
            .transpose()?;
        let draft = EventDraft {
            subject: &line.subject,
            trace_id: &line.trace_id,
            key: &line.key,
            response_subject: &line.response_subject,
            payload: payload.as_deref(),
            id: (!line.id.is_empty()).then_some(line.id.as_str()),
            created_at,
        };
        Ok(PendingEvent::new(&draft)?)
    }
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub target: Source,
    /// JSON Lines file to read (default: standard input).
    #[arg(long, short)]
    pub input: Option<PathBuf>,
    /// With --path and --secret-key: plaintext bytes sealed together in the files written.
    #[arg(long, env = "BUS_BLOCK_SIZE", default_value_t = DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,
}

/// A run of consecutive lines that go out together.
struct Batch {
    first_line: usize,
    last_line: usize,
    namespace: String,
    bytes: usize,
    lines: Vec<(Vec<u8>, EventLine)>,
}

pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let input: Box<dyn BufRead + Send> = match &args.input {
        Some(path) => Box::new(BufReader::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        )),
        None => Box::new(BufReader::new(std::io::stdin())),
    };
    let mut sink = match &args.target.path {
        Some(path) => Sink::Directory {
            path: path.clone(),
            cipher: args.target.key.cipher(args.block_size)?,
            logs: BTreeMap::new(),
        },
        None => Sink::Server(args.target.server.client()?),
    };
    let bar = progress::events(None, "restoring");
    let mut restored = 0u64;
    let mut batch: Option<Batch> = None;
    for (i, line) in input.split(b'\n').enumerate() {
        let number = i + 1;
        let line = line.context("reading the input")?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let event =
            EventLine::parse(&line).with_context(|| format!("line {number} of the input"))?;
        let fits = batch.as_ref().is_some_and(|b| {
            b.namespace == event.namespace()
                && b.lines.len() < BATCH_EVENTS
                && b.bytes + line.len() < BATCH_BYTES
        });
        if !fits {
            if let Some(full) = batch.take() {
                restored += sink.write(full, restored).await?;
                bar.set_position(restored);
            }
        }
        let current = batch.get_or_insert_with(|| Batch {
            first_line: number,
            last_line: number,
            namespace: event.namespace().to_owned(),
            bytes: 0,
            lines: Vec::new(),
        });
        current.last_line = number;
        current.bytes += line.len() + 1;
        current.lines.push((line, event));
    }
    if let Some(last) = batch.take() {
        restored += sink.write(last, restored).await?;
    }
    sink.close().await?;
    bar.finish_and_clear();
    eprintln!("restored {restored} events");
    Ok(())
}

enum Sink {
    Server(Client),
    Directory {
        path: PathBuf,
        cipher: Option<Cipher>,
        logs: BTreeMap<String, Arc<Log>>,
    },
}

impl Sink {
    /// Writes a batch atomically; returns how many events it held.
    async fn write(&mut self, batch: Batch, restored_before: u64) -> anyhow::Result<u64> {
        let count = batch.lines.len() as u64;
        // Where a failure happened: the batch's lines, and how much is in already.
        let what = |sent_of_batch: u64| {
            let lines = match batch.first_line == batch.last_line {
                true => format!("line {}", batch.first_line),
                false => format!("lines {}-{}", batch.first_line, batch.last_line),
            };
            format!(
                "restoring {lines} ({} events were restored before the failure)",
                restored_before + sent_of_batch
            )
        };
        match self {
            Sink::Server(client) => {
                // The server takes events with a response subject only one at a time.
                let mut sent = 0;
                let runs = batch.lines.chunk_by(|a, b| {
                    a.1.event.response_subject.is_empty() && b.1.event.response_subject.is_empty()
                });
                for run in runs {
                    let body = match run {
                        [(json, _)] => json.clone(),
                        run => {
                            let mut body = Vec::with_capacity(batch.bytes + 2);
                            body.push(b'[');
                            for (i, (json, _)) in run.iter().enumerate() {
                                if i > 0 {
                                    body.push(b',');
                                }
                                body.extend_from_slice(json);
                            }
                            body.push(b']');
                            body
                        }
                    };
                    client
                        .publish_json(Bytes::from(body))
                        .await
                        .with_context(|| what(sent))?;
                    sent += run.len() as u64;
                }
            }
            Sink::Directory { path, cipher, logs } => {
                let log = match logs.get(&batch.namespace) {
                    Some(log) => Arc::clone(log),
                    None => {
                        let log = open_log(path, &batch.namespace, cipher.clone())
                            .with_context(|| what(0))?;
                        logs.insert(batch.namespace.clone(), Arc::clone(&log));
                        log
                    }
                };
                let events = batch
                    .lines
                    .iter()
                    .map(|(_, line)| line.to_pending())
                    .collect::<anyhow::Result<Vec<_>>>()
                    .with_context(|| what(0))?;
                log.append(events)
                    .await
                    .map_err(explain_duplicate)
                    .with_context(|| what(0))?;
            }
        }
        Ok(count)
    }

    async fn close(self) -> anyhow::Result<()> {
        if let Sink::Directory { logs, .. } = self {
            for log in logs.values() {
                log.close().await?;
            }
        }
        Ok(())
    }
}

pub(super) fn open_log(
    data_dir: &Path,
    namespace: &str,
    cipher: Option<Cipher>,
) -> anyhow::Result<Arc<Log>> {
    crate::store::validate_namespace(namespace)?;
    let mut config = StoreConfig::new(data_dir);
    config.cipher = cipher;
    let log = Log::open(&data_dir.join(namespace), namespace, &config)
        .with_context(|| format!("opening namespace {namespace} in {}", data_dir.display()))?;
    Ok(Arc::new(log))
}

pub(super) fn explain_duplicate(error: StoreError) -> anyhow::Error {
    match error {
        StoreError::DuplicateId(id) => anyhow!(
            "event {id} is already in the log; events are never stored twice (restore only events that are not there yet)"
        ),
        other => other.into(),
    }
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Data directory to copy from (no server may have it open).
    #[arg(long)]
    pub from: PathBuf,
    /// Data directory to copy to (created if needed; no server may have it open).
    #[arg(long)]
    pub to: PathBuf,
    /// Namespaces to copy, comma-separated (default: all of --from's).
    #[arg(long, value_delimiter = ',')]
    pub namespace: Vec<String>,
    /// Skip events whose ids the destination already holds, instead of stopping at the
    /// first one: copying again into the same destination then adds only what is new.
    #[arg(long)]
    pub skip_ids: bool,
    /// Secret key of an encrypted source.
    #[arg(long, env = "BUS_SRC_SECRET_KEY", hide_env_values = true)]
    pub src_secret_key: Option<String>,
    /// Secret key to encrypt the destination with (a destination namespace that exists
    /// already must have been encrypted with it, or not be encrypted if none is given).
    #[arg(long, env = "BUS_DST_SECRET_KEY", hide_env_values = true)]
    pub dst_secret_key: Option<String>,
    /// Plaintext bytes sealed together in the encrypted destination.
    #[arg(long, env = "BUS_BLOCK_SIZE", default_value_t = DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,
}

pub async fn copy(args: CopyArgs) -> anyhow::Result<()> {
    // The source's block size does not matter: readers take blocks of any size.
    let source_cipher = cipher_for(args.src_secret_key.as_deref(), DEFAULT_BLOCK_SIZE)?;
    let target_cipher = cipher_for(args.dst_secret_key.as_deref(), args.block_size)?;
    let namespaces = match args.namespace.is_empty() {
        true => inspect::namespaces(&args.from)?,
        false => args.namespace.clone(),
    };
    if namespaces.is_empty() {
        bail!("{} holds no namespace to copy", args.from.display());
    }
    let runtime = tokio::runtime::Handle::current();
    for namespace in namespaces {
        let source = LogFiles::open(&args.from.join(&namespace), source_cipher.as_ref())
            .with_context(|| format!("namespace {namespace}"))?;
        let target = open_log(&args.to, &namespace, target_cipher.clone())?;
        let bar = progress::events(None, &format!("copying {namespace}"));
        let skip_ids = args.skip_ids;
        let runtime = runtime.clone();
        let task_target = Arc::clone(&target);
        let task_bar = bar.clone();
        let (copied, skipped) =
            tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, u64)> {
                let target = task_target;
                let (mut copied, mut skipped) = (0u64, 0u64);
                let mut batch = Vec::with_capacity(BATCH_EVENTS);
                let mut flush = |batch: &mut Vec<PendingEvent>| -> anyhow::Result<()> {
                    let events = std::mem::take(batch);
                    let n = events.len() as u64;
                    runtime
                        .block_on(target.append(events))
                        .map_err(explain_duplicate)?;
                    copied += n;
                    Ok(())
                };
                let end = source.for_each_event(|record| -> anyhow::Result<()> {
                    let line = EventLine::parse(record.json).with_context(|| {
                        format!("{} at offset {}", record.file.display(), record.offset)
                    })?;
                    task_bar.inc(1);
                    if skip_ids && runtime.block_on(target.find_id(&line.event.id))?.is_some() {
                        skipped += 1;
                        return Ok(());
                    }
                    batch.push(line.to_pending()?);
                    if batch.len() >= BATCH_EVENTS {
                        flush(&mut batch)?;
                    }
                    Ok(())
                })?;
                flush(&mut batch)?;
                if let Some(torn) = end.torn_tail {
                    eprintln!("bus: ignored an interrupted last write of the source ({torn})");
                }
                Ok((copied, skipped))
            })
            .await
            .context("the copy task failed")?
            .with_context(|| format!("copying namespace {namespace}"))?;
        target.close().await?;
        bar.finish_and_clear();
        if skipped > 0 {
            eprintln!("{namespace}: copied {copied} events, skipped {skipped} already there");
        } else {
            eprintln!("{namespace}: copied {copied} events");
        }
    }
    Ok(())
}
