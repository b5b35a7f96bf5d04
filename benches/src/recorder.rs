//! `Recorder`: one client's measurements of one target in one round, merged
//! over clients afterwards. Latency goes into an HDR histogram (microseconds,
//! 3 significant digits) and into a per-interval timeline whose length is
//! bounded whatever the duration.
//!
//! A client keeps only its interval in progress and adds it to the round's
//! [`SharedTimeline`] when it moves on to the next: a timeline per client
//! would take clients x intervals histograms (about 25 KB each), gigabytes
//! for a thousand clients over ten minutes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;

/// The highest latency recorded exactly; slower operations count as this.
const LATENCY_US_MAX: u64 = 3_600_000_000;
/// The most points of a timeline: long runs get wider intervals.
pub const TIMELINE_POINTS_MAX: u64 = 600;

/// Measurements of one client (or, merged, of all clients).
#[derive(Clone, Debug)]
pub struct Recorder {
    pub latency: Histogram<u64>,
    /// Errors by SQLSTATE (`other` for errors without one).
    pub errors: BTreeMap<String, u64>,
    pub timeline: Vec<Interval>,
    /// The width of each timeline interval.
    pub interval: Duration,
    /// A client's interval in progress, by index, and where it goes when
    /// done (the client's own `timeline` is then empty).
    current: Option<(usize, Interval)>,
    shared: Option<Arc<SharedTimeline>>,
}

/// The timeline all clients of a round add their intervals to.
#[derive(Debug)]
pub struct SharedTimeline {
    intervals: Vec<Mutex<Interval>>,
}

impl SharedTimeline {
    pub fn new(duration: Duration) -> Arc<SharedTimeline> {
        let (_, points) = shape(duration);
        Arc::new(SharedTimeline {
            intervals: (0..points).map(|_| Mutex::new(Interval::new())).collect(),
        })
    }

    fn add(&self, i: usize, interval: &Interval) {
        let last = self.intervals.len() - 1;
        let mut mine = self.intervals[i.min(last)].lock().expect("lock poisoned");
        mine.merge(interval);
    }

    /// The intervals, once every client has finished.
    pub fn take(&self) -> Vec<Interval> {
        self.intervals
            .iter()
            .map(|m| std::mem::replace(&mut *m.lock().expect("lock poisoned"), Interval::new()))
            .collect()
    }
}

/// One interval of the timeline.
#[derive(Clone, Debug)]
pub struct Interval {
    pub latency: Histogram<u64>,
    pub errors: u64,
}

impl Interval {
    fn new() -> Interval {
        // Two digits per interval: enough for a p99 line, a tenth the memory.
        Interval {
            latency: histogram(2),
            errors: 0,
        }
    }

    fn merge(&mut self, other: &Interval) {
        self.latency
            .add(&other.latency)
            .expect("histograms with the same bounds merge");
        self.errors += other.errors;
    }
}

/// The interval width and the number of intervals for a run of `duration`.
fn shape(duration: Duration) -> (Duration, usize) {
    let interval = interval_for(duration);
    let points = duration.as_millis().div_ceil(interval.as_millis()).max(1) as usize;
    (interval, points)
}

fn histogram(significant_digits: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, significant_digits)
        .expect("constant bounds are valid")
}

/// The timeline interval for a run of `duration`: one second, or wider so
/// there are at most [`TIMELINE_POINTS_MAX`] of them.
pub fn interval_for(duration: Duration) -> Duration {
    let min_width_ms = duration.as_millis().div_ceil(TIMELINE_POINTS_MAX as u128);
    Duration::from_millis((min_width_ms as u64).max(1000))
}

impl Recorder {
    /// An empty recorder for a measured `duration`.
    pub fn new(duration: Duration) -> Recorder {
        let (interval, points) = shape(duration);
        Recorder {
            latency: histogram(3),
            errors: BTreeMap::new(),
            timeline: (0..points).map(|_| Interval::new()).collect(),
            interval,
            current: None,
            shared: None,
        }
    }

    /// A client's recorder: its timeline goes into `shared`, an interval
    /// at a time; call [`Recorder::finish`] when the client is done.
    pub fn for_client(duration: Duration, shared: Arc<SharedTimeline>) -> Recorder {
        Recorder {
            latency: histogram(3),
            errors: BTreeMap::new(),
            timeline: Vec::new(),
            interval: interval_for(duration),
            current: None,
            shared: Some(shared),
        }
    }

    /// Adds the interval in progress to the shared timeline.
    pub fn finish(&mut self) {
        if let (Some((i, interval)), Some(shared)) = (self.current.take(), &self.shared) {
            shared.add(i, &interval);
        }
    }

    fn slot(&mut self, at: Duration) -> &mut Interval {
        let i = (at.as_nanos() / self.interval.as_nanos()) as usize;
        if self.shared.is_none() {
            let last = self.timeline.len() - 1;
            return &mut self.timeline[i.min(last)];
        }
        if self.current.as_ref().is_some_and(|(c, _)| *c != i) {
            self.finish();
        }
        &mut self.current.get_or_insert_with(|| (i, Interval::new())).1
    }

    /// A successful operation scheduled `at` after measuring began.
    pub fn success(&mut self, at: Duration, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, LATENCY_US_MAX);
        self.latency.saturating_record(us);
        self.slot(at).latency.saturating_record(us);
    }

    /// A failed operation scheduled `at` after measuring began.
    pub fn error(&mut self, at: Duration, code: &str) {
        *self.errors.entry(code.to_owned()).or_default() += 1;
        self.slot(at).errors += 1;
    }

    /// Adds `other`'s measurements (same duration) to these.
    pub fn merge(&mut self, other: &Recorder) {
        self.latency
            .add(&other.latency)
            .expect("histograms with the same bounds merge");
        for (code, n) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += n;
        }
        for (mine, theirs) in self.timeline.iter_mut().zip(&other.timeline) {
            mine.merge(theirs);
        }
    }

    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_is_bounded_and_slots_clamp() {
        assert_eq!(
            interval_for(Duration::from_secs(10)),
            Duration::from_secs(1)
        );
        assert_eq!(
            interval_for(Duration::from_secs(6000)),
            Duration::from_secs(10)
        );
        let mut r = Recorder::new(Duration::from_millis(2500));
        assert_eq!(r.timeline.len(), 3);
        r.success(Duration::from_millis(100), Duration::from_micros(250));
        r.success(Duration::from_secs(9), Duration::from_millis(2));
        r.error(Duration::from_millis(1500), "40001");
        let mut merged = Recorder::new(Duration::from_millis(2500));
        merged.merge(&r);
        merged.merge(&r);
        assert_eq!(merged.latency.len(), 4);
        assert_eq!(merged.timeline[0].latency.len(), 2);
        assert_eq!(
            merged.timeline[2].latency.len(),
            2,
            "late ops land in the last slot"
        );
        assert_eq!(merged.timeline[1].errors, 2);
        assert_eq!(merged.errors_total(), 2);
    }

    #[test]
    fn clients_add_their_intervals_to_the_shared_timeline() {
        let duration = Duration::from_millis(2500);
        let shared = SharedTimeline::new(duration);
        for _ in 0..2 {
            let mut r = Recorder::for_client(duration, Arc::clone(&shared));
            r.success(Duration::from_millis(100), Duration::from_micros(250));
            r.success(Duration::from_millis(900), Duration::from_micros(300));
            r.error(Duration::from_millis(1500), "40001");
            r.success(Duration::from_secs(9), Duration::from_millis(2));
            assert!(r.timeline.is_empty(), "a client keeps no timeline");
            r.finish();
            assert_eq!(r.latency.len(), 3);
        }
        let timeline = shared.take();
        assert_eq!(timeline.len(), 3);
        assert_eq!(timeline[0].latency.len(), 4);
        assert_eq!(timeline[1].errors, 2);
        assert_eq!(
            timeline[2].latency.len(),
            2,
            "late ops land in the last slot"
        );
    }
}
