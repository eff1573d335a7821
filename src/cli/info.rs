//! `bus info [NAMESPACE]`: what a running server's namespaces hold and who reads them
//! (`GET /namespaces`), as a table or as JSON lines.

use clap::Args;

use super::HostArgs;
use crate::units::approximate_size;
use crate::wire::NamespaceInfo;

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Only this namespace (all of them without it).
    pub namespace: Option<String>,
    /// One JSON object per namespace and line, as the server answers, instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: InfoArgs) -> anyhow::Result<()> {
    let client = args.host.client()?;
    let namespaces = match &args.namespace {
        Some(namespace) => vec![client.namespace(namespace).await?],
        None => client.namespaces().await?,
    };
    if args.json {
        for namespace in &namespaces {
            println!("{}", serde_json::to_string(namespace)?);
        }
    } else {
        print!("{}", table(&namespaces));
    }
    Ok(())
}

const HEADINGS: [&str; 10] = [
    "NAMESPACE",
    "EVENTS",
    "FIRST",
    "LAST",
    "SIZE",
    "SEGMENTS",
    "OLDEST",
    "NEWEST",
    "SUBSCRIBERS",
    "CONSUMERS",
];

/// The namespaces as a table: a heading line, then one line per namespace, in columns
/// wide enough for their widest cell; `-` where there is nothing to show.
fn table(namespaces: &[NamespaceInfo]) -> String {
    let rows: Vec<[String; 10]> = namespaces
        .iter()
        .map(|n| {
            let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
            [
                n.namespace.clone(),
                n.events.to_string(),
                n.first_index.to_string(),
                or_dash(n.last_index.map(|i| i.to_string())),
                approximate_size(n.bytes),
                or_dash(n.segments.map(|s| s.to_string())),
                or_dash(n.first_created_at.as_deref().map(to_seconds)),
                or_dash(n.last_created_at.as_deref().map(to_seconds)),
                n.subscribers.to_string(),
                n.consumers.to_string(),
            ]
        })
        .collect();
    let mut widths = HEADINGS.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let headings = HEADINGS.map(str::to_owned);
    for row in std::iter::once(&headings).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// An RFC 3339 time to the second (`2026-12-02T14:10:11.123456789Z` → `2026-12-02T14:10:11Z`):
/// the fraction is noise in a table.
fn to_seconds(time: &str) -> String {
    match (time.get(..19), time.ends_with('Z')) {
        (Some(seconds), true) => format!("{seconds}Z"),
        _ => time.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(namespace: &str, events: u64) -> NamespaceInfo {
        NamespaceInfo {
            namespace: namespace.to_owned(),
            first_index: 0,
            last_index: events.checked_sub(1),
            next_index: events,
            events,
            bytes: 3 << 20,
            segments: Some(1),
            first_created_at: (events > 0).then(|| "2026-12-02T14:10:11.123456789Z".to_owned()),
            last_created_at: (events > 0).then(|| "2026-12-02T15:00:00.5Z".to_owned()),
            subscribers: 2,
            consumers: 0,
        }
    }

    #[test]
    fn a_table_has_aligned_columns_and_dashes_for_nothing() {
        let text = table(&[info("orders", 1204), info("app", 0)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with("NAMESPACE  EVENTS  FIRST  LAST  SIZE "),
            "{text}"
        );
        assert!(
            lines[1].starts_with("orders     1204    0      1203  3 MiB"),
            "{text}"
        );
        assert!(
            lines[1].contains("2026-12-02T14:10:11Z  2026-12-02T15:00:00Z"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("app        0       0      -     3 MiB"),
            "{text}"
        );
        // Every line's columns start where the heading's do.
        let column = lines[0].find("SUBSCRIBERS").expect("heading");
        assert_eq!(&lines[1][column..column + 1], "2", "{text}");
    }
}
