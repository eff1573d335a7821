//! The server's memory budget (`--max-memory`): how much memory the process may use, how
//! much it uses, and whether new work may start.
//!
//! What it owns:
//!
//! - **The budget**, in bytes: given, or `auto` ([`auto_budget`]): half of the machine's
//!   memory (`MemTotal` of `/proc/meminfo`), or half of the container's limit (the
//!   cgroup's `memory.max`, or `memory.limit_in_bytes` under cgroup v1) when that is
//!   lower.
//! - **The memory in use**: the process's anonymous resident memory (`RssAnon` of
//!   `/proc/self/status`: heap, stacks, buffers), sampled every [`SAMPLE_EVERY`] by
//!   [`MemoryBudget::watch`]. Pages of files are not counted: the logs' segments are read
//!   with `pread` into buffers (which are counted), the sealed segments' id indexes are
//!   memory-mapped read-only (file-backed pages, which the kernel drops at will), and the
//!   page cache is the kernel's, not the process's.
//! - **Admission** ([`MemoryBudget::admit`]): one atomic load and a comparison, cheap
//!   enough for every request. The last sample, plus what the publishes in flight were
//!   charged (each holds a [`Charge`] of its own worst case until it is answered), plus
//!   what the subscriptions opened since the sample were charged, plus the new request's
//!   cost, must fit in the budget; a request alone is admitted whenever the last sample
//!   is under the budget, so that a budget smaller than one request's worst case slows
//!   clients down rather than refusing them for ever.
//! - **Giving memory back**: the C allocator keeps what the program frees for reuse, so
//!   the resident memory of a server that freed much does not go down by itself. The
//!   watcher asks it to return its free pages (glibc's `malloc_trim`, on the blocking
//!   pool; other C libraries have no such call and keep their own policy), at most once
//!   a second:
//!   - near the budget (nine tenths of it), before it counts the server as over;
//!   - when the usage grew by 64 MiB since the last trim (a burst of work leaves its
//!     transient buffers with the allocator);
//!   - when [`TRIM_AFTER_RELEASED`] bytes were reported freed
//!     ([`MemoryBudget::released`]: a closed stream, a publish's [`Charge`] of 1 MiB or
//!     more when it is dropped);
//!   - when less was reported freed and nothing more for [`TRIM_WHEN_QUIET`]: memory goes
//!     back when an attack ends.
//!
//!   A steady load of small publishes, whose memory the allocator reuses, causes no
//!   trims. At start-up [`tune_allocator`] fixes glibc's thresholds so that large
//!   buffers go back as they are freed.
//!
//! Promises: [`MemoryBudget::is_over`] and [`MemoryBudget::admit`] never block, allocate
//! or read a file; the budget never changes while the server runs; without
//! `/proc/self/status` (not Linux) the usage reads as 0 and nothing is ever refused.
//!
//! It does not refuse anything itself (the HTTP layer asks and answers 503), does not
//! measure requests one by one (their costs are the documented bounds), and does not
//! know HTTP.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How often the process's memory is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Bytes reported freed (see [`MemoryBudget::released`]) that make a trim worthwhile at
/// once.
pub const TRIM_AFTER_RELEASED: u64 = 32 << 20;
/// Less is handed back once nothing more was reported freed for this long.
pub const TRIM_WHEN_QUIET: Duration = Duration::from_secs(1);
/// A publish's charge is reported freed when it is at least this large: small publishes
/// are the steady state, whose memory the allocator reuses.
const REPORT_CHARGES_FROM: u64 = 1 << 20;
/// Near the budget (this fraction of it, in tenths), free memory is handed back before
/// the server counts itself over.
const NEAR_TENTHS: u64 = 9;
/// Growth of the usage since the last trim that makes another worthwhile: a burst of
/// work leaves the memory of its transient buffers with the allocator.
const TRIM_AFTER_GROWTH: u64 = 64 << 20;
/// Trims are at least this far apart, whatever asks for them (a trim walks the
/// allocator's free lists, and the pages it returns are faulted in again when reused).
const TRIM_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// What a request that needs memory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    Publish,
    Subscribe,
}

/// The answer to a request the budget has no room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Resident memory at the last sample, in bytes.
    pub used: u64,
    pub budget: u64,
}

/// The budget and what is known of the memory in use (see the module docs).
#[derive(Debug)]
pub struct MemoryBudget {
    budget: u64,
    /// Anonymous resident memory at the last sample.
    used: AtomicU64,
    /// Whether the last sample (taken after a trim, if one was due) was over the budget.
    over: AtomicBool,
    /// Bytes charged to publishes being served.
    in_flight: AtomicU64,
    /// Bytes charged to subscriptions opened since the last sample (which sees them).
    recent: AtomicU64,
    /// Bytes reported freed since the last trim.
    released: AtomicU64,
    refused_publishes: AtomicU64,
    refused_subscriptions: AtomicU64,
    trims: AtomicU64,
}

impl MemoryBudget {
    pub fn new(budget: u64) -> MemoryBudget {
        MemoryBudget {
            budget,
            used: AtomicU64::new(0),
            over: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            recent: AtomicU64::new(0),
            released: AtomicU64::new(0),
            refused_publishes: AtomicU64::new(0),
            refused_subscriptions: AtomicU64::new(0),
            trims: AtomicU64::new(0),
        }
    }

    /// A budget that is never reached (for servers built without one, and tests).
    pub fn unlimited() -> MemoryBudget {
        MemoryBudget::new(u64::MAX)
    }

    /// The budget, in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The process's anonymous resident memory at the last sample, in bytes.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether the last sample was over the budget (after handing free memory back).
    pub fn is_over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Requests of each kind refused since the server started.
    pub fn refusals(&self, work: Work) -> u64 {
        self.refusal_counter(work).load(Ordering::Relaxed)
    }

    /// Times the allocator was asked to hand free memory back.
    pub fn trims(&self) -> u64 {
        self.trims.load(Ordering::Relaxed)
    }

    fn refusal_counter(&self, work: Work) -> &AtomicU64 {
        match work {
            Work::Publish => &self.refused_publishes,
            Work::Subscribe => &self.refused_subscriptions,
        }
    }

    /// Admits `work` that may use up to `cost` bytes, or refuses it (and counts the
    /// refusal) when the budget has no room for it (see the module docs). A publish
    /// holds the returned charge until it is answered; a subscription's charge counts
    /// only until the next sample, which sees what it really holds.
    pub fn admit(self: &Arc<Self>, work: Work, cost: u64) -> Result<Charge, Refused> {
        let used = self.used();
        let others = self.in_flight.load(Ordering::Relaxed) + self.recent.load(Ordering::Relaxed);
        let fits = used.saturating_add(others).saturating_add(cost) <= self.budget;
        if self.is_over() || (!fits && others > 0) {
            self.refusal_counter(work).fetch_add(1, Ordering::Relaxed);
            return Err(Refused {
                used,
                budget: self.budget,
            });
        }
        match work {
            Work::Publish => {
                self.in_flight.fetch_add(cost, Ordering::Relaxed);
                Ok(Charge {
                    budget: Some(Arc::clone(self)),
                    bytes: cost,
                })
            }
            Work::Subscribe => {
                self.recent.fetch_add(cost, Ordering::Relaxed);
                Ok(Charge {
                    budget: None,
                    bytes: cost,
                })
            }
        }
    }

    /// Reports that about `bytes` were freed (a large request answered, a stream
    /// closed): once enough has been, free memory is handed back to the system.
    pub fn released(&self, bytes: u64) {
        self.released.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Records a sample of the memory in use.
    fn record(&self, used: u64) {
        self.used.store(used, Ordering::Relaxed);
        self.recent.store(0, Ordering::Relaxed);
        self.over.store(used > self.budget, Ordering::Relaxed);
    }

    /// Whether a trim is due with `used` bytes in use, `after_last` of them after the
    /// last trim, which was `since` ago, and nothing reported freed for `quiet`.
    fn trim_due(&self, used: u64, after_last: u64, since: Duration, quiet: Duration) -> bool {
        let near = used >= self.budget / 10 * NEAR_TENTHS;
        let grown = used.saturating_sub(after_last) >= TRIM_AFTER_GROWTH;
        let released = self.released.load(Ordering::Relaxed);
        since >= TRIM_AT_MOST_EVERY
            && (near
                || grown
                || released >= TRIM_AFTER_RELEASED
                || (released > 0 && quiet >= TRIM_WHEN_QUIET))
    }

    /// Samples the process's memory every [`SAMPLE_EVERY`] until `shutdown` turns true,
    /// handing free memory back when it is due (see the module docs).
    pub async fn watch(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let (mut last_trim, mut after_last_trim) = (Instant::now(), self.used());
        // The freed bytes last seen, and since when they have not changed.
        let (mut seen_released, mut quiet_since) = (0, Instant::now());
        let mut ticks = tokio::time::interval(SAMPLE_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.wait_for(|down| *down) => return,
            }
            // Reading /proc/self/status never waits for a disk: it is formatted from the
            // kernel's counters, in microseconds, so it is done right here.
            let mut used = resident_anon_bytes().unwrap_or(0);
            let released = self.released.load(Ordering::Relaxed);
            if released != seen_released {
                (seen_released, quiet_since) = (released, Instant::now());
            }
            let due = self.trim_due(
                used,
                after_last_trim,
                last_trim.elapsed(),
                quiet_since.elapsed(),
            );
            if due {
                self.released.fetch_sub(released, Ordering::Relaxed);
                seen_released = 0;
                last_trim = Instant::now();
                self.trims.fetch_add(1, Ordering::Relaxed);
                // A trim walks the allocator's free lists: milliseconds on a large heap.
                let _ = tokio::task::spawn_blocking(trim).await;
                used = resident_anon_bytes().unwrap_or(0);
                after_last_trim = used;
            }
            self.record(used);
        }
    }

    /// Takes a sample now (before the server starts serving, so that the first requests
    /// are judged on a real figure).
    pub fn sample_now(&self) {
        self.record(resident_anon_bytes().unwrap_or(0));
    }
}

/// What an admitted request was charged; a publish's charge is given back, and its bytes
/// reported freed, when it is dropped.
#[derive(Debug)]
#[must_use = "the charge lasts as long as the work it pays for"]
pub struct Charge {
    budget: Option<Arc<MemoryBudget>>,
    bytes: u64,
}

impl Charge {
    /// The bytes charged.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.in_flight.fetch_sub(self.bytes, Ordering::Relaxed);
            if self.bytes >= REPORT_CHARGES_FROM {
                budget.released(self.bytes);
            }
        }
    }
}

/// Sets the C allocator up so that freed memory can go back to the system (glibc only;
/// a no-op elsewhere, and when `GLIBC_TUNABLES` or `MALLOC_*_` variables set the malloc
/// tunables: the operator's choice wins).
///
/// glibc raises its thresholds as the program frees large buffers (up to 32 MiB for
/// `mmap` and 64 MiB for trimming): after one attack of large publishes, buffers of
/// megabytes come from the per-thread arenas, whose free ends [`trim`] cannot reach, and
/// the memory stays with the process. Fixed thresholds keep buffers of 1 MiB and more
/// (large bodies, a large group's frames) in pages of their own, returned when freed,
/// and let an arena keep at most 2 MiB free at its end. Smaller buffers (a subscriber's
/// reads of the log, single events) are served from the arenas as before.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let operator_chose = std::env::var_os("GLIBC_TUNABLES")
            .is_some_and(|t| t.to_string_lossy().contains("malloc"))
            || std::env::vars_os().any(|(name, _)| name.to_string_lossy().starts_with("MALLOC_"));
        if !operator_chose {
            // SAFETY: mallopt only changes the allocator's parameters; both values are in
            // range (positive, below the 32 MiB maximum of M_MMAP_THRESHOLD).
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 2 << 20);
            }
        }
    }
}

/// Hands memory that the program freed back to the system (glibc only; a no-op
/// elsewhere).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The process's anonymous resident memory (`RssAnon`), if the system tells it.
pub fn resident_anon_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status_field_bytes(&status, "RssAnon")
}

/// A `kB` field of a `/proc/*/status` or `/proc/meminfo` text (`RssAnon:  1234 kB`), in
/// bytes.
pub fn status_field_bytes(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if name.trim() != field {
            return None;
        }
        let kib = value
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse::<u64>()
            .ok()?;
        kib.checked_mul(1024)
    })
}

/// A cgroup's memory limit as its file says it (`memory.max`: bytes or `max`;
/// `memory.limit_in_bytes`: bytes, a huge number when unlimited). `None` when unlimited
/// or unreadable.
pub fn parse_cgroup_limit(text: &str) -> Option<u64> {
    match text.trim() {
        "max" | "" => None,
        bytes => bytes.parse::<u64>().ok().filter(|&b| b > 0 && b < 1 << 62),
    }
}

/// The `auto` budget: half of the machine's memory, or of the container's limit when
/// that is lower. `None` when neither is known.
pub fn auto_budget(mem_total: Option<u64>, cgroup_limit: Option<u64>) -> Option<u64> {
    let memory = match (mem_total, cgroup_limit) {
        (Some(total), Some(limit)) => total.min(limit),
        (total, limit) => total.or(limit)?,
    };
    Some(memory / 2)
}

/// Where the `auto` budget comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoBudget {
    pub bytes: Option<u64>,
    /// How it was decided, for the start-up log.
    pub source: &'static str,
}

/// Reads the machine's memory and the container's limit and decides the `auto` budget.
/// Blocking (it reads a few small files).
pub fn detect_auto_budget() -> AutoBudget {
    let mem_total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| status_field_bytes(&text, "MemTotal"));
    let cgroup_limit = cgroup_limit_files()
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| parse_cgroup_limit(&text));
    let source = match (mem_total, cgroup_limit) {
        (Some(total), Some(limit)) if limit < total => "auto: half of the container's memory limit",
        (None, Some(_)) => "auto: half of the container's memory limit",
        (Some(_), _) => "auto: half of the machine's memory",
        (None, None) => "auto: the memory size is unknown",
    };
    AutoBudget {
        bytes: auto_budget(mem_total, cgroup_limit),
        source,
    }
}

/// The files that may hold this process's cgroup memory limit, most specific first: its
/// own cgroup's (from `/proc/self/cgroup`), then the root of the mount (what a container
/// with its own cgroup namespace sees as its own).
fn cgroup_limit_files() -> Vec<String> {
    let mut files = Vec::new();
    if let Ok(groups) = std::fs::read_to_string("/proc/self/cgroup") {
        for line in groups.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let path = path.trim_end_matches('/');
            if controllers.is_empty() {
                files.push(format!("/sys/fs/cgroup{path}/memory.max"));
            } else if controllers.split(',').any(|c| c == "memory") {
                files.push(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"));
            }
        }
    }
    files.push("/sys/fs/cgroup/memory.max".into());
    files.push("/sys/fs/cgroup/memory/memory.limit_in_bytes".into());
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_and_meminfo_fields() {
        let status =
            "Name:\tbus\nVmRSS:\t  204800 kB\nRssAnon:\t  102400 kB\nRssFile:\t   1024 kB\n";
        assert_eq!(status_field_bytes(status, "RssAnon"), Some(100 << 20));
        assert_eq!(status_field_bytes(status, "RssFile"), Some(1 << 20));
        assert_eq!(status_field_bytes(status, "RssShmem"), None);
        assert_eq!(status_field_bytes("RssAnon:\tlots kB\n", "RssAnon"), None);
        let meminfo = "MemTotal:       24683584 kB\nMemFree:        13000000 kB\n";
        assert_eq!(
            status_field_bytes(meminfo, "MemTotal"),
            Some(24683584 * 1024)
        );
        assert_eq!(status_field_bytes(meminfo, "Mem"), None);
        // This process has one (on Linux).
        if cfg!(target_os = "linux") {
            assert!(resident_anon_bytes().is_some_and(|b| b > 0));
        }
    }

    #[test]
    fn auto_is_half_of_the_machine_or_of_a_lower_container_limit() {
        let gib = 1u64 << 30;
        assert_eq!(parse_cgroup_limit("max\n"), None);
        assert_eq!(parse_cgroup_limit("4294967296\n"), Some(4 * gib));
        // cgroup v1 says "unlimited" with a huge number.
        assert_eq!(parse_cgroup_limit("9223372036854771712\n"), None);
        assert_eq!(parse_cgroup_limit("garbage"), None);
        assert_eq!(auto_budget(Some(16 * gib), None), Some(8 * gib));
        assert_eq!(auto_budget(Some(16 * gib), Some(4 * gib)), Some(2 * gib));
        assert_eq!(auto_budget(Some(16 * gib), Some(64 * gib)), Some(8 * gib));
        assert_eq!(auto_budget(None, Some(4 * gib)), Some(2 * gib));
        assert_eq!(auto_budget(None, None), None);
        let detected = detect_auto_budget();
        if cfg!(target_os = "linux") {
            assert!(detected.bytes.is_some_and(|b| b > 0), "{detected:?}");
        }
    }

    #[test]
    fn admits_within_the_budget_and_refuses_beyond() {
        let budget = Arc::new(MemoryBudget::new(100));
        budget.record(50);
        // A publish in flight counts until it is answered.
        let first = budget.admit(Work::Publish, 30).expect("fits");
        assert_eq!(
            budget.admit(Work::Publish, 30).unwrap_err(),
            Refused {
                used: 50,
                budget: 100
            }
        );
        assert_eq!(budget.refusals(Work::Publish), 1);
        drop(first);
        let second = budget.admit(Work::Publish, 30).expect("room again");
        drop(second);
        assert_eq!(budget.released.load(Ordering::Relaxed), 0, "small charges");
        drop(budget.admit(Work::Publish, REPORT_CHARGES_FROM));
        assert_eq!(budget.released.load(Ordering::Relaxed), REPORT_CHARGES_FROM);
        // Alone, a request larger than the room left is admitted while under the budget.
        assert!(budget.admit(Work::Publish, 500).is_ok());
        // Subscriptions count until the next sample.
        let _sub = budget.admit(Work::Subscribe, 40).expect("fits");
        assert!(budget.admit(Work::Subscribe, 40).is_err());
        assert_eq!(budget.refusals(Work::Subscribe), 1);
        budget.record(50);
        assert!(budget.admit(Work::Subscribe, 40).is_ok());
        // Over the budget, nothing new is admitted.
        budget.record(101);
        assert!(budget.is_over());
        assert!(budget.admit(Work::Subscribe, 0).is_err());
        assert!(budget.admit(Work::Publish, 0).is_err());
        budget.record(99);
        assert!(!budget.is_over());
        assert!(budget.admit(Work::Publish, 0).is_ok());
    }

    #[test]
    fn trims_near_the_budget_and_after_large_frees() {
        let (long, short) = (Duration::from_secs(60), Duration::from_millis(10));
        let every = TRIM_AT_MOST_EVERY;
        let budget = MemoryBudget::new(1000);
        assert!(!budget.trim_due(100, 100, long, long), "nothing freed");
        assert!(budget.trim_due(900, 900, every, short), "near the budget");
        assert!(!budget.trim_due(950, 900, short, short), "not in a loop");
        budget.released(1);
        assert!(
            !budget.trim_due(100, 100, long, short),
            "while memory is being freed"
        );
        assert!(
            budget.trim_due(100, 100, long, TRIM_WHEN_QUIET),
            "once it is quiet"
        );
        budget.released(TRIM_AFTER_RELEASED);
        assert!(
            budget.trim_due(100, 100, every, Duration::ZERO),
            "much freed"
        );
        assert!(
            !budget.trim_due(100, 100, short, Duration::ZERO),
            "not in a loop"
        );
        let unlimited = MemoryBudget::unlimited();
        assert!(!unlimited.trim_due(u64::MAX / 2, u64::MAX / 2, long, long));
        let grown = TRIM_AFTER_GROWTH + 10;
        assert!(unlimited.trim_due(grown, 10, every, short), "grown");
        assert!(
            !unlimited.trim_due(grown, 10, short, short),
            "not in a loop"
        );
        assert!(
            !unlimited.trim_due(grown, 11, long, short),
            "not grown enough"
        );
    }
}
