//! Transaction pooling: prepared statements and session settings follow the
//! client across server connections; limits give clear errors.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::harness::{sqlstate, Env, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_survive_100_transactions_over_2_connections() {
    let env = Env::with(Options {
        pool_size: 2,
        ..Options::default()
    })
    .await;
    let client = Arc::new(env.client().await);
    let statement = client
        .prepare("SELECT $1::int8 * 2, pg_backend_pid()")
        .await
        .unwrap();

    // Other clients keep the pool busy so transactions land on either connection.
    let mut noise = Vec::new();
    for _ in 0..3 {
        let other = env.client().await;
        noise.push(tokio::spawn(async move {
            let stmt = other
                .prepare("SELECT pg_backend_pid(), $1::text")
                .await
                .unwrap();
            for i in 0..100 {
                other.query_one(&stmt, &[&format!("n{i}")]).await.unwrap();
            }
        }));
    }

    // And every tenth transaction runs while another client holds a server
    // connection in an open transaction, so it must take the other one.
    let holder = env.client().await;
    let mut pids = HashSet::new();
    for i in 0..100i64 {
        if i % 10 == 0 {
            holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
        }
        let row = client.query_one(&statement, &[&i]).await.unwrap();
        if i % 10 == 0 {
            holder.batch_execute("COMMIT").await.unwrap();
        }
        assert_eq!(row.get::<_, i64>(0), i * 2);
        pids.insert(row.get::<_, i32>(1));
        // Inside an explicit transaction too.
        client.batch_execute("BEGIN").await.unwrap();
        let row = client.query_one(&statement, &[&(i + 1)]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), (i + 1) * 2);
        client.batch_execute("COMMIT").await.unwrap();
    }
    for task in noise {
        task.await.unwrap();
    }
    assert_eq!(
        pids.len(),
        2,
        "the statement ran on both server connections: {pids:?}"
    );

    // Close is answered locally; a new statement with the same name works.
    drop(statement);
    let again = client.prepare("SELECT $1::int8 * 3").await.unwrap();
    assert_eq!(
        client
            .query_one(&again, &[&2i64])
            .await
            .unwrap()
            .get::<_, i64>(0),
        6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_follow_the_client_and_stay_private() {
    let env = Env::with(Options {
        pool_size: 2,
        ..Options::default()
    })
    .await;
    let setter = env.client().await;
    let bystander = env.client().await;
    setter
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS s1; SET search_path TO s1, public; SET application_name = 'setter'; \
             SET TIME ZONE 'Asia/Tokyo'; SET statement_timeout = '7s'; SET DateStyle = 'German, DMY'",
        )
        .await
        .unwrap();
    let show = "SELECT current_setting('search_path'), current_setting('application_name'), \
                current_setting('TimeZone'), current_setting('statement_timeout'), current_setting('DateStyle')";
    let defaults = bystander.query_one(show, &[]).await.unwrap();
    let defaults: Vec<String> = (0..5).map(|i| defaults.get(i)).collect();

    for _ in 0..30 {
        // Interleave so both clients use both server connections.
        let (a, b) = tokio::join!(setter.query_one(show, &[]), bystander.query_one(show, &[]));
        let a = a.unwrap();
        let a: Vec<String> = (0..5).map(|i| a.get(i)).collect();
        assert_eq!(
            a,
            ["s1, public", "setter", "Asia/Tokyo", "7s", "German, DMY"]
        );
        let b = b.unwrap();
        let b: Vec<String> = (0..5).map(|i| b.get(i)).collect();
        assert_eq!(b, defaults, "another client's settings never leak");
    }

    // RESET and SET inside a rolled-back transaction.
    setter
        .batch_execute("RESET statement_timeout")
        .await
        .unwrap();
    setter
        .batch_execute("BEGIN; SET application_name = 'rolled-back'; ROLLBACK")
        .await
        .unwrap();
    setter.batch_execute("BEGIN").await.unwrap();
    setter.batch_execute("SET TIME ZONE 'UTC'").await.unwrap();
    setter.batch_execute("COMMIT").await.unwrap();
    for _ in 0..10 {
        let (a, _) = tokio::join!(setter.query_one(show, &[]), bystander.query_one(show, &[]));
        let a = a.unwrap();
        assert_eq!(a.get::<_, String>(1), "setter");
        assert_eq!(a.get::<_, String>(2), "UTC");
        assert_eq!(a.get::<_, String>(3), defaults[3]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_one_connection_and_resets_it() {
    let env = Env::with(Options {
        pool_size: 1,
        pool_mode: "session",
        ..Options::default()
    })
    .await;
    let client = env.client().await;
    client
        .batch_execute("PREPARE q AS SELECT 5; SET application_name = 'sess'")
        .await
        .unwrap();
    let pid1: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let five: i32 = client.query_one("EXECUTE q", &[]).await.unwrap().get(0);
    assert_eq!(five, 5);
    drop(client);

    let next = env.client().await;
    let row = crate::harness::eventually(Duration::from_secs(5), || async {
        next.query_one("SELECT pg_backend_pid()", &[]).await.is_ok()
    })
    .await;
    assert!(row);
    let pid2: i32 = next
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid1, pid2, "the one pooled connection is reused");
    let err = next.query_one("EXECUTE q", &[]).await.unwrap_err();
    assert_eq!(
        sqlstate(&err),
        "26000",
        "DISCARD ALL dropped the previous session's statements"
    );
    let name: String = next
        .query_one("SHOW application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(name, "sess");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_share_ten_connections() {
    let env = Env::with(Options {
        pool_size: 10,
        proxy_extra: "checkout_timeout = \"60s\"".into(),
        ..Options::default()
    })
    .await;
    let url = env.url("trusted", "", "db");
    let mut tasks = Vec::new();
    for i in 0..500i32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let row = client.query_one("SELECT $1::int4 + 1", &[&i]).await?;
            Ok::<i32, tokio_postgres::Error>(row.get(0))
        }));
    }
    let mut served = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let value = task.await.unwrap().expect("every client is served");
        assert_eq!(value, i as i32 + 1);
        served += 1;
    }
    assert_eq!(served, 500);

    let direct = env.direct().await;
    let backends: i64 = direct
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = 'postgres' AND backend_type = 'client backend'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        backends <= 11,
        "at most the pool (10) plus this connection: {backends}"
    );
}

/// Two clients on two workers take turns with one server connection: it
/// moves to the reactor of each borrower's worker (`ServerConn::settle`)
/// and keeps working, for prepared statements and for a waiter the gate
/// lets in when the other worker's transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_connection_serves_clients_on_every_worker() {
    let env = Env::with(Options {
        pool_size: 1,
        worker_threads: 2,
        ..Options::default()
    })
    .await;
    // A new client goes to the least busy worker: one each.
    let a = env.client().await;
    let b = Arc::new(env.client().await);
    let on_a = a
        .prepare("SELECT $1::int8 + 1, pg_backend_pid()")
        .await
        .unwrap();
    let on_b = b
        .prepare("SELECT $1::text || 'b', pg_backend_pid()")
        .await
        .unwrap();
    let mut pids = HashSet::new();
    for i in 0..50i64 {
        let row = a.query_one(&on_a, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), i + 1);
        pids.insert(row.get::<_, i32>(1));
        let row = b.query_one(&on_b, &[&i.to_string()]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), format!("{i}b"));
        pids.insert(row.get::<_, i32>(1));
        if i % 10 == 0 {
            // B waits at the gate while A's transaction holds the connection.
            a.batch_execute("BEGIN; SELECT 1").await.unwrap();
            let waiter = b.clone();
            let waiting = tokio::spawn(async move {
                let row = waiter.query_one("SELECT pg_backend_pid()", &[]).await;
                row.unwrap().get::<_, i32>(0)
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!waiting.is_finished(), "B waits for the one connection");
            a.batch_execute("COMMIT").await.unwrap();
            pids.insert(waiting.await.unwrap());
        }
    }
    assert_eq!(pids.len(), 1, "one server connection served both: {pids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_and_client_cap_give_clear_errors() {
    let env = Env::with(Options {
        pool_size: 1,
        proxy_extra: "checkout_timeout = \"300ms\"\nmax_client_connections = 3".into(),
        ..Options::default()
    })
    .await;
    let holder = env.client().await;
    holder.batch_execute("BEGIN").await.unwrap();

    let waiter = env.client().await;
    let err = waiter.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "53300");
    let db = err.as_db_error().unwrap();
    assert!(db.message().contains("pool exhausted"), "{}", db.message());
    assert!(
        db.message().contains("ms"),
        "says how long it waited: {}",
        db.message()
    );

    holder.batch_execute("COMMIT").await.unwrap();
    let one: i32 = waiter.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(
        one, 1,
        "the same client is served once a connection is free"
    );

    let _third = env.client().await;
    let Err(err) = env
        .connect_as("app", crate::harness::APP_PASSWORD, "db")
        .await
    else {
        panic!("a fourth client is refused");
    };
    assert_eq!(sqlstate(&err), "53300");
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("max_client_connections"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_server_connections_are_replaced_not_handed_out() {
    let env = Env::with(Options {
        pool_size: 3,
        ..Options::default()
    })
    .await;
    let clients = [env.client().await, env.client().await, env.client().await];
    open_one_connection_each(&clients).await;

    // Every pooled connection dies while idle, as in a server restart.
    let direct = env.direct().await;
    let killed = pooled_backends(&direct, "pg_terminate_backend(pid)").await;
    assert_eq!(killed, 3);
    let gone = crate::harness::eventually(Duration::from_secs(10), || async {
        let n = pooled_backends(&direct, "*").await;
        n == 0
    })
    .await;
    assert!(gone);

    // Every client is served at once by a fresh connection: no error, no timeout.
    let started = std::time::Instant::now();
    for c in &clients {
        let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "no checkout timed out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_server_connections_close_after_server_idle_timeout() {
    let env = Env::with(Options {
        pool_size: 3,
        proxy_extra: "server_idle_timeout = \"1s\"".into(),
        ..Options::default()
    })
    .await;
    let clients = [env.client().await, env.client().await, env.client().await];
    open_one_connection_each(&clients).await;
    let direct = env.direct().await;
    assert_eq!(pooled_backends(&direct, "*").await, 3);

    // One client keeps working, a statement every 200 ms: its connection is
    // never idle for a second, the two others are, and close.
    let busy = &clients[0];
    let first = backend_pid(busy).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut open = 3;
    while std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            backend_pid(busy).await,
            first,
            "the busy connection stays open"
        );
        open = pooled_backends(&direct, "*").await;
        if open == 1 {
            break;
        }
    }
    assert_eq!(open, 1, "the idle connections closed; the busy one did not");

    // Idle long enough, the last one closes too; the next statement gets a
    // fresh connection.
    let all_closed = crate::harness::eventually(Duration::from_secs(10), || async {
        pooled_backends(&direct, "*").await == 0
    })
    .await;
    assert!(all_closed);
    let one: i32 = clients[1].query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_transaction_does_not_leak_it() {
    let env = Env::with(Options {
        pool_size: 1,
        ..Options::default()
    })
    .await;
    let setup = env.client().await;
    setup
        .batch_execute("CREATE TABLE leak_t (id int)")
        .await
        .unwrap();
    let leaver = env.client().await;
    leaver
        .batch_execute("BEGIN; INSERT INTO leak_t VALUES (1)")
        .await
        .unwrap();
    drop(leaver);

    // The only server connection was in a transaction: it is closed, not reused.
    let next = env.client().await;
    let ok = crate::harness::eventually(Duration::from_secs(10), || async {
        next.query_one("SELECT count(*) FROM leak_t", &[])
            .await
            .is_ok()
    })
    .await;
    assert!(ok);
    let row = next
        .query_one("SELECT count(*) FROM leak_t", &[])
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        0,
        "the abandoned insert is neither committed nor visible (not its transaction)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_options_and_application_name_apply_on_every_connection() {
    let env = Env::with(Options {
        pool_size: 2,
        ..Options::default()
    })
    .await;
    let url = format!(
        "{}?application_name=from-startup&options=-c%20statement_timeout%3D4321",
        env.url("app", crate::harness::APP_PASSWORD, "db")
    );
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let plain = env.client().await;
    let mut pids = HashSet::new();
    for _ in 0..20 {
        let (row, _) = tokio::join!(
            client.query_one(
                "SELECT current_setting('application_name'), current_setting('statement_timeout'), pg_backend_pid()",
                &[]
            ),
            plain.query_one("SELECT pg_sleep(0.001)", &[])
        );
        let row = row.unwrap();
        assert_eq!(row.get::<_, String>(0), "from-startup");
        assert_eq!(row.get::<_, String>(1), "4321ms");
        pids.insert(row.get::<_, i32>(2));
    }
    let other: String = plain
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(other, "0", "the other client keeps the server default");
    assert!(!pids.is_empty());
}

/// Fills a pool: transactions open at once need a server connection each.
async fn open_one_connection_each(clients: &[tokio_postgres::Client]) {
    for c in clients {
        c.batch_execute("BEGIN").await.unwrap();
        c.query_one("SELECT 1", &[]).await.unwrap();
    }
    for c in clients {
        c.batch_execute("COMMIT").await.unwrap();
    }
}

async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    let row = client.query_one("SELECT pg_backend_pid()", &[]).await;
    row.unwrap().get(0)
}

/// `count(expr)` over the server connections the proxy opened (user
/// `postgres`), leaving out the calling connection.
async fn pooled_backends(direct: &tokio_postgres::Client, expr: &str) -> i64 {
    let sql = format!(
        "SELECT count({expr}) FROM pg_stat_activity WHERE usename = 'postgres' \
         AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    );
    direct.query_one(&sql, &[]).await.unwrap().get(0)
}
