//! Tests of `testkit::Cluster` against the real PostgreSQL on this machine.
//!
//! Everything else's end-to-end tests stand on these clusters, so this checks the promises
//! they rely on: a server answers, both password storages authenticate (and reject wrong
//! passwords), concurrent starts work, servers and dirs are gone after drop or panic, and
//! replicas follow their primary (also after moving ports), lag when told to, and promote.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use testkit::{free_port, Cluster, PasswordEncryption, MD5_USER, TRUST_USER};
use tokio_postgres::error::SqlState;

/// Whether `pid` is a running (not exited, not zombie) process.
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rsplit_once(')') {
            Some((_, rest)) => !rest.trim_start().starts_with('Z'),
            None => panic!("unexpected /proc/{pid}/stat: {stat:?}"),
        },
        Err(_) => false,
    }
}

/// How long a replica may take to show a row committed on its primary.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `SELECT count(*) FROM <table> WHERE x = <x>` on `cluster` until it is 1, failing
/// the test after [`REPLICATION_TIMEOUT`]; returns when the row showed up. A missing table
/// counts as no row (the replica may not have replayed its creation yet).
async fn wait_for_row(cluster: &Cluster, table: &str, x: i32) -> Instant {
    let client = cluster.connect().await.expect("connect");
    let deadline = Instant::now() + REPLICATION_TIMEOUT;
    let sql = format!("SELECT count(*) FROM {table} WHERE x = {x}");
    loop {
        let found = match client.query_one(&sql, &[]).await {
            Ok(row) => row.get::<_, i64>(0) == 1,
            Err(err) if err.code() == Some(&SqlState::UNDEFINED_TABLE) => false,
            Err(err) => panic!("{sql} on port {}: {err}", cluster.port()),
        };
        if found {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "row x = {x} of {table} not on port {} after {REPLICATION_TIMEOUT:?}",
            cluster.port()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn in_recovery(cluster: &Cluster) -> bool {
    cluster
        .connect()
        .await
        .expect("connect")
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect("pg_is_in_recovery")
        .get(0)
}

/// A temp dir the server user can traverse (as root the server runs as `postgres`).
fn shared_temp_dir() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    root
}

fn sqlstate(err: &anyhow::Error) -> Option<SqlState> {
    err.downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::code)
        .cloned()
}

#[tokio::test]
async fn answers_queries_as_superuser() {
    let cluster = Cluster::start().expect("cluster starts");

    let client = cluster.connect().await.expect("superuser connects");
    let one: i32 = client
        .query_one("SELECT 1", &[])
        .await
        .expect("SELECT 1")
        .get(0);
    assert_eq!(one, 1);

    let settings = client
        .query_one(
            "SELECT current_setting('listen_addresses'), current_setting('fsync'), \
             current_setting('port')::int, current_user::text",
            &[],
        )
        .await
        .expect("settings");
    assert_eq!(settings.get::<_, String>(0), "127.0.0.1");
    assert_eq!(settings.get::<_, String>(1), "off");
    assert_eq!(settings.get::<_, i32>(2), i32::from(cluster.port()));
    assert_eq!(settings.get::<_, String>(3), "postgres");
    assert!(cluster.data_dir().join("PG_VERSION").is_file());

    cluster
        .execute("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
        .await
        .expect("execute");
    let x: i32 = client
        .query_one("SELECT x FROM t", &[])
        .await
        .expect("select")
        .get(0);
    assert_eq!(x, 7);
}

#[tokio::test]
async fn md5_and_scram_roles_log_in_with_the_right_password_only() {
    let cluster = Cluster::start().expect("cluster starts");
    let scram_user = "scram_user";
    let password = "s3cret 'quoted' p@ss";
    cluster
        .create_role(MD5_USER, password, PasswordEncryption::Md5)
        .await
        .expect("md5 role");
    cluster
        .create_role(scram_user, password, PasswordEncryption::Scram)
        .await
        .expect("scram role");

    let client = cluster.connect().await.expect("superuser connects");
    for (role, prefix) in [(MD5_USER, "md5"), (scram_user, "SCRAM-SHA-256$")] {
        let stored: String = client
            .query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                &[&role],
            )
            .await
            .expect("role exists")
            .get(0);
        assert!(stored.starts_with(prefix), "{role} stored as {stored:?}");
    }

    for role in [MD5_USER, scram_user] {
        let client = cluster
            .connect_as(role, password, "postgres")
            .await
            .unwrap_or_else(|err| panic!("{role} logs in with the right password: {err:#}"));
        let who: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .expect("query")
            .get(0);
        assert_eq!(who, role);

        let err = cluster
            .connect_as(role, "wrong", "postgres")
            .await
            .err()
            .unwrap_or_else(|| panic!("{role} must not log in with a wrong password"));
        assert_eq!(
            sqlstate(&err),
            Some(SqlState::INVALID_PASSWORD),
            "{role}: {err:#}"
        );
    }

    // The URL form carries the (percent-encoded) password too.
    let url = cluster.url(scram_user, password, "postgres");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("login by URL");
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.expect("query by URL");
}

#[tokio::test]
async fn trust_user_needs_no_password() {
    let cluster = Cluster::start().expect("cluster starts");
    cluster
        .create_role(TRUST_USER, "unused", PasswordEncryption::Scram)
        .await
        .expect("trust role");

    let client = cluster
        .connect_as(TRUST_USER, "anything", "postgres")
        .await
        .expect("trust login");
    client.simple_query("SELECT 1").await.expect("query");
}

#[test]
fn concurrent_starts_get_separate_servers() {
    let starters = 3;
    let barrier = Arc::new(Barrier::new(starters));
    let handles: Vec<_> = (0..starters)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                Cluster::start()
            })
        })
        .collect();
    let clusters: Vec<Cluster> = handles
        .into_iter()
        .map(|handle| handle.join().expect("no panic").expect("cluster starts"))
        .collect();

    let mut ports: Vec<u16> = clusters.iter().map(Cluster::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), starters, "ports must differ: {ports:?}");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for (i, cluster) in clusters.iter().enumerate() {
            // Each server has its own data: a table made in one is absent in the others.
            cluster
                .execute(&format!("CREATE TABLE only_in_{i} ()"))
                .await
                .expect("create");
            let client = cluster.connect().await.expect("connect");
            let tables: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'only_in_%'",
                    &[],
                )
                .await
                .expect("count")
                .get(0);
            assert_eq!(tables, 1, "cluster {i}");
        }
    });
}

#[tokio::test]
async fn builder_settings_override_defaults() {
    let cluster = Cluster::builder()
        .setting("max_connections", "600")
        .setting("application_name", "from_builder")
        .start()
        .expect("cluster starts");

    let client = cluster.connect().await.expect("connect");
    let row = client
        .query_one(
            "SELECT current_setting('max_connections'), current_setting('shared_buffers')",
            &[],
        )
        .await
        .expect("settings");
    assert_eq!(row.get::<_, String>(0), "600");
    assert_eq!(row.get::<_, String>(1), "32MB");
}

#[tokio::test]
async fn drop_stops_the_server_and_removes_its_dir() {
    let cluster = Cluster::start().expect("cluster starts");
    let pid = cluster.pid().expect("running");
    let port = cluster.port();
    let dir = cluster.data_dir().to_owned();
    assert!(running(pid));
    let url = cluster.url("postgres", "postgres", "postgres");

    drop(cluster);

    assert!(!running(pid), "postgres {pid} still running");
    assert!(!dir.exists(), "{} still exists", dir.display());
    let refused = tokio_postgres::connect(&url, tokio_postgres::NoTls).await;
    assert!(refused.is_err(), "port {port} still accepts connections");
}

#[test]
fn panicking_test_still_stops_the_server() {
    let (sender, receiver) = std::sync::mpsc::channel();
    let outcome = thread::spawn(move || {
        let cluster = Cluster::start().expect("cluster starts");
        sender
            .send((
                cluster.pid().expect("running"),
                cluster.data_dir().to_owned(),
            ))
            .expect("send");
        panic!("simulated test failure while the cluster is alive");
    })
    .join();

    assert!(outcome.is_err(), "the thread panicked");
    let (pid, dir) = receiver.recv().expect("cluster started before the panic");
    assert!(!running(pid), "postgres {pid} still running after unwind");
    assert!(!dir.exists(), "{} still exists after unwind", dir.display());
}

#[tokio::test]
async fn stop_is_idempotent_and_keeps_the_dir_until_drop() {
    let mut cluster = Cluster::start().expect("cluster starts");
    let pid = cluster.pid().expect("running");

    cluster.stop();
    cluster.stop();

    assert_eq!(cluster.pid(), None);
    assert!(!running(pid));
    assert!(cluster.data_dir().join("PG_VERSION").is_file());
    assert!(
        cluster.connect().await.is_err(),
        "stopped server accepts connections"
    );
}

#[tokio::test]
async fn persistent_cluster_keeps_data_and_replaces_a_stale_server() {
    let root = tempfile::tempdir().expect("temp dir");
    // As root the server runs as `postgres`, which must traverse into our temp dir.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let dir = root.path().join("dev");
    let (superuser, password) = ("dev", "dev p@ss'word");

    // A taken port fails the start with the server's own explanation (initdb still ran).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let err = Cluster::open_or_init(&dir, taken_port, superuser, password)
        .expect_err("the port is taken");
    let message = format!("{err:#}");
    assert!(message.contains("Address already in use"), "{message}");
    assert!(dir.join("PG_VERSION").is_file());
    drop(taken);

    // Arrange: a fresh cluster with one row.
    let first = Cluster::open_or_init(&dir, free_port(), superuser, password).expect("init");
    assert_eq!(first.data_dir(), dir.canonicalize().expect("dir exists"));
    first
        .execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
        .await
        .expect("write");
    let err = first
        .connect_as(superuser, "wrong", "postgres")
        .await
        .expect_err("wrong password rejected");
    assert_eq!(sqlstate(&err), Some(SqlState::INVALID_PASSWORD), "{err:#}");
    let fsync: String = first
        .connect()
        .await
        .expect("connect")
        .query_one("SELECT current_setting('fsync')", &[])
        .await
        .expect("fsync")
        .get(0);
    assert_eq!(fsync, "on", "a persistent cluster must be durable");

    // Drop stops the server but keeps the data.
    let first_pid = first.pid().expect("running");
    drop(first);
    assert!(!running(first_pid));
    assert!(dir.join("PG_VERSION").is_file());

    // Reopen on another port: the row survived. Then "crash" without stopping the server.
    let second = Cluster::open_or_init(&dir, free_port(), superuser, password).expect("reopen");
    let second_pid = second.pid().expect("running");
    std::mem::forget(second);
    assert!(
        running(second_pid),
        "the forgotten server keeps running, like after a kill -9"
    );

    // Act: open again while the stale server holds the directory.
    let third = Cluster::open_or_init(&dir, free_port(), superuser, password)
        .expect("open over a stale server");

    // Check: the stale server is gone and the new one has the data.
    assert!(
        !running(second_pid),
        "stale postgres {second_pid} still running"
    );
    let x: i32 = third
        .connect()
        .await
        .expect("connect")
        .query_one("SELECT x FROM kept", &[])
        .await
        .expect("row survived")
        .get(0);
    assert_eq!(x, 42);
}

#[tokio::test]
async fn replica_follows_its_primary_and_takes_writes_once_promoted() {
    // Arrange: a primary with a table, and a replica of it.
    let primary = Cluster::start().expect("primary starts");
    primary
        .execute("CREATE TABLE t (x int)")
        .await
        .expect("create");
    let replica = primary.replica().start().expect("replica starts");
    assert_ne!(replica.port(), primary.port());
    assert_ne!(replica.data_dir(), primary.data_dir());

    // Act: write on the primary.
    primary
        .execute("INSERT INTO t VALUES (1)")
        .await
        .expect("insert");

    // Check: the replica shows the row, serves reads only, and refuses writes.
    wait_for_row(&replica, "t", 1).await;
    assert!(in_recovery(&replica).await);
    assert!(!in_recovery(&primary).await);
    let err = replica
        .execute("INSERT INTO t VALUES (2)")
        .await
        .expect_err("a replica refuses writes");
    assert_eq!(
        sqlstate(&err),
        Some(SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err:#}"
    );

    // Act: promote. Check: it has left recovery and takes writes of its own.
    replica.promote().expect("promote");
    assert!(!in_recovery(&replica).await);
    replica
        .execute("INSERT INTO t VALUES (3)")
        .await
        .expect("the promoted replica takes writes");
    wait_for_row(&replica, "t", 3).await;
    assert!(primary.promote().is_err(), "a primary cannot be promoted");

    // Drop stops the replica and removes its dir, like any throwaway cluster.
    let (pid, dir) = (
        replica.pid().expect("running"),
        replica.data_dir().to_owned(),
    );
    drop(replica);
    assert!(!running(pid), "replica {pid} still running");
    assert!(!dir.exists(), "{} still exists", dir.display());
}

#[tokio::test]
async fn delayed_replica_applies_commits_only_after_the_delay() {
    let delay = Duration::from_millis(500);
    let primary = Cluster::start().expect("primary starts");
    primary
        .execute("CREATE TABLE t (x int)")
        .await
        .expect("create");
    let replica = primary
        .replica()
        .setting("recovery_min_apply_delay", "500ms")
        .start()
        .expect("replica starts");
    // The table's creation is delayed too; wait until it is there.
    primary
        .execute("INSERT INTO t VALUES (0)")
        .await
        .expect("insert");
    wait_for_row(&replica, "t", 0).await;
    let reader = replica.connect().await.expect("connect");

    // Act: commit a row on the primary.
    let before_commit = Instant::now();
    primary
        .execute("INSERT INTO t VALUES (1)")
        .await
        .expect("insert");

    // Check: not there right away, there only once the delay has passed since the commit.
    let right_away: i64 = reader
        .query_one("SELECT count(*) FROM t WHERE x = 1", &[])
        .await
        .expect("count")
        .get(0);
    if before_commit.elapsed() < delay {
        assert_eq!(right_away, 0, "the row arrived before the delay");
    }
    let shown_at = wait_for_row(&replica, "t", 1).await;
    let lag = shown_at - before_commit;
    assert!(
        lag >= delay,
        "the row showed up after {lag:?}, before {delay:?}"
    );
}

#[tokio::test]
async fn restarted_replica_keeps_its_port_and_catches_up() {
    let primary = Cluster::start().expect("primary starts");
    primary
        .execute("CREATE TABLE t (x int)")
        .await
        .expect("create");
    let mut replica = primary.replica().start().expect("replica starts");
    let (port, pid) = (replica.port(), replica.pid().expect("running"));

    // Act: write while the replica is down, then restart it.
    replica.stop();
    primary
        .execute("INSERT INTO t VALUES (1)")
        .await
        .expect("insert");
    replica.restart().expect("restart");

    // Check: a new server on the same port, still a replica, with the row.
    assert_eq!(replica.port(), port);
    assert!(!running(pid), "the old replica {pid} still runs");
    assert_ne!(replica.pid(), Some(pid));
    wait_for_row(&replica, "t", 1).await;
    assert!(in_recovery(&replica).await);

    // A restarted primary keeps its port too, and its replica reconnects.
    let mut primary = primary;
    let primary_port = primary.port();
    primary.restart().expect("restart primary");
    assert_eq!(primary.port(), primary_port);
    primary
        .execute("INSERT INTO t VALUES (2)")
        .await
        .expect("insert");
    wait_for_row(&replica, "t", 2).await;
}

#[tokio::test]
async fn persistent_replica_follows_its_primary_to_a_new_port() {
    let root = shared_temp_dir();
    let (primary_dir, replica_dir) = (root.path().join("primary"), root.path().join("replica"));
    let (superuser, password) = ("dev", "dev p@ss:w'rd");
    let open_primary = || {
        Cluster::builder()
            .setting("wal_level", "logical")
            .open_or_init(&primary_dir, free_port(), superuser, password)
            .expect("primary opens")
    };
    let open_replica = |primary: &Cluster| {
        primary
            .replica()
            .open_or_init(&replica_dir, free_port())
            .expect("replica opens")
    };

    // Arrange: a persistent primary and its replica, one row replicated; then both stop.
    let primary = open_primary();
    primary
        .execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await
        .expect("write");
    let replica = open_replica(&primary);
    assert_eq!(
        replica.data_dir(),
        replica_dir.canonicalize().expect("replica dir exists")
    );
    assert!(
        !Path::new(&format!("{}.basebackup", replica_dir.display())).exists(),
        "the staging dir is gone"
    );
    wait_for_row(&replica, "t", 1).await;
    let login = replica
        .connect_as(superuser, password, "postgres")
        .await
        .expect("the primary's superuser logs in to the replica");
    drop(login);
    // Gone if the next open copied the primary again instead of opening this replica.
    let marker = replica_dir.join("opened-before");
    std::fs::write(&marker, "").expect("marker");
    drop(replica);
    drop(primary);

    // Act: reopen both, each on another port.
    let primary = open_primary();
    let replica = open_replica(&primary);

    // Check: the same replica, following the primary on its new port.
    assert!(marker.exists(), "the replica was copied again");
    primary
        .execute("INSERT INTO t VALUES (2)")
        .await
        .expect("write");
    wait_for_row(&replica, "t", 2).await;
    assert!(in_recovery(&replica).await);
    let fsync: String = replica
        .connect()
        .await
        .expect("connect")
        .query_one("SELECT current_setting('fsync')", &[])
        .await
        .expect("fsync")
        .get(0);
    assert_eq!(fsync, "on", "a persistent replica must be durable");
}
