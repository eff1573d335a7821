//! The server's counters and histograms, and their Prometheus text exposition.
//!
//! Everything here is a relaxed atomic, updated where the thing happens (the writer thread
//! for syncs and group commits, the HTTP handlers for publishes, the subscription loops for
//! deliveries) and read only when `GET /metrics` renders it: no lock and no allocation on
//! any hot path.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// The git commit the binary was built from (`build.rs`: `git rev-parse`, or the
/// `BUS_COMMIT` environment variable of the build), `unknown` if neither was there.
pub const BUILD_COMMIT: &str = match option_env!("BUS_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

/// Bounds of duration histograms, in microseconds (rendered in seconds).
pub const DURATION_BOUNDS_MICROS: &[u64] = &[
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000,
];

/// Bounds of the events-per-group-commit histogram.
pub const GROUP_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384];

/// A cumulative histogram over fixed bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One per bound, plus one for values above the last.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: u64) {
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, duration: std::time::Duration) {
        self.observe(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX));
    }

    /// The sum of the values observed.
    pub fn sum(&self) -> u64 {
        self.sum.load(Ordering::Relaxed)
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Writes the `_bucket`, `_sum` and `_count` series; values are multiplied by `scale`
    /// (1e-6 turns microseconds into seconds).
    pub fn render(&self, out: &mut String, name: &str, labels: &str, scale: f64) {
        let separator = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(&bound) => format_float(bound as f64 * scale),
                None => "+Inf".to_owned(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{separator}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum.load(Ordering::Relaxed) as f64 * scale;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", format_float(sum));
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// A float as Prometheus reads it, without noise such as `0.00025000000000000006`.
fn format_float(value: f64) -> String {
    let text = format!("{value:.9}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text.is_empty() {
        "0".to_owned()
    } else {
        text.to_owned()
    }
}

/// What retention deleted, by namespace (namespaces are fixed when the server starts).
#[derive(Debug, Default)]
pub struct RetentionCounts {
    /// (namespace, segments deleted, events deleted)
    namespaces: Vec<(String, AtomicU64, AtomicU64)>,
}

impl RetentionCounts {
    pub fn new<'a>(namespaces: impl IntoIterator<Item = &'a str>) -> RetentionCounts {
        RetentionCounts {
            namespaces: namespaces
                .into_iter()
                .map(|n| (n.to_owned(), AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
        }
    }

    /// Counts one segment of `namespace`, holding `events`, deleted.
    pub fn deleted(&self, namespace: &str, events: u64) {
        if let Some((_, segments, counted)) = self.namespaces.iter().find(|(n, ..)| n == namespace)
        {
            segments.fetch_add(1, Ordering::Relaxed);
            counted.fetch_add(events, Ordering::Relaxed);
        }
    }

    /// Writes `bus_retention_deleted_segments_total` and `bus_retention_deleted_events_total`.
    pub fn render(&self, out: &mut String) {
        family(
            out,
            "bus_retention_deleted_segments_total",
            "counter",
            "Log segments deleted by retention (--retention-age, --retention-bytes).",
        );
        for (namespace, segments, _) in &self.namespaces {
            let _ = writeln!(
                out,
                "bus_retention_deleted_segments_total{{namespace=\"{}\"}} {}",
                label(namespace),
                segments.load(Ordering::Relaxed)
            );
        }
        family(
            out,
            "bus_retention_deleted_events_total",
            "counter",
            "Events in the log segments deleted by retention.",
        );
        for (namespace, _, events) in &self.namespaces {
            let _ = writeln!(
                out,
                "bus_retention_deleted_events_total{{namespace=\"{}\"}} {}",
                label(namespace),
                events.load(Ordering::Relaxed)
            );
        }
    }
}

/// Writes the `# HELP` and `# TYPE` lines of a metric family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value, escaped as the exposition format requires.
pub fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition `text` with `name="value"` added to the labels of every sample (the
/// `node` label: one server's series told apart from another's by the same names).
pub fn with_label(text: &str, name: &str, value: &str) -> String {
    let pair = format!("{name}=\"{}\"", label(value));
    let mut out = String::with_capacity(text.len() + text.lines().count() * (pair.len() + 3));
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            out.push_str(line);
        } else if let Some(open) = line.find('{') {
            let (metric, labels) = line.split_at(open + 1);
            out.push_str(metric);
            out.push_str(&pair);
            if !labels.starts_with('}') {
                out.push(',');
            }
            out.push_str(labels);
        } else {
            let (metric, sample) = line.split_at(line.find(' ').unwrap_or(line.len()));
            out.push_str(metric);
            out.push('{');
            out.push_str(&pair);
            out.push('}');
            out.push_str(sample);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[10, 100]);
        for v in [5, 10, 11, 1000] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "ns=\"a\"", 0.001);
        assert_eq!(
            out,
            "x_seconds_bucket{ns=\"a\",le=\"0.01\"} 2\n\
             x_seconds_bucket{ns=\"a\",le=\"0.1\"} 3\n\
             x_seconds_bucket{ns=\"a\",le=\"+Inf\"} 4\n\
             x_seconds_sum{ns=\"a\"} 1.026\n\
             x_seconds_count{ns=\"a\"} 4\n"
        );
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn a_label_goes_on_every_sample() {
        let text = "# HELP a A.\n# TYPE a gauge\na 1\nb{ns=\"x\"} 2\nc{} 3\n";
        assert_eq!(
            with_label(text, "node", "n\"1"),
            "# HELP a A.\n# TYPE a gauge\na{node=\"n\\\"1\"} 1\n\
             b{node=\"n\\\"1\",ns=\"x\"} 2\nc{node=\"n\\\"1\"} 3\n"
        );
    }

    #[test]
    fn retention_deletions_by_namespace() {
        let counts = RetentionCounts::new(["a", "b"]);
        counts.deleted("a", 10);
        counts.deleted("a", 5);
        counts.deleted("unknown", 7);
        let mut out = String::new();
        counts.render(&mut out);
        assert!(out.contains("bus_retention_deleted_segments_total{namespace=\"a\"} 2\n"));
        assert!(out.contains("bus_retention_deleted_events_total{namespace=\"a\"} 15\n"));
        assert!(out.contains("bus_retention_deleted_events_total{namespace=\"b\"} 0\n"));
    }

    #[test]
    fn floats_and_labels() {
        assert_eq!(format_float(0.00025), "0.00025");
        assert_eq!(format_float(2.5), "2.5");
        assert_eq!(format_float(0.0), "0");
        assert_eq!(format_float(16.0), "16");
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
