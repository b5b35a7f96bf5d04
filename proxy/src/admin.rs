//! The admin console: the virtual database `shardline`, open to users with
//! `admin = true`, answering simple queries about the running proxy (as
//! PgBouncer's `pgbouncer` database does): `SHOW POOLS`, `SHOW CLIENTS`,
//! `SHOW SERVERS`, `SHOW STATS`, `SHOW CONFIG`, `SHOW SHARDS`, `SHOW
//! CACHE`, `SHOW VERSION`, `RELOAD`, `PAUSE [db]`, `RESUME [db]`,
//! `SHUTDOWN` and the `CACHE` commands. `SHOW SHARDS` lists every server of
//! the shard map with what this proxy's monitors know about it.

mod control;
pub(crate) mod views;

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use wire::backend::{self, TransactionStatus};
use wire::{frontend, rows, Frame};

use crate::error::{Error, Result};
use crate::result_cache::ResultCache;
use crate::shared::Shared;

/// The database name that reaches the console instead of a server.
pub const DATABASE: &str = "shardline";

/// The error a cache command gets from a proxy without a cache (one that
/// follows no shard map). `SHOW CACHE` there returns no row.
pub const NO_CACHE: &str =
    "this proxy has no cache: it caches sharded tables, and follows no shard map";

/// Largest message the console reads.
const MESSAGE_BYTES_MAX: u32 = 65_535;

/// What the console answers, for its error message.
const COMMANDS: &str = "SHOW POOLS, SHOW CLIENTS, SHOW SERVERS, SHOW STATS, SHOW CONFIG, \
                        SHOW SHARDS, SHOW CACHE, SHOW SLO, SHOW VERSION, RELOAD, PAUSE [db], RESUME [db], \
                        SHUTDOWN, CACHE ENABLE table, CACHE DISABLE table and CACHE FLUSH";

/// Finishes the login of an admin user and answers queries until the client
/// leaves. `buf` holds what the client sent after authenticating, `out` what
/// is still to be sent to it (the end of the authentication exchange).
pub async fn serve(
    shared: &Arc<Shared>,
    stream: &mut TcpStream,
    user: &str,
    application_name: &str,
    mut buf: BytesMut,
    mut out: BytesMut,
) -> Result<()> {
    use std::os::fd::AsRawFd;
    // Listed in `SHOW CLIENTS` (as PgBouncer lists its console's clients)
    // until this returns, before the caller closes the socket.
    let _registration = shared.clients.register(crate::clients::NewClient {
        user: user.to_owned(),
        database: DATABASE.to_owned(),
        peer: stream.peer_addr().ok(),
        local: stream.local_addr().ok(),
        application_name: application_name.to_owned(),
        fd: stream.as_raw_fd(),
        pool: 0,
        now_us: shared.clock.now_us(),
    });
    backend::encode_authentication_ok(&mut out);
    for (name, value) in [
        (
            "server_version",
            concat!("15.0 (Shardline ", env!("CARGO_PKG_VERSION"), ")"),
        ),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        backend::encode_parameter_status(&mut out, name.as_bytes(), value.as_bytes());
    }
    backend::encode_backend_key_data(&mut out, 0, 0);
    backend::encode_ready_for_query(&mut out, TransactionStatus::Idle);
    loop {
        stream.write_all(&out).await.map_err(Error::ClientIo)?;
        out.clear();
        let frame = loop {
            if let Some(frame) = Frame::decode(&mut buf, MESSAGE_BYTES_MAX)? {
                break frame;
            }
            if stream.read_buf(&mut buf).await.map_err(Error::ClientIo)? == 0 {
                if shared.is_stopping() {
                    // Woken by SHUTDOWN (or the client left: then nobody reads this).
                    Error::ShuttingDown.encode(&mut out);
                    let _ = stream.write_all(&out).await;
                }
                return Ok(());
            }
        };
        match frame.tag() {
            frontend::QUERY => {
                let sql = String::from_utf8_lossy(frontend::query_text(frame.body())?).into_owned();
                answer(shared, &sql, &mut out).await;
                backend::encode_ready_for_query(&mut out, TransactionStatus::Idle);
            }
            frontend::TERMINATE => return Ok(()),
            _ => {
                return Err(Error::Unsupported(
                    "the admin console answers simple queries only".into(),
                ))
            }
        }
    }
}

async fn answer(shared: &Shared, sql: &str, out: &mut BytesMut) {
    let command = sql.trim().trim_end_matches(';').trim().to_ascii_uppercase();
    let command: Vec<&str> = command.split_whitespace().collect();
    // A database name as written (the command was upper-cased).
    let argument = || {
        let word = sql.split_whitespace().nth(1).unwrap_or_default();
        word.trim_end_matches(';').trim_matches('"').to_owned()
    };
    match command.as_slice() {
        ["SHOW", "SHARDS"] => show_shards(shared, out),
        ["SHOW", "CACHE"] => show_cache(shared, out),
        ["SHOW", "SLO"] => show_slo(shared, out),
        ["SHOW", "POOLS"] => views::show_pools(shared, out),
        ["SHOW", "CLIENTS"] => views::show_clients(shared, out),
        ["SHOW", "SERVERS"] => views::show_servers(shared, out),
        ["SHOW", "STATS"] => views::show_stats(shared, out),
        ["SHOW", "CONFIG"] => views::show_config(shared, out),
        ["RELOAD"] => control::reload(shared, out).await,
        ["PAUSE"] => control::pause(shared, None, out).await,
        ["PAUSE", _] => control::pause(shared, Some(&argument()), out).await,
        ["RESUME"] => control::resume(shared, None, out),
        ["RESUME", _] => control::resume(shared, Some(&argument()), out),
        ["SHUTDOWN"] => control::shutdown(shared, out),
        ["CACHE", verb @ ("ENABLE" | "DISABLE"), _] => {
            // The table name as written (the command was upper-cased).
            let table = sql.split_whitespace().nth(2).unwrap_or_default();
            let table = table.trim_end_matches(';').trim_matches('"');
            cache_command(shared, out, |cache| {
                if *verb == "ENABLE" {
                    cache.enable(table);
                } else {
                    cache.disable(table);
                }
            });
        }
        ["CACHE", "FLUSH"] => cache_command(shared, out, |cache| cache.store.flush()),
        ["SHOW", "VERSION"] => {
            rows::encode_text_row_description(out, &["version"]);
            let version = concat!("Shardline ", env!("CARGO_PKG_VERSION"));
            rows::encode_data_row(out, &[Some(version.as_bytes())]);
            rows::encode_command_complete(out, b"SHOW");
        }
        [] => rows::encode_empty(out, backend::EMPTY_QUERY_RESPONSE),
        _ => {
            let message = format!(
                "unsupported admin console command \"{}\"; the console answers {COMMANDS}",
                sql.trim()
            );
            backend::encode_error(out, backend::ERROR_RESPONSE, "ERROR", "0A000", &message);
        }
    }
}

/// One row per database objective and window: how the last 5 minutes and
/// the last hour of requests met it.
fn show_slo(shared: &Shared, out: &mut BytesMut) {
    rows::encode_text_row_description(
        out,
        &[
            "database",
            "objective",
            "target",
            "window",
            "statements",
            "bad",
            "compliance",
            "burn_rate",
            "status",
        ],
    );
    let now = shared.clock.now_us();
    let mut count = 0;
    for slo in shared.statements.slos() {
        for s in slo.standings(now) {
            count += 1;
            let status = match (s.statements, s.met()) {
                (0, _) => "no traffic",
                (_, true) => "met",
                (_, false) => "missed",
            };
            let fields = [
                slo.database().to_owned(),
                s.objective.to_owned(),
                s.target.clone(),
                s.window.to_owned(),
                s.statements.to_string(),
                s.bad.to_string(),
                format!("{:.4}%", s.good_ratio * 100.0),
                format!("{:.3}", s.burn_rate),
                status.to_owned(),
            ];
            let values: Vec<Option<&[u8]>> = fields.iter().map(|f| Some(f.as_bytes())).collect();
            rows::encode_data_row(out, &values);
        }
    }
    rows::encode_command_complete(out, format!("SHOW {count}").as_bytes());
}

/// Runs a cache command, or explains that there is no cache.
fn cache_command(shared: &Shared, out: &mut BytesMut, run: impl FnOnce(&ResultCache)) {
    match &shared.cache {
        Some(cache) => {
            run(cache);
            rows::encode_command_complete(out, b"CACHE");
        }
        None => backend::encode_error(out, backend::ERROR_RESPONSE, "ERROR", "0A000", NO_CACHE),
    }
}

/// One row: the cache's counters, its tables, and each change feed's state
/// (a shard whose feed is down or behind is not served from the cache).
fn show_cache(shared: &Shared, out: &mut BytesMut) {
    const COLUMNS: [&str; 16] = [
        "tables",
        "hits",
        "misses",
        "hit_ratio",
        "fills",
        "fills_stale",
        "fills_too_large",
        "evictions",
        "expirations",
        "key_invalidations",
        "table_invalidations",
        "entries",
        "bytes",
        "max_bytes",
        "max_stream_lag_ms",
        "feeds",
    ];
    rows::encode_text_row_description(out, &COLUMNS);
    let Some(cache) = &shared.cache else {
        rows::encode_command_complete(out, b"SHOW 0");
        return;
    };
    cache.store.run_pending_tasks();
    let s = cache.stats();
    let lookups = s.hits + s.misses;
    let ratio = if lookups == 0 {
        0.0
    } else {
        s.hits as f64 / lookups as f64
    };
    let map = shared.follower.as_ref().map(|f| f.map());
    let feeds: Vec<String> = cache
        .feeds()
        .iter()
        .map(|feed| {
            let info = feed.info();
            let lag = map
                .as_ref()
                .and_then(|m| {
                    let shard = m.shards.values().find(|s| s.primary == feed.addr)?;
                    shared.backends.shard(shard.id, m)
                })
                .and_then(|nodes| nodes.stream_lag(feed.position(), Instant::now()));
            let state = match (feed.connected(), lag) {
                (true, Some(lag)) if lag <= cache.config().max_stream_lag => {
                    format!("serving (lag {} ms)", lag.as_millis())
                }
                (true, Some(lag)) => format!("behind (lag {} ms): bypassed", lag.as_millis()),
                (true, None) => "no WAL position from the monitor yet: bypassed".to_owned(),
                (false, _) => format!(
                    "down: bypassed ({})",
                    info.last_error.as_deref().unwrap_or("connecting")
                ),
            };
            let mut text = format!(
                "{} {state} at {}, published [{}]",
                feed.addr,
                cache::pgoutput::format_lsn(feed.position()),
                feed.published().join(", ")
            );
            for left in &info.left_out {
                text.push_str(&format!("; {} not published: {}", left.table, left.reason));
            }
            // Why writes to these tables invalidate more than they name.
            let (anything, cascades): (Vec<_>, Vec<_>) =
                info.reach.iter().partition(|r| r.changes.is_none());
            if !anything.is_empty() {
                let names: Vec<&str> = anything.iter().map(|r| r.table.as_str()).collect();
                text.push_str(&format!(
                    "; triggers or rules on [{}] (writes there invalidate every cached table)",
                    names.join(", ")
                ));
            }
            if !cascades.is_empty() {
                let pairs: Vec<String> = cascades
                    .iter()
                    .map(|r| format!("{} -> {}", r.table, r.changes.as_deref().unwrap_or("")))
                    .collect();
                text.push_str(&format!("; cascading foreign keys [{}]", pairs.join(", ")));
            }
            text
        })
        .collect();
    let values = [
        cache.tables().join(", "),
        s.hits.to_string(),
        s.misses.to_string(),
        format!("{ratio:.4}"),
        s.fills.to_string(),
        s.fills_stale.to_string(),
        s.fills_too_large.to_string(),
        s.evictions.to_string(),
        s.expirations.to_string(),
        s.key_invalidations.to_string(),
        s.table_invalidations.to_string(),
        s.entries.to_string(),
        s.bytes.to_string(),
        cache.config().max_bytes.to_string(),
        cache.config().max_stream_lag.as_millis().to_string(),
        feeds.join("\n"),
    ];
    let values: Vec<Option<&[u8]>> = values.iter().map(|v| Some(v.as_bytes())).collect();
    rows::encode_data_row(out, &values);
    rows::encode_command_complete(out, b"SHOW 1");
}

/// One row per server of the shard map: its place in the map, the role it
/// reports, health, lag and breaker state, and the requests it has now.
fn show_shards(shared: &Shared, out: &mut BytesMut) {
    const COLUMNS: [&str; 11] = [
        "shard",
        "addr",
        "map_role",
        "role",
        "state",
        "breaker",
        "lsn",
        "lag_bytes",
        "lag_ms",
        "outstanding",
        "last_error",
    ];
    rows::encode_text_row_description(out, &COLUMNS);
    let map = shared.follower.as_ref().map(|f| f.map());
    let backends = &shared.backends;
    let shards = map
        .iter()
        .flat_map(|m| m.shards.keys().filter_map(|id| backends.shard(*id, m)))
        .collect::<Vec<_>>();
    let now = Instant::now();
    let mut count = 0;
    for shard in &shards {
        let primary = backends.primary(shard).ok();
        for node in &shard.nodes {
            let s = node.state();
            let role = match s.in_recovery {
                Some(true) => "replica",
                Some(false) => "primary",
                None => "unknown",
            };
            let takes_writes = primary.as_ref().is_some_and(|p| p.addr == node.addr);
            let state = s.health();
            let breaker = match s.open_until {
                Some(until) => format!(
                    "open ({} ms)",
                    until.saturating_duration_since(now).as_millis()
                ),
                None => "closed".to_owned(),
            };
            let lag = shard.lag(&s);
            let lag_bytes = lag.map(|(bytes, _)| bytes.to_string());
            let lag_ms = lag.map(|(_, time)| time.as_millis().to_string());
            let map_role = if node.map_primary {
                "primary"
            } else {
                "replica"
            };
            let role = if takes_writes && role == "primary" {
                "primary (writes)"
            } else {
                role
            };
            let lsn = s.sampled_at.map(|_| cache::pgoutput::format_lsn(s.lsn));
            let values = [
                Some(shard.id.to_string()),
                Some(node.addr.clone()),
                Some(map_role.to_owned()),
                Some(role.to_owned()),
                Some(state.to_owned()),
                Some(breaker),
                lsn,
                lag_bytes,
                lag_ms,
                Some(node.outstanding().to_string()),
                s.last_error.clone(),
            ];
            let values: Vec<Option<&[u8]>> = values
                .iter()
                .map(|v| v.as_deref().map(str::as_bytes))
                .collect();
            rows::encode_data_row(out, &values);
            count += 1;
        }
    }
    rows::encode_command_complete(out, format!("SHOW {count}").as_bytes());
}
