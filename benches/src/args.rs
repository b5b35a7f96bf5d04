//! `BenchArgs`: the command line of `shardline bench`, and its resolution
//! into a checked [`BenchConfig`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};

use crate::config::{BenchConfig, Load, Target, CLIENTS_MAX, DURATION_MAX, ROUNDS_MAX};
use crate::custom::CustomSql;
use crate::dev_cluster;
use crate::scenario::Scenario;

const AFTER_HELP: &str = "\
Targets run alternately: each round runs every target once, in order, so drift
of the machine hits all of them; the first target is the baseline and every
target's throughput and p99 are reported as ratios to it.

Without --target, the dev cluster of `shardline dev` in --dir is used: target
`postgres` is its first shard's PostgreSQL (database `postgres`, holding the
whole table) and `shardline` its proxy (database `app`). With the dev cluster,
--init declares shardline_bench sharded by id (16 partitions) in its metadata
group; with other targets, pass --meta to do the same, else the table is a
plain table (on a Shardline proxy: on its home shard).

The table: shardline_bench (id int8 PRIMARY KEY, v int8 NOT NULL, pad text
NOT NULL) with ids 1..=--rows. --init (re)creates and loads it through every
target that does not already hold exactly --rows rows.

Custom scenario (--scenario custom --sql FILE): the file holds one statement
with parameters $1..$n and, for each, a header line saying how it is drawn:
  -- $1: uniform 1 100000          integer, uniform in 1..=100000
  -- $2: zipf 1 100000 1.1         integer in 1..=100000, Zipf skew 1.1 (1 hottest)
  -- $3: const 42                  always this value
  SELECT * FROM shardline_bench WHERE id = $1 OR id = $2 LIMIT $3
Values are sent as the type PostgreSQL infers (int2, int4, int8, float4,
float8 or text); other lines starting with -- are comments.

Writes report.json, report.md and chart.svg into --out and prints the table.";

/// Load-test PostgreSQL targets (e.g. direct PostgreSQL vs Shardline) and compare them.
#[derive(Parser, Debug)]
#[command(name = "shardline bench", after_help = AFTER_HELP)]
pub struct BenchArgs {
    /// A target as NAME=URL (postgres://user:password@host:port/db); repeat
    /// for each; the first is the baseline.
    #[arg(long = "target", value_name = "NAME=URL")]
    targets: Vec<String>,
    /// Without --target: the `shardline dev` directory to find targets in.
    #[arg(long, default_value = "./.shardline/dev")]
    dir: PathBuf,
    /// The operation: a primary-key read (point-select), an update by key
    /// (point-update), a mix of both (read-write), Zipfian-key reads
    /// (hot-keys), a key-less count/sum over the table (scatter), inserts of
    /// new ids (insert), or a statement from --sql (custom).
    #[arg(long, value_enum, default_value_t = ScenarioArg::PointSelect)]
    scenario: ScenarioArg,
    /// The SQL file of `--scenario custom` (format below).
    #[arg(long, value_name = "FILE")]
    sql: Option<PathBuf>,
    /// read-write: the share of point selects (the rest are point updates).
    #[arg(long, default_value_t = 0.9)]
    read_ratio: f64,
    /// hot-keys: the Zipf exponent of the ids (0 is uniform; higher is hotter).
    #[arg(long, default_value_t = 0.99)]
    skew: f64,
    /// Concurrent clients per target, each with its own connection.
    #[arg(long, default_value_t = 8)]
    clients: u32,
    /// Open loop: total operations per second over all clients, on a fixed
    /// schedule; latency counts from each operation's scheduled start.
    /// Without it: closed loop.
    #[arg(long, value_name = "OPS_PER_S")]
    rate: Option<f64>,
    /// Measured time per target per round (e.g. 10s, 1m).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Unrecorded time per target per round before measuring.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Rounds; each runs every target once.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Rows of shardline_bench (ids 1..=rows).
    #[arg(long, default_value_t = 100_000)]
    rows: i64,
    /// Create and load shardline_bench first (see below).
    #[arg(long)]
    init: bool,
    /// Metadata group (host:port, comma-separated) in which --init declares
    /// the table sharded; defaults to the dev cluster's without --target.
    #[arg(long, value_delimiter = ',')]
    meta: Vec<String>,
    /// Directory for report.json, report.md and chart.svg.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ScenarioArg {
    PointSelect,
    PointUpdate,
    ReadWrite,
    HotKeys,
    Scatter,
    Insert,
    Custom,
}

impl BenchArgs {
    /// Checks the arguments and finds the targets.
    pub fn resolve(self) -> anyhow::Result<BenchConfig> {
        let mut meta = self.meta;
        let targets = if self.targets.is_empty() {
            let dev = dev_cluster::discover(&self.dir)?;
            if meta.is_empty() {
                meta = dev.meta;
            }
            dev.targets
        } else {
            self.targets
                .iter()
                .map(|t| parse_target(t))
                .collect::<anyhow::Result<Vec<_>>>()?
        };
        for (i, t) in targets.iter().enumerate() {
            if targets[..i].iter().any(|o| o.name == t.name) {
                bail!("two targets are named {}", t.name);
            }
        }
        if self.sql.is_some() && !matches!(self.scenario, ScenarioArg::Custom) {
            bail!("--sql is for --scenario custom");
        }
        let scenario = match self.scenario {
            ScenarioArg::PointSelect => Scenario::PointSelect,
            ScenarioArg::PointUpdate => Scenario::PointUpdate,
            ScenarioArg::ReadWrite => {
                if !(0.0..=1.0).contains(&self.read_ratio) {
                    bail!("--read-ratio must be between 0 and 1");
                }
                Scenario::ReadWrite {
                    read_ratio: self.read_ratio,
                }
            }
            ScenarioArg::HotKeys => {
                if !(self.skew >= 0.0 && self.skew.is_finite()) {
                    bail!("--skew must be a number >= 0");
                }
                Scenario::HotKeys { skew: self.skew }
            }
            ScenarioArg::Scatter => Scenario::Scatter,
            ScenarioArg::Insert => Scenario::Insert,
            ScenarioArg::Custom => {
                let path = self.sql.context("--scenario custom needs --sql FILE")?;
                Scenario::Custom(CustomSql::load(&path)?)
            }
        };
        if !(1..=CLIENTS_MAX).contains(&self.clients) {
            bail!("--clients must be 1 to {CLIENTS_MAX}");
        }
        if !(1..=ROUNDS_MAX).contains(&self.rounds) {
            bail!("--rounds must be 1 to {ROUNDS_MAX}");
        }
        if self.duration.is_zero() || self.duration > DURATION_MAX || self.warmup > DURATION_MAX {
            bail!("--duration must be above zero and --duration and --warmup at most a day");
        }
        if self.rows < 1 {
            bail!("--rows must be at least 1");
        }
        let load = match self.rate {
            None => Load::Closed,
            Some(rate) if rate > 0.0 && rate.is_finite() => Load::Open { rate },
            Some(_) => bail!("--rate must be above zero"),
        };
        Ok(BenchConfig {
            targets,
            scenario,
            clients: self.clients,
            load,
            duration: self.duration,
            warmup: self.warmup,
            rounds: self.rounds,
            rows: self.rows,
            init: self.init,
            meta,
            out: self.out,
        })
    }
}

/// `NAME=URL`, the URL checked as a tokio-postgres connection string.
fn parse_target(arg: &str) -> anyhow::Result<Target> {
    let (name, url) = arg
        .split_once('=')
        .filter(|(name, _)| !name.is_empty() && !name.contains(':'))
        .with_context(|| format!("--target {arg}: expected NAME=URL"))?;
    url.parse::<tokio_postgres::Config>()
        .map_err(|e| anyhow::anyhow!("--target {name}: {e}"))?;
    Ok(Target {
        name: name.to_owned(),
        url: url.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(args: &[&str]) -> anyhow::Result<BenchConfig> {
        let argv = std::iter::once("bench").chain(args.iter().copied());
        BenchArgs::try_parse_from(argv)?.resolve()
    }

    #[test]
    fn targets_keep_their_order_and_defaults_apply() {
        let c = resolve(&[
            "--target",
            "pg=postgres://u:p@127.0.0.1:5432/db",
            "--target",
            "sl=postgres://u:p@127.0.0.1:6432/db",
        ])
        .expect("valid");
        let names: Vec<&str> = c.targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["pg", "sl"]);
        assert_eq!((c.clients, c.rounds, c.rows), (8, 3, 100_000));
        assert_eq!(c.duration, Duration::from_secs(10));
        assert!(matches!(c.load, Load::Closed));
        assert!(matches!(c.scenario, Scenario::PointSelect));
    }

    #[test]
    fn bad_arguments_are_refused() {
        let t = "--target=a=postgres://u@h/db";
        for (args, why) in [
            (vec!["--target", "nourl"], "NAME=URL"),
            (vec![t, "--target=a=postgres://u@h/db"], "two targets"),
            (vec![t, "--scenario", "custom"], "needs --sql"),
            (vec![t, "--sql", "x.sql"], "--sql is for"),
            (vec![t, "--clients", "0"], "--clients"),
            (vec![t, "--rate", "0"], "--rate"),
            (vec![t, "--duration", "0s"], "--duration"),
            (
                vec![t, "--scenario", "read-write", "--read-ratio", "2"],
                "--read-ratio",
            ),
            (
                vec!["--dir", "/nonexistent/dev"],
                "start one with `shardline dev`",
            ),
        ] {
            let e = format!("{:#}", resolve(&args).expect_err(why));
            assert!(e.contains(why), "{args:?}: {e}");
        }
    }
}
