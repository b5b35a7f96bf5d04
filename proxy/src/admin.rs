//! The admin console: the virtual database `shardline`, open to users with
//! `admin = true`, answering simple queries about the running proxy (as
//! PgBouncer's `pgbouncer` database does). `SHOW SHARDS` lists every server
//! of the shard map with what this proxy's monitors know about it.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use wire::backend::{self, TransactionStatus};
use wire::{frontend, rows, Frame};

use crate::error::{Error, Result};
use crate::shared::Shared;

/// The database name that reaches the console instead of a server.
pub const DATABASE: &str = "shardline";

/// Largest message the console reads.
const MESSAGE_BYTES_MAX: u32 = 65_535;

/// Finishes the login of an admin user and answers queries until the client
/// leaves. `buf` holds what the client sent after authenticating, `out` what
/// is still to be sent to it (the end of the authentication exchange).
pub async fn serve(
    shared: &Arc<Shared>,
    stream: &mut TcpStream,
    mut buf: BytesMut,
    mut out: BytesMut,
) -> Result<()> {
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
                return Ok(());
            }
        };
        match frame.tag() {
            frontend::QUERY => {
                let sql = String::from_utf8_lossy(frontend::query_text(frame.body())?).into_owned();
                answer(shared, &sql, &mut out);
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

fn answer(shared: &Shared, sql: &str, out: &mut BytesMut) {
    let command = sql.trim().trim_end_matches(';').trim().to_ascii_uppercase();
    let command: Vec<&str> = command.split_whitespace().collect();
    match command.as_slice() {
        ["SHOW", "SHARDS"] => show_shards(shared, out),
        ["SHOW", "VERSION"] => {
            rows::encode_text_row_description(out, &["version"]);
            let version = concat!("Shardline ", env!("CARGO_PKG_VERSION"));
            rows::encode_data_row(out, &[Some(version.as_bytes())]);
            rows::encode_command_complete(out, b"SHOW");
        }
        [] => rows::encode_empty(out, backend::EMPTY_QUERY_RESPONSE),
        _ => {
            let message = format!(
                "unsupported admin console command \"{}\"; the console answers SHOW SHARDS and SHOW VERSION",
                sql.trim()
            );
            backend::encode_error(out, backend::ERROR_RESPONSE, "ERROR", "0A000", &message);
        }
    }
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
            let state = match (s.open_until.is_some(), s.sampled_at) {
                (true, _) => "down",
                (false, Some(_)) => "up",
                (false, None) => "unknown",
            };
            let breaker = match s.open_until {
                Some(until) => format!(
                    "open ({} ms)",
                    until.saturating_duration_since(now).as_millis()
                ),
                None => "closed".to_owned(),
            };
            let (lag_bytes, lag_ms) = match (s.in_recovery, s.sampled_at) {
                (Some(true), Some(at)) => {
                    let (bytes, time) = shard.lag_of(s.lsn, at);
                    (Some(bytes.to_string()), Some(time.as_millis().to_string()))
                }
                (Some(false), _) => (Some("0".to_owned()), Some("0".to_owned())),
                _ => (None, None),
            };
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
            let lsn = s
                .sampled_at
                .map(|_| format!("{:X}/{:X}", s.lsn >> 32, s.lsn & 0xFFFF_FFFF));
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
