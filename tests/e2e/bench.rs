//! `shardline bench`, run in-process against a direct PostgreSQL and a
//! Shardline proxy in front of it: every scenario produces a report whose
//! JSON, markdown and chart are complete, with operations counted for every
//! target; with a metadata group, `--init` makes the table sharded.

use std::path::Path;

use clap::Parser;
use serde_json::Value;

use crate::harness::{Env, APP_PASSWORD};
use crate::sharded_env::ShardedEnv;

const ROWS: i64 = 1000;

const CUSTOM_SQL: &str = "\
-- a point read and a hot read, as a custom file would state them
-- $1: uniform 1 1000
-- $2: zipf 1 1000 1.1
-- $3: const 5
SELECT id, v FROM shardline_bench WHERE id IN ($1, $2) LIMIT $3;
";

/// Runs the bench with `args` plus the targets, one 1 s round and `--init`,
/// writing into `out`; returns the parsed report.json.
async fn bench(targets: &[(&str, String)], args: &[&str], out: &Path) -> Value {
    let mut argv: Vec<String> = ["bench", "--init", "--rounds", "1", "--duration", "1s"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.extend(["--warmup", "100ms", "--clients", "2"].map(String::from));
    argv.extend(["--rows".into(), ROWS.to_string()]);
    argv.extend(["--out".into(), out.display().to_string()]);
    for (name, url) in targets {
        argv.extend(["--target".into(), format!("{name}={url}")]);
    }
    argv.extend(args.iter().map(|s| s.to_string()));
    let parsed = benches::BenchArgs::try_parse_from(&argv).expect("valid arguments");
    let written = benches::main(parsed)
        .await
        .unwrap_or_else(|e| panic!("bench {args:?}: {e:#}"));
    assert_eq!(written.json, out.join("report.json"));
    let json = std::fs::read_to_string(&written.json).expect("report.json exists");
    serde_json::from_str(&json).expect("report.json parses")
}

/// Checks a report's shape and that every target did work without errors.
fn check_report(report: &Value, out: &Path, scenario: &str, names: &[&str]) {
    assert_eq!(report["settings"]["scenario"]["name"], scenario);
    let targets = report["targets"].as_array().expect("targets");
    let got: Vec<&str> = targets
        .iter()
        .map(|t| t["name"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(got, names, "{scenario}");
    for t in targets {
        let s = &t["summary"];
        let context = format!("{scenario}/{}: {s}", t["name"]);
        assert!(s["ops"].as_u64().expect("ops") > 0, "{context}");
        assert!(
            s["ops_per_s"].as_f64().expect("ops_per_s") > 0.0,
            "{context}"
        );
        assert_eq!(s["errors"], 0, "{context}");
        for p in ["mean", "p50", "p90", "p99", "p99_9", "max"] {
            assert!(
                s["latency_ms"][p].as_f64().expect(p) > 0.0,
                "{context}: {p}"
            );
        }
        assert!(
            t["ratio"]["ops_per_s"].as_f64().expect("ratio") > 0.0,
            "{context}"
        );
        assert!(
            t["ratio"]["p99"].as_f64().expect("ratio") > 0.0,
            "{context}"
        );
        assert!(
            !t["url"].as_str().expect("url").contains(APP_PASSWORD),
            "{context}"
        );
        let rounds = t["rounds"].as_array().expect("rounds");
        assert_eq!(rounds.len(), 1, "{context}");
        let timeline = rounds[0]["timeline"].as_array().expect("timeline");
        assert!(!timeline.is_empty(), "{context}");
        assert!(timeline
            .iter()
            .all(|p| p["t_s"].is_f64() && p["p99_ms"].is_f64()));
    }
    assert_eq!(targets[0]["ratio"]["ops_per_s"], 1.0);

    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md exists");
    assert!(md.contains("| target | ops/s | p50 ms | p99 ms |"), "{md}");
    for name in names {
        assert!(md.contains(&format!("| {name} | ")), "{md}");
    }
    let svg = std::fs::read_to_string(out.join("chart.svg")).expect("chart.svg exists");
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg:.200}"
    );
    for name in names {
        assert!(svg.contains(name), "the chart's legend names {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_reports_postgres_and_shardline() {
    // Arrange: one PostgreSQL, a proxy in front of it, a custom SQL file.
    let env = Env::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sql = dir.path().join("custom.sql");
    std::fs::write(&sql, CUSTOM_SQL).expect("write the custom SQL");
    let targets = [
        ("postgres", env.pg.url("postgres", "postgres", "postgres")),
        ("shardline", env.url("app", APP_PASSWORD, "db")),
    ];
    let sql = sql.display().to_string();
    // Inserts last: they grow the table, so the next --init would reload it.
    let runs: [(&str, Vec<&str>); 8] = [
        ("point-select", vec![]),
        ("point-select", vec!["--rate", "200"]),
        ("point-update", vec![]),
        ("read-write", vec!["--read-ratio", "0.5"]),
        ("hot-keys", vec!["--skew", "1.2"]),
        ("scatter", vec![]),
        ("custom", vec!["--sql", &sql]),
        ("insert", vec![]),
    ];

    for (i, (scenario, extra)) in runs.iter().enumerate() {
        // Act
        let out = dir.path().join(format!("{i}-{scenario}"));
        let mut args = vec!["--scenario", scenario];
        args.extend(extra.iter().copied());
        let report = bench(&targets, &args, &out).await;
        // Check
        check_report(&report, &out, scenario, &["postgres", "shardline"]);
        if extra.contains(&"--rate") {
            assert_eq!(report["settings"]["load"]["mode"], "open");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_with_a_metadata_group_shards_the_table() {
    // Arrange: two shards behind a proxy; the baseline in its own database on
    // shard 0, so it holds the whole table.
    let env = ShardedEnv::start(2).await;
    env.direct(0)
        .await
        .batch_execute("CREATE DATABASE baseline")
        .await
        .expect("create the baseline database");
    let dir = tempfile::tempdir().expect("tempdir");
    let targets = [
        (
            "postgres",
            env.pg[0].url("postgres", "postgres", "baseline"),
        ),
        (
            "shardline",
            format!(
                "postgres://app:{APP_PASSWORD}@127.0.0.1:{}/db",
                env.addr.port()
            ),
        ),
    ];
    let meta = env.meta.addrs().join(",");

    // Act: point selects and a scatter aggregate over the sharded table.
    for scenario in ["point-select", "scatter"] {
        let out = dir.path().join(scenario);
        let report = bench(&targets, &["--scenario", scenario, "--meta", &meta], &out).await;
        check_report(&report, &out, scenario, &["postgres", "shardline"]);
    }

    // Check: the table is declared and its rows are split over both shards.
    let (state, _) = env.meta.read().await.expect("read the map");
    assert!(state.map.tables.contains_key("shardline_bench"));
    let mut total = 0;
    for shard in 0..2 {
        let n: i64 = env
            .direct(shard)
            .await
            .query_one("SELECT count(*) FROM shardline_bench", &[])
            .await
            .expect("count on a shard")
            .get(0);
        assert!(n > 0 && n < ROWS, "shard {shard} holds {n} of {ROWS} rows");
        total += n;
    }
    assert_eq!(total, ROWS);
}
