//! Benchmarks for Shardline: criterion micro-benchmarks (in `benches/`) and
//! the load harness behind `shardline bench`.
//!
//! The harness is a library so the binary only parses arguments and the
//! end-to-end tests can run it in-process. It compares targets (PostgreSQL
//! URLs; the first is the baseline) under the same workload, alternating
//! them in rounds so machine drift hits all of them alike, and reports each
//! target's ratio to the baseline.

mod args;
mod chart;
mod config;
mod custom;
mod dev_cluster;
mod recorder;
mod report;
mod run;
mod scenario;
mod schema;

pub use args::BenchArgs;
pub use config::{BenchConfig, Load, Target};
pub use report::Report;
pub use scenario::Scenario;

/// The files a run wrote.
#[derive(Debug)]
pub struct Written {
    pub json: std::path::PathBuf,
    pub markdown: std::path::PathBuf,
    pub chart: std::path::PathBuf,
}

/// Runs `shardline bench`: resolves the targets, optionally creates the
/// schema, runs every round, prints the table on stdout and writes the
/// report files.
pub async fn main(args: BenchArgs) -> anyhow::Result<Written> {
    let config = args.resolve()?;
    let report = run::run(&config).await?;
    let written = report.write(&config.out)?;
    println!("{}", report.markdown_table());
    println!("wrote {}", written.json.display());
    println!("wrote {}", written.markdown.display());
    println!("wrote {}", written.chart.display());
    Ok(written)
}
