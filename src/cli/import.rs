//! `bus import`: moving a reference server's (ella.to/bus) events into a `bus` data
//! directory, read straight from the reference's log files ([`crate::reference`]).
//!
//! Each record becomes the same event: id, subject, trace id, key, response subject,
//! creation time and payload are kept, and so is the order (a record's position in its
//! file is its event's `index`). Events are appended through the store as `bus restore`
//! appends them ([`archive`](super::archive)), in batches that are each atomic; the
//! payload is stored compact, as every publish is.
//!
//! What it promises:
//! - **Nothing written unless everything can be.** A first pass reads every namespace and
//!   checks every record (framing, decryption, that it is an event `bus` can store, and
//!   against what the target already holds); only then does a second pass write. A
//!   damaged record stops the import before anything is written, with the file, the
//!   record's number and its byte offset. With `--skip-damaged` the damaged records are
//!   left out instead, each one reported, and counted at the end.
//! - **Importing again never duplicates.** A target namespace must be empty, or begin
//!   with the very events this import would write, in the same order (an earlier import
//!   of the same reference file, perhaps interrupted, perhaps followed by events published
//!   to `bus` since): then only the reference's events after those are appended. Anything
//!   else in the target namespace stops the import, since appending would break the
//!   reference's order or mix two histories.
//! - **What the reference never delivered is not imported, and is said.** Bytes after the
//!   records the reference's file header counts (a write a crash or an error left
//!   unfinished) are reported with their offset and length.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;

use super::archive::{explain_duplicate, open_log, EventLine, KeyArgs, BATCH_BYTES, BATCH_EVENTS};
use super::progress;
use crate::event::PendingEvent;
use crate::reference::cipher::DEFAULT_BLOCK_SIZE as REFERENCE_BLOCK_SIZE;
use crate::reference::{self, LogFile, Record, ReferenceCipher, ReferenceError};
use crate::store::Log;

const EXAMPLES: &str = "\
Examples:
  # Stop the reference server, then import all its namespaces into a new bus data directory:
  bus import --reference-path /var/lib/ella-bus --path /var/lib/bus
  bus server --path /var/lib/bus --namespaces app,orders

  # Only some namespaces, from a reference server that encrypted its files:
  bus import --reference-path ./data --path ./bus-data --namespaces orders \\
      --reference-secret-key \"$OLD_SECRET\"

Importing again adds only the events the reference has written since; it never
duplicates one.";

#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct ImportArgs {
    /// The reference server's data directory (the `--path` it was started with), which
    /// holds one `<namespace>.log` file per namespace. Stop the reference server first, or
    /// import again afterwards to pick up what it wrote meanwhile.
    #[arg(long, value_name = "DIR")]
    pub reference_path: PathBuf,
    /// The `bus` data directory to write into (created if needed; no `bus` server may
    /// have it open).
    #[arg(long, value_name = "DIR")]
    pub path: PathBuf,
    /// Namespaces to import, comma-separated (default: every `<namespace>.log` in
    /// --reference-path).
    #[arg(long, alias = "namespace", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// The secret key the reference server encrypted its log files with (its
    /// `--secret-key`). Reading the reference's encryption has not been tried on files the
    /// reference wrote (see README).
    #[arg(
        long,
        alias = "reference-key",
        env = "BUS_REFERENCE_SECRET_KEY",
        hide_env_values = true
    )]
    pub reference_secret_key: Option<String>,
    /// The reference server's `--block-size` (for encrypted files only).
    #[arg(long, env = "BUS_REFERENCE_BLOCK_SIZE", default_value_t = REFERENCE_BLOCK_SIZE)]
    pub reference_block_size: usize,
    /// Leave out records that cannot be read (cut off, undecryptable, or not an event)
    /// instead of stopping: each is reported, and the import says how many it left out.
    /// After a record that is cut off nothing more of its file can be read.
    #[arg(long)]
    pub skip_damaged: bool,
    // The key to encrypt the `bus` data directory with (--secret-key).
    #[command(flatten)]
    pub key: KeyArgs,
    /// With --secret-key: plaintext bytes sealed together in the files written.
    #[arg(long, env = "BUS_BLOCK_SIZE", default_value_t = crate::store::cipher::DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,
}

/// What the check of one namespace found, and what the import will do.
#[derive(Debug)]
struct Plan {
    namespace: String,
    file: PathBuf,
    /// Records the check read (the import reads no more, should the file have grown).
    records: u64,
    /// Events the reference file holds that can be imported.
    events: u64,
    /// Of those, the ones the target holds already (an earlier import).
    present: u64,
    /// Events the target holds after those (published to `bus` since).
    newer: u64,
    /// Records left out (`--skip-damaged`), and records never reached after a cut-off
    /// one (that one included).
    skipped: u64,
    unreached: u64,
}

impl Plan {
    fn new_events(&self) -> u64 {
        self.events - self.present
    }

    fn summary(&self) -> String {
        let mut line = match (self.new_events(), self.present) {
            (new, 0) => format!("{}: imported {new} events", self.namespace),
            (0, present) => format!(
                "{}: nothing new to import ({present} events were imported before)",
                self.namespace
            ),
            (new, present) => format!(
                "{}: imported {new} new events ({present} were imported before)",
                self.namespace
            ),
        };
        if self.newer > 0 {
            line.push_str(&format!(
                "; the namespace also holds {} events published to bus since",
                self.newer
            ));
        }
        if self.skipped > 0 {
            line.push_str(&format!("; left out {} damaged records", self.skipped));
        }
        if self.unreached > 0 {
            line.push_str(&format!(
                "; could not read the last {} records (cut off)",
                self.unreached
            ));
        }
        line
    }
}

pub async fn run(args: ImportArgs) -> anyhow::Result<()> {
    let dir = &args.reference_path;
    let namespaces = namespaces_to_import(dir, &args.namespaces)?;
    let source_cipher = match args.reference_secret_key.as_deref() {
        None | Some("") => None,
        Some(secret) => Some(
            ReferenceCipher::new(secret, args.reference_block_size).map_err(anyhow::Error::msg)?,
        ),
    };
    let target_cipher = args.key.cipher(args.block_size)?;

    // First pass: check everything, write nothing (a namespace the target does not have
    // yet is not even created).
    let mut checked = Vec::with_capacity(namespaces.len());
    for namespace in namespaces {
        let file = dir.join(format!("{namespace}.log"));
        let log = match args.path.join(&namespace).exists() {
            true => Some(open_log(&args.path, &namespace, target_cipher.clone())?),
            false => None,
        };
        let cipher = source_cipher.clone();
        let skip_damaged = args.skip_damaged;
        let task_log = log.clone();
        let plan = tokio::task::spawn_blocking(move || {
            check(
                namespace,
                file,
                task_log.as_deref(),
                cipher.as_ref(),
                skip_damaged,
            )
        })
        .await
        .context("the check task failed")??;
        checked.push((plan, log));
    }

    // Second pass: write.
    let runtime = tokio::runtime::Handle::current();
    let mut left_out = 0;
    for (plan, log) in checked {
        let log = match log {
            Some(log) => log,
            None => open_log(&args.path, &plan.namespace, target_cipher.clone())?,
        };
        let plan = Arc::new(plan);
        if plan.new_events() > 0 {
            let (task_plan, task_log) = (Arc::clone(&plan), Arc::clone(&log));
            let cipher = source_cipher.clone();
            let skip_damaged = args.skip_damaged;
            let runtime = runtime.clone();
            tokio::task::spawn_blocking(move || {
                write(
                    &task_plan,
                    &task_log,
                    cipher.as_ref(),
                    skip_damaged,
                    &runtime,
                )
            })
            .await
            .context("the import task failed")?
            .with_context(|| format!("importing namespace {}", plan.namespace))?;
        }
        log.close().await?;
        left_out += plan.skipped + plan.unreached;
        eprintln!("{}", plan.summary());
    }
    if left_out > 0 {
        eprintln!("bus: left out {left_out} damaged records (each is reported above)");
    }
    Ok(())
}

/// The namespaces to import: those asked for, each checked to have its file, or all of the
/// directory's.
fn namespaces_to_import(dir: &Path, asked: &[String]) -> anyhow::Result<Vec<String>> {
    let metadata = std::fs::metadata(dir).with_context(|| {
        format!(
            "--reference-path {}: cannot read it (give the directory the reference server \
             was started with as --path; it holds one <namespace>.log per namespace)",
            dir.display()
        )
    })?;
    if !metadata.is_dir() {
        bail!(
            "--reference-path {} is not a directory: give the reference server's data \
             directory (its --path), which holds one <namespace>.log per namespace",
            dir.display()
        );
    }
    let found = reference::namespaces(dir)?;
    if asked.is_empty() && found.is_empty() {
        bail!(
            "{} holds no <namespace>.log file: is it the reference server's data directory \
             (its --path)?",
            dir.display()
        );
    }
    for namespace in asked {
        if namespace == reference::INBOX_NAMESPACE {
            bail!(
                "{namespace} holds the reference's inbox events (replies and confirmations), \
                 which bus does not store: leave it out"
            );
        }
        if !dir.join(format!("{namespace}.log")).is_file() {
            let listed = match found.is_empty() {
                true => "none".to_owned(),
                false => found.join(", "),
            };
            bail!(
                "there is no {namespace}.log in {} (its namespaces: {listed})",
                dir.display()
            );
        }
    }
    let namespaces = match asked.is_empty() {
        true => found,
        false => asked.to_vec(),
    };
    for namespace in &namespaces {
        crate::store::validate_namespace(namespace)
            .with_context(|| format!("{namespace}.log: its name cannot be a namespace of bus"))?;
    }
    Ok(namespaces)
}

/// The first pass over one namespace: reads and checks every record, compares the events
/// with what the target holds, and reports damage (on standard error) as it goes.
fn check(
    namespace: String,
    file: PathBuf,
    log: Option<&Log>,
    cipher: Option<&ReferenceCipher>,
    skip_damaged: bool,
) -> anyhow::Result<Plan> {
    let (first, committed, ids) = match log {
        Some(log) => target_ids(log)?,
        None => (0, 0, Vec::new()),
    };
    let bar = progress::events(None, &format!("checking {namespace}"));
    let mut index = 0u64;
    let reading = read_events(
        &file,
        &namespace,
        cipher,
        skip_damaged,
        None,
        |record, event| {
            bar.inc(1);
            if index < committed && index >= first {
                let there = ids
                    .get((index - first) as usize)
                    .map(String::as_str)
                    .unwrap_or_default();
                if there != event.line.id() {
                    bail!(
                    "namespace {namespace} of the target already holds other events: its event \
                     at index {index} is {there}, where the reference has {} (record {} at \
                     byte offset {} of {}). An import adds to a namespace only what follows \
                     an earlier import of the same file: import into an empty namespace or a \
                     new --path",
                    event.line.id(),
                    record.number,
                    record.offset,
                    file.display()
                );
                }
            }
            index += 1;
            Ok(())
        },
    )?;
    bar.finish_and_clear();
    for damage in &reading.damage {
        eprintln!("bus: {namespace}: left out: {damage}");
    }
    if let Some((offset, len)) = reading.end.trailing {
        eprintln!(
            "bus: {}: {len} bytes at byte offset {offset}, after the {} records its header \
             counts, were not imported: the reference never delivered them (a write it did \
             not finish)",
            file.display(),
            reading.end.records
        );
    }
    if let Some((header, actual)) = reading.end.last_offset_mismatch {
        eprintln!(
            "bus: {}: its header says the last record starts at byte offset {header}, but it \
             starts at {actual}; all {} records were read and checked",
            file.display(),
            reading.end.records
        );
    }
    Ok(Plan {
        namespace,
        file,
        records: reading.records,
        events: reading.events,
        present: reading.events.min(committed),
        newer: committed.saturating_sub(reading.events),
        skipped: reading.skipped,
        unreached: reading.unreached,
    })
}

/// The target namespace's first retained position, its committed count, and the ids from
/// the first retained position on.
fn target_ids(log: &Log) -> anyhow::Result<(u64, u64, Vec<String>)> {
    let first = log.first_position();
    let committed = log.committed();
    let mut ids = Vec::with_capacity(committed.saturating_sub(first) as usize);
    log.scan_blocking(first, |_, json, layout| {
        let id = json.get(layout.id.clone()).unwrap_or_default();
        ids.push(String::from_utf8_lossy(id).into_owned());
    })
    .with_context(|| format!("reading namespace {} of the target", log.namespace()))?;
    Ok((first, committed, ids))
}

/// The second pass: appends the events after the `present` ones, in atomic batches.
fn write(
    plan: &Plan,
    log: &Log,
    cipher: Option<&ReferenceCipher>,
    skip_damaged: bool,
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<()> {
    let bar = progress::events(
        Some(plan.new_events()),
        &format!("importing {}", plan.namespace),
    );
    let (mut index, mut written) = (0u64, 0u64);
    let mut batch: Vec<PendingEvent> = Vec::with_capacity(BATCH_EVENTS);
    let mut batch_bytes = 0usize;
    let mut flush = |batch: &mut Vec<PendingEvent>| -> anyhow::Result<()> {
        let events = std::mem::take(batch);
        let n = events.len() as u64;
        runtime
            .block_on(log.append(events))
            .map_err(explain_duplicate)
            .with_context(|| {
                format!(
                    "{written} events of {} were imported before this failure; importing \
                     again resumes after them",
                    plan.namespace
                )
            })?;
        written += n;
        bar.set_position(written);
        Ok(())
    };
    read_events(
        &plan.file,
        &plan.namespace,
        cipher,
        skip_damaged,
        Some(plan.records),
        |record, event| {
            if index >= plan.present {
                batch_bytes += record.content.len();
                batch.push(event.pending);
                if batch.len() >= BATCH_EVENTS || batch_bytes >= BATCH_BYTES {
                    flush(&mut batch)?;
                    batch_bytes = 0;
                }
            }
            index += 1;
            Ok(())
        },
    )?;
    flush(&mut batch)?;
    bar.finish_and_clear();
    Ok(())
}

/// A record's event, checked as the store takes it.
struct Event {
    line: EventLine,
    pending: PendingEvent,
}

/// What reading a reference file found.
#[derive(Debug)]
struct Reading {
    /// Records read (damaged ones included).
    records: u64,
    /// Events handed on.
    events: u64,
    /// Records left out, with one message each (and one for a cut-off record).
    skipped: u64,
    damage: Vec<String>,
    /// Records the header counts from a cut-off one on, which could not be read.
    unreached: u64,
    end: reference::LogEnd,
}

/// Reads the events of a reference log file (at most `limit` records), calling `each`
/// with every record that holds an event `bus` can store. A damaged record is an error,
/// or with `skip_damaged` a message in [`Reading::damage`].
fn read_events(
    file: &Path,
    namespace: &str,
    cipher: Option<&ReferenceCipher>,
    skip_damaged: bool,
    limit: Option<u64>,
    mut each: impl FnMut(&Record, Event) -> anyhow::Result<()>,
) -> anyhow::Result<Reading> {
    let mut log_file = LogFile::open(file)?;
    let mut reading = Reading {
        records: 0,
        events: 0,
        skipped: 0,
        damage: Vec::new(),
        unreached: 0,
        end: log_file.end(),
    };
    while limit.is_none_or(|limit| reading.records < limit) {
        let record = match log_file.next_record() {
            Ok(Some(record)) => record,
            Ok(None) => break,
            Err(
                error @ (ReferenceError::Truncated { number, .. }
                | ReferenceError::BadLength { number, .. }),
            ) => {
                if !skip_damaged {
                    bail!(
                        "{error} (with --skip-damaged the import takes the records before it \
                         and says how many it could not read)"
                    );
                }
                reading.unreached = log_file.count() - number;
                reading.damage.push(format!(
                    "{error}; the {} records from there on could not be read",
                    reading.unreached
                ));
                reading.records = log_file.count();
                break;
            }
            Err(error) => return Err(error.into()),
        };
        reading.records += 1;
        match event_of(&record, file, namespace, cipher) {
            Ok(event) => {
                each(&record, event)?;
                reading.events += 1;
            }
            Err(error) if skip_damaged => {
                reading.skipped += 1;
                reading.damage.push(format!("{error:#}"));
            }
            Err(error) => bail!(
                "{error:#} (with --skip-damaged the import leaves such records out, and says \
                 which)"
            ),
        }
    }
    reading.end = log_file.end();
    Ok(reading)
}

/// The event a record holds, checked as the store takes it.
fn event_of(
    record: &Record,
    file: &Path,
    namespace: &str,
    cipher: Option<&ReferenceCipher>,
) -> anyhow::Result<Event> {
    let at = || {
        format!(
            "{}: record {} at byte offset {}",
            file.display(),
            record.number,
            record.offset
        )
    };
    let decrypted;
    let content = match cipher {
        Some(cipher) => {
            decrypted = cipher
                .open(&record.content)
                .map_err(|reason| ReferenceError::Decrypt {
                    path: file.to_path_buf(),
                    number: record.number,
                    offset: record.offset,
                    reason,
                })?;
            &decrypted[..]
        }
        None => &record.content[..],
    };
    let is_json = serde_json::from_slice::<serde::de::IgnoredAny>(content).is_ok();
    if !is_json && cipher.is_none() {
        bail!(
            "{} is not an event's JSON: if the reference server was started with a secret \
             key, give it as --reference-secret-key",
            at()
        );
    }
    if !is_json {
        bail!("{} is not an event's JSON once decrypted", at());
    }
    let not_storable = || format!("{} is not an event bus can store", at());
    let line = EventLine::parse(content).with_context(not_storable)?;
    if line.namespace() != namespace {
        bail!(
            "{}: its subject {} belongs to namespace {}, not {namespace}",
            not_storable(),
            line.subject(),
            line.namespace()
        );
    }
    let pending = line.to_pending().with_context(not_storable)?;
    Ok(Event { line, pending })
}
