//! The console's views of the running proxy, with PgBouncer's column names
//! where the concept is the same: `SHOW POOLS`, `SHOW CLIENTS`, `SHOW
//! SERVERS`, `SHOW STATS` and `SHOW CONFIG`. Columns PgBouncer has and
//! Shardline has no such thing for (cancel-request states, `sv_used`,
//! `sv_tested`, TLS, replication) are left out rather than filled.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use wire::rows;

use crate::clients::{ClientId, ClientInfo};
use crate::clock::{format_wall, Clock};
use crate::shared::Shared;

/// A result set being written: a RowDescription, rows, CommandComplete.
pub struct Table<'a> {
    out: &'a mut BytesMut,
    rows: usize,
}

impl<'a> Table<'a> {
    pub fn new(out: &'a mut BytesMut, columns: &[&str]) -> Table<'a> {
        rows::encode_text_row_description(out, columns);
        Table { out, rows: 0 }
    }

    pub fn row(&mut self, values: &[Option<String>]) {
        let values: Vec<Option<&[u8]>> = values
            .iter()
            .map(|v| v.as_deref().map(str::as_bytes))
            .collect();
        rows::encode_data_row(self.out, &values);
        self.rows += 1;
    }

    pub fn finish(self) {
        let tag = format!("SHOW {}", self.rows);
        rows::encode_command_complete(self.out, tag.as_bytes());
    }
}

fn text(s: impl ToString) -> Option<String> {
    Some(s.to_string())
}

/// `host:port` split for the `addr` and `port` columns.
fn split_addr(addr: &str) -> (Option<String>, Option<String>) {
    match addr.rsplit_once(':') {
        Some((host, port)) => (text(host.trim_matches(['[', ']'])), text(port)),
        None => (text(addr), None),
    }
}

fn socket(addr: Option<std::net::SocketAddr>) -> (Option<String>, Option<String>) {
    match addr {
        Some(a) => (text(a.ip()), text(a.port())),
        None => (None, None),
    }
}

fn wall(clock: &Clock, us: u64) -> Option<String> {
    text(format_wall(clock.wall(us)))
}

/// The shard and map role of the server at `addr` (`host:port`), when the
/// shard map names it.
fn shard_of(shared: &Shared, addr: &str) -> (Option<String>, Option<String>) {
    let Some(follower) = &shared.follower else {
        return (None, None);
    };
    let map = follower.map();
    for shard in map.shards.values() {
        if shard.primary == addr {
            return (text(shard.id), text("primary"));
        }
        if shard.replicas.iter().any(|r| r == addr) {
            return (text(shard.id), text("replica"));
        }
    }
    (None, None)
}

/// Clients holding a server connection, and which.
/// Each connected client's state as `SHOW CLIENTS` and `/metrics` show it:
/// `waiting` for a server connection, `active` (holding one, or inside a
/// transaction), or `idle`.
pub(crate) fn client_states(shared: &Shared) -> Vec<(Arc<ClientInfo>, &'static str)> {
    let links = links(shared);
    shared
        .clients
        .all()
        .into_iter()
        .map(|client| {
            let state = if client.is_waiting() {
                "waiting"
            } else if links.contains_key(&client.id)
                || client.in_transaction.load(Ordering::Relaxed)
            {
                "active"
            } else {
                "idle"
            };
            (client, state)
        })
        .collect()
}

fn links(shared: &Shared) -> HashMap<ClientId, u64> {
    let mut links = HashMap::new();
    for (_, pool) in shared.pools.all() {
        for server in pool.servers() {
            let client = server.link.load(Ordering::Relaxed);
            if server.is_active() && client != 0 {
                links.insert(ClientId(client), server.id);
            }
        }
    }
    links
}

/// How long `client` has been waiting, if it is.
fn waited_us(clock: &Clock, client: &ClientInfo) -> u64 {
    if client.is_waiting() {
        clock
            .now_us()
            .saturating_sub(client.wait_start_us.load(Ordering::Relaxed))
    } else {
        0
    }
}

/// One row per pool: its clients and server connections by state.
pub fn show_pools(shared: &Shared, out: &mut BytesMut) {
    let mut table = Table::new(
        out,
        &[
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "sv_login",
            "maxwait",
            "maxwait_us",
            "pool_mode",
            "pool_size",
            "paused",
            "shard",
            "role",
            "addr",
            "port",
        ],
    );
    let clients = shared.clients.all();
    let clock = &shared.clock;
    for ((database, user, _), pool) in shared.pools.all() {
        let id = pool.id().0;
        // A client counts in the pool of its last server connection (its
        // database's own pool until it has had one).
        let active = (clients.iter())
            .filter(|c| !c.is_waiting() && c.pool.load(Ordering::Relaxed) == id)
            .count();
        let maxwait = (clients.iter())
            .filter(|c| c.waiting_pool.load(Ordering::Relaxed) == id)
            .map(|c| waited_us(clock, c))
            .max()
            .unwrap_or(0);
        let f = pool.figures();
        let (shard, role) = shard_of(shared, &pool.addr);
        let (addr, port) = split_addr(&pool.addr);
        let mode = match pool.mode {
            crate::config::PoolMode::Transaction => "transaction",
            crate::config::PoolMode::Session => "session",
        };
        table.row(&[
            text(database),
            text(user),
            text(active),
            text(f.waiting),
            text(f.active),
            text(f.idle),
            text(f.logging_in),
            text(maxwait / 1_000_000),
            text(maxwait % 1_000_000),
            text(mode),
            text(f.size),
            text(u8::from(f.paused)),
            shard,
            role,
            addr,
            port,
        ]);
    }
    table.finish();
}

/// One row per connected client, admin consoles included.
pub fn show_clients(shared: &Shared, out: &mut BytesMut) {
    let mut table = Table::new(
        out,
        &[
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "local_addr",
            "local_port",
            "connect_time",
            "request_time",
            "wait",
            "wait_us",
            "link",
            "application_name",
            "id",
        ],
    );
    let links = links(shared);
    let clock = &shared.clock;
    for (client, state) in client_states(shared) {
        let link = links.get(&client.id);
        let waited = waited_us(clock, &client);
        let (addr, port) = socket(client.peer);
        let (local_addr, local_port) = socket(client.local);
        table.row(&[
            text("C"),
            text(&client.user),
            text(&client.database),
            text(state),
            addr,
            port,
            local_addr,
            local_port,
            text(format_wall(client.connect_time)),
            wall(clock, client.request_us.load(Ordering::Relaxed)),
            text(waited / 1_000_000),
            text(waited % 1_000_000),
            link.map(|id| id.to_string()),
            text(client.application_name()),
            text(client.id.0),
        ]);
    }
    table.finish();
}

/// One row per server connection of every pool.
pub fn show_servers(shared: &Shared, out: &mut BytesMut) {
    let mut table = Table::new(
        out,
        &[
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "local_addr",
            "local_port",
            "connect_time",
            "request_time",
            "link",
            "remote_pid",
            "id",
            "shard",
            "role",
        ],
    );
    let clock = &shared.clock;
    for ((database, _, _), pool) in shared.pools.all() {
        let (shard, role) = shard_of(shared, &pool.addr);
        let (addr, port) = split_addr(&pool.addr);
        for server in pool.servers() {
            let active = server.is_active();
            let link = server.link.load(Ordering::Relaxed);
            let (local_addr, local_port) = socket(server.local);
            table.row(&[
                text("S"),
                text(&pool.server_user),
                text(&database),
                text(if active { "active" } else { "idle" }),
                addr.clone(),
                port.clone(),
                local_addr,
                local_port,
                text(format_wall(server.connect_time)),
                wall(clock, server.request_us.load(Ordering::Relaxed)),
                (active && link != 0).then(|| link.to_string()),
                text(server.cancel_key.process_id),
                text(server.id),
                shard.clone(),
                role.clone(),
            ]);
        }
    }
    table.finish();
}

/// One row per database: totals since the proxy started, and averages over
/// the last `[admin] stats_period`. Times in microseconds, as PgBouncer's.
pub fn show_stats(shared: &Shared, out: &mut BytesMut) {
    let mut table = Table::new(
        out,
        &[
            "database",
            "total_xact_count",
            "total_query_count",
            "total_server_assignment_count",
            "total_received",
            "total_sent",
            "total_xact_time",
            "total_query_time",
            "total_wait_time",
            "avg_xact_count",
            "avg_query_count",
            "avg_server_assignment_count",
            "avg_recv",
            "avg_sent",
            "avg_xact_time",
            "avg_query_time",
            "avg_wait_time",
        ],
    );
    for (database, t) in crate::stats::totals(shared) {
        let a = shared.stats.averages(&database);
        let c = &t.clients;
        table.row(&[
            text(&database),
            text(c.xacts),
            text(c.queries),
            text(t.assignments),
            text(c.received),
            text(c.sent),
            text(c.xact_us),
            text(c.query_us),
            text(c.wait_us),
            text(a.xact_count),
            text(a.query_count),
            text(a.assignment_count),
            text(a.recv),
            text(a.sent),
            text(a.xact_time),
            text(a.query_time),
            text(a.wait_time),
        ]);
    }
    table.finish();
}

/// The config in force, one setting per row (passwords hidden).
pub fn show_config(shared: &Shared, out: &mut BytesMut) {
    let mut table = Table::new(out, &["key", "value", "default", "changeable"]);
    for s in crate::settings::settings(&shared.effective()) {
        let changeable = if s.changeable { "yes" } else { "no" };
        table.row(&[text(s.key), s.value, s.default, text(changeable)]);
    }
    table.finish();
}
