//! The process's own figures, under the names every Prometheus client library gives them
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, …), read from Linux's
//! `/proc/self` when `GET /metrics` asks.
//!
//! Reading them is blocking file I/O: call [`ProcessStats::read`] off the async workers.
//! On a system without `/proc` (or a figure it cannot read) the family is left out rather
//! than reported as 0, so that an alert on it never fires on a made-up value.

use std::fmt::Write;

use crate::metrics::family;

/// What `/proc/self` said, each figure `None` when it could not be read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessStats {
    /// User and system CPU time, in seconds.
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    /// The soft limit on open file descriptors.
    pub max_fds: Option<u64>,
    /// When the process started, in seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Reads `/proc/self/stat`, `/proc/self/fd` and `/proc/stat` (blocking).
    pub fn read() -> ProcessStats {
        // SAFETY: sysconf only reads configuration values.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| boot_time(&text));
        let mut stats = stat
            .as_deref()
            .map(|stat| from_stat(stat, ticks, page, boot))
            .unwrap_or_default();
        stats.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            // The directory being read holds a descriptor of its own: not counted.
            .map(|entries| (entries.count() as u64).saturating_sub(1));
        stats.max_fds = max_open_files();
        stats
    }

    /// Writes the families that could be read.
    pub fn render(&self, out: &mut String) {
        let families: [(&str, &str, &str, Option<f64>); 6] = [
            (
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                self.cpu_seconds,
            ),
            (
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                self.resident_bytes.map(|b| b as f64),
            ),
            (
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
                self.virtual_bytes.map(|b| b as f64),
            ),
            (
                "process_open_fds",
                "gauge",
                "Number of open file descriptors.",
                self.open_fds.map(|n| n as f64),
            ),
            (
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
                self.max_fds.map(|n| n as f64),
            ),
            (
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                self.start_time_seconds,
            ),
        ];
        for (name, kind, help, value) in families {
            if let Some(value) = value {
                family(out, name, kind, help);
                let _ = writeln!(out, "{name} {value}");
            }
        }
    }
}

/// The figures of `/proc/self/stat` (see proc(5)): CPU times and start time in clock
/// ticks, virtual size in bytes, resident size in pages.
fn from_stat(stat: &str, ticks: i64, page: i64, boot: Option<u64>) -> ProcessStats {
    // The command name, field 2, is in parentheses and may hold spaces or parentheses:
    // the fields after it start after its last `)`.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return ProcessStats::default();
    };
    // `rest` starts with field 3 (state): field n is at index n - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let ticks = (ticks > 0).then_some(ticks as f64);
    let cpu_seconds = match (field(14), field(15), ticks) {
        (Some(user), Some(system), Some(ticks)) => Some((user + system) as f64 / ticks),
        _ => None,
    };
    let start_time_seconds = match (field(22), boot, ticks) {
        (Some(start), Some(boot), Some(ticks)) => Some(boot as f64 + start as f64 / ticks),
        _ => None,
    };
    let page = u64::try_from(page).ok().filter(|&p| p > 0);
    ProcessStats {
        cpu_seconds,
        resident_bytes: field(24).zip(page).map(|(pages, page)| pages * page),
        virtual_bytes: field(23),
        open_fds: None,
        max_fds: None,
        start_time_seconds,
    }
}

/// The system's boot time (`btime` of `/proc/stat`), in seconds since the Unix epoch.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

fn max_open_files() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed to it.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    (read && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with a space and a parenthesis; utime 250, stime 50 (ticks),
        // starttime 1000, vsize 4096000, rss 300 pages.
        let stat = "42 (bus (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 \
                    1000 4096000 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let stats = from_stat(stat, 100, 4096, Some(1_700_000_000));
        assert_eq!(stats.cpu_seconds, Some(3.0));
        assert_eq!(stats.start_time_seconds, Some(1_700_000_010.0));
        assert_eq!(stats.virtual_bytes, Some(4_096_000));
        assert_eq!(stats.resident_bytes, Some(300 * 4096));
        assert_eq!(
            from_stat("garbage", 100, 4096, None),
            ProcessStats::default()
        );
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn this_process_is_read_on_linux() {
        let stats = ProcessStats::read();
        if cfg!(target_os = "linux") {
            assert!(stats.resident_bytes.is_some_and(|b| b > 0), "{stats:?}");
            assert!(stats.open_fds.is_some_and(|n| n >= 3), "{stats:?}");
            assert!(stats.max_fds.is_some(), "{stats:?}");
            assert!(stats.cpu_seconds.is_some(), "{stats:?}");
            assert!(
                stats.start_time_seconds.is_some_and(|t| t > 1e9),
                "{stats:?}"
            );
        }
        let mut out = String::new();
        stats.render(&mut out);
        if cfg!(target_os = "linux") {
            assert!(out.contains("# TYPE process_open_fds gauge\n"), "{out}");
        }
    }
}
