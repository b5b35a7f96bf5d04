//! SloWindow: a database's service-level objectives and how its statements
//! met them over the last hour.
//!
//! Objectives are configured per database (`[[slo]]`): a latency objective
//! such as `p99 < 5ms` (99% of statements finish within 5 ms) and an error
//! objective such as `< 0.1%`. Each allows a fraction of bad statements,
//! its error budget; the burn rate is the observed bad fraction divided by
//! it (1 spends the budget exactly as fast as the objective allows, above 1
//! the objective is being missed). Counts are kept in 10-second slots of
//! atomic counters covering an hour, so recording takes no lock and the
//! 5-minute and 1-hour windows are sums over slots.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;

/// Seconds per slot, and slots kept (one hour).
const SLOT_SECONDS: u64 = 10;
const SLOTS: u64 = 360;

/// The windows reported by `SHOW SLO` and `/metrics`.
pub const WINDOWS: [(&str, Duration); 2] = [
    ("5m", Duration::from_secs(300)),
    ("1h", Duration::from_secs(3600)),
];

/// One `[[slo]]` table of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloConfig {
    /// The client-facing database name the objectives are for.
    pub database: String,
    /// `"p99 < 5ms"`: that quantile of statements finishes within that time.
    #[serde(default, deserialize_with = "latency_objective")]
    pub latency: Option<LatencyObjective>,
    /// `"< 0.1%"` (or `"0.1%"`): at most that share of statements fails.
    #[serde(default, deserialize_with = "error_objective")]
    pub errors: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyObjective {
    /// The percentage of statements that must be fast, such as 99.
    pub percentile: f64,
    pub threshold: Duration,
}

impl LatencyObjective {
    /// The share of statements allowed to be slow: 0.01 for p99.
    pub fn budget(&self) -> f64 {
        (100.0 - self.percentile) / 100.0
    }
}

impl std::fmt::Display for LatencyObjective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (p, t) = (self.percentile, humantime::format_duration(self.threshold));
        write!(f, "p{p} < {t}")
    }
}

/// Parses `p99 < 5ms`, `p99.9<250ms`.
pub fn parse_latency(text: &str) -> Result<LatencyObjective, String> {
    let bad = || {
        format!("latency objective \"{text}\" is not of the form \"p99 < 5ms\" (a percentile below 100, then a duration)")
    };
    let (p, threshold) = text.split_once('<').ok_or_else(bad)?;
    let p = p.trim().strip_prefix('p').ok_or_else(bad)?;
    let percentile: f64 = p.parse().map_err(|_| bad())?;
    if !(percentile > 0.0 && percentile < 100.0) {
        return Err(bad());
    }
    let threshold = humantime::parse_duration(threshold.trim()).map_err(|_| bad())?;
    if threshold.is_zero() {
        return Err(bad());
    }
    Ok(LatencyObjective {
        percentile,
        threshold,
    })
}

/// Parses `< 0.1%` or `0.1%` into a fraction (0.001).
pub fn parse_errors(text: &str) -> Result<f64, String> {
    let bad = || {
        format!("error objective \"{text}\" is not of the form \"< 0.1%\" (a percentage above 0 and below 100)")
    };
    let t = text.trim();
    let t = t.strip_prefix('<').unwrap_or(t).trim();
    let percent: f64 = t
        .strip_suffix('%')
        .ok_or_else(bad)?
        .trim()
        .parse()
        .map_err(|_| bad())?;
    if !(percent > 0.0 && percent < 100.0) {
        return Err(bad());
    }
    Ok(percent / 100.0)
}

fn latency_objective<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<LatencyObjective>, D::Error> {
    let text = String::deserialize(d)?;
    parse_latency(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn error_objective<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let text = String::deserialize(d)?;
    parse_errors(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[derive(Default)]
struct Slot {
    /// Which 10-second period (counted from the proxy's start, plus one)
    /// the counts are for; 0: never used.
    period: AtomicU64,
    statements: AtomicU64,
    slow: AtomicU64,
    errors: AtomicU64,
}

/// Counts over a window.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub statements: u64,
    /// Slower than the latency objective's threshold.
    pub slow: u64,
    pub errors: u64,
}

/// One objective's standing over one window.
#[derive(Debug, Clone)]
pub struct Standing {
    /// `latency` or `errors`.
    pub objective: &'static str,
    /// The objective as configured (`p99 < 5ms`, `errors < 0.1%`).
    pub target: String,
    pub window: &'static str,
    pub statements: u64,
    pub bad: u64,
    /// The share of good statements (1 without traffic).
    pub good_ratio: f64,
    /// Bad share over the allowed share; 0 without traffic.
    pub burn_rate: f64,
}

impl Standing {
    pub fn met(&self) -> bool {
        self.burn_rate <= 1.0
    }
}

pub struct SloWindow {
    config: SloConfig,
    slots: Box<[Slot]>,
}

impl SloWindow {
    pub fn new(config: SloConfig) -> SloWindow {
        SloWindow {
            config,
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
        }
    }

    pub fn database(&self) -> &str {
        &self.config.database
    }

    /// `now_us`: microseconds since the proxy started (`Shared::clock`).
    fn period(now_us: u64) -> u64 {
        now_us / (SLOT_SECONDS * 1_000_000) + 1
    }

    /// Records a statement that ended at `now_us` after `elapsed`.
    pub fn record(&self, now_us: u64, elapsed: Duration, failed: bool) {
        let period = Self::period(now_us);
        let slot = &self.slots[(period % SLOTS) as usize];
        let seen = slot.period.load(Ordering::Acquire);
        if seen < period
            && slot
                .period
                .compare_exchange(seen, period, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // An hour-old slot starts over. (A statement counted between
            // the exchange and these stores is lost: one in a 10 s period.)
            slot.statements.store(0, Ordering::Relaxed);
            slot.slow.store(0, Ordering::Relaxed);
            slot.errors.store(0, Ordering::Relaxed);
        }
        slot.statements.fetch_add(1, Ordering::Relaxed);
        if self.config.latency.is_some_and(|l| elapsed > l.threshold) {
            slot.slow.fetch_add(1, Ordering::Relaxed);
        }
        if failed {
            slot.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts over the `window` that ends at `now_us` (whole slots).
    pub fn totals(&self, now_us: u64, window: Duration) -> Totals {
        let current = Self::period(now_us);
        let periods = (window.as_secs() / SLOT_SECONDS).clamp(1, SLOTS);
        let oldest = current.saturating_sub(periods - 1).max(1);
        let mut totals = Totals::default();
        for slot in self.slots.iter() {
            let period = slot.period.load(Ordering::Acquire);
            if period >= oldest && period <= current {
                totals.statements += slot.statements.load(Ordering::Relaxed);
                totals.slow += slot.slow.load(Ordering::Relaxed);
                totals.errors += slot.errors.load(Ordering::Relaxed);
            }
        }
        totals
    }

    /// Each objective's standing over each of [`WINDOWS`].
    pub fn standings(&self, now_us: u64) -> Vec<Standing> {
        let mut out = Vec::new();
        for (window, length) in WINDOWS {
            let t = self.totals(now_us, length);
            let mut push = |objective, target: String, bad: u64, allowed: f64| {
                let bad_ratio = if t.statements == 0 {
                    0.0
                } else {
                    bad as f64 / t.statements as f64
                };
                out.push(Standing {
                    objective,
                    target,
                    window,
                    statements: t.statements,
                    bad,
                    good_ratio: 1.0 - bad_ratio,
                    burn_rate: bad_ratio / allowed,
                });
            };
            if let Some(l) = self.config.latency {
                push("latency", l.to_string(), t.slow, l.budget());
            }
            if let Some(e) = self.config.errors {
                push("errors", format!("errors < {}%", e * 100.0), t.errors, e);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(latency: &str, errors: &str) -> SloWindow {
        SloWindow::new(SloConfig {
            database: "app".into(),
            latency: Some(parse_latency(latency).unwrap()),
            errors: Some(parse_errors(errors).unwrap()),
        })
    }

    #[test]
    fn objectives_parse_and_bad_ones_say_what_is_expected() {
        let l = parse_latency("p99 < 5ms").unwrap();
        assert_eq!(l.percentile, 99.0);
        assert!((l.budget() - 0.01).abs() < 1e-12);
        assert_eq!(l.threshold, Duration::from_millis(5));
        assert_eq!(l.to_string(), "p99 < 5ms");
        let l = parse_latency("p99.9<250ms").unwrap();
        assert_eq!(l.to_string(), "p99.9 < 250ms");
        assert!((l.budget() - 0.001).abs() < 1e-12);
        assert_eq!(parse_errors("< 0.1%").unwrap(), 0.001);
        assert_eq!(parse_errors("2%").unwrap(), 0.02);
        for bad in [
            "99 < 5ms",
            "p100 < 5ms",
            "p99 < soon",
            "p99 5ms",
            "p99 < 0ms",
        ] {
            let e = parse_latency(bad).unwrap_err();
            assert!(e.contains("p99 < 5ms"), "{e}");
        }
        for bad in ["0.1", "< 0%", "< 100%", "lots%"] {
            assert!(parse_errors(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn burn_rate_is_the_bad_share_over_the_budget_per_window() {
        let w = window("p99 < 5ms", "< 1%");
        let sec = 1_000_000; // microseconds
                             // An hour ago-ish: 100 statements, all slow; only the 1 h window sees them.
        let early = 60 * sec;
        for _ in 0..100 {
            w.record(early, Duration::from_millis(50), false);
        }
        // Now: 1000 statements, 5 slow and 20 failed.
        let now = 3000 * sec;
        for i in 0..1000 {
            let elapsed = Duration::from_millis(if i < 5 { 6 } else { 1 });
            w.record(now, elapsed, i % 50 == 0);
        }
        let s = w.standings(now);
        let get = |o: &str, win: &str| {
            s.iter()
                .find(|x| x.objective == o && x.window == win)
                .unwrap()
                .clone()
        };
        let l5 = get("latency", "5m");
        assert_eq!((l5.statements, l5.bad), (1000, 5));
        assert!((l5.burn_rate - 0.5).abs() < 1e-9, "{l5:?}");
        assert!(l5.met());
        let e5 = get("errors", "5m");
        assert_eq!(e5.bad, 20);
        assert!((e5.burn_rate - 2.0).abs() < 1e-9, "{e5:?}");
        assert!(!e5.met());
        let l1h = get("latency", "1h");
        assert_eq!((l1h.statements, l1h.bad), (1100, 105));
        // A slot reused an hour later starts from zero.
        let later = early + SLOTS * SLOT_SECONDS * sec;
        w.record(later, Duration::from_millis(1), false);
        assert_eq!(
            w.totals(later, Duration::from_secs(10)),
            Totals {
                statements: 1,
                slow: 0,
                errors: 0
            }
        );
    }

    #[test]
    fn without_traffic_nothing_burns() {
        let w = window("p99 < 5ms", "< 1%");
        for s in w.standings(0) {
            assert_eq!(s.statements, 0);
            assert_eq!(s.burn_rate, 0.0);
            assert!(s.met());
        }
    }
}
