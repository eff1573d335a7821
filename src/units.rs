//! Sizes and durations as people write them: in flags, environment variables and the
//! messages that quote a limit back (`128MiB` in, `128 MiB` out; durations the Go way,
//! see [`crate::duration`]). A leaf: it imports nothing of the crate but `duration`.

use std::time::Duration;

use crate::duration::parse_go_duration;

/// Parses a byte size: a number of bytes, optionally followed by `K`, `M` or `G` (also
/// written `KB`/`KiB`, …; all are powers of 1024). Sizes under 64 bytes are refused: no
/// setting of the bus means anything that small.
///
/// ```
/// use bus::units::parse_size;
///
/// assert_eq!(parse_size("128MiB"), Ok(128 << 20));
/// assert_eq!(parse_size("64 KB"), Ok(64 << 10));
/// assert!(parse_size("12x").unwrap_err().contains("unknown unit"));
/// ```
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

/// A byte size as [`parse_size`] reads it: `8 MiB`, `64 KiB`, or bytes.
///
/// ```
/// assert_eq!(bus::units::format_size(8 << 20), "8 MiB");
/// assert_eq!(bus::units::format_size(1536), "1536 bytes");
/// ```
pub fn format_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// A size for people: exact when it is a whole number of MiB (or smaller than one), else
/// in GiB or MiB with one decimal.
///
/// ```
/// assert_eq!(bus::units::approximate_size(3 << 20), "3 MiB");
/// assert_eq!(bus::units::approximate_size((1 << 20) + (1 << 19)), "1.5 MiB");
/// ```
pub fn approximate_size(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 20) || bytes < 1 << 20 {
        return format_size(bytes);
    }
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// Parses a duration flag (`5s`, `1m30s`), with the error as text for the command line.
///
/// ```
/// use std::time::Duration;
///
/// assert_eq!(bus::units::parse_duration("1m30s"), Ok(Duration::from_secs(90)));
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    parse_go_duration(text).map_err(|e| e.to_string())
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
        for (size, text) in [(8 << 20, "8 MiB"), (3 << 30, "3 GiB"), (1536, "1536 bytes")] {
            assert_eq!(format_size(size), text);
            assert_eq!(parse_size(&text.replace(" bytes", "")), Ok(size));
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("5 minutes")
            .unwrap_err()
            .contains("examples"));
    }
}
