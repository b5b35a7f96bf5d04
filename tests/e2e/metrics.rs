//! The operators' HTTP listener: `/metrics` parses as Prometheus text and
//! its figures follow known traffic; `/healthz`, `/readyz`, and errors for
//! anything else.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Env, Options};

/// One HTTP/1.1 GET: the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics listener");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read the response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("headers end with an empty line");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, body.to_owned())
}

/// The samples of `/metrics`, parsed by a Prometheus text parser.
pub async fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("Prometheus text format")
}

/// The sum of `name`'s samples whose labels include every pair of `labels`.
pub fn sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_follow_known_traffic() {
    let env = Env::with(Options {
        pool_size: 3,
        proxy_extra: "[admin]\nlisten = \"127.0.0.1:0\"\n".into(),
        ..Options::default()
    })
    .await;
    let addr = env.metrics.expect("the metrics listener is bound");
    let client = env.client().await;
    client.simple_query("SELECT 1").await.expect("first query");

    let before = scrape(addr).await;
    let pool = [("database", "db"), ("user", "app")];
    let checkouts = |s: &prometheus_parse::Scrape| sum(s, "shardline_pool_checkouts_total", &pool);
    const N: usize = 25;
    for i in 0..N {
        client
            .simple_query(&format!("SELECT {i}"))
            .await
            .expect("query");
    }
    let after = scrape(addr).await;
    // Transaction pooling: one checkout per statement outside a transaction.
    assert_eq!(
        checkouts(&after) - checkouts(&before),
        N as f64,
        "checkouts did not follow the {N} statements"
    );
    assert_eq!(sum(&after, "shardline_client_connections", &[]), 1.0);
    assert_eq!(sum(&after, "shardline_pool_size", &pool), 3.0);
    let open = sum(&after, "shardline_server_connections", &pool);
    assert!((1.0..=3.0).contains(&open), "{open} server connections");
    assert_eq!(
        sum(
            &after,
            "shardline_server_connections",
            &[("state", "active")]
        ),
        0.0,
        "a connection stayed lent out between transactions"
    );
    assert!(sum(&after, "shardline_server_connections_opened_total", &pool) >= 1.0);

    assert_eq!(sum(&after, "shardline_clients", &[("state", "idle")]), 1.0);
    assert_eq!(
        sum(&after, "shardline_clients", &[("state", "active")]),
        0.0
    );

    // A second client is counted while it is connected, as active while
    // its transaction holds a server connection.
    let second = env.client().await;
    second
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("open a transaction");
    let during = scrape(addr).await;
    assert_eq!(sum(&during, "shardline_client_connections", &[]), 2.0);
    assert_eq!(
        sum(&during, "shardline_clients", &[("state", "active")]),
        1.0
    );
    assert_eq!(sum(&during, "shardline_clients", &[("state", "idle")]), 1.0);
    second.batch_execute("COMMIT").await.expect("commit");
    drop(second);

    assert_eq!(get(addr, "/healthz").await.0, 200);
    // No metadata group: nothing to wait for.
    assert_eq!(get(addr, "/readyz").await.0, 200);
    let (status, body) = get(addr, "/nothing-here").await;
    assert_eq!(status, 404, "{body}");
}

/// `[proxy]` lines for a proxy with metrics, an SLO on `db`, a slow-statement
/// threshold and an admin user `ops`.
const OBSERVED: &str = r#"log_min_duration = "200ms"

[admin]
listen = "127.0.0.1:0"

[[slo]]
database = "db"
latency = "p90 < 200ms"
errors = "< 10%"

[[users]]
name = "ops"
auth = "trust"
admin = true
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_timed_by_route_errors_counted_by_class_and_slos_reported() {
    let env = Env::with(Options {
        pool_size: 3,
        proxy_extra: OBSERVED.into(),
        ..Options::default()
    })
    .await;
    let addr = env.metrics.expect("the metrics listener is bound");
    let client = env.client().await;
    client.simple_query("SELECT 1").await.expect("first query");
    let route = [
        ("database", "db"),
        ("shard", "home"),
        ("role", "primary"),
        ("cached", "false"),
    ];
    let count =
        |s: &prometheus_parse::Scrape| sum(s, "shardline_statement_duration_seconds_count", &route);
    let division = [("class", "22"), ("kind", "postgres")];
    let before = scrape(addr).await;

    for i in 0..20 {
        client
            .simple_query(&format!("SELECT {i}"))
            .await
            .expect("query");
    }
    client
        .simple_query("SELECT pg_sleep(0.4)")
        .await
        .expect("slow query");
    let e = client.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO)
    );
    // Extended protocol: the prepare is one request, each execution another.
    let statement = client.prepare("SELECT $1::int").await.expect("prepare");
    for i in 0..5 {
        client.query(&statement, &[&i]).await.expect("execute");
    }

    let after = scrape(addr).await;
    assert_eq!(
        count(&after) - count(&before),
        28.0,
        "20 + 1 + 1 + 1 + 5 requests"
    );
    assert_eq!(
        sum(&after, "shardline_errors_total", &division)
            - sum(&before, "shardline_errors_total", &division),
        1.0
    );
    let histogram = after
        .samples
        .iter()
        .find(|s| {
            s.metric == "shardline_statement_duration_seconds"
                && route.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .expect("the route's histogram");
    let prometheus_parse::Value::Histogram(buckets) = &histogram.value else {
        panic!("not a histogram: {:?}", histogram.value);
    };
    let under = |bound: f64| {
        buckets
            .iter()
            .find(|b| b.less_than == bound)
            .map(|b| b.count)
            .expect("bucket")
    };
    // The pg_sleep(0.4) request is the only one that can be over 250 ms.
    assert_eq!(under(f64::INFINITY) - under(0.25), 1.0, "{buckets:?}");

    // The SLO: 29 requests so far, 1 slow (3.4% against 10% allowed), 1
    // failed (3.4% against 10%): both met, burning a third of the budget.
    let burn = |objective: &str| {
        sum(
            &after,
            "shardline_slo_burn_rate",
            &[
                ("database", "db"),
                ("objective", objective),
                ("window", "5m"),
            ],
        )
    };
    for objective in ["latency", "errors"] {
        let b = burn(objective);
        assert!(
            (b - (1.0 / 29.0) / 0.1).abs() < 1e-9,
            "{objective} burn rate {b}"
        );
    }
    let admin = crate::harness::connect(env.addr, "ops", "", "shardline")
        .await
        .expect("admin console");
    let rows: Vec<_> = admin
        .simple_query("SHOW SLO")
        .await
        .expect("SHOW SLO")
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect();
    let columns: Vec<&str> = rows[0].columns().iter().map(|c| c.name()).collect();
    assert_eq!(
        columns,
        [
            "database",
            "objective",
            "target",
            "window",
            "statements",
            "bad",
            "compliance",
            "burn_rate",
            "status"
        ]
    );
    assert_eq!(rows.len(), 4, "two objectives, two windows");
    for row in &rows {
        assert_eq!(row.get("database"), Some("db"));
        assert_eq!(row.get("statements"), Some("29"));
        assert_eq!(row.get("bad"), Some("1"));
        assert_eq!(row.get("status"), Some("met"));
    }
    let targets: Vec<_> = rows.iter().map(|r| r.get("target").unwrap()).collect();
    assert!(targets.contains(&"p90 < 200ms"), "{targets:?}");
    assert!(targets.contains(&"errors < 10%"), "{targets:?}");
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Logs of a proxy running on this thread (a current-thread runtime runs
/// its tasks here) while `body` runs, at `filter`.
async fn logs_of(filter: &str, env: &Env, body: impl std::future::Future<Output = ()>) -> String {
    let _ = env;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    body.await;
    drop(guard);
    captured.text()
}

#[tokio::test]
async fn slow_requests_are_logged_at_info_with_their_route_and_sql_only_at_debug() {
    let env = Env::with(Options {
        pool_size: 2,
        proxy_extra: OBSERVED.into(),
        ..Options::default()
    })
    .await;
    // A session's span belongs to the subscriber of the moment it connects.
    let run = || async {
        let client = env.client().await;
        client.simple_query("SELECT 2").await.expect("fast");
        client
            .simple_query("SELECT pg_sleep(0.3), 'marker-sql'")
            .await
            .expect("slow");
    };

    let info = logs_of("info", &env, run()).await;
    let slow: Vec<&str> = info
        .lines()
        .filter(|l| l.contains("slow statement"))
        .collect();
    assert_eq!(slow.len(), 1, "one slow request logged:\n{info}");
    let line = slow[0];
    for field in [
        "shard=home",
        "role=\"primary\"",
        "database=db",
        "user=app",
        "cached=false",
    ] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
    assert!(!info.contains("marker-sql"), "SQL logged at INFO:\n{info}");

    let debug = logs_of("debug", &env, run()).await;
    let done: Vec<&str> = debug
        .lines()
        .filter(|l| l.contains("statement done"))
        .collect();
    assert_eq!(done.len(), 2, "a span per statement:\n{debug}");
    assert!(
        done.iter()
            .any(|l| l.contains("marker-sql") && l.contains("duration_us=")),
        "the statement span has its SQL and duration:\n{debug}"
    );
    assert!(
        done.iter().all(|l| l.contains("session{client=127.0.0.1:")),
        "statement spans are inside their session's:\n{debug}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_each_timed_and_counted() {
    let env = Env::with(Options {
        pool_size: 2,
        proxy_extra: OBSERVED.into(),
        ..Options::default()
    })
    .await;
    let addr = env.metrics.expect("the metrics listener is bound");
    let mut raw = crate::raw::Raw::login(env.addr).await;
    raw.query("SELECT 0");
    raw.until_ready().await;
    let route = [("shard", "home"), ("role", "primary"), ("cached", "false")];
    let timed =
        |s: &prometheus_parse::Scrape| sum(s, "shardline_statement_duration_seconds_count", &route);
    let queries = |s: &prometheus_parse::Scrape| sum(s, "shardline_queries_total", &[]);
    let before = scrape(addr).await;
    // Five requests in one write: three Queries, a Sync on its own, and an
    // extended-protocol statement; five ReadyForQuery messages.
    raw.query("SELECT 1")
        .query("SELECT pg_sleep(0.3)")
        .query("SELECT 3");
    raw.sync();
    raw.parse("", "SELECT 4").bind("", &[]).execute().sync();
    let mut ready = 0;
    raw.replies(|r| {
        ready += usize::from(r.starts_with("Z:"));
        ready == 5
    })
    .await;
    let after = scrape(addr).await;
    assert_eq!(queries(&after) - queries(&before), 5.0);
    assert_eq!(timed(&after) - timed(&before), 5.0);
    // SELECT 1 was answered before the sleep began: fast. The sleep, and
    // the three requests queued behind it, waited 0.3 s.
    let slow = |s: &prometheus_parse::Scrape| {
        let h = s
            .samples
            .iter()
            .find(|x| {
                x.metric == "shardline_statement_duration_seconds"
                    && route.iter().all(|(k, v)| x.labels.get(k) == Some(*v))
            })
            .expect("the route's histogram");
        match &h.value {
            prometheus_parse::Value::Histogram(b) => {
                let at = |bound: f64| b.iter().find(|x| x.less_than == bound).unwrap().count;
                at(f64::INFINITY) - at(0.25)
            }
            v => panic!("not a histogram: {v:?}"),
        }
    };
    assert_eq!(slow(&after) - slow(&before), 4.0);
}
