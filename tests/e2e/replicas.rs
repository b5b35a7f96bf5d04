//! Read routing to streaming replicas, against a real primary and replica:
//! reads land on the replica, writes and write transactions on the primary,
//! a session reads its own writes, a lagging replica gets no reads, a dead
//! replica costs no client errors, a dead primary fails writes fast and a
//! promoted replica takes the writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{connect, eventually, sqlstate, APP_PASSWORD};
use crate::replica_env::ReplicaEnv;

/// The first column of the first row of `sql` (simple protocol), as a bool.
async fn in_recovery(client: &Client, sql: &str) -> Option<bool> {
    let messages = client.simple_query(sql).await.ok()?;
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).map(|v| v == "t"),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_replica_and_writes_to_the_primary() {
    let env = ReplicaEnv::start_with(1, &[], "", "", true).await;
    let client = env.client().await;

    // Act + assert: where each kind of statement ran.
    let plain = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap();
    assert!(
        plain.get::<_, bool>(0),
        "a plain read (extended protocol) runs on the replica"
    );
    assert_eq!(
        in_recovery(&client, "SELECT pg_is_in_recovery()").await,
        Some(true)
    );
    let in_write_txn = in_recovery(&client, "BEGIN; SELECT pg_is_in_recovery(); COMMIT").await;
    assert_eq!(
        in_write_txn,
        Some(false),
        "a transaction block runs on the primary"
    );
    client.batch_execute("BEGIN").await.unwrap();
    let in_txn = in_recovery(&client, "SELECT pg_is_in_recovery()").await;
    assert_eq!(
        in_txn,
        Some(false),
        "a read inside BEGIN runs on the primary"
    );
    client.batch_execute("COMMIT").await.unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    let row = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap();
    assert!(
        !row.get::<_, bool>(0),
        "a read inside BEGIN (extended protocol) runs on the primary"
    );
    client.batch_execute("COMMIT").await.unwrap();
    // The multi-statement transaction above counts as a write (its text could
    // hold one): reads stay on the primary until the replica has replayed it.
    assert!(
        eventually(Duration::from_secs(10), || async {
            in_recovery(&client, "SELECT pg_is_in_recovery()").await == Some(true)
        })
        .await
    );
    client.batch_execute("BEGIN READ ONLY").await.unwrap();
    let row = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "a READ ONLY transaction may run on the replica"
    );
    client.batch_execute("COMMIT").await.unwrap();
    // A row larger than the proxy buffers whole streams through after the
    // RowDescription it held back (both protocols).
    let messages = client
        .simple_query("SELECT repeat('y', 300000), pg_is_in_recovery()")
        .await
        .unwrap();
    let big = messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some((r.get(0).unwrap().len(), r.get(1) == Some("t"))),
        _ => None,
    });
    assert_eq!(big, Some((300_000, true)));
    let row = client
        .query_one("SELECT repeat('y', 300000), pg_is_in_recovery()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0).len(), 300_000);
    let hinted = "/* shardline: primary */ SELECT pg_is_in_recovery()";
    assert_eq!(in_recovery(&client, hinted).await, Some(false));
    let locking = "SELECT pg_is_in_recovery() FROM t WHERE id = 1 FOR UPDATE";
    assert_eq!(in_recovery(&client, locking).await, Some(false));
    assert_eq!(
        in_recovery(&client, "SELECT pg_is_in_recovery(), nextval('t_seq')").await,
        None,
        "nextval goes to the primary (where this sequence does not exist either)"
    );
    client
        .batch_execute("SET shardline.read_from = primary")
        .await
        .unwrap();
    assert_eq!(
        in_recovery(&client, "SELECT pg_is_in_recovery()").await,
        Some(false)
    );
    client
        .batch_execute("RESET shardline.read_from")
        .await
        .unwrap();
    // A write runs on the primary and reaches the replica by replication.
    client
        .execute("UPDATE t SET v = 7 WHERE id = 2", &[])
        .await
        .unwrap();
    let replica = env.replicas[0].connect().await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let row = replica
                .query_one("SELECT v FROM t WHERE id = 2", &[])
                .await
                .unwrap();
            row.get::<_, i32>(0) == 7
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reads_its_own_writes_from_a_delayed_replica() {
    // Arrange: the replica applies commits half a second late.
    let env =
        ReplicaEnv::start_with(1, &[("recovery_min_apply_delay", "500ms")], "", "", true).await;
    let writer = env.client().await;
    let bystander = env.client().await;

    // Act: write, then read back in the same session, 1,000 times.
    for i in 1..=1000 {
        writer
            .simple_query(&format!("UPDATE t SET v = {i} WHERE id = 1"))
            .await
            .unwrap();
        let messages = writer
            .simple_query("SELECT v FROM t WHERE id = 1")
            .await
            .unwrap();
        let seen = messages.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        });
        // Assert: every read shows the write before it.
        assert_eq!(
            seen.as_deref(),
            Some(i.to_string().as_str()),
            "iteration {i}"
        );
    }
    // A session that wrote nothing still reads from the replica.
    assert_eq!(
        in_recovery(&bystander, "SELECT pg_is_in_recovery()").await,
        Some(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_gets_no_reads() {
    // Arrange: the replica applies commits 2 s late; 300 ms is the limit.
    let env = ReplicaEnv::start_with(
        1,
        &[("recovery_min_apply_delay", "2s")],
        "max_replica_lag = \"300ms\"",
        "",
        true,
    )
    .await;
    let writes = tokio::spawn({
        let writer = env.primary.connect().await.unwrap();
        async move {
            for i in 0..60 {
                writer
                    .execute("UPDATE t SET v = $1 WHERE id = 3", &[&i])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Act + assert: while the writes go on, reads from a fresh session (which
    // wrote nothing) are served by the primary.
    let reader = env.client().await;
    for _ in 0..20 {
        let on_replica = in_recovery(&reader, "SELECT pg_is_in_recovery()").await;
        assert_eq!(
            on_replica,
            Some(false),
            "a read went to the lagging replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writes.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replica_costs_readers_no_errors() {
    let mut env = ReplicaEnv::start_with(1, &[], "", "", true).await;
    let reads = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut readers = Vec::new();
    for i in 0..16 {
        let client = env.client().await;
        let reads = reads.clone();
        readers.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                // Half the clients use the extended protocol (prepare, then
                // Bind/Execute), half simple queries.
                let result = if i % 2 == 0 {
                    client
                        .simple_query("SELECT count(*) FROM t")
                        .await
                        .map(drop)
                } else {
                    client.query("SELECT count(*) FROM t", &[]).await.map(drop)
                };
                if let Err(e) = result {
                    let message = e.as_db_error().map(|d| d.message().to_owned());
                    return Some(format!("{}: {e} {message:?}", sqlstate(&e)));
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
            None
        }));
    }

    // Act: the replica goes away under load.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = reads.load(Ordering::Relaxed);
    tokio::task::block_in_place(|| env.replicas[0].stop());

    // Assert: no client saw an error, and reads went on.
    let mut errors = Vec::new();
    for reader in readers {
        errors.extend(reader.await.unwrap());
    }
    assert_eq!(
        errors,
        Vec::<String>::new(),
        "errors while the replica died"
    );
    let after = reads.load(Ordering::Relaxed) - before;
    assert!(
        before > 100 && after > 100,
        "reads before {before}, after {after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_primary_fails_writes_fast_and_reads_go_on() {
    let mut env = ReplicaEnv::start_with(1, &[], "", "", true).await;
    let client = env.client().await;
    client
        .execute("UPDATE t SET v = 1 WHERE id = 4", &[])
        .await
        .unwrap();

    // Act: the primary stops.
    tokio::task::block_in_place(|| env.primary.stop());

    // Assert: writes fail fast with 57P03 naming the shard; reads carry on.
    let writer = env.client().await;
    let started = Instant::now();
    let e = writer
        .execute("UPDATE t SET v = 2 WHERE id = 4", &[])
        .await
        .expect_err("no primary to write to");
    let took = started.elapsed();
    assert!(
        ["57P03", "08006"].contains(&sqlstate(&e).as_str()),
        "{}: {e}",
        sqlstate(&e)
    );
    let message = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("shard 0"), "{message}");
    assert!(
        took < Duration::from_secs(3),
        "the write took {took:?} to fail"
    );
    let reader = env.client().await;
    assert_eq!(
        in_recovery(&reader, "SELECT pg_is_in_recovery()").await,
        Some(true)
    );
    let row = reader
        .query_one("SELECT v FROM t WHERE id = 4", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);

    // The primary comes back: writes succeed again, same proxy.
    tokio::task::block_in_place(|| env.primary.restart()).expect("restart");
    assert!(
        eventually(Duration::from_secs(20), || async {
            writer
                .execute("UPDATE t SET v = 3 WHERE id = 4", &[])
                .await
                .is_ok()
        })
        .await,
        "writes did not resume"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_replica_takes_the_writes() {
    let mut env = ReplicaEnv::start_with(1, &[], "", "", true).await;

    // Act: the primary stops and the replica is promoted.
    tokio::task::block_in_place(|| env.primary.stop());
    env.replicas[0].promote().expect("promote");

    // Assert: writes reach the promoted server without a proxy restart.
    let client = env.client().await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            client
                .execute("UPDATE t SET v = 9 WHERE id = 5", &[])
                .await
                .is_ok()
        })
        .await,
        "writes never reached the promoted replica"
    );
    let in_txn = in_recovery(&client, "BEGIN; SELECT pg_is_in_recovery(); COMMIT").await;
    assert_eq!(in_txn, Some(false));
    let direct = env.replicas[0].connect().await.unwrap();
    let row = direct
        .query_one("SELECT v FROM t WHERE id = 5", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 9);

    // The old primary starts again, not demoted: two servers accept writes.
    // A write is refused (57P03) or lands on the promoted server, never on
    // the old primary, which lacks what the promoted one took meanwhile.
    tokio::task::block_in_place(|| env.primary.restart()).expect("restart");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let result = client
        .execute("UPDATE t SET v = 10 WHERE id = 6", &[])
        .await;
    let old = env.primary.connect().await.unwrap();
    let on_old: i32 = old
        .query_one("SELECT v FROM t WHERE id = 6", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(on_old, 10, "a write went to the old primary");
    match result {
        Ok(_) => {
            let row = direct
                .query_one("SELECT v FROM t WHERE id = 6", &[])
                .await
                .unwrap();
            assert_eq!(row.get::<_, i32>(0), 10);
        }
        Err(e) => assert_eq!(sqlstate(&e), "57P03", "{e}"),
    }
}

/// `SHOW SHARDS` rows of the admin console, as column -> value maps.
async fn show_shards(client: &Client) -> Vec<std::collections::HashMap<String, String>> {
    let messages = client
        .simple_query("SHOW SHARDS")
        .await
        .expect("SHOW SHARDS");
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                row.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), row.get(i).unwrap_or("").to_owned()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_console_shows_role_health_and_breakers() {
    let mut env = ReplicaEnv::start_with(1, &[], "", "", true).await;
    let admin = connect(env.addr, "ops", "ops-secret", "shardline")
        .await
        .expect("an admin user reaches the console");
    let replica_addr = format!("127.0.0.1:{}", env.replicas[0].port());

    let servers = show_shards(&admin).await;
    assert_eq!(servers.len(), 2, "{servers:?}");
    let replica = servers
        .iter()
        .find(|s| s["addr"] == replica_addr)
        .expect("replica row");
    assert_eq!(replica["role"], "replica");
    assert_eq!(replica["state"], "up");
    assert_eq!(replica["breaker"], "closed");
    assert!(replica["lag_bytes"].parse::<u64>().is_ok(), "{replica:?}");
    let primary = servers
        .iter()
        .find(|s| s["map_role"] == "primary")
        .expect("primary row");
    assert_eq!(primary["role"], "primary (writes)");

    // The replica stops: the console shows it down, its breaker open.
    tokio::task::block_in_place(|| env.replicas[0].stop());
    assert!(
        eventually(Duration::from_secs(10), || async {
            let servers = show_shards(&admin).await;
            let replica = servers.iter().find(|s| s["addr"] == replica_addr).unwrap();
            replica["state"] == "down" && replica["breaker"].starts_with("open")
        })
        .await,
        "the console never showed the replica down"
    );

    // Other users are refused, and unknown commands are errors.
    let e = connect(env.addr, "app", APP_PASSWORD, "shardline")
        .await
        .expect_err("not an admin");
    assert_eq!(sqlstate(&e), "42501");
    let e = admin
        .simple_query("SHOW NOTHING")
        .await
        .expect_err("unknown command");
    assert_eq!(sqlstate(&e), "0A000");
}
