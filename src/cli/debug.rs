//! `bus debug`: what a data directory holds, read directly from its files while no server
//! has it open. Statistics per namespace; `--list` prints every record with its file and
//! offset; `--verify` checks every record's checksum and the indexes and reports each
//! problem with file and offset (exit code 1 when the data is damaged).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use super::{progress, Exit, EXIT_FAILURE};
use crate::event::JsonLayout;
use crate::store::inspect::{self, LogFiles};

#[derive(Debug, Args)]
pub struct DebugArgs {
    /// The data directory.
    #[arg(long)]
    pub path: PathBuf,
    /// Namespaces to look at, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub namespace: Vec<String>,
    /// Print every record: position, file and offset, id, creation time, subject.
    #[arg(long)]
    pub list: bool,
    /// Check every record and index, and report all damage found.
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub key: super::archive::KeyArgs,
}

pub async fn run(args: DebugArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || debug(&args))
        .await
        .context("the debug task failed")?
}

fn debug(args: &DebugArgs) -> anyhow::Result<()> {
    let namespaces = match args.namespace.is_empty() {
        true => inspect::namespaces(&args.path)?,
        false => args.namespace.clone(),
    };
    if namespaces.is_empty() {
        anyhow::bail!("{} holds no namespace", args.path.display());
    }
    // Readers take blocks of any size.
    let cipher = args.key.cipher(crate::store::cipher::DEFAULT_BLOCK_SIZE)?;
    let mut damaged = Vec::new();
    for namespace in &namespaces {
        let files = LogFiles::open(&args.path.join(namespace), cipher.as_ref())
            .with_context(|| format!("namespace {namespace}"))?;
        println!("namespace {namespace}");
        let readable = statistics(&files, args.list)?;
        // Verify runs even when the read failed: it lists every damaged place.
        let verified = !args.verify || verify(&files);
        if !(readable && verified) {
            damaged.push(namespace.clone());
        }
    }
    if damaged.is_empty() {
        return Ok(());
    }
    Err(Exit {
        code: EXIT_FAILURE,
        message: format!("damaged data in namespace {}", damaged.join(", ")),
    }
    .into())
}

/// Prints the statistics of one namespace (and its records with `list`); `false` if its
/// data cannot be read through.
fn statistics(files: &LogFiles, list: bool) -> anyhow::Result<bool> {
    struct Endpoint {
        position: u64,
        id: String,
        created_at: String,
    }
    let endpoint = |position: u64, json: &[u8]| {
        let layout = JsonLayout::parse(json);
        let text = |range: Option<std::ops::Range<usize>>| {
            range.map_or_else(String::new, |r| {
                String::from_utf8_lossy(&json[r]).into_owned()
            })
        };
        Endpoint {
            position,
            id: text(layout.as_ref().map(|l| l.id.clone())),
            created_at: text(layout.as_ref().map(|l| l.created_at.clone())),
        }
    };
    let mut first = None;
    let mut last = None;
    let mut per_segment = vec![0u64; files.segments().len()];
    let mut segment_index = 0;
    let bar = progress::bytes(files.bytes(), "reading");
    let mut current_file: Option<PathBuf> = None;
    let read = files.for_each_event(|record| -> anyhow::Result<()> {
        if current_file.as_deref() != Some(record.file) {
            if current_file.is_some() {
                segment_index += 1;
            }
            current_file = Some(record.file.to_owned());
        }
        if let Some(count) = per_segment.get_mut(segment_index) {
            *count += 1;
        }
        if first.is_none() {
            first = Some(endpoint(record.position, record.json));
        }
        last = Some((record.position, record.json.to_vec()));
        bar.set_position(record.offset);
        if list {
            let e = endpoint(record.position, record.json);
            let subject = JsonLayout::parse(record.json)
                .map(|l| String::from_utf8_lossy(&record.json[l.subject]).into_owned())
                .unwrap_or_default();
            bar.suspend(|| {
                println!(
                    "  {}\t{}:{}\t{}\t{}\t{}",
                    e.position,
                    file_name(record.file),
                    record.offset,
                    e.id,
                    e.created_at,
                    subject
                )
            });
        }
        Ok(())
    });
    bar.finish_and_clear();

    println!("  directory: {}", files.dir().display());
    println!(
        "  segments:  {} ({} bytes)",
        files.segments().len(),
        files.bytes()
    );
    for (segment, events) in files.segments().iter().zip(&per_segment) {
        println!(
            "    {}  first position {}, {} events, {} bytes",
            file_name(&segment.path),
            segment.base,
            events,
            segment.bytes
        );
    }
    match read {
        Ok(end) => {
            let kept_from = files.first_position();
            println!("  events:    {}", end.events - kept_from);
            if kept_from > 0 {
                println!(
                    "  retained:  positions {kept_from} to {} (older ones removed by retention)",
                    end.events.saturating_sub(1)
                );
            }
            if let (Some(first), Some((position, json))) = (first, last) {
                let last = endpoint(position, &json);
                for (name, e) in [("first:", first), ("last:", last)] {
                    println!(
                        "  {name:<10} position {}, {}, {}",
                        e.position, e.id, e.created_at
                    );
                }
            }
            if let Some(torn) = end.torn_tail {
                println!("  torn tail: {torn} (the server drops it when it next opens the log)");
            }
            Ok(true)
        }
        Err(e) => {
            println!("  DAMAGED:   {e:#}");
            Ok(false)
        }
    }
}

/// Verifies one namespace and prints what it found; `false` if the data is damaged.
fn verify(files: &LogFiles) -> bool {
    let bar = progress::bytes(files.bytes(), "verifying");
    let found = files.verify(|bytes| bar.inc(bytes));
    bar.finish_and_clear();
    let found = match found {
        Ok(found) => found,
        Err(e) => {
            println!("  verify:    cannot read the log: {e}");
            return false;
        }
    };
    for damage in &found.repairable {
        println!("  repairable: {damage}");
    }
    for damage in &found.damage {
        println!("  DAMAGE:    {damage}");
    }
    if found.damage.is_empty() {
        println!("  verify:    ok, {} records checked", found.valid_records);
        true
    } else {
        println!(
            "  verify:    {} damaged places, {} valid records",
            found.damage.len(),
            found.valid_records
        );
        false
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
