//! Stats: traffic per database for the console's `SHOW STATS` and for
//! `/metrics`.
//!
//! Totals are the sessions' own counters ([`crate::clients::Counters`])
//! summed when asked, plus the pools' checkout counts from bb8. Averages
//! (`avg_*`, as PgBouncer's) cover the last complete `[admin]
//! stats_period` (60 s by default): a task takes the totals once per period
//! and keeps the differences, so they are 0 until one period has passed.

use std::collections::BTreeMap;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::clients::Totals;
use crate::shared::Shared;

/// Everything `SHOW STATS` counts for one database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatabaseTotals {
    pub clients: Totals,
    /// Server connections handed to a client (checkouts).
    pub assignments: u64,
}

/// Per second, or per transaction, query or checkout, over one period.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Averages {
    pub xact_count: u64,
    pub query_count: u64,
    pub assignment_count: u64,
    pub recv: u64,
    pub sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
}

impl Averages {
    fn between(old: &DatabaseTotals, new: &DatabaseTotals, elapsed: Duration) -> Averages {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let (o, n) = (&old.clients, &new.clients);
        let rate = |a: u64, b: u64| (b.saturating_sub(a) as f64 / secs).round() as u64;
        let per = |sum_a: u64, sum_b: u64, a: u64, b: u64| {
            let sum = sum_b.saturating_sub(sum_a);
            sum.checked_div(b.saturating_sub(a)).unwrap_or(0)
        };
        Averages {
            xact_count: rate(o.xacts, n.xacts),
            query_count: rate(o.queries, n.queries),
            assignment_count: rate(old.assignments, new.assignments),
            recv: rate(o.received, n.received),
            sent: rate(o.sent, n.sent),
            xact_time: per(o.xact_us, n.xact_us, o.xacts, n.xacts),
            query_time: per(o.query_us, n.query_us, o.queries, n.queries),
            wait_time: per(o.wait_us, n.wait_us, old.assignments, new.assignments),
        }
    }
}

/// The averages of the last period, by database.
#[derive(Default)]
pub struct StatsWindow {
    averages: Mutex<BTreeMap<String, Averages>>,
}

impl StatsWindow {
    pub fn averages(&self, database: &str) -> Averages {
        let averages = self.averages.lock().expect("lock poisoned");
        averages.get(database).copied().unwrap_or_default()
    }
}

/// Totals by database: every configured database, and any other a client
/// used.
pub fn totals(shared: &Shared) -> BTreeMap<String, DatabaseTotals> {
    let mut all: BTreeMap<String, DatabaseTotals> = (shared.config.databases.iter())
        .map(|d| (d.name.clone(), DatabaseTotals::default()))
        .collect();
    for (database, clients) in shared.clients.totals() {
        if database != crate::admin::DATABASE {
            all.entry(database).or_default().clients = clients;
        }
    }
    for ((database, _, _), pool) in shared.pools.all() {
        all.entry(database).or_default().assignments += pool.assignments();
    }
    all
}

/// Recomputes the averages once per `stats_period` (read live) for as long
/// as the proxy lives.
pub async fn sample(shared: Weak<Shared>) {
    let mut last: Option<(Instant, BTreeMap<String, DatabaseTotals>)> = None;
    loop {
        let period = match shared.upgrade() {
            Some(shared) => {
                let now = Instant::now();
                let current = totals(&shared);
                if let Some((at, previous)) = &last {
                    let elapsed = now - *at;
                    let averages = (current.iter())
                        .map(|(name, new)| {
                            let old = previous.get(name).copied().unwrap_or_default();
                            (name.clone(), Averages::between(&old, new, elapsed))
                        })
                        .collect();
                    *shared.stats.averages.lock().expect("lock poisoned") = averages;
                }
                last = Some((now, current));
                shared.effective().admin.stats_period
            }
            None => return,
        };
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_are_rates_and_means() {
        let old = DatabaseTotals::default();
        let new = DatabaseTotals {
            clients: Totals {
                xacts: 20,
                queries: 40,
                received: 2000,
                sent: 4000,
                xact_us: 20_000,
                query_us: 8_000,
                wait_us: 500,
            },
            assignments: 10,
        };
        let a = Averages::between(&old, &new, Duration::from_secs(10));
        assert_eq!((a.xact_count, a.query_count, a.assignment_count), (2, 4, 1));
        assert_eq!((a.recv, a.sent), (200, 400));
        assert_eq!((a.xact_time, a.query_time, a.wait_time), (1000, 200, 50));
        assert_eq!(
            Averages::between(&new, &new, Duration::from_secs(10)),
            Averages::default()
        );
    }
}
