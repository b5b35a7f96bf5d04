//! StatementStats: what the proxy's clients' statements cost and how they
//! fail, by route, for `/metrics`, `SHOW SLO` and the slow-statement log.
//!
//! A session times each request (from its first message to the
//! ReadyForQuery that ends it) and records it once, at its end, in the
//! latency histogram of its route and in its database's SLO window. The
//! histograms are atomic counters, so recording takes no lock; the session
//! keeps the histogram of its last route, so looking one up (under a read
//! lock) happens only when a session's route changes.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::slo::SloWindow;
use crate::workers::Striped;

/// Where a request ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    pub shard: RouteShard,
    pub role: RouteRole,
    /// Answered from the result cache.
    pub cached: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteShard {
    /// The database's configured server (no shard map routes it).
    Home,
    Shard(u32),
    /// Several shards (fanned out and merged).
    All,
}

impl fmt::Display for RouteShard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteShard::Home => f.write_str("home"),
            RouteShard::Shard(id) => write!(f, "{id}"),
            RouteShard::All => f.write_str("all"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteRole {
    Primary,
    Replica,
    /// No server: the proxy answered (a cache hit, a BEGIN it defers, a
    /// statement it refused).
    Proxy,
}

impl RouteRole {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteRole::Primary => "primary",
            RouteRole::Replica => "replica",
            RouteRole::Proxy => "proxy",
        }
    }
}

/// Upper bounds of the latency buckets, in seconds (Prometheus `le`), from
/// a cache hit's tens of microseconds to a long report's seconds.
pub const BUCKETS_SECONDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The same bounds in nanoseconds, for recording without floating point.
const BUCKETS_NANOS: [u64; 16] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A latency histogram of atomic counters: recording is a few relaxed adds.
/// Every session of a route records into it, so the counters are striped
/// by worker (see [`crate::workers::STRIPES`]): with one set, each record
/// moved the set's cache lines from the other core, several times a
/// transaction.
#[derive(Default)]
pub struct LatencyHistogram {
    stripes: Striped<Counts>,
}

/// One worker's counters.
#[derive(Default)]
struct Counts {
    /// Per bucket (not cumulative); the last one is `+Inf`.
    counts: [AtomicU64; BUCKETS_NANOS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A histogram's figures at one moment.
#[derive(Debug)]
pub struct HistogramSnapshot {
    pub count: u64,
    pub sum_seconds: f64,
    /// Per bucket (not cumulative), by upper bound in seconds; the last
    /// bound is `f64::MAX` (`+Inf`), as `prometheus-client` encodes it.
    pub buckets: Vec<(f64, u64)>,
}

impl LatencyHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BUCKETS_NANOS
            .iter()
            .position(|&bound| nanos <= bound)
            .unwrap_or(BUCKETS_NANOS.len());
        let stripe = self.stripes.mine();
        stripe.counts[bucket].fetch_add(1, Ordering::Relaxed);
        stripe.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = BUCKETS_SECONDS
            .iter()
            .chain(std::iter::once(&f64::MAX))
            .enumerate()
            .map(|(i, bound)| {
                let n = self
                    .stripes
                    .all()
                    .map(|s| s.counts[i].load(Ordering::Relaxed));
                (*bound, n.sum())
            })
            .collect();
        let sum_nanos: u64 = (self.stripes.all())
            .map(|s| s.sum_nanos.load(Ordering::Relaxed))
            .sum();
        HistogramSnapshot {
            count: buckets.iter().map(|(_, n)| n).sum(),
            sum_seconds: sum_nanos as f64 / 1e9,
            buckets,
        }
    }
}

/// Distinct (class, kind) error counters kept; errors beyond are counted
/// under class `??` (a server could send any bytes as its SQLSTATE).
const ERROR_LABELS_MAX: usize = 256;

/// Who raised an error the client received.
pub const KIND_POSTGRES: &str = "postgres";

/// One proxy's statement figures.
pub struct StatementStats {
    histograms: RwLock<HashMap<(String, Route), Arc<LatencyHistogram>>>,
    /// By SQLSTATE class (its first two characters) and kind: `postgres`
    /// for PostgreSQL's own errors, else the proxy's error kind.
    errors: Mutex<HashMap<([u8; 2], &'static str), u64>>,
    /// The SLO window of each database with objectives.
    slos: HashMap<String, Arc<SloWindow>>,
}

impl StatementStats {
    pub fn new(slos: impl IntoIterator<Item = SloWindow>) -> StatementStats {
        StatementStats {
            histograms: RwLock::default(),
            errors: Mutex::default(),
            slos: slos
                .into_iter()
                .map(|w| (w.database().to_owned(), Arc::new(w)))
                .collect(),
        }
    }

    /// The histogram of `route` for `database`, created on first use.
    pub fn histogram(&self, database: &str, route: Route) -> Arc<LatencyHistogram> {
        let key = (database.to_owned(), route);
        if let Some(h) = self.histograms.read().expect("lock poisoned").get(&key) {
            return h.clone();
        }
        self.histograms
            .write()
            .expect("lock poisoned")
            .entry(key)
            .or_default()
            .clone()
    }

    /// Every histogram: database, route, figures.
    pub fn histograms(&self) -> Vec<(String, Route, HistogramSnapshot)> {
        let map = self.histograms.read().expect("lock poisoned");
        let mut all: Vec<_> = map
            .iter()
            .map(|((db, route), h)| (db.clone(), *route, h.snapshot()))
            .collect();
        all.sort_by(|a, b| (&a.0, a.1.shard.to_string()).cmp(&(&b.0, b.1.shard.to_string())));
        all
    }

    /// Counts an error sent to a client with SQLSTATE `code`.
    pub fn count_error(&self, code: &[u8], kind: &'static str) {
        let class = match code {
            [a, b, ..] if a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric() => [*a, *b],
            _ => *b"??",
        };
        let mut errors = self.errors.lock().expect("lock poisoned");
        let key = if errors.len() < ERROR_LABELS_MAX || errors.contains_key(&(class, kind)) {
            (class, kind)
        } else {
            (*b"??", kind)
        };
        *errors.entry(key).or_default() += 1;
    }

    /// Every error counter: SQLSTATE class, kind, count.
    pub fn errors(&self) -> Vec<(String, &'static str, u64)> {
        let errors = self.errors.lock().expect("lock poisoned");
        let mut all: Vec<_> = errors
            .iter()
            .map(|((class, kind), n)| (String::from_utf8_lossy(class).into_owned(), *kind, *n))
            .collect();
        all.sort();
        all
    }

    pub fn slo(&self, database: &str) -> Option<Arc<SloWindow>> {
        self.slos.get(database).cloned()
    }

    /// Every database's SLO window, by database name.
    pub fn slos(&self) -> Vec<Arc<SloWindow>> {
        let mut all: Vec<_> = self.slos.values().cloned().collect();
        all.sort_by(|a, b| a.database().cmp(b.database()));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::STRIPES;

    #[test]
    fn a_histogram_counts_each_observation_in_its_bucket_and_the_sum() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(50)); // <= 0.1 ms
        h.observe(Duration::from_micros(100)); // on the bound: <= 0.1 ms
        h.observe(Duration::from_millis(3)); // <= 5 ms
        h.observe(Duration::from_secs(60)); // +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets.len(), BUCKETS_SECONDS.len() + 1);
        assert_eq!(s.buckets[0], (0.0001, 2));
        assert_eq!(s.buckets[4], (0.0025, 0));
        assert_eq!(s.buckets[5], (0.005, 1));
        assert_eq!(s.buckets.last(), Some(&(f64::MAX, 1)));
        assert!((s.sum_seconds - 60.00315).abs() < 1e-9);
    }

    #[test]
    fn a_snapshot_sums_what_every_worker_recorded() {
        let h = LatencyHistogram::default();
        // This thread is no worker: it records in stripe 0. Another
        // worker's thread records in its own.
        h.observe(Duration::from_micros(50));
        let other = h.stripes.all().nth(STRIPES - 1).unwrap();
        other.counts[0].fetch_add(2, Ordering::Relaxed);
        other.sum_nanos.fetch_add(30_000, Ordering::Relaxed);
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.0001, 3));
        assert!((s.sum_seconds - 0.00008).abs() < 1e-12);
    }

    #[test]
    fn errors_are_counted_by_class_and_kind_with_a_bounded_label_set() {
        let stats = StatementStats::new([]);
        stats.count_error(b"23505", KIND_POSTGRES);
        stats.count_error(b"23503", KIND_POSTGRES);
        stats.count_error(b"53300", "unavailable");
        stats.count_error(b"\xff", KIND_POSTGRES);
        assert_eq!(
            stats.errors(),
            vec![
                ("23".to_owned(), KIND_POSTGRES, 2),
                ("53".to_owned(), "unavailable", 1),
                ("??".to_owned(), KIND_POSTGRES, 1),
            ]
        );
        for i in 0..1000u32 {
            let code = format!("{:02}000", i % 100);
            stats.count_error(code.as_bytes(), if i < 500 { "a" } else { "b" });
        }
        assert!(stats.errors().len() <= ERROR_LABELS_MAX + 2);
    }
}
