//! The runner: every round runs every target in turn (round 1: target 1, 2,
//! ...; then round 2), so slow drift of the machine (thermal, background
//! work, caches) hits all targets alike. Per target and round: connect the
//! clients, prepare, warm up, measure, disconnect.
//!
//! Closed loop: each client sends its next operation when the last returns.
//! Open loop: each client has a fixed schedule (rate / clients per second,
//! the clients staggered) and latency is measured from the scheduled start,
//! so a stall is charged to every operation it delayed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

use crate::config::{BenchConfig, Load, Target};
use crate::recorder::{Recorder, SharedTimeline};
use crate::report::Report;
use crate::scenario::{InsertIds, Scenario, Workload};
use crate::schema;

/// How long a client may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an operation in flight at the end may still take before it is
/// cut off (counted as error `timeout`); so runs always end.
const OP_GRACE: Duration = Duration::from_secs(5);
/// Pause between attempts to reconnect a client whose connection broke.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// The measurements of one target in one round.
pub struct TargetRound {
    pub recorder: Recorder,
}

/// Connects to `target` (tokio-postgres, no TLS), with a timeout.
pub async fn connect(target: &Target) -> anyhow::Result<Client> {
    let connecting = tokio_postgres::connect(&target.url, NoTls);
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {CONNECT_TIMEOUT:?}"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| format!("cannot connect to {}", target.redacted_url()))?;
    tokio::spawn(async move {
        // Its errors reach the client's calls; nothing to add here.
        let _ = connection.await;
    });
    Ok(client)
}

/// Runs `--init` if asked, then every round, and builds the report.
pub async fn run(config: &BenchConfig) -> anyhow::Result<Report> {
    if config.init {
        schema::init(config).await?;
    }
    let phase = config.warmup + config.duration;
    let total = phase * config.rounds * config.targets.len() as u32;
    let bar = ProgressBar::new(total.as_millis() as u64).with_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:30}] {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let mut results: Vec<Vec<TargetRound>> = config.targets.iter().map(|_| Vec::new()).collect();
    for round in 0..config.rounds {
        for (t, target) in config.targets.iter().enumerate() {
            let done_before = phase * (round * config.targets.len() as u32 + t as u32);
            let label = format!("round {}/{} {}", round + 1, config.rounds, target.name);
            let result = run_target(config, target, &bar, done_before, &label)
                .await
                .with_context(|| label.clone())?;
            results[t].push(result);
        }
    }
    bar.finish_and_clear();
    Ok(Report::build(config, &results))
}

/// One target for one round.
async fn run_target(
    config: &BenchConfig,
    target: &Target,
    bar: &ProgressBar,
    done_before: Duration,
    label: &str,
) -> anyhow::Result<TargetRound> {
    bar.set_message(format!("{label}: connecting"));
    let first_insert_id = match config.scenario {
        Scenario::Insert => {
            let client = connect(target).await?;
            let row = client
                .query_one("SELECT coalesce(max(id), 0) FROM shardline_bench", &[])
                .await
                .context("finding where inserts start")?;
            row.get::<_, i64>(0) + 1
        }
        _ => 0,
    };
    let clients = config.clients as usize;
    let mut setups = Vec::with_capacity(clients);
    for c in 0..clients {
        let ids = InsertIds {
            next: first_insert_id + c as i64,
            step: clients as i64,
        };
        setups.push(async move {
            let client = connect(target).await?;
            let work = Workload::prepare(&client, &config.scenario, config.rows, ids).await?;
            anyhow::Ok((client, work))
        });
    }
    let connections = futures_util::future::try_join_all(setups)
        .await
        .with_context(|| format!("setting up {clients} clients"))?;

    let ops = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let interval = match config.load {
        Load::Closed => None,
        Load::Open { rate } => Some(Duration::from_secs_f64(clients as f64 / rate)),
    };
    let timeline = SharedTimeline::new(config.duration);
    let mut tasks = tokio::task::JoinSet::new();
    for (c, (client, work)) in connections.into_iter().enumerate() {
        let plan = Plan {
            start,
            warmup: config.warmup,
            duration: config.duration,
            interval,
            // Open loop: the clients' schedules interleave evenly.
            offset: interval.map_or(Duration::ZERO, |i| i.mul_f64(c as f64 / clients as f64)),
        };
        let ops = Arc::clone(&ops);
        let target = target.clone();
        let scenario = config.scenario.clone();
        let rows = config.rows;
        let recorder = Recorder::for_client(config.duration, Arc::clone(&timeline));
        tasks.spawn(async move {
            let conn = Conn { client, work };
            drive(conn, &target, &scenario, rows, plan, &ops, recorder).await
        });
    }

    let mut merged = Recorder::new(config.duration);
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(recorder) => merged.merge(&recorder.context("a client task failed")?),
                None => break,
            },
            _ = ticker.tick() => {
                let elapsed = start.elapsed().min(config.warmup + config.duration);
                bar.set_position((done_before + elapsed).as_millis() as u64);
                let state = if elapsed < config.warmup { "warming up" } else { "measuring" };
                bar.set_message(format!("{label}: {state}, {} ops", ops.load(Ordering::Relaxed)));
            }
        }
    }
    merged.timeline = timeline.take();
    Ok(TargetRound { recorder: merged })
}

/// When a client runs and how its operations are scheduled.
#[derive(Clone, Copy)]
struct Plan {
    start: Instant,
    warmup: Duration,
    duration: Duration,
    /// Open loop: time between this client's scheduled starts.
    interval: Option<Duration>,
    /// Open loop: this client's first scheduled start after `start`.
    offset: Duration,
}

/// A client's connection and workload.
struct Conn {
    client: Client,
    work: Workload,
}

/// One client's loop until the plan ends; returns what it measured.
async fn drive(
    mut conn: Conn,
    target: &Target,
    scenario: &Scenario,
    rows: i64,
    plan: Plan,
    ops: &AtomicU64,
    mut recorder: Recorder,
) -> Recorder {
    let measure_start = plan.start + plan.warmup;
    let end = measure_start + plan.duration;
    let hard_end = end + OP_GRACE;
    let mut k: u32 = 0;
    loop {
        let intended = match plan.interval {
            Some(interval) => plan.start + plan.offset + interval.mul_f64(k as f64),
            None => Instant::now(),
        };
        if intended >= end {
            break;
        }
        k = k.saturating_add(1);
        tokio::time::sleep_until(intended).await;
        let outcome = tokio::time::timeout_at(hard_end, conn.work.run_one(&conn.client)).await;
        let latency = Instant::now() - intended;
        let measured = intended >= measure_start;
        let at = intended.saturating_duration_since(measure_start);
        match outcome {
            Ok(Ok(())) if measured => recorder.success(at, latency),
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if measured {
                    let code = e.code().map_or("other", |c| c.code());
                    recorder.error(at, code);
                }
                if conn.client.is_closed() {
                    match reconnect(&conn, target, scenario, rows, end).await {
                        Some(fresh) => conn = fresh,
                        None => break,
                    }
                }
            }
            Err(_) => {
                recorder.error(at, "timeout");
                break;
            }
        }
        ops.fetch_add(1, Ordering::Relaxed);
    }
    recorder.finish();
    recorder
}

/// A new connection and prepared workload for a client whose connection
/// broke, retried until `end`; `None` if there was none by then.
async fn reconnect(
    old: &Conn,
    target: &Target,
    scenario: &Scenario,
    rows: i64,
    end: Instant,
) -> Option<Conn> {
    while Instant::now() < end {
        if let Ok(client) = connect(target).await {
            if let Ok(work) =
                Workload::prepare(&client, scenario, rows, old.work.insert_ids()).await
            {
                return Some(Conn { client, work });
            }
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
    None
}
