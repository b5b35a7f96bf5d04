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
async fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("Prometheus text format")
}

/// The sum of `name`'s samples whose labels include every pair of `labels`.
fn sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
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

    // A second client is counted while it is connected.
    let second = env.client().await;
    assert_eq!(
        sum(&scrape(addr).await, "shardline_client_connections", &[]),
        2.0
    );
    drop(second);

    assert_eq!(get(addr, "/healthz").await.0, 200);
    // No metadata group: nothing to wait for.
    assert_eq!(get(addr, "/readyz").await.0, 200);
    let (status, body) = get(addr, "/nothing-here").await;
    assert_eq!(status, 404, "{body}");
}
