//! `Report`: the figures of a run (per target: all rounds merged, each
//! round, and each round's timeline) with every target's ratio to the
//! baseline, and the files made from it: `report.json`, `report.md` and
//! `chart.svg`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::config::{BenchConfig, Load};
use crate::recorder::Recorder;
use crate::run::TargetRound;
use crate::Written;

/// Everything a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub settings: BenchConfig,
    /// In the order given; the first is the baseline.
    pub targets: Vec<TargetReport>,
}

/// One target over all rounds.
#[derive(Clone, Debug, Serialize)]
pub struct TargetReport {
    pub name: String,
    pub url: String,
    pub summary: Summary,
    /// This target's figures divided by the baseline's.
    pub ratio: Ratio,
    pub rounds: Vec<RoundReport>,
}

/// Aggregate figures of a set of operations.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Successful operations.
    pub ops: u64,
    pub ops_per_s: f64,
    pub latency_ms: Latency,
    pub errors: u64,
    /// Errors by SQLSTATE (`other`: no SQLSTATE, `timeout`: cut off at the end).
    pub errors_by_sqlstate: BTreeMap<String, u64>,
    /// Measured seconds.
    pub seconds: f64,
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

/// A target's figures over the baseline's (1.0 for the baseline itself).
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub ops_per_s: f64,
    pub p99: f64,
}

/// One target in one round.
#[derive(Clone, Debug, Serialize)]
pub struct RoundReport {
    /// From 1.
    pub round: u32,
    pub summary: Summary,
    pub timeline: Vec<Point>,
}

/// One interval of a round's timeline.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// Seconds from the start of measuring to the end of the interval.
    pub t_s: f64,
    pub ops_per_s: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn latency(h: &Histogram<u64>) -> Latency {
    Latency {
        mean: h.mean() / 1000.0,
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        p99_9: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    }
}

fn summary(recorder: &Recorder, seconds: f64) -> Summary {
    Summary {
        ops: recorder.latency.len(),
        ops_per_s: recorder.latency.len() as f64 / seconds,
        latency_ms: latency(&recorder.latency),
        errors: recorder.errors_total(),
        errors_by_sqlstate: recorder.errors.clone(),
        seconds,
    }
}

/// `a / b`, or 0 when the baseline has nothing to compare with.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

impl Report {
    /// The report of `results[target][round]`.
    pub fn build(config: &BenchConfig, results: &[Vec<TargetRound>]) -> Report {
        let round_s = config.duration.as_secs_f64();
        let mut targets: Vec<TargetReport> = config
            .targets
            .iter()
            .zip(results)
            .map(|(target, rounds)| {
                let mut all = Recorder::new(config.duration);
                let rounds = (1..)
                    .zip(rounds)
                    .map(|(round, r)| {
                        all.merge(&r.recorder);
                        let width = r.recorder.interval.as_secs_f64();
                        let timeline = (1..)
                            .zip(&r.recorder.timeline)
                            .map(|(i, point)| {
                                // The last interval may be cut short by the duration.
                                let end = (i as f64 * width).min(round_s);
                                let span = end - (i - 1) as f64 * width;
                                Point {
                                    t_s: end,
                                    ops_per_s: point.latency.len() as f64 / span,
                                    p99_ms: ms(point.latency.value_at_quantile(0.99)),
                                    errors: point.errors,
                                }
                            })
                            .collect();
                        RoundReport {
                            round,
                            summary: summary(&r.recorder, round_s),
                            timeline,
                        }
                    })
                    .collect();
                TargetReport {
                    name: target.name.clone(),
                    url: target.redacted_url(),
                    summary: summary(&all, round_s * config.rounds as f64),
                    ratio: Ratio {
                        ops_per_s: 1.0,
                        p99: 1.0,
                    },
                    rounds,
                }
            })
            .collect();
        if let Some(base) = targets.first().map(|t| t.summary.clone()) {
            for t in &mut targets {
                t.ratio = Ratio {
                    ops_per_s: ratio(t.summary.ops_per_s, base.ops_per_s),
                    p99: ratio(t.summary.latency_ms.p99, base.latency_ms.p99),
                };
            }
        }
        Report {
            settings: config.clone(),
            targets,
        }
    }

    /// One row per target: throughput, latency, errors and ratios.
    pub fn markdown_table(&self) -> String {
        let mut out = String::from(
            "| target | ops/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | ops/s vs base | p99 vs base |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for t in &self.targets {
            let s = &t.summary;
            let l = &s.latency_ms;
            writeln!(
                out,
                "| {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {:.2} | {:.2} |",
                t.name,
                s.ops_per_s,
                l.p50,
                l.p99,
                l.p99_9,
                l.max,
                errors_cell(s),
                t.ratio.ops_per_s,
                t.ratio.p99
            )
            .expect("writing to a String");
        }
        out
    }

    /// `report.md`: settings, the table, each round.
    pub fn markdown(&self) -> String {
        let s = &self.settings;
        let load = match s.load {
            Load::Closed => format!("closed loop, {} clients", s.clients),
            Load::Open { rate } => format!("open loop, {rate} ops/s over {} clients", s.clients),
        };
        let mut out = format!(
            "# shardline bench: {}\n\n\
             - load: {load}\n\
             - {} round(s) of {} per target (after {} warmup), targets alternating\n\
             - table `shardline_bench`, {} rows\n\
             - baseline: `{}`\n\n",
            s.scenario.name(),
            s.rounds,
            humantime::format_duration(s.duration),
            humantime::format_duration(s.warmup),
            s.rows,
            self.targets.first().map_or("", |t| t.name.as_str()),
        );
        for t in &self.targets {
            writeln!(out, "- `{}`: {}", t.name, t.url).expect("writing to a String");
        }
        out.push('\n');
        out.push_str(&self.markdown_table());
        out.push_str(
            "\n## Rounds\n\n| round | target | ops/s | p50 ms | p99 ms | errors |\n\
             |---:|---|---:|---:|---:|---:|\n",
        );
        for round in 0..s.rounds as usize {
            for t in &self.targets {
                let r = &t.rounds[round].summary;
                writeln!(
                    out,
                    "| {} | {} | {:.0} | {:.3} | {:.3} | {} |",
                    round + 1,
                    t.name,
                    r.ops_per_s,
                    r.latency_ms.p50,
                    r.latency_ms.p99,
                    errors_cell(r)
                )
                .expect("writing to a String");
            }
        }
        out.push_str("\nThroughput and p99 over time: `chart.svg`.\n");
        out
    }

    /// Writes `report.json`, `report.md` and `chart.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<Written> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let written = Written {
            json: dir.join("report.json"),
            markdown: dir.join("report.md"),
            chart: dir.join("chart.svg"),
        };
        let json = serde_json::to_string_pretty(self).expect("a report serializes");
        std::fs::write(&written.json, json)
            .with_context(|| format!("cannot write {}", written.json.display()))?;
        std::fs::write(&written.markdown, self.markdown())
            .with_context(|| format!("cannot write {}", written.markdown.display()))?;
        crate::chart::write(self, &written.chart)
            .with_context(|| format!("cannot write {}", written.chart.display()))?;
        Ok(written)
    }
}

/// The error count, with the SQLSTATEs when there are any.
fn errors_cell(s: &Summary) -> String {
    if s.errors == 0 {
        return "0".into();
    }
    let codes: Vec<String> = s
        .errors_by_sqlstate
        .iter()
        .map(|(code, n)| format!("{code}: {n}"))
        .collect();
    format!("{} ({})", s.errors, codes.join(", "))
}
