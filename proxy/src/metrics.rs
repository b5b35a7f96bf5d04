//! Metrics: the operators' HTTP listener (`[admin] listen`).
//!
//! `/metrics` answers in the Prometheus text format, encoded by
//! `prometheus-client`; `/healthz` says the process answers; `/readyz` says
//! it can route (with a metadata group: its lease on the shard map holds).
//! Every figure is read from the proxy's own state at scrape time (client
//! slots, bb8's pool statistics, the health monitors, the cache counters),
//! so the statement path pays nothing for being observed.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::shared::Shared;

/// How long a scraper may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The content type of the Prometheus text format, version 0.0.4.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds the listener at `addr` (synchronously, so the caller knows the
/// port before serving).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` for as long as
/// the proxy's shared state lives.
pub async fn serve(listener: std::net::TcpListener, shared: Weak<Shared>, connections_max: u32) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "metrics listener unusable; no metrics");
            return;
        }
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProxyCollector {
        shared: shared.clone(),
    }));
    let registry = Arc::new(registry);
    let slots = Arc::new(Semaphore::new(connections_max.max(1) as usize));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.strong_count() == 0 {
            return;
        }
        let (shared, registry) = (shared.clone(), registry.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let answer = answer(&shared, &registry, &request);
                async move { Ok::<_, Infallible>(answer) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

fn answer(
    shared: &Weak<Shared>,
    registry: &Registry,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    let text = "text/plain; charset=utf-8";
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, text, "GET only\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => reply(StatusCode::OK, TEXT_FORMAT, body),
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    text,
                    "encoding failed\n".into(),
                ),
            }
        }
        "/healthz" => reply(StatusCode::OK, text, "ok\n".into()),
        "/readyz" => match shared.upgrade().map(|s| not_ready(&s)) {
            Some(None) => reply(StatusCode::OK, text, "ready\n".into()),
            Some(Some(why)) => reply(StatusCode::SERVICE_UNAVAILABLE, text, format!("{why}\n")),
            None => reply(StatusCode::SERVICE_UNAVAILABLE, text, "stopping\n".into()),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            text,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Why the proxy cannot serve clients correctly now, if it cannot.
fn not_ready(shared: &Shared) -> Option<String> {
    let follower = shared.follower.as_ref()?;
    (!follower.is_current())
        .then(|| "no current shard map: the lease with the metadata group does not hold".to_owned())
}

/// Reads the proxy's state at every scrape.
struct ProxyCollector {
    shared: Weak<Shared>,
}

impl fmt::Debug for ProxyCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProxyCollector")
    }
}

type Labels = Vec<(&'static str, String)>;

/// One metric family: its rows, each a label set and a value.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels, M)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in rows {
        if labels.is_empty() {
            // A metric without labels is the family's only sample.
            return metric.encode(family);
        }
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, f64)>,
) -> fmt::Result {
    let rows = rows.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
    family(encoder, name, help, MetricType::Gauge, rows)
}

/// A counter (the encoder adds `_total` to its name).
fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let rows = rows.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
    family(encoder, name, help, MetricType::Counter, rows)
}

impl Collector for ProxyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        let e = &mut encoder;
        let max = shared.effective().proxy.max_client_connections;
        gauge(
            e,
            "shardline_client_connections",
            "Client connections logged in or logging in.",
            [(vec![], f64::from(shared.client_count()))],
        )?;
        let mut by_state: std::collections::BTreeMap<&str, f64> =
            ["active", "idle", "waiting"].map(|s| (s, 0.0)).into();
        for (_, state) in crate::admin::views::client_states(&shared) {
            *by_state.entry(state).or_default() += 1.0;
        }
        gauge(
            e,
            "shardline_clients",
            "Logged-in clients by state: active (holding a server connection or inside a \
             transaction), idle, waiting (for a server connection).",
            by_state
                .into_iter()
                .map(|(state, n)| (vec![("state", state.to_owned())], n)),
        )?;
        gauge(
            e,
            "shardline_client_connections_max",
            "The max_client_connections cap.",
            [(vec![], f64::from(max))],
        )?;
        pools(e, &shared)?;
        traffic(e, &shared)?;
        servers(e, &shared)?;
        if let Some(follower) = &shared.follower {
            let map = follower.map();
            gauge(
                e,
                "shardline_metadata_epoch",
                "Epoch of the shard map this proxy routes by.",
                [(vec![], map.epoch.0 as f64)],
            )?;
            gauge(
                e,
                "shardline_metadata_lease_valid",
                "1 while this proxy's lease with the metadata group holds.",
                [(vec![], f64::from(u8::from(follower.is_current())))],
            )?;
        }
        if let Some(cache) = &shared.cache {
            cache_metrics(e, cache)?;
        }
        statements(e, &shared)
    }
}

/// A histogram's figures read at scrape time.
#[derive(Debug)]
struct ConstHistogram(crate::statement_stats::HistogramSnapshot);

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> fmt::Result {
        let s = &self.0;
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            s.sum_seconds,
            s.count,
            &s.buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Request latency by route, errors by SQLSTATE class, SLO burn rates.
fn statements(e: &mut DescriptorEncoder<'_>, shared: &Shared) -> fmt::Result {
    let stats = &shared.statements;
    let rows = stats.histograms().into_iter().map(|(database, route, h)| {
        let labels: Labels = vec![
            ("database", database),
            ("shard", route.shard.to_string()),
            ("role", route.role.as_str().to_owned()),
            ("cached", route.cached.to_string()),
        ];
        (labels, ConstHistogram(h))
    });
    family(
        e,
        "shardline_statement_duration_seconds",
        "Requests from their first message to their ReadyForQuery, by route: shard (home \
         without a shard map, all when fanned out), role (primary, replica, or proxy when \
         answered without a server) and whether the cache answered.",
        MetricType::Histogram,
        rows,
    )?;
    counter(
        e,
        "shardline_errors",
        "ErrorResponses sent to clients, by SQLSTATE class and kind (postgres: raised by \
         PostgreSQL; client, server, unavailable, internal: by the proxy).",
        stats.errors().into_iter().map(|(class, kind, n)| {
            let labels: Labels = vec![("class", class), ("kind", kind.to_owned())];
            (labels, n)
        }),
    )?;
    let now = shared.clock.now_us();
    let mut burn = Vec::new();
    for slo in stats.slos() {
        for s in slo.standings(now) {
            let labels: Labels = vec![
                ("database", slo.database().to_owned()),
                ("objective", s.objective.to_owned()),
                ("window", s.window.to_owned()),
            ];
            burn.push((labels, s.burn_rate));
        }
    }
    gauge(
        e,
        "shardline_slo_burn_rate",
        "How fast each SLO's error budget is being spent over the window: the share of bad \
         statements over the share the objective allows (above 1: the objective is missed).",
        burn,
    )
}

/// Server pools: size, connections by state, and bb8's checkout statistics.
fn pools(e: &mut DescriptorEncoder<'_>, shared: &Shared) -> fmt::Result {
    let pools: Vec<_> = shared
        .pools
        .all()
        .into_iter()
        .map(|((database, user, addr), pool)| {
            let server = if addr.is_empty() {
                shared
                    .database(&database)
                    .map(|d| format!("{}:{}", d.host, d.port))
                    .unwrap_or_default()
            } else {
                addr
            };
            let labels: Labels = vec![("database", database), ("user", user), ("server", server)];
            (
                labels,
                pool.size(),
                pool.state(),
                pool.figures(),
                pool.checkouts(),
            )
        })
        .collect();
    let with = |labels: &Labels, state: &'static str| {
        let mut l = labels.clone();
        l.push(("state", state.to_owned()));
        l
    };
    gauge(
        e,
        "shardline_pool_size",
        "Most server connections a pool opens.",
        pools
            .iter()
            .map(|(l, size, ..)| (l.clone(), f64::from(*size))),
    )?;
    gauge(
        e,
        "shardline_server_connections",
        "Server connections of a pool, by state (active: lent to a client).",
        pools.iter().flat_map(|(l, _, _, f, _)| {
            [
                (with(l, "idle"), f64::from(f.idle)),
                (with(l, "active"), f64::from(f.active)),
            ]
        }),
    )?;
    gauge(
        e,
        "shardline_pool_waiting",
        "Checkouts waiting for a server connection now.",
        pools
            .iter()
            .map(|(l, _, _, f, _)| (l.clone(), f64::from(f.waiting))),
    )?;
    counter(
        e,
        "shardline_pool_checkouts",
        "Checkouts finished: at once, after waiting, or timed out (SQLSTATE 53300).",
        pools.iter().flat_map(|(l, .., c)| {
            [
                (with(l, "direct"), c.direct),
                (with(l, "waited"), c.waited),
                (with(l, "timed_out"), c.timed_out),
            ]
        }),
    )?;
    let wait = pools
        .iter()
        .map(|(l, .., c)| (l.clone(), ConstCounter::new(c.wait.as_secs_f64())));
    family(
        e,
        "shardline_pool_checkout_wait_seconds",
        "Time checkouts spent waiting for a server connection.",
        MetricType::Counter,
        wait,
    )?;
    counter(
        e,
        "shardline_server_connections_opened",
        "Server connections opened by a pool.",
        pools
            .iter()
            .map(|(l, _, s, ..)| (l.clone(), s.statistics.connections_created)),
    )
}

/// Client traffic by database: the counters of the console's `SHOW STATS`.
fn traffic(e: &mut DescriptorEncoder<'_>, shared: &Shared) -> fmt::Result {
    let totals = crate::stats::totals(shared);
    let rows = |value: fn(&crate::clients::Totals) -> u64| {
        (totals.iter())
            .map(move |(database, t)| (vec![("database", database.clone())], value(&t.clients)))
            .collect::<Vec<_>>()
    };
    for (name, help, value) in [
        (
            "shardline_bytes_received",
            "Bytes received from clients.",
            rows(|t| t.received),
        ),
        (
            "shardline_bytes_sent",
            "Bytes sent to clients.",
            rows(|t| t.sent),
        ),
        (
            "shardline_transactions",
            "Transactions completed (a ReadyForQuery outside a transaction).",
            rows(|t| t.xacts),
        ),
        (
            "shardline_queries",
            "Queries completed (every ReadyForQuery from a server).",
            rows(|t| t.queries),
        ),
    ] {
        counter(e, name, help, value)?;
    }
    Ok(())
}

/// Every server of the shard map as the health monitors see it.
fn servers(e: &mut DescriptorEncoder<'_>, shared: &Shared) -> fmt::Result {
    let mut up = Vec::new();
    let mut breaker = Vec::new();
    let mut lag_bytes = Vec::new();
    let mut lag_seconds = Vec::new();
    for shard in shared.backends.all() {
        for node in &shard.nodes {
            let s = node.state();
            let labels: Labels = vec![
                ("shard", shard.id.to_string()),
                ("server", node.addr.clone()),
                ("role", node.role_name().to_owned()),
            ];
            up.push((labels.clone(), f64::from(u8::from(s.health() == "up"))));
            breaker.push((labels.clone(), f64::from(u8::from(s.open_until.is_some()))));
            if let Some((bytes, time)) = shard.lag(&s).filter(|_| s.in_recovery == Some(true)) {
                lag_bytes.push((labels.clone(), bytes as f64));
                lag_seconds.push((labels, time.as_secs_f64()));
            }
        }
    }
    gauge(
        e,
        "shardline_server_up",
        "1 when the server's last health check succeeded and its breaker is closed.",
        up,
    )?;
    gauge(
        e,
        "shardline_server_breaker_open",
        "1 while the server's circuit breaker is open (no traffic is sent to it).",
        breaker,
    )?;
    gauge(
        e,
        "shardline_replica_lag_bytes",
        "WAL bytes a replica has not replayed yet.",
        lag_bytes,
    )?;
    gauge(
        e,
        "shardline_replica_lag_seconds",
        "How far behind its primary a replica's replay is.",
        lag_seconds,
    )
}

fn cache_metrics(
    e: &mut DescriptorEncoder<'_>,
    cache: &crate::result_cache::ResultCache,
) -> fmt::Result {
    let s = cache.stats();
    let kinds: [(&str, &str, u64); 9] = [
        ("hits", "Point reads answered from the cache.", s.hits),
        (
            "misses",
            "Cacheable point reads sent to the server.",
            s.misses,
        ),
        ("fills", "Replies stored.", s.fills),
        (
            "fills_stale",
            "Replies not stored: a write to their key was acknowledged while they were read.",
            s.fills_stale,
        ),
        (
            "fills_too_large",
            "Replies not stored: larger than entry_bytes_max.",
            s.fills_too_large,
        ),
        (
            "evictions",
            "Entries dropped to stay under max_bytes.",
            s.evictions,
        ),
        (
            "expirations",
            "Entries dropped at their TTL or TTI.",
            s.expirations,
        ),
        (
            "key_invalidations",
            "Writes that invalidated one key.",
            s.key_invalidations,
        ),
        (
            "table_invalidations",
            "Writes that invalidated a whole table.",
            s.table_invalidations,
        ),
    ];
    for (kind, help, value) in kinds {
        counter(
            e,
            &format!("shardline_cache_{kind}"),
            help,
            [(vec![], value)],
        )?;
    }
    gauge(
        e,
        "shardline_cache_entries",
        "Entries in the cache.",
        [(vec![], s.entries as f64)],
    )?;
    gauge(
        e,
        "shardline_cache_bytes",
        "Weight of the cache's entries (replies, keys and bookkeeping).",
        [(vec![], s.bytes as f64)],
    )?;
    let feeds = cache.feeds();
    gauge(
        e,
        "shardline_cache_feed_connected",
        "1 while the WAL change feed of a shard primary is connected (else reads bypass the cache).",
        feeds
            .iter()
            .map(|f| (vec![("server", f.addr.clone())], f64::from(u8::from(f.connected())))),
    )
}
