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

/// `shardline proxy` (the binary) in front of `env`'s PostgreSQL with a
/// 200 ms slow-statement threshold, logging with `RUST_LOG=filter` and
/// `--log-format format` while `queries` run through it; its stderr
/// (logs in a separate process: in-process subscribers race with the
/// other tests' callsite caches under `cargo test`).
async fn proxy_logs(env: &Env, filter: &str, format: &str, queries: &[&str]) -> String {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("shardline.toml");
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nlog_min_duration = \"200ms\"\n\n[admin]\n\
         listen = \"off\"\n\n[[users]]\nname = \"app\"\npassword = \"{}\"\n\n\
         [[databases]]\nname = \"db\"\nport = {}\ndbname = \"postgres\"\n\
         server_user = \"postgres\"\nserver_password = \"postgres\"\n",
        crate::harness::APP_PASSWORD,
        env.pg.port()
    );
    std::fs::write(&config, text).expect("write the config");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_shardline"))
        .args(["--log-format", format, "proxy", "--config"])
        .arg(&config)
        .env("RUST_LOG", filter)
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start shardline proxy");
    let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut log = String::new();
    let addr = loop {
        let line = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
            .await
            .expect("the proxy starts within 30 s")
            .expect("read stderr")
            .unwrap_or_else(|| panic!("the proxy exited:\n{log}"));
        log.push_str(&line);
        log.push('\n');
        if let Some(at) = line.find("127.0.0.1:") {
            if line.contains("listening") {
                let port: String = line[at + 10..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                break format!("127.0.0.1:{port}");
            }
        }
    };
    let addr: SocketAddr = addr.parse().expect("the listening address");
    let client = crate::harness::connect(addr, "app", crate::harness::APP_PASSWORD, "db")
        .await
        .expect("connect through the proxy");
    for sql in queries {
        client.simple_query(sql).await.expect(sql);
    }
    drop(client);
    // The last request's events are written before its reply is sent.
    child.start_kill().expect("stop the proxy");
    while let Ok(Some(line)) = lines.next_line().await {
        log.push_str(&line);
        log.push('\n');
    }
    let _ = child.wait().await;
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_are_logged_at_info_with_their_route_and_sql_only_at_debug() {
    let env = Env::start().await;
    let queries = ["SELECT 2", "SELECT pg_sleep(0.3), 'marker-sql'"];

    // INFO, as JSON: one slow request, its route, no SQL.
    let info = proxy_logs(&env, "info", "json", &queries).await;
    let slow: Vec<serde_json::Value> = info
        .lines()
        .filter(|l| l.contains("slow statement"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(slow.len(), 1, "one slow request logged:\n{info}");
    let fields = &slow[0]["fields"];
    assert_eq!(slow[0]["level"], "INFO", "{}", slow[0]);
    assert_eq!(fields["shard"], "home", "{}", slow[0]);
    assert_eq!(fields["role"], "primary", "{}", slow[0]);
    assert_eq!(fields["database"], "db", "{}", slow[0]);
    assert_eq!(fields["user"], "app", "{}", slow[0]);
    assert!(
        fields["duration_ms"].as_f64().unwrap() >= 300.0,
        "{}",
        slow[0]
    );
    assert!(!info.contains("marker-sql"), "SQL logged at INFO:\n{info}");

    // DEBUG for statements, as text: a span per statement with its SQL and
    // duration, inside its session's span.
    let debug = proxy_logs(
        &env,
        "info,shardline::statement=debug,proxy::listener=debug",
        "text",
        &queries,
    )
    .await;
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
