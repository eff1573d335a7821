//! What the benchmarks compute and print: percentiles of latencies, times in
//! milliseconds, a process's resident memory, and the report (a table, or one JSON object
//! per run with `--json`, the lines BENCHMARKS.md quotes).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::target::Target;

/// The `q` quantile (0 to 1) of `sorted`, by the nearest-rank method; zero when empty.
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Wall-clock time in nanoseconds: a publisher puts it in the event and a subscriber
/// subtracts it from its own, so both must read the same clock (one machine).
pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A process's resident memory in KiB, from /proc.
pub fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Prints the figures of benchmark `name`: one JSON object with `--json`, else a table.
pub fn report(target: &Target, name: &str, fields: serde_json::Value) {
    print_report(target.json, name, fields)
}

/// Prints the figures of benchmark `name`: one JSON object if `json`, else a table.
pub fn print_report(json: bool, name: &str, fields: serde_json::Value) {
    if json {
        let mut object = json!({ "bench": name });
        if let (Some(out), Some(fields)) = (object.as_object_mut(), fields.as_object()) {
            out.extend(fields.clone());
        }
        println!("{object}");
        return;
    }
    println!("bus bench {name}");
    if let Some(fields) = fields.as_object() {
        for (key, value) in fields {
            let text = match value {
                serde_json::Value::Number(n) if n.is_f64() => {
                    format!("{:.3}", n.as_f64().unwrap_or_default())
                }
                other => other.to_string(),
            };
            println!("  {key:<24} {text}");
        }
    }
}
