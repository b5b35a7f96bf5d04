//! Clock: a coarse clock for the statement path's statistics.
//!
//! Sessions time transactions, queries and waits for `SHOW STATS` and
//! `SHOW CLIENTS` without a system call: a task stores the time since the
//! proxy started every [`TICK`], and readers load it (one relaxed atomic
//! load). A single short transaction therefore measures as 0 or 1 tick, but
//! the start of a transaction falls anywhere within a tick, so averages over
//! many transactions are unbiased.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// How often the clock moves.
pub const TICK: Duration = Duration::from_millis(1);

pub struct Clock {
    started: Instant,
    started_wall: SystemTime,
    /// Microseconds since `started`, as of the last tick.
    now_us: AtomicU64,
    running: AtomicBool,
}

impl Clock {
    /// A clock moved by a task on the current runtime until [`Clock::stop`].
    /// It lives as long as the process (one per proxy), so that pools and
    /// sessions reach it through a plain reference.
    pub fn start() -> &'static Clock {
        let clock: &'static Clock = Box::leak(Box::new(Clock {
            started: Instant::now(),
            started_wall: SystemTime::now(),
            now_us: AtomicU64::new(0),
            running: AtomicBool::new(true),
        }));
        tokio::spawn(tick(clock));
        clock
    }

    /// Stops the task that moves the clock (the proxy is gone).
    pub fn stop(&self) {
        self.running.store(false, Ordering::Relaxed);
    }

    /// Microseconds since the proxy started, as of the last tick.
    #[inline]
    pub fn now_us(&self) -> u64 {
        self.now_us.load(Ordering::Relaxed)
    }

    /// The wall-clock time of a reading of [`Clock::now_us`].
    pub fn wall(&self, us: u64) -> SystemTime {
        self.started_wall + Duration::from_micros(us)
    }

    fn update(&self) {
        let us = self.started.elapsed().as_micros() as u64;
        self.now_us.store(us, Ordering::Relaxed);
    }
}

async fn tick(clock: &'static Clock) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while clock.running.load(Ordering::Relaxed) {
        interval.tick().await;
        clock.update();
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
        clock.stop();
    }

    #[test]
    fn formats_like_pgbouncer() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 + 3_661);
        assert_eq!(format_wall(t), "1970-01-02 01:01:01 UTC");
    }
}
