//! Server settings: command-line flags, each with a `BUS_*` environment variable.
//!
//! Precedence: an explicit flag beats the environment, which beats the default. Values
//! are checked here, before anything is opened, so that a typo fails at start-up with a
//! message naming the setting.

use std::path::PathBuf;

use clap::Args;

use crate::store::{FsyncPolicy, StoreConfig, DEFAULT_TAIL_BYTES};

/// Settings of `bus server`.
#[derive(Debug, Clone, Args)]
pub struct ServerConfig {
    /// Data directory; each namespace keeps its log in a subdirectory.
    #[arg(long, env = "BUS_PATH", default_value = "./bus_data")]
    pub path: PathBuf,

    /// Namespaces to serve, comma-separated. The namespace is the first segment of a
    /// subject (`orders` in `orders.created`); every namespace must be declared.
    #[arg(long, env = "BUS_NAMESPACES", value_delimiter = ',', required = true)]
    pub namespaces: Vec<String>,

    /// When appends reach the disk: `always` (acknowledged only once synced),
    /// `interval=<duration>` (synced at least that often) or `never` (left to the OS).
    #[arg(long, env = "BUS_FSYNC", default_value = "always")]
    pub fsync: FsyncPolicy,

    /// Size at which a log segment is sealed and a new one started (bytes, or with a
    /// KiB/MiB/GiB suffix).
    #[arg(long, env = "BUS_SEGMENT_SIZE", default_value = "128MiB", value_parser = parse_size)]
    pub segment_size: u64,
}

impl ServerConfig {
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            path: self.path.clone(),
            segment_size: self.segment_size,
            fsync: self.fsync,
            tail_bytes: DEFAULT_TAIL_BYTES,
        }
    }

    /// The declared namespaces, trimmed, without empty entries (`a,,b` or a trailing comma).
    pub fn namespaces(&self) -> Vec<String> {
        self.namespaces
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect()
    }
}

/// Parses a byte size: a number of bytes, optionally followed by `K`, `M` or `G` (also
/// written `KB`/`KiB`, …; all are powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number.parse().map_err(|_| {
        format!("invalid size {text:?}: expected a number of bytes such as 1048576 or 128MiB")
    })?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {unit:?} (use KiB, MiB or GiB)"
            ))
        }
    };
    let size = number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size {text:?} is too large"))?;
    if size < 64 {
        return Err(format!("size {text:?} is too small (at least 64 bytes)"));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("64 KB"), Ok(64 << 10));
        for bad in ["", "MiB", "12x", "-5", "1", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
    }
}
