//! Clock: the statement path's clock for `SHOW STATS` and `SHOW CLIENTS`.
//!
//! Microseconds since the proxy started, read from the monotonic clock.
//! (An earlier version kept a coarse copy moved by a 1 ms task to spare the
//! read; but `clock_gettime` is a vDSO call, no system call, at about 20 ns,
//! while the task woke the runtime a thousand times a second, idle or not,
//! which cost more per transaction than the reads it saved.) The clock is
//! read directly, as whole microseconds: `Instant::elapsed` spends three
//! times the read itself on `Duration` arithmetic, four times a transaction.

use std::time::{Duration, SystemTime};

use nix::time::{clock_gettime, ClockId};

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    started_us: u64,
    started_wall: SystemTime,
}

/// The monotonic clock (`Instant`'s), in microseconds.
#[inline]
fn monotonic_us() -> u64 {
    // As `Instant::now`: this clock cannot fail on Linux.
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is readable");
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000
}

impl Clock {
    /// A clock for one proxy, starting now (two words: pools copy it).
    pub fn start() -> Clock {
        Clock {
            started_us: monotonic_us(),
            started_wall: SystemTime::now(),
        }
    }

    /// Microseconds since the proxy started.
    #[inline]
    pub fn now_us(&self) -> u64 {
        monotonic_us().saturating_sub(self.started_us)
    }

    /// The wall-clock time of a reading of [`Clock::now_us`].
    pub fn wall(&self, us: u64) -> SystemTime {
        self.started_wall + Duration::from_micros(us)
    }
}

/// `time` as PgBouncer prints timestamps: `2024-05-01 12:00:00 UTC`.
pub fn format_wall(time: SystemTime) -> String {
    let text = humantime::format_rfc3339_seconds(time).to_string();
    format!("{} UTC", text.trim_end_matches('Z').replacen('T', " ", 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn moves_with_time() {
        let clock = Clock::start();
        let before = clock.now_us();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let moved = clock.now_us() - before;
        assert!(moved >= 10_000, "moved {moved} us in 20 ms");
    }

    #[test]
    fn formats_like_pgbouncer() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 + 3_661);
        assert_eq!(format_wall(t), "1970-01-02 01:01:01 UTC");
    }
}
