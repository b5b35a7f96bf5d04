//! `shardline admin`: the operator's view of and hand on the metadata group,
//! and on a proxy's point-read cache (through its admin console).
//! Human-readable tables by default, `--json` for scripts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;

use metadata::client::MetaClient;
use metadata::Command;
use router::{placement, KeyType, PartitionState, ShardId, ShardMap};

#[derive(Args)]
pub struct AdminArgs {
    /// Metadata node addresses (host:port, comma-separated). Without it, the
    /// dev cluster started from `--dir` is used.
    #[arg(long, value_delimiter = ',')]
    meta: Vec<String>,
    /// The `shardline dev` directory whose metadata node (and proxy) to use.
    #[arg(long, default_value = "./.shardline/dev")]
    dir: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// A proxy's admin console, for what that proxy sees of the servers, its
    /// views (`show`) and its cache
    /// (`postgres://USER:PASSWORD@HOST:PORT/shardline`, an admin user).
    /// Without it, the proxy of the dev cluster in `--dir`.
    #[arg(long, global = true)]
    proxy: Option<String>,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// A proxy's point-read cache (its admin console; see `--proxy`).
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// A view of a proxy's admin console (`SHOW VIEW` there): a table, or
    /// with `--json` a list of objects (see `--proxy`).
    Show {
        #[arg(value_enum)]
        view: ConsoleView,
    },
    #[command(flatten)]
    Meta(MetaCommand),
}

/// The admin console's `SHOW` views (see the README's admin console).
#[derive(Clone, Copy, clap::ValueEnum)]
enum ConsoleView {
    /// Each pool: clients active and waiting, server connections by state.
    Pools,
    /// Each client: user, database, state, address, application_name.
    Clients,
    /// Each server connection: state, the client it serves, its backend.
    Servers,
    /// Per database: transactions, queries, bytes and times.
    Stats,
    /// Every setting, its default and whether RELOAD applies it.
    Config,
    /// Each database's objective over the last 5 minutes and hour.
    Slo,
    /// The shards and each server's role, health and lag.
    Shards,
    /// The point-read cache's counters (also `cache stats`).
    Cache,
    /// The proxy's version.
    Version,
}

impl ConsoleView {
    fn command(self) -> &'static str {
        match self {
            ConsoleView::Pools => "SHOW POOLS",
            ConsoleView::Clients => "SHOW CLIENTS",
            ConsoleView::Servers => "SHOW SERVERS",
            ConsoleView::Stats => "SHOW STATS",
            ConsoleView::Config => "SHOW CONFIG",
            ConsoleView::Slo => "SHOW SLO",
            ConsoleView::Shards => "SHOW SHARDS",
            ConsoleView::Cache => "SHOW CACHE",
            ConsoleView::Version => "SHOW VERSION",
        }
    }
}

#[derive(Subcommand)]
enum CacheAction {
    /// Counters, cached tables and each change feed's state (`SHOW CACHE`).
    Stats,
    /// Cache point reads of a sharded table from now on (`CACHE ENABLE`).
    Enable {
        /// The table, as the shard map names it.
        table: String,
    },
    /// Stop caching a table and drop its entries (`CACHE DISABLE`).
    Disable {
        /// The table, as the shard map names it.
        table: String,
    },
    /// Drop every cached entry (`CACHE FLUSH`).
    Flush,
}

/// Commands on the metadata group (with `shards` also asking a proxy).
#[derive(Subcommand)]
enum MetaCommand {
    /// Members, leader, epoch and proxy leases.
    Status,
    /// Shards and their addresses, and each server's role, health, lag and
    /// breaker state as a proxy sees them.
    Shards,
    AddShard {
        #[arg(long)]
        id: u32,
        #[arg(long)]
        primary: String,
        #[arg(long = "replica")]
        replicas: Vec<String>,
    },
    RemoveShard {
        #[arg(long)]
        id: u32,
    },
    /// Sharded tables.
    Tables,
    DeclareTable {
        name: String,
        #[arg(long)]
        key: String,
        #[arg(long = "type")]
        key_type: String,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        partitions: Option<u32>,
    },
    /// Partition -> shard, and the distance from the rendezvous target.
    Placement,
    /// Where a statement would be routed by the current map.
    Route {
        /// The SQL text.
        sql: String,
    },
    /// Metadata group members.
    Members,
    AddMember {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        addr: String,
    },
    RemoveMember {
        #[arg(long)]
        id: u64,
    },
}

/// Like `println!`, but a closed stdout (`admin ... | head`) is not a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// A connection to a proxy's admin console: `url`, or the proxy of the dev
/// cluster in `dir` (as its first admin user).
async fn proxy_console(url: Option<&str>, dir: &Path) -> anyhow::Result<tokio_postgres::Client> {
    let config: tokio_postgres::Config = match url {
        Some(url) => url.parse().context("--proxy is not a connection URL")?,
        None => {
            let text = std::fs::read_to_string(dir.join("shardline.toml"))
                .context("no --proxy given and no dev proxy config found")?;
            let config = proxy::Config::parse(&text)?;
            let user = config
                .users
                .iter()
                .find(|u| u.admin)
                .context("the dev config has no admin user")?;
            let mut c = tokio_postgres::Config::new();
            c.host(config.proxy.listen.ip().to_string())
                .port(config.proxy.listen.port())
                .user(&user.name)
                .password(user.password.clone().unwrap_or_default())
                .dbname(proxy::admin::DATABASE);
            c
        }
    };
    let (client, connection) = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        config.connect(tokio_postgres::NoTls),
    )
    .await
    .context("timed out connecting to the proxy")?
    .context("cannot reach the proxy's admin console")?;
    tokio::spawn(connection);
    Ok(client)
}

/// An error the proxy's admin console answered a command with.
#[derive(Debug)]
struct ConsoleError(String);

impl std::fmt::Display for ConsoleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the proxy refused: {}", self.0)
    }
}

impl std::error::Error for ConsoleError {}

/// Runs `command` on the admin console: the column names and the rows (NULL
/// as an empty string). An ErrorResponse becomes a [`ConsoleError`].
async fn console_query(
    client: &tokio_postgres::Client,
    command: &str,
) -> anyhow::Result<(Vec<String>, Vec<Vec<String>>)> {
    let messages = match client.simple_query(command).await {
        Ok(messages) => messages,
        Err(e) => {
            return Err(match e.as_db_error() {
                Some(db) => ConsoleError(db.message().to_owned()).into(),
                None => anyhow::Error::new(e).context(format!("sending {command}")),
            })
        }
    };
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for message in messages {
        match message {
            tokio_postgres::SimpleQueryMessage::RowDescription(description) => {
                columns = description.iter().map(|c| c.name().to_owned()).collect();
            }
            tokio_postgres::SimpleQueryMessage::Row(row) => rows.push(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or_default().to_owned())
                    .collect(),
            ),
            _ => {}
        }
    }
    Ok((columns, rows))
}

/// `SHOW SHARDS` from a proxy's admin console.
async fn proxy_servers(
    url: Option<&str>,
    dir: &Path,
) -> anyhow::Result<(Vec<String>, Vec<Vec<String>>)> {
    let client = proxy_console(url, dir).await?;
    console_query(&client, "SHOW SHARDS").await
}

/// `shardline admin cache ...`: one console command; needs no metadata group.
async fn run_cache(
    action: CacheAction,
    url: Option<&str>,
    dir: &Path,
    json: bool,
) -> anyhow::Result<()> {
    if let CacheAction::Enable { table } | CacheAction::Disable { table } = &action {
        console_table(table)?;
    }
    let client = proxy_console(url, dir).await?;
    let (command, confirmation) = match &action {
        CacheAction::Stats => {
            let (columns, rows) = console_query(&client, "SHOW CACHE").await?;
            // Without a cache the console sends the columns but no row.
            let Some(row) = rows.into_iter().next() else {
                return Err(ConsoleError(proxy::admin::NO_CACHE.to_owned()).into());
            };
            return print_cache_stats(&columns, row, json);
        }
        CacheAction::Enable { table } => (
            format!("CACHE ENABLE {table}"),
            format!("cache enabled for {table}: served once each shard's change feed publishes it"),
        ),
        CacheAction::Disable { table } => (
            format!("CACHE DISABLE {table}"),
            format!("cache disabled for {table}: its entries are dropped"),
        ),
        CacheAction::Flush => (
            "CACHE FLUSH".to_owned(),
            "cache flushed: every entry dropped".to_owned(),
        ),
    };
    console_query(&client, &command).await?;
    if json {
        return print_json(&json!({"ok": true, "message": confirmation}));
    }
    out!("{confirmation}");
    Ok(())
}

/// `shardline admin show VIEW`: the console's rows as they come, as a table
/// or as one JSON object per row (values as the console's text).
async fn run_show(
    view: ConsoleView,
    url: Option<&str>,
    dir: &Path,
    json: bool,
) -> anyhow::Result<()> {
    let client = proxy_console(url, dir).await?;
    let (columns, rows) = console_query(&client, view.command()).await?;
    if json {
        let objects: Vec<serde_json::Value> = rows
            .into_iter()
            .map(|row| {
                let object = columns.iter().cloned().zip(row.into_iter().map(Into::into));
                serde_json::Value::Object(object.collect())
            })
            .collect();
        return print_json(&serde_json::Value::Array(objects));
    }
    let headers: Vec<&str> = columns.iter().map(String::as_str).collect();
    table(&headers, rows);
    Ok(())
}

/// Checks that `table` is a name the console's `CACHE ENABLE|DISABLE <table>`
/// takes: one word, which it uses as written.
fn console_table(table: &str) -> anyhow::Result<()> {
    let word = !table.is_empty()
        && !table
            .chars()
            .any(|c| c.is_whitespace() || c == ';' || c == '"' || c.is_control());
    anyhow::ensure!(
        word,
        "{table:?} is not a table name the console accepts: give it as the shard map names it, \
         without spaces, quotes or semicolons"
    );
    Ok(())
}

/// The `SHOW CACHE` row as (name, value) lines, or as one JSON object with
/// numbers as numbers and `tables` and `feeds` as lists.
fn print_cache_stats(columns: &[String], row: Vec<String>, json: bool) -> anyhow::Result<()> {
    if json {
        let object: serde_json::Map<String, serde_json::Value> = columns
            .iter()
            .zip(row)
            .map(|(name, value)| {
                let value = match name.as_str() {
                    "tables" => json!(value
                        .split(", ")
                        .filter(|t| !t.is_empty())
                        .collect::<Vec<_>>()),
                    "feeds" => json!(value.lines().collect::<Vec<_>>()),
                    _ => {
                        if let Ok(n) = value.parse::<u64>() {
                            json!(n)
                        } else if let Ok(x) = value.parse::<f64>() {
                            json!(x)
                        } else {
                            json!(value)
                        }
                    }
                };
                (name.clone(), value)
            })
            .collect();
        return print_json(&serde_json::Value::Object(object));
    }
    let mut rows = Vec::new();
    for (name, value) in columns.iter().zip(row) {
        // One line per feed, so the table stays aligned.
        let mut lines = value.lines();
        rows.push(vec![
            name.clone(),
            lines.next().unwrap_or_default().to_owned(),
        ]);
        rows.extend(lines.map(|line| vec![String::new(), line.to_owned()]));
    }
    table(&["name", "value"], rows);
    Ok(())
}

/// File in a dev directory holding the metadata node's address.
pub const DEV_META_ADDR_FILE: &str = "meta.addr";

pub fn dev_meta_addr(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join(DEV_META_ADDR_FILE);
    let addr = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no --meta given and no dev cluster found ({} is missing); start one with `shardline dev` or pass --meta host:port",
            path.display()
        )
    })?;
    Ok(addr.trim().to_owned())
}

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let command = match args.command {
        AdminCommand::Cache { action } => {
            return run_cache(action, args.proxy.as_deref(), &args.dir, args.json).await
        }
        AdminCommand::Show { view } => {
            return run_show(view, args.proxy.as_deref(), &args.dir, args.json).await
        }
        AdminCommand::Meta(command) => command,
    };
    let addrs = if args.meta.is_empty() {
        vec![dev_meta_addr(&args.dir)?]
    } else {
        args.meta.clone()
    };
    let client = MetaClient::new(addrs);
    let json = args.json;
    match command {
        MetaCommand::Status => {
            let s = client.status().await?;
            if json {
                return print_json(&json!({
                    "leader": s.leader, "term": s.term, "epoch": s.epoch,
                    "last_applied": s.last_applied,
                    "members": s.members.iter().map(|(id, addr, voter)| json!({"id": id, "addr": addr, "voter": voter})).collect::<Vec<_>>(),
                    "proxies": s.proxies.iter().map(|p| json!({"id": p.id, "addr": p.addr, "live": p.is_live(s.now_ms), "lease_ms_left": p.expires_ms.saturating_sub(s.now_ms), "acked_epoch": p.acked_epoch})).collect::<Vec<_>>(),
                    "epoch_acknowledged_by": s.acks.acknowledged, "epoch_pending": s.acks.pending,
                }));
            }
            out!(
                "leader: {}   term: {}   epoch: {}",
                s.leader.map_or("none".into(), |l| l.to_string()),
                s.term,
                s.epoch
            );
            print_members(&s.members, s.leader);
            let rows: Vec<Vec<String>> = s
                .proxies
                .iter()
                .map(|p| {
                    let left = p.expires_ms.saturating_sub(s.now_ms);
                    vec![
                        p.id.clone(),
                        p.addr.clone(),
                        if p.is_live(s.now_ms) {
                            format!("live ({}.{:01}s left)", left / 1000, left % 1000 / 100)
                        } else {
                            "expired".into()
                        },
                        p.acked_epoch.to_string(),
                    ]
                })
                .collect();
            out!();
            table(&["proxy", "address", "lease", "acked epoch"], rows);
            out!(
                "\nepoch {}: acknowledged by {} live proxies, pending: {}",
                s.epoch,
                s.acks.acknowledged.len(),
                if s.acks.pending.is_empty() {
                    "none".into()
                } else {
                    s.acks.pending.join(", ")
                }
            );
        }
        MetaCommand::Members => {
            let s = client.status().await?;
            if json {
                return print_json(&json!(s.members.iter().map(|(id, addr, voter)| json!({"id": id, "addr": addr, "voter": voter, "leader": Some(*id) == s.leader})).collect::<Vec<_>>()));
            }
            print_members(&s.members, s.leader);
        }
        MetaCommand::Shards => {
            let (state, _) = client.read().await?;
            let map = &state.map;
            if json {
                let servers = match proxy_servers(args.proxy.as_deref(), &args.dir).await {
                    Ok((columns, rows)) => rows
                        .into_iter()
                        .map(|row| {
                            columns
                                .iter()
                                .cloned()
                                .zip(row.into_iter().map(serde_json::Value::String))
                                .collect::<serde_json::Map<_, _>>()
                        })
                        .collect(),
                    Err(_) => Vec::new(),
                };
                return print_json(&json!({
                    "shards": map.shards.values().map(|s| json!({"id": s.id.0, "primary": s.primary, "replicas": s.replicas, "partitions": map.partitions_owned(s.id)})).collect::<Vec<_>>(),
                    "servers": servers,
                }));
            }
            let rows = map
                .shards
                .values()
                .map(|s| {
                    vec![
                        s.id.to_string(),
                        s.primary.clone(),
                        s.replicas.join(", "),
                        map.partitions_owned(s.id).to_string(),
                    ]
                })
                .collect();
            table(&["shard", "primary", "replicas", "partitions"], rows);
            match proxy_servers(args.proxy.as_deref(), &args.dir).await {
                Ok((columns, rows)) => {
                    out!("\nservers, as the proxy sees them:");
                    let columns: Vec<&str> = columns.iter().map(String::as_str).collect();
                    table(&columns, rows);
                }
                Err(e) => eprintln!("\n(no server health: {e:#})"),
            }
        }
        MetaCommand::AddShard {
            id,
            primary,
            replicas,
        } => {
            let applied = client
                .propose(Command::AddShard {
                    id: ShardId(id),
                    primary,
                    replicas,
                })
                .await?;
            done(json, &format!("shard {id} added"), applied.epoch)?;
        }
        MetaCommand::RemoveShard { id } => {
            let applied = client
                .propose(Command::RemoveShard { id: ShardId(id) })
                .await?;
            done(json, &format!("shard {id} removed"), applied.epoch)?;
        }
        MetaCommand::Tables => {
            let (state, _) = client.read().await?;
            let map = &state.map;
            if json {
                return print_json(&json!(map.tables.values().map(|t| json!({"name": t.name, "key": t.key, "type": t.key_type.as_str(), "group": t.group, "partitions": map.groups[&t.group].modulus()})).collect::<Vec<_>>()));
            }
            let rows = map
                .tables
                .values()
                .map(|t| {
                    vec![
                        t.name.clone(),
                        t.key.clone(),
                        t.key_type.to_string(),
                        t.group.clone(),
                        map.groups[&t.group].modulus().to_string(),
                    ]
                })
                .collect();
            table(&["table", "key", "type", "group", "partitions"], rows);
        }
        MetaCommand::DeclareTable {
            name,
            key,
            key_type,
            group,
            partitions,
        } => {
            let key_type: KeyType = key_type.parse().map_err(anyhow::Error::msg)?;
            let applied = client
                .propose(Command::DeclareTable {
                    name: name.clone(),
                    key,
                    key_type,
                    group,
                    partitions,
                })
                .await?;
            done(json, &format!("table {name} declared"), applied.epoch)?;
        }
        MetaCommand::Placement => {
            let (state, _) = client.read().await?;
            print_placement(&state.map, json)?;
        }
        MetaCommand::Route { sql } => {
            let (state, _) = client.read().await?;
            print_route(&state.map, &sql, json)?;
        }
        MetaCommand::AddMember { id, addr } => {
            client.add_member(id, &addr).await?;
            done(json, &format!("node {id} ({addr}) is a voting member"), 0)?;
        }
        MetaCommand::RemoveMember { id } => {
            client.remove_member(id).await?;
            done(json, &format!("node {id} removed"), 0)?;
        }
    }
    Ok(())
}

fn print_placement(map: &ShardMap, json: bool) -> anyhow::Result<()> {
    let shards: Vec<ShardId> = map.shards.keys().copied().collect();
    if json {
        let groups: BTreeMap<_, _> = map
            .groups
            .values()
            .map(|g| {
                let target = placement::target(g.modulus(), &shards);
                let parts: Vec<_> = g
                    .partitions
                    .iter()
                    .enumerate()
                    .map(|(i, p)| json!({"partition": i, "owner": p.owner.0, "target": target.get(i).map(|s| s.0), "moving_to": match p.state { PartitionState::Moving { to, .. } => Some(to.0), PartitionState::Stable => None }}))
                    .collect();
                (g.name.clone(), json!({"partitions": parts, "misplaced": placement::misplaced(g, &shards).len()}))
            })
            .collect();
        return print_json(&json!({"epoch": map.epoch.0, "groups": groups}));
    }
    if map.groups.is_empty() {
        out!("no sharded tables yet (declare one with `shardline admin declare-table`)");
        return Ok(());
    }
    for g in map.groups.values() {
        let target = placement::target(g.modulus(), &shards);
        let misplaced = placement::misplaced(g, &shards);
        out!(
            "group {} ({}, {} partitions): {} of {} partitions away from the rendezvous target",
            g.name,
            g.key_type,
            g.modulus(),
            misplaced.len(),
            g.modulus()
        );
        let rows = g
            .partitions
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let t = target.get(i).map_or("-".into(), |s| s.to_string());
                vec![
                    i.to_string(),
                    p.owner.to_string(),
                    t,
                    match p.state {
                        PartitionState::Stable => "stable".into(),
                        PartitionState::Moving { to, phase } => {
                            format!("moving to {to} ({phase:?})")
                        }
                    },
                ]
            })
            .collect();
        table(&["partition", "owner", "target", "state"], rows);
    }
    Ok(())
}

/// Per sharded table: the shards its keys map to, or all shards.
fn print_route(map: &ShardMap, sql: &str, json: bool) -> anyhow::Result<()> {
    let analysis = router::analyse(sql, map)?;
    let mut routes = Vec::new();
    for target in &analysis.targets {
        let table = &map.tables[&target.table];
        let group = &map.groups[&table.group];
        let to = match &target.keys {
            None => "every shard (no usable key)".to_owned(),
            Some(keys) => {
                let mut shards = std::collections::BTreeSet::new();
                let mut parameters = false;
                for key in keys {
                    match key {
                        router::KeySource::Const(v) => {
                            let p = router::hash::partition_of(&[Some(v)], group.modulus());
                            shards.insert(group.partitions[p as usize].owner.0);
                        }
                        _ => parameters = true,
                    }
                }
                let listed: Vec<String> = shards.iter().map(|s| format!("shard {s}")).collect();
                match (listed.is_empty(), parameters) {
                    (true, _) => "decided by the bound parameters".to_owned(),
                    (false, false) => listed.join(", "),
                    (false, true) => format!("{} and where the parameters lead", listed.join(", ")),
                }
            }
        };
        routes.push((target.table.clone(), to));
    }
    if json {
        return print_json(&json!({
            "refusal": analysis.refusal,
            "routes": routes.iter().map(|(t, to)| json!({"table": t, "to": to})).collect::<Vec<_>>(),
        }));
    }
    if let Some(why) = &analysis.refusal {
        out!("refused: {why}");
    }
    match router::hint::hint(sql) {
        Err(why) => out!("refused: {why}"),
        Ok(None) => {}
        Ok(Some(hint)) => {
            let route = router::route(&analysis, map, router::Params::default());
            match router::hint::apply_hint(route, &hint, &analysis, map) {
                router::Route::Shard(s) => out!("routing hint: shard {s}"),
                router::Route::Refused(why) => out!("refused: {why}"),
                other => out!("routing hint: {other:?}"),
            }
        }
    }
    if routes.is_empty() {
        out!("no sharded table: the home shard ({})", ShardMap::HOME);
    }
    for (table, to) in routes {
        out!("{table}: {to}");
    }
    Ok(())
}

fn print_members(members: &[(u64, String, bool)], leader: Option<u64>) {
    let rows = members
        .iter()
        .map(|(id, addr, voter)| {
            let role = if Some(*id) == leader {
                "leader"
            } else if *voter {
                "voter"
            } else {
                "learner"
            };
            vec![id.to_string(), addr.clone(), role.to_owned()]
        })
        .collect();
    table(&["node", "address", "role"], rows);
}

fn done(json: bool, what: &str, epoch: u64) -> anyhow::Result<()> {
    if json {
        print_json(&json!({"ok": true, "message": what, "epoch": epoch}))
    } else {
        if epoch > 0 {
            out!("{what} (epoch {epoch})");
        } else {
            out!("{what}");
        }
        Ok(())
    }
}

fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    out!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A plain text table with aligned columns.
fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    line(widths.iter().map(|w| "-".repeat(*w)).collect());
    if rows.is_empty() {
        out!("(none)");
    }
    for row in rows {
        line(row);
    }
}

/// Turns a refused command into a clean message for the operator.
pub fn explain(e: &anyhow::Error) -> Option<String> {
    if let Some(refused) = e.downcast_ref::<ConsoleError>() {
        return Some(refused.to_string());
    }
    match e.downcast_ref::<metadata::Error>()? {
        metadata::Error::Refused(r) => Some(format!("refused: {r}")),
        metadata::Error::NoLeader(why) => Some(format!(
            "no metadata leader reachable ({why}); check that the nodes in --meta are running"
        )),
        _ => None,
    }
}
