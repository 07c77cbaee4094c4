//! The hub's one source of time. Production reads the wall clock; tests pass a [`ManualClock`]
//! and move it, so deadlines, ack windows and expiry are tested with time as an input; the
//! lifecycle host runs the server binary on an [`OffsetClock`] it moves forward
//! (`serve --test-clock-file`, hidden), so hours of a phone's life pass in seconds.

use std::{
    path::Path,
    sync::atomic::{AtomicI64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

/// Unix milliseconds now, from the wall clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unix ms as `YYYY-MM-DDTHH:MM:SSZ` (UTC), for messages and listings.
pub fn fmt_utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Where the hub reads the time.
pub trait Clock: Send + Sync + 'static {
    /// Unix milliseconds now.
    fn now_ms(&self) -> i64;
}

/// The wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// The wall clock plus an offset that only grows: simulated time for the lifecycle host, which
/// writes the offset (ms, decimal) to a file and signals the server to read it (see
/// `server::watch_test_clock`). Never built from the configuration file, so a production server
/// runs on [`SystemClock`].
#[derive(Debug, Default)]
pub struct OffsetClock(AtomicI64);

impl OffsetClock {
    /// The offset now, ms.
    pub fn offset_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Move the offset to `offset_ms`. Time never goes back (every deadline the hub keeps
    /// assumes it): an offset below the current one is refused and changes nothing.
    pub fn move_to(&self, offset_ms: i64) -> Result<(), String> {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                (offset_ms >= now).then_some(offset_ms)
            })
            .map(|_| ())
            .map_err(|now| {
                format!("clock offset {offset_ms} ms is behind the current {now} ms: time does not go back")
            })
    }

    /// Read the offset from `path` (ms, decimal, surrounding whitespace ignored) and move to it.
    pub fn move_to_file(&self, path: &Path) -> Result<i64, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let offset: i64 = text.trim().parse().map_err(|_| {
            format!(
                "{}: {:?} is not a number of milliseconds",
                path.display(),
                text.trim()
            )
        })?;
        self.move_to(offset)?;
        Ok(offset)
    }
}

impl Clock for OffsetClock {
    fn now_ms(&self) -> i64 {
        now_ms().saturating_add(self.offset_ms())
    }
}

/// A clock that moves only when told to.
#[cfg(test)]
pub(super) struct ManualClock(std::sync::atomic::AtomicI64);

#[cfg(test)]
impl ManualClock {
    /// A clock showing `at` (Unix ms).
    pub(super) fn new(at: i64) -> Self {
        Self(std::sync::atomic::AtomicI64::new(at))
    }

    /// Move forward by `ms`.
    pub(super) fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(fmt_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(fmt_utc(1_796_083_199_000), "2026-11-30T23:59:59Z");
    }

    #[test]
    fn the_offset_clock_only_moves_forward() {
        let clock = OffsetClock::default();
        let before = now_ms();
        clock.move_to(3_600_000).unwrap();
        let t = clock.now_ms();
        assert!(t >= before + 3_600_000 && t <= now_ms() + 3_600_000, "{t}");
        let err = clock.move_to(60_000).unwrap_err();
        assert!(err.contains("does not go back"), "{err}");
        assert_eq!(clock.offset_ms(), 3_600_000, "a refused move changes nothing");
        clock.move_to(3_600_000).unwrap();
    }

    #[test]
    fn the_offset_file_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clock");
        let clock = OffsetClock::default();
        std::fs::write(&path, " 1800000\n").unwrap();
        assert_eq!(clock.move_to_file(&path), Ok(1_800_000));
        std::fs::write(&path, "30m").unwrap();
        assert!(clock.move_to_file(&path).unwrap_err().contains("not a number"));
        assert!(clock.move_to_file(&dir.path().join("missing")).is_err());
        assert_eq!(clock.offset_ms(), 1_800_000);
    }
}
