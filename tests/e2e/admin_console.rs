//! The admin console (database `shardline`) through `psql`: each SHOW
//! command answers with its documented columns and rows that follow known
//! state; RELOAD changes a pool size live; PAUSE waits for an open
//! transaction and holds new queries until RESUME; SHUTDOWN lets an open
//! transaction commit, refuses new connections, and ends the proxy's run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use testkit::Cluster;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::harness::{eventually, sqlstate, tool, APP_PASSWORD};

const OPS_PASSWORD: &str = "ops-secret";

const POOLS: &[&str] = &[
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
];
const CLIENTS: &[&str] = &[
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
];
const SERVERS: &[&str] = &[
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
];
const STATS: &[&str] = &[
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
];

/// One PostgreSQL, and a proxy started from a config file (so RELOAD has
/// something to re-read) whose run future the test can await.
struct Console {
    pg: Cluster,
    _dir: tempfile::TempDir,
    path: PathBuf,
    addr: SocketAddr,
    metrics: SocketAddr,
    run: Option<JoinHandle<()>>,
    stop: Option<oneshot::Sender<()>>,
}

/// The proxy's config file: `pool_size` and extra `[proxy]` lines.
fn config(pg_port: u16, pool_size: u32, proxy_extra: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
pool_size = {pool_size}
checkout_timeout = "10s"
{proxy_extra}

[admin]
listen = "127.0.0.1:0"

[[users]]
name = "app"
password = "{APP_PASSWORD}"

[[users]]
name = "ops"
password = "{OPS_PASSWORD}"
admin = true

[[databases]]
name = "db"
port = {pg_port}
dbname = "postgres"
server_user = "postgres"
server_password = "postgres"
"#
    )
}

/// `psql` output: the columns and rows of the last result, and stderr
/// (notices, warnings, errors).
struct Psql {
    success: bool,
    columns: Vec<String>,
    rows: Vec<Vec<String>>,
    stdout: String,
    stderr: String,
}

impl Psql {
    fn column(&self, name: &str) -> usize {
        (self.columns.iter().position(|c| c == name))
            .unwrap_or_else(|| panic!("no column {name} in {:?}", self.columns))
    }

    /// Rows as column -> value maps (NULL reads as "").
    fn maps(&self) -> Vec<HashMap<String, String>> {
        (self.rows.iter())
            .map(|row| {
                self.columns
                    .iter()
                    .cloned()
                    .zip(row.iter().cloned())
                    .collect()
            })
            .collect()
    }

    /// The one row whose `column` is `value`.
    fn row_where(&self, column: &str, value: &str) -> HashMap<String, String> {
        let i = self.column(column);
        let mut found = self.rows.iter().filter(|r| r[i] == value);
        let row = found
            .next()
            .unwrap_or_else(|| panic!("no row with {column} = {value}:\n{}", self.stdout));
        assert!(
            found.next().is_none(),
            "several rows with {column} = {value}"
        );
        self.columns
            .iter()
            .cloned()
            .zip(row.iter().cloned())
            .collect()
    }
}

impl Console {
    async fn start(pool_size: u32) -> Console {
        let pg = tokio::task::spawn_blocking(|| {
            Cluster::builder().setting("max_connections", "100").start()
        })
        .await
        .expect("join")
        .expect("PostgreSQL starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("shardline.toml");
        std::fs::write(&path, config(pg.port(), pool_size, "")).expect("write the config");
        let parsed = proxy::Config::load(&path).expect("the config loads");
        let proxy = proxy::Proxy::bind(parsed).await.expect("bind");
        let addr = proxy.local_addr().expect("addr");
        let metrics = proxy.metrics_addr().expect("metrics listener");
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tokio::spawn(proxy.run(async {
            let _ = stopped.await;
        }));
        Console {
            pg,
            _dir: dir,
            path,
            addr,
            metrics,
            run: Some(run),
            stop: Some(stop),
        }
    }

    /// Rewrites the config file with another pool size and `[proxy]` lines.
    fn rewrite(&self, pool_size: u32, proxy_extra: &str) {
        let text = config(self.pg.port(), pool_size, proxy_extra);
        std::fs::write(&self.path, text).expect("rewrite the config");
    }

    fn url(&self, user: &str, password: &str, db: &str, application_name: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{db}?application_name={application_name}",
            self.addr.port()
        )
    }

    /// An `app` client of `db`, and its connection task (which ends with
    /// the error that closed the connection, if any).
    async fn client_and_connection(
        &self,
        application_name: &str,
    ) -> (Client, JoinHandle<Result<(), tokio_postgres::Error>>) {
        let url = self.url("app", APP_PASSWORD, "db", application_name);
        let (client, connection) = tokio_postgres::connect(&url, NoTls)
            .await
            .expect("connect through the proxy");
        (client, tokio::spawn(connection))
    }

    async fn client(&self, application_name: &str) -> Client {
        self.client_and_connection(application_name).await.0
    }

    /// A tokio-postgres connection to the console.
    async fn admin(&self) -> Client {
        let url = self.url("ops", OPS_PASSWORD, "shardline", "test");
        let (client, connection) = tokio_postgres::connect(&url, NoTls)
            .await
            .expect("connect to the admin console");
        tokio::spawn(connection);
        client
    }

    /// Runs `sql` on the console with psql.
    async fn psql(&self, sql: &str) -> Psql {
        let url = self.url("ops", OPS_PASSWORD, "shardline", "psql");
        let sql = sql.to_owned();
        let output = tokio::task::spawn_blocking(move || {
            tool("psql")
                .args([
                    url.as_str(),
                    "-X",
                    "-A",
                    "-F",
                    "\x1f",
                    "-P",
                    "footer=off",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    &sql,
                ])
                .output()
                .expect("run psql")
        })
        .await
        .expect("join");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let mut lines = stdout.lines();
        let columns = (lines.next().unwrap_or_default().split('\x1f'))
            .map(str::to_owned)
            .collect();
        let rows = lines
            .map(|l| l.split('\x1f').map(str::to_owned).collect())
            .collect();
        Psql {
            success: output.status.success(),
            columns,
            rows,
            stdout,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// `SHOW` through psql, checking that it succeeds with `columns`.
    async fn show(&self, what: &str, columns: &[&str]) -> Psql {
        let out = self.psql(&format!("SHOW {what}")).await;
        assert!(out.success, "SHOW {what}: {}", out.stderr);
        assert_eq!(out.columns, columns, "SHOW {what} columns");
        out
    }

    /// The `db` pool's row of `SHOW POOLS`.
    async fn pool(&self) -> HashMap<String, String> {
        self.show("POOLS", POOLS).await.row_where("database", "db")
    }

    /// Sends `PAUSE` from a console of its own and returns once the pool
    /// shows as paused, with the command's outcome still to come.
    async fn begin_pause(&self) -> JoinHandle<Result<(), tokio_postgres::Error>> {
        let admin = self.admin().await;
        let pause = tokio::spawn(async move { admin.simple_query("PAUSE").await.map(drop) });
        assert!(
            eventually(Duration::from_secs(5), || async {
                self.pool().await["paused"] == "1"
            })
            .await,
            "the pool was never paused"
        );
        pause
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The first value of the first row of a simple query.
async fn value(client: &Client, sql: &str) -> String {
    let messages = client.simple_query(sql).await.expect(sql);
    for message in messages {
        if let SimpleQueryMessage::Row(row) = message {
            return row.get(0).unwrap_or_default().to_owned();
        }
    }
    panic!("{sql} returned no row")
}

fn number(row: &HashMap<String, String>, column: &str) -> u64 {
    row[column]
        .parse()
        .unwrap_or_else(|_| panic!("{column} = {:?} is not a number", row[column]))
}

/// One sample's value from a `/metrics` scrape.
async fn metric(addr: SocketAddr, name: &str, database: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (_, body) = response.split_once("\r\n\r\n").expect("a body");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && s.labels.get("database") == Some(database))
        .unwrap_or_else(|| panic!("no {name}{{database={database}}} in\n{body}"));
    match sample.value {
        prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name} is {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_commands_answer_with_their_columns_and_known_state() {
    let env = Console::start(4).await;
    let holder = env.client("holder").await;
    let worker = env.client("worker").await;
    let other = env.client("other").await;
    holder.simple_query("BEGIN").await.expect("BEGIN");
    let pid = value(&holder, "SELECT pg_backend_pid()").await;

    // Three clients and psql itself; the one in a transaction is active.
    let clients = env.show("CLIENTS", CLIENTS).await;
    assert_eq!(clients.rows.len(), 4, "{}", clients.stdout);
    let held = clients.row_where("application_name", "holder");
    assert_eq!((held["type"].as_str(), held["user"].as_str()), ("C", "app"));
    assert_eq!(
        (held["database"].as_str(), held["state"].as_str()),
        ("db", "active")
    );
    assert_eq!(held["addr"], "127.0.0.1");
    assert_eq!(held["local_port"], env.addr.port().to_string());
    assert!(held["connect_time"].ends_with(" UTC"), "{held:?}");
    let idle = clients.row_where("application_name", "worker");
    assert_eq!(
        (idle["state"].as_str(), idle["link"].as_str()),
        ("idle", "")
    );
    let console = clients.row_where("application_name", "psql");
    assert_eq!(
        (console["database"].as_str(), console["user"].as_str()),
        ("shardline", "ops")
    );

    // The name a client SETs shows once it holds (a ROLLBACK undoes one).
    let other_id = clients.row_where("application_name", "other")["id"].clone();
    other
        .batch_execute("SET application_name = 'renamed'")
        .await
        .expect("SET");
    other
        .batch_execute("BEGIN; SET application_name = 'undone'; ROLLBACK")
        .await
        .expect("SET rolled back");
    let clients = env.show("CLIENTS", CLIENTS).await;
    assert_eq!(
        clients.row_where("application_name", "renamed")["id"],
        other_id,
        "{}",
        clients.stdout
    );

    // Its server connection is active, linked to it, and is the backend it sees.
    let servers = env.show("SERVERS", SERVERS).await;
    let active = servers.row_where("state", "active");
    assert_eq!(active["link"], held["id"]);
    assert_eq!(held["link"], active["id"]);
    assert_eq!(active["remote_pid"], pid);
    assert_eq!(
        (active["type"].as_str(), active["user"].as_str()),
        ("S", "postgres")
    );
    assert_eq!(
        (active["database"].as_str(), active["port"].as_str()),
        ("db", env.pg.port().to_string().as_str())
    );

    let pool = env.pool().await;
    assert_eq!(number(&pool, "cl_active"), 3, "{pool:?}");
    assert_eq!(number(&pool, "cl_waiting"), 0, "{pool:?}");
    assert_eq!(number(&pool, "sv_active"), 1, "{pool:?}");
    assert_eq!(
        number(&pool, "sv_idle") + 1,
        servers.rows.len() as u64,
        "{pool:?}"
    );
    assert_eq!(
        (pool["pool_mode"].as_str(), pool["pool_size"].as_str()),
        ("transaction", "4")
    );
    assert_eq!(
        (pool["paused"].as_str(), pool["maxwait"].as_str()),
        ("0", "0")
    );

    // Counters move by the transactions and queries run.
    let before = env.show("STATS", STATS).await.row_where("database", "db");
    const N: u64 = 10;
    for i in 0..N {
        worker
            .simple_query(&format!("SELECT {i}"))
            .await
            .expect("query");
    }
    for sql in ["BEGIN", "SELECT 1", "COMMIT"] {
        other.simple_query(sql).await.expect(sql);
    }
    let after = env.show("STATS", STATS).await.row_where("database", "db");
    let moved = |column: &str| number(&after, column) - number(&before, column);
    assert_eq!(moved("total_xact_count"), N + 1, "{before:?}\n{after:?}");
    assert_eq!(moved("total_query_count"), N + 3, "{before:?}\n{after:?}");
    assert!(moved("total_received") > 0 && moved("total_sent") > 0);
    // The same counters on /metrics.
    for (name, column) in [
        ("shardline_transactions_total", "total_xact_count"),
        ("shardline_queries_total", "total_query_count"),
        ("shardline_bytes_received_total", "total_received"),
        ("shardline_bytes_sent_total", "total_sent"),
    ] {
        let exported = metric(env.metrics, name, "db").await;
        assert_eq!(exported, number(&after, column) as f64, "{name}");
    }

    // Once it commits, the client is idle and so is its server connection.
    holder.simple_query("COMMIT").await.expect("COMMIT");
    let clients = env.show("CLIENTS", CLIENTS).await;
    assert_eq!(
        clients.row_where("application_name", "holder")["state"],
        "idle"
    );
    let servers = env.show("SERVERS", SERVERS).await;
    assert!(servers.maps().iter().all(|s| s["state"] == "idle"));

    // The config in force, passwords hidden.
    let config = env
        .show("CONFIG", &["key", "value", "default", "changeable"])
        .await;
    let pool_size = config.row_where("key", "proxy.pool_size");
    assert_eq!(
        (
            pool_size["value"].as_str(),
            pool_size["default"].as_str(),
            pool_size["changeable"].as_str()
        ),
        ("4", "20", "yes")
    );
    assert_eq!(config.row_where("key", "proxy.listen")["changeable"], "no");
    assert_eq!(
        config.row_where("key", "users.app.password")["value"],
        "********"
    );
    for secret in [APP_PASSWORD, OPS_PASSWORD] {
        assert!(!config.stdout.contains(secret), "a password is shown");
    }

    let version = env.show("VERSION", &["version"]).await;
    assert!(
        version.rows[0][0].starts_with("Shardline "),
        "{}",
        version.stdout
    );
    let unknown = env.psql("SHOW NOTHING").await;
    assert!(
        !unknown.success && unknown.stderr.contains("SHOW POOLS"),
        "{}",
        unknown.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_the_pool_size_without_dropping_anyone() {
    let env = Console::start(2).await;
    let keeper = env.client("keeper").await;
    assert_eq!(value(&keeper, "SELECT 1").await, "1");

    // Two transactions hold the pool's two connections; a third query waits.
    let first = env.client("first").await;
    let second = env.client("second").await;
    for client in [&first, &second] {
        client.simple_query("BEGIN").await.expect("BEGIN");
        client.simple_query("SELECT 1").await.expect("SELECT");
    }
    let third = env.client("third").await;
    let waiting = tokio::spawn(async move { value(&third, "SELECT 3").await });
    let env = &env;
    assert!(
        eventually(Duration::from_secs(5), || async {
            number(&env.pool().await, "cl_waiting") == 1
        })
        .await,
        "the third query never waited"
    );
    assert!(!waiting.is_finished());
    let servers_before: Vec<String> = (env.show("SERVERS", SERVERS).await.maps().iter())
        .map(|s| s["id"].clone())
        .collect();
    assert_eq!(servers_before.len(), 2);

    // RELOAD with a larger pool: the waiting query gets a third connection.
    env.rewrite(3, "");
    let reload = env.psql("RELOAD").await;
    assert!(reload.success, "{}", reload.stderr);
    assert!(
        reload.stderr.contains("applied: proxy.pool_size"),
        "{}",
        reload.stderr
    );
    let third = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting query ran after RELOAD")
        .expect("join");
    assert_eq!(third, "3");
    let pool = env.pool().await;
    assert_eq!(pool["pool_size"], "3");
    let servers_after: Vec<String> = (env.show("SERVERS", SERVERS).await.maps().iter())
        .map(|s| s["id"].clone())
        .collect();
    assert!(
        servers_before.iter().all(|id| servers_after.contains(id)),
        "a server connection was dropped: {servers_before:?} -> {servers_after:?}"
    );
    for client in [&first, &second] {
        client.simple_query("COMMIT").await.expect("COMMIT");
    }

    // Settings that cannot change live are reported and kept.
    env.rewrite(1, "listen_backlog = 7");
    let reload = env.psql("RELOAD").await;
    assert!(reload.success, "{}", reload.stderr);
    assert!(
        reload.stderr.contains("WARNING") && reload.stderr.contains("proxy.listen_backlog"),
        "{}",
        reload.stderr
    );
    let config = env
        .show("CONFIG", &["key", "value", "default", "changeable"])
        .await;
    assert_eq!(
        config.row_where("key", "proxy.listen_backlog")["value"],
        "1024"
    );
    assert_eq!(config.row_where("key", "proxy.pool_size")["value"], "1");

    // Shrunk to 1: surplus connections close as they come back, and one
    // transaction at a time gets a connection.
    for _ in 0..4 {
        keeper.simple_query("SELECT 1").await.expect("keeper stays");
    }
    let pool = env.pool().await;
    assert_eq!(
        number(&pool, "sv_active") + number(&pool, "sv_idle"),
        1,
        "{pool:?}"
    );
    first.simple_query("BEGIN").await.expect("BEGIN");
    first.simple_query("SELECT 1").await.expect("SELECT");
    let blocked = tokio::spawn(async move { value(&second, "SELECT 2").await });
    assert!(
        eventually(Duration::from_secs(5), || async {
            number(&env.pool().await, "cl_waiting") == 1
        })
        .await,
        "a second transaction got a connection from a pool of 1"
    );
    first.simple_query("COMMIT").await.expect("COMMIT");
    let second = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("the query ran once the connection came back")
        .expect("join");
    assert_eq!(second, "2");

    // A shorter server_idle_timeout holds for the connection already idle.
    env.rewrite(1, "listen_backlog = 7\nserver_idle_timeout = \"1s\"");
    let reload = env.psql("RELOAD").await;
    assert!(
        reload.success && reload.stderr.contains("applied: proxy.server_idle_timeout"),
        "{}",
        reload.stderr
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            let pool = env.pool().await;
            number(&pool, "sv_active") + number(&pool, "sv_idle") == 0
        })
        .await,
        "the idle server connection closed after 1 s"
    );

    // A file that does not load changes nothing.
    std::fs::write(&env.path, "[proxy]\npool_size = \"many\"\n").expect("write");
    let reload = env.psql("RELOAD").await;
    assert!(!reload.success);
    assert!(
        reload.stderr.contains("RELOAD failed") && reload.stderr.contains("line 2"),
        "{}",
        reload.stderr
    );
    assert_eq!(env.pool().await["pool_size"], "1");
    // The first client was never dropped.
    assert_eq!(value(&keeper, "SELECT 'still here'").await, "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_waits_for_open_transactions_and_holds_queries_until_resume() {
    let env = Console::start(4).await;
    env.pg
        .execute("CREATE TABLE paused (id int)")
        .await
        .expect("create table");
    let writer = env.client("writer").await;
    let reader = env.client("reader").await;
    writer.simple_query("BEGIN").await.expect("BEGIN");
    writer
        .simple_query("INSERT INTO paused VALUES (1)")
        .await
        .expect("INSERT");

    // PAUSE waits while the transaction holds its connection.
    let pause = env.begin_pause().await;
    let env = &env;
    assert!(
        !pause.is_finished(),
        "PAUSE answered with a transaction open"
    );
    writer.simple_query("COMMIT").await.expect("COMMIT");
    tokio::time::timeout(Duration::from_secs(5), pause)
        .await
        .expect("PAUSE answered once the transaction committed")
        .expect("join")
        .expect("PAUSE succeeds");

    // New queries wait until RESUME.
    let query = tokio::spawn(async move { value(&reader, "SELECT count(*) FROM paused").await });
    assert!(
        eventually(Duration::from_secs(5), || async {
            number(&env.pool().await, "cl_waiting") == 1
        })
        .await,
        "the query did not wait for RESUME"
    );
    let waiting = env.show("CLIENTS", CLIENTS).await;
    assert_eq!(
        waiting.row_where("application_name", "reader")["state"],
        "waiting"
    );
    assert!(!query.is_finished());
    let resume = env.psql("RESUME").await;
    assert!(resume.success, "{}", resume.stderr);
    let count = tokio::time::timeout(Duration::from_secs(5), query)
        .await
        .expect("the query ran after RESUME")
        .expect("join");
    assert_eq!(count, "1");
    assert_eq!(env.pool().await["paused"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_open_transactions_commit_then_stops() {
    let mut env = Console::start(4).await;
    env.pg
        .execute("CREATE TABLE shut (id int)")
        .await
        .expect("create table");
    let (writer, writer_connection) = env.client_and_connection("writer").await;
    let (idle, idle_connection) = env.client_and_connection("idle").await;
    idle.simple_query("SELECT 1").await.expect("SELECT");
    writer.simple_query("BEGIN").await.expect("BEGIN");
    writer
        .simple_query("INSERT INTO shut VALUES (1)")
        .await
        .expect("INSERT");

    let shutdown = env.psql("SHUTDOWN").await;
    assert!(shutdown.success, "{}", shutdown.stderr);

    // The idle client is told why it is disconnected.
    let ended = tokio::time::timeout(Duration::from_secs(5), idle_connection)
        .await
        .expect("the idle client was disconnected")
        .expect("join");
    let e = ended.expect_err("the connection ended with an error");
    assert_eq!(sqlstate(&e), "57P01", "{e}");
    // New connections are refused.
    let addr = env.addr;
    assert!(
        eventually(Duration::from_secs(5), || async {
            tokio::net::TcpStream::connect(addr).await.is_err()
        })
        .await,
        "the proxy still accepts connections"
    );
    // The open transaction carries on and commits.
    writer
        .simple_query("INSERT INTO shut VALUES (2)")
        .await
        .expect("INSERT in the open transaction");
    writer.simple_query("COMMIT").await.expect("COMMIT");
    let run = env.run.take().expect("running");
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the proxy's run future completed")
        .expect("join");
    let ended = tokio::time::timeout(Duration::from_secs(5), writer_connection)
        .await
        .expect("the writer was disconnected after its commit")
        .expect("join");
    assert_eq!(sqlstate(&ended.expect_err("57P01")), "57P01");

    let direct = env.pg.connect().await.expect("direct connection");
    let count = value(&direct, "SELECT count(*) FROM shut").await;
    assert_eq!(count, "2", "the committed rows are on the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_pause_neither_claims_success_nor_undoes_a_later_one() {
    let env = Console::start(4).await;
    env.rewrite(4, "pause_timeout = \"1s\"");
    let reload = env.psql("RELOAD").await;
    assert!(reload.success, "{}", reload.stderr);
    let writer = env.client("writer").await;
    writer.simple_query("BEGIN").await.expect("BEGIN");
    writer.simple_query("SELECT 1").await.expect("SELECT");

    // PAUSE A waits for the open transaction...
    let first = env.begin_pause().await;
    let env = &env;
    // ... meanwhile another operator resumes, the transaction ends, and a
    // second PAUSE completes at once.
    assert!(env.psql("RESUME").await.success);
    writer.simple_query("COMMIT").await.expect("COMMIT");
    let second = env.psql("PAUSE").await;
    assert!(second.success, "{}", second.stderr);
    // A gives up after pause_timeout...
    let first = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("the first PAUSE gave up")
        .expect("join");
    assert!(
        first.is_err(),
        "the first PAUSE was resumed before it completed"
    );
    // ... and leaves the second PAUSE standing.
    assert_eq!(env.pool().await["paused"], "1");
    assert!(env.psql("RESUME").await.success);
    assert_eq!(env.pool().await["paused"], "0");
}
