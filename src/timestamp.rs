//! Wall-clock instants as the bus writes them: UTC, nanosecond precision, RFC 3339.
//!
//! Every `created_at` the server assigns or accepts goes through [`Timestamp`]. Formatting
//! always yields the same 30-byte shape (`2026-11-22T11:26:51.507272246Z`), so the log's
//! writer can format one instant per group commit and copy it into every event. Parsing
//! accepts any RFC 3339 date-time (any fraction length, `Z` or a numeric offset) and
//! normalises it to UTC. Instants are 64-bit nanosecond counts, so parsing accepts
//! 1677-09-21T00:12:43.145224192Z to 2262-04-11T23:47:16.854775807Z and rejects what lies
//! outside with a message saying so (never a silent wrap-around).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch, UTC.
///
/// ```
/// use bus::timestamp::Timestamp;
///
/// let t = Timestamp::parse("2026-11-22T13:26:51.5+02:00")?;
/// assert_eq!(t.to_string(), "2026-11-22T11:26:51.500000000Z");
/// # Ok::<(), bus::timestamp::TimestampError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

/// Length of [`Timestamp::format`]'s output.
pub const FORMATTED_LEN: usize = 30;

const NANOS_PER_SEC: i64 = 1_000_000_000;
const SECS_PER_DAY: i64 = 86_400;
/// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999999999Z, the RFC 3339 range.
const MIN_SECS: i64 = -62_167_219_200;
const MAX_SECS: i64 = 253_402_300_799;

/// Why a string is not an RFC 3339 date-time; its message names the input and the fault.
///
/// ```
/// let error = bus::timestamp::Timestamp::parse("2026-13-01T00:00:00Z").unwrap_err();
/// assert!(error.to_string().contains("month out of range"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid RFC 3339 timestamp {input:?}: {reason}")]
pub struct TimestampError {
    input: String,
    reason: &'static str,
}

impl Timestamp {
    /// The current wall-clock time.
    ///
    /// ```
    /// use bus::timestamp::Timestamp;
    ///
    /// assert!(Timestamp::now() > Timestamp::parse("2026-01-01T00:00:00Z")?);
    /// # Ok::<(), bus::timestamp::TimestampError>(())
    /// ```
    pub fn now() -> Timestamp {
        Timestamp::from(SystemTime::now())
    }

    /// The instant `nanos` nanoseconds after (or, negative, before) 1970-01-01T00:00:00Z.
    ///
    /// ```
    /// use bus::timestamp::Timestamp;
    ///
    /// assert_eq!(Timestamp::from_unix_nanos(1_500_000_000).to_string(), "1970-01-01T00:00:01.500000000Z");
    /// ```
    pub fn from_unix_nanos(nanos: i64) -> Timestamp {
        Timestamp(nanos)
    }

    /// Nanoseconds since 1970-01-01T00:00:00Z.
    ///
    /// ```
    /// use bus::timestamp::Timestamp;
    ///
    /// assert_eq!(Timestamp::parse("1970-01-01T00:00:02Z")?.unix_nanos(), 2_000_000_000);
    /// # Ok::<(), bus::timestamp::TimestampError>(())
    /// ```
    pub fn unix_nanos(self) -> i64 {
        self.0
    }

    /// Whole milliseconds since the Unix epoch; 0 for instants before it.
    ///
    /// ```
    /// use bus::timestamp::Timestamp;
    ///
    /// assert_eq!(Timestamp::parse("1970-01-01T00:00:02.5Z")?.unix_millis(), 2_500);
    /// assert_eq!(Timestamp::parse("1969-12-31T23:59:59Z")?.unix_millis(), 0);
    /// # Ok::<(), bus::timestamp::TimestampError>(())
    /// ```
    pub fn unix_millis(self) -> u64 {
        u64::try_from(self.0 / 1_000_000).unwrap_or(0)
    }

    /// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`; instants outside the RFC 3339 range are clamped.
    ///
    /// ```
    /// use bus::timestamp::{Timestamp, FORMATTED_LEN};
    ///
    /// let bytes: [u8; FORMATTED_LEN] = Timestamp::from_unix_nanos(0).format();
    /// assert_eq!(&bytes, b"1970-01-01T00:00:00.000000000Z");
    /// ```
    pub fn format(self) -> [u8; FORMATTED_LEN] {
        let min = MIN_SECS.saturating_mul(NANOS_PER_SEC);
        let max = MAX_SECS
            .saturating_mul(NANOS_PER_SEC)
            .saturating_add(NANOS_PER_SEC - 1);
        let nanos = self.0.clamp(min, max);
        let secs = nanos.div_euclid(NANOS_PER_SEC);
        let frac = nanos.rem_euclid(NANOS_PER_SEC) as u64;
        let days = secs.div_euclid(SECS_PER_DAY);
        let of_day = secs.rem_euclid(SECS_PER_DAY) as u64;
        let (year, month, day) = civil_from_days(days);

        let mut out = *b"0000-00-00T00:00:00.000000000Z";
        put_digits(&mut out[0..4], year as u64);
        put_digits(&mut out[5..7], u64::from(month));
        put_digits(&mut out[8..10], u64::from(day));
        put_digits(&mut out[11..13], of_day / 3600);
        put_digits(&mut out[14..16], of_day / 60 % 60);
        put_digits(&mut out[17..19], of_day % 60);
        put_digits(&mut out[20..29], frac);
        out
    }

    /// Parses an RFC 3339 date-time such as `2026-11-22T11:26:51.5+02:00`.
    ///
    /// ```
    /// use bus::timestamp::Timestamp;
    ///
    /// let utc = Timestamp::parse("2026-11-22T09:26:51.5Z")?;
    /// assert_eq!(Timestamp::parse("2026-11-22T11:26:51.5+02:00")?, utc);
    /// assert!(Timestamp::parse("2300-01-01T00:00:00Z").is_err()); // beyond 2262
    /// # Ok::<(), bus::timestamp::TimestampError>(())
    /// ```
    pub fn parse(input: &str) -> Result<Timestamp, TimestampError> {
        let fail = |reason| TimestampError {
            input: input.to_owned(),
            reason,
        };
        let b = input.as_bytes();
        if b.len() < 20 {
            return Err(fail("too short; expected YYYY-MM-DDTHH:MM:SSZ"));
        }
        let shape_ok = b[4] == b'-'
            && b[7] == b'-'
            && matches!(b[10], b'T' | b't' | b' ')
            && b[13] == b':'
            && b[16] == b':';
        if !shape_ok {
            return Err(fail("expected YYYY-MM-DDTHH:MM:SS"));
        }
        let num = |range: std::ops::Range<usize>| -> Result<u64, TimestampError> {
            parse_digits(&b[range]).ok_or_else(|| fail("expected digits"))
        };
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&month) {
            return Err(fail("month out of range"));
        }
        if day == 0 || day > days_in_month(year as i64, month as u32) {
            return Err(fail("day out of range"));
        }
        if hour > 23 || minute > 59 || second > 59 {
            return Err(fail("time of day out of range"));
        }

        let mut rest = &b[19..];
        let mut frac_nanos = 0u64;
        if let Some(after_dot) = rest.strip_prefix(b".") {
            let digits = after_dot.iter().take_while(|c| c.is_ascii_digit()).count();
            if digits == 0 {
                return Err(fail("expected digits after the decimal point"));
            }
            // Digits past the ninth are below a nanosecond: truncate, as Go does.
            for (i, &d) in after_dot[..digits].iter().enumerate().take(9) {
                frac_nanos += u64::from(d - b'0') * 10u64.pow(8 - i as u32);
            }
            rest = &after_dot[digits..];
        }
        let offset_secs: i64 = match rest {
            [b'Z' | b'z'] => 0,
            [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
                let hours = parse_digits(&[*h1, *h2]).ok_or_else(|| fail("bad UTC offset"))?;
                let mins = parse_digits(&[*m1, *m2]).ok_or_else(|| fail("bad UTC offset"))?;
                if hours > 23 || mins > 59 {
                    return Err(fail("UTC offset out of range"));
                }
                let secs = (hours * 3600 + mins * 60) as i64;
                if *sign == b'-' {
                    -secs
                } else {
                    secs
                }
            }
            _ => return Err(fail("expected Z or a UTC offset like +02:00 at the end")),
        };

        let days = days_from_civil(year as i64, month as u32, day as u32);
        let secs = days * SECS_PER_DAY + (hour * 3600 + minute * 60 + second) as i64 - offset_secs;
        let nanos = i128::from(secs) * i128::from(NANOS_PER_SEC) + i128::from(frac_nanos);
        i64::try_from(nanos)
            .map(Timestamp)
            .map_err(|_| fail("outside the years 1677 to 2262 that the server can store"))
    }
}

/// Instants beyond the years 1677 to 2262 saturate at those ends.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use bus::timestamp::Timestamp;
///
/// let t = Timestamp::from(UNIX_EPOCH + Duration::from_millis(1500));
/// assert_eq!(t.to_string(), "1970-01-01T00:00:01.500000000Z");
/// ```
impl From<SystemTime> for Timestamp {
    fn from(time: SystemTime) -> Timestamp {
        let nanos = match time.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_nanos()).unwrap_or(i64::MAX),
        };
        Timestamp(nanos)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.format();
        // The formatter writes ASCII only.
        f.write_str(std::str::from_utf8(&bytes).map_err(|_| fmt::Error)?)
    }
}

fn put_digits(out: &mut [u8], mut value: u64) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

fn parse_digits(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &d| {
        d.is_ascii_digit().then(|| acc * 10 + u64::from(d - b'0'))
    })
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: u32) -> u64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_epoch_and_known_instants() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000000000Z");
        let t = Timestamp::parse("2026-11-22T11:26:51.507272246Z").unwrap();
        assert_eq!(t.to_string(), "2026-11-22T11:26:51.507272246Z");
        assert_eq!(Timestamp(-1).to_string(), "1969-12-31T23:59:59.999999999Z");
        assert_eq!(
            Timestamp::parse("2000-02-29T00:00:00Z")
                .unwrap()
                .to_string(),
            "2000-02-29T00:00:00.000000000Z"
        );
    }

    #[test]
    fn parse_normalises_offsets_and_fractions() {
        let t = Timestamp::parse("2026-11-22T13:26:51.5+02:00").unwrap();
        assert_eq!(t.to_string(), "2026-11-22T11:26:51.500000000Z");
        let t = Timestamp::parse("2026-01-01T00:30:00-01:00").unwrap();
        assert_eq!(t.to_string(), "2026-01-01T01:30:00.000000000Z");
        let t = Timestamp::parse("2026-11-22t11:26:51.1234567891234z").unwrap();
        assert_eq!(t.to_string(), "2026-11-22T11:26:51.123456789Z");
    }

    #[test]
    fn parse_rejects_malformed_input() {
        for bad in [
            "",
            "2026-11-22",
            "2026-11-22T11:26:51",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-22T24:00:00Z",
            "2026-11-22T11:26:51.Z",
            "2026-11-22T11:26:51+2:00",
            "2026-11-22T11:26:51Zjunk",
            "20x6-11-22T11:26:51Z",
        ] {
            assert!(Timestamp::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn parse_stays_within_the_instants_it_can_hold() {
        for (text, ok) in [
            ("4048-01-01T00:00:00Z", false),
            ("0000-01-01T00:00:00Z", false),
            ("1677-09-21T00:12:43.145224191Z", false),
            ("1677-09-21T00:12:43.145224192Z", true),
            ("2262-04-11T23:47:16.854775807Z", true),
            ("2262-04-11T23:47:16.854775808Z", false),
            ("2262-04-12T01:47:16+02:00", true),
        ] {
            match Timestamp::parse(text) {
                Ok(t) => {
                    assert!(ok, "{text} parsed as {t}");
                    let back = Timestamp::parse(&t.to_string()).unwrap();
                    assert_eq!(back, t, "{text} round-trips");
                }
                Err(e) => {
                    assert!(!ok, "{text}: {e}");
                    assert!(e.to_string().contains("1677 to 2262"), "{e}");
                }
            }
        }
    }

    #[test]
    fn civil_conversion_round_trips_over_centuries() {
        for days in (-800_000..3_000_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
