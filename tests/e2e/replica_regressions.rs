//! Replica routing under failure and odd protocol sequences: each test is a
//! bug a review found (a write lost or misplaced, a transaction split, a
//! stale or wrong reply, a server left out of rotation), driven with raw
//! protocol messages where drivers would hide the sequence. Each comment
//! describes the failure its test guards against.

use std::time::Duration;

use testkit::Cluster;
use tokio_postgres::SimpleQueryMessage;

use crate::harness::{eventually, Options};
use crate::raw::Raw;
use crate::replica_env::{first, ReplicaEnv};

/// Terminates, on `server`, the backends whose query contains `needle`.
async fn terminate(server: &Cluster, needle: &str) -> i64 {
    let c = server.connect().await.unwrap();
    let row = c
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
            &[&needle],
        )
        .await
        .unwrap();
    row.get(0)
}

/// A READ ONLY transaction on a replica: when the replica connection dies
/// during its second statement, the statement is re-run on the primary,
/// outside any transaction, and the client is told it is idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_txn_split_on_retry() {
    let env = ReplicaEnv::start(1, "", "", true).await;
    let mut raw = Raw::login(env.addr).await;
    raw.query("BEGIN READ ONLY");
    eprintln!("{:?}", raw.until_ready().await);
    raw.query("SELECT pg_is_in_recovery()");
    let first = raw.until_ready().await;
    assert!(first.contains(&"D:t".to_owned()), "{first:?}");
    raw.query("SELECT pg_is_in_recovery() FROM pg_sleep(1) /* marker1 */");
    raw.send().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = terminate(&env.replicas[0], "marker1").await;
    assert_eq!(killed, 1);
    let second = raw.until_ready().await;
    // As on PostgreSQL: the transaction's connection is gone, so is the
    // client's; its statement did not run anywhere else.
    assert!(
        !second.contains(&"D:f".to_owned()) && second.last() != Some(&"Z:I".to_owned()),
        "the transaction that began on the replica ran its second statement on the primary, \
         outside the transaction: {second:?}"
    );
    assert!(second.iter().any(|r| r.starts_with("E:")), "{second:?}");
    assert_eq!(second.last().map(String::as_str), Some("EOF"), "{second:?}");
}

/// An extended-protocol INSERT acknowledged, then the server ends the
/// connection before the client's Sync: the proxy swallows the FATAL and
/// answers the Sync as if all was well; the INSERT never committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_before_sync_loses_write() {
    let env = ReplicaEnv::start(1, "", "", true).await;
    let mut raw = Raw::login(env.addr).await;
    raw.parse("", "INSERT INTO t VALUES (5000, 1) /* marker2 */")
        .bind("", &[])
        .execute()
        .flush();
    let got = raw
        .replies_within(|r| r.starts_with("C:"), 10)
        .await
        .unwrap();
    eprintln!("{got:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed = terminate(&env.primary, "marker2").await;
    assert_eq!(killed, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    raw.sync();
    let at_sync = raw
        .replies_within(|r| r.starts_with("Z:") || r == "EOF", 10)
        .await;
    let direct = env.primary.connect().await.unwrap();
    let n: i64 = direct
        .query_one("SELECT count(*) FROM t WHERE id = 5000", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!("reply to Sync: {at_sync:?}; rows with id 5000 on the primary: {n}");
    let clean = at_sync.as_ref().is_some_and(|s| {
        s.iter().all(|r| !r.starts_with("E:")) && s.last().is_some_and(|z| z.starts_with("Z:"))
    });
    assert!(
        !(clean && n == 0),
        "the client was told the batch ended fine, but the INSERT is not there"
    );
}

/// 3a. One extended batch (one Sync): INSERT then SELECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_write_then_read() {
    let env = ReplicaEnv::start(1, "", "", true).await;
    let mut raw = Raw::login(env.addr).await;
    raw.parse("", "INSERT INTO t VALUES (6000, 1)")
        .bind("", &[])
        .execute()
        .parse("", "SELECT v FROM t WHERE id = 6000")
        .bind("", &[])
        .execute()
        .sync();
    let got = raw.until_ready().await;
    let direct = env.primary.connect().await.unwrap();
    let n: i64 = direct
        .query_one("SELECT count(*) FROM t WHERE id = 6000", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!("batch INSERT+SELECT: {got:?}; rows: {n}");
    assert!(got.iter().all(|r| !r.starts_with("E:")), "{got:?}");
}

/// 3b. One extended batch (one Sync) with two SELECTs, two replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_two_reads_two_replicas() {
    let env = ReplicaEnv::start(2, "", "", true).await;
    // Both replicas up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut failures = 0;
    for _ in 0..10 {
        let mut raw = Raw::login(env.addr).await;
        raw.parse("", "SELECT 1")
            .bind("", &[])
            .execute()
            .parse("", "SELECT 2")
            .bind("", &[])
            .execute()
            .sync();
        let got = raw.until_ready().await;
        if got.iter().any(|r| r.starts_with("E:")) {
            failures += 1;
        }
    }
    assert_eq!(failures, 0, "batches of two reads refused");
}

/// Two simple queries pipelined; the replica dies during the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_query_lost_on_retry() {
    let env = ReplicaEnv::start(1, "", "", true).await;
    let mut raw = Raw::login(env.addr).await;
    raw.query("SELECT pg_is_in_recovery() FROM pg_sleep(1) /* marker4 */")
        .query("SELECT 42");
    raw.send().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(terminate(&env.replicas[0], "marker4").await, 1);
    let mut zs = 0;
    let got = raw
        .replies_within(
            move |r| {
                if r.starts_with("Z:") {
                    zs += 1;
                }
                zs == 2
            },
            8,
        )
        .await;
    assert!(got.is_some(), "the second query was never answered");
}

/// FunctionCall (fastpath, libpq's lo_* API) outside a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_call_goes_to_replica() {
    let env = ReplicaEnv::start(1, "", "", true).await;
    let direct = env.primary.connect().await.unwrap();
    let oid: u32 = direct
        .query_one("SELECT 'lo_creat'::regproc::oid", &[])
        .await
        .unwrap()
        .get(0);
    let mut raw = Raw::login(env.addr).await;
    raw.function_call(oid, "-1");
    let got = raw.until_ready().await;
    eprintln!("lo_creat via FunctionCall: {got:?}");
    assert!(got.iter().all(|r| !r.starts_with("E:")), "{got:?}");
}

/// The monitors log in to the first [[databases]] entry's dbname: if the
/// shard servers do not have it, every server of every shard is "down".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_uses_first_database() {
    let other = r#"
[[databases]]
name = "other"
port = 1
dbname = "not_on_the_shards"
server_user = "postgres"
server_password = "postgres"
"#;
    let env = ReplicaEnv::start(1, "", other, false).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = env.client().await;
    let w = client.execute("UPDATE t SET v = 1 WHERE id = 7", &[]).await;
    let r = client.simple_query("SELECT 1").await;
    eprintln!("write: {w:?}\nread: {:?}", r.as_ref().map(|_| "ok"));
    assert!(w.is_ok(), "a write to a healthy primary failed: {w:?}");
    assert!(r.is_ok(), "a read failed");
}

/// A write in a one-text transaction ("BEGIN; UPDATE ...; COMMIT"): the
/// text's kind is that of its first statement (BEGIN), so it does not count
/// as a write and the session's next read may go to a replica without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ryw_multi_statement_transaction() {
    let env =
        ReplicaEnv::start_with(1, &[("recovery_min_apply_delay", "500ms")], "", "", false).await;
    // Not waiting with a delayed replica: wait here instead.
    env.wait_for_replica_reads().await;
    let client = env.client().await;
    let direct_replica = env.replicas[0].connect().await.unwrap();
    direct_replica.simple_query("SELECT 1").await.unwrap();
    let mut stale = 0;
    for i in 1..=50 {
        client
            .simple_query(&format!("BEGIN; UPDATE t SET v = {i} WHERE id = 1; COMMIT"))
            .await
            .unwrap();
        let v = first(&client, "SELECT v FROM t WHERE id = 1")
            .await
            .unwrap();
        if v != i.to_string() {
            stale += 1;
        }
    }
    assert_eq!(
        stale, 0,
        "reads after the session's own write did not see it"
    );
}

/// SET shardline.read_from through the extended protocol (what JDBC and
/// tokio-postgres' execute send) goes to the server and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_from_extended() {
    let env = ReplicaEnv::start(1, "", "", true).await;
    let client = env.client().await;
    let r = client
        .execute("SET shardline.read_from = 'primary'", &[])
        .await;
    eprintln!("extended SET: {r:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let on = first(&client, "SELECT pg_is_in_recovery()").await;
    assert_eq!(on.as_deref(), Some("f"), "read_from = primary ignored");
}

/// A read whose retry failed leaves `retry` set: a later statement on
/// the primary that loses its connection gets the old read re-run and its
/// result sent as its reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_retry_answers_a_later_write() {
    let mut env = ReplicaEnv::start(1, "", "", true).await;
    let mut raw = Raw::login(env.addr).await;
    tokio::task::block_in_place(|| env.primary.stop());
    tokio::time::sleep(Duration::from_secs(1)).await;
    raw.query("SELECT 'old read' FROM pg_sleep(1) /* marker10a */");
    raw.send().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(terminate(&env.replicas[0], "marker10a").await, 1);
    let failed_read = raw.until_ready().await;
    eprintln!("retried read with the primary down: {failed_read:?}");
    tokio::task::block_in_place(|| env.primary.restart()).unwrap();
    let other = env.client().await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            other
                .execute("UPDATE t SET v = 1 WHERE id = 9", &[])
                .await
                .is_ok()
        })
        .await
    );
    raw.query("UPDATE t SET v = 77 WHERE id = 8 AND pg_sleep(1) IS NOT NULL /* marker10b */");
    raw.send().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(terminate(&env.primary, "marker10b").await, 1);
    let reply = raw
        .replies_within(|r| r.starts_with("Z:") || r == "EOF", 10)
        .await;
    eprintln!("reply to the UPDATE: {reply:?}");
    assert!(
        !reply.unwrap_or_default().iter().any(|r| r == "D:old read"),
        "the UPDATE was answered with the rows of an old read"
    );
}

/// role = "map" and a shard without replicas: no monitor runs for it, so
/// the breaker a session opens on a failed connection never closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_never_closes_without_monitor() {
    let options = Options {
        proxy_extra:
            "connect_timeout = \"2s\"\ncheckout_timeout = \"3s\"\n[replicas]\nrole = \"map\"\n"
                .into(),
        ..Options::default()
    };
    let mut env = crate::sharded_env::ShardedEnv::with(1, options).await;
    env.declare("accounts", "id", router::KeyType::Int8, 4)
        .await;
    let client = env.client().await;
    client.simple_query("SELECT 1").await.unwrap();
    tokio::task::block_in_place(|| env.pg[0].stop());
    let e = client.simple_query("SELECT 1").await;
    eprintln!("while down: {:?}", e.as_ref().err());
    tokio::task::block_in_place(|| env.pg[0].restart()).unwrap();
    let direct = env.direct(0).await;
    direct.simple_query("SELECT 1").await.unwrap();
    let back = eventually(Duration::from_secs(15), || async {
        client.simple_query("SELECT 1").await.is_ok()
    })
    .await;
    let last = client.simple_query("SELECT 1").await;
    eprintln!(
        "after restart: {:?}",
        last.as_ref().err().map(|e| e.to_string())
    );
    assert!(back, "the shard never came back into rotation");
}

/// Read-your-writes with synchronous_commit = off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ryw_async_commit() {
    let env = ReplicaEnv::start(1, "", "", true).await;
    let client = env.client().await;
    client
        .simple_query("SET synchronous_commit = off")
        .await
        .unwrap();
    let mut stale = 0;
    let mut on_replica = 0;
    for i in 1..=200 {
        client
            .simple_query(&format!("UPDATE t SET v = {i} WHERE id = 1"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        let msgs = client
            .simple_query("SELECT v, pg_is_in_recovery() FROM t WHERE id = 1")
            .await
            .unwrap();
        let (v, rec) = msgs
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => {
                    Some((r.get(0).unwrap().to_owned(), r.get(1).unwrap().to_owned()))
                }
                _ => None,
            })
            .unwrap();
        if rec == "t" {
            on_replica += 1;
        }
        if v != i.to_string() {
            stale += 1;
        }
    }
    eprintln!("stale {stale} of 200; on replica {on_replica}");
    assert_eq!(stale, 0);
}

/// An error in an extended batch without Sync makes the server skip what
/// follows up to the Sync. A Bind sent meanwhile was kept as a read to send
/// again, and when the replica died it ran elsewhere: the client got a
/// BindComplete and rows PostgreSQL never sends for skipped messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipped_messages_are_not_run_elsewhere() {
    let env = ReplicaEnv::start(1, "", "", true).await;
    let mut raw = Raw::login(env.addr).await;
    raw.parse("", "SELECT 1/(id-id) FROM t WHERE id = 1 /* skipped1 */")
        .bind("", &[])
        .execute()
        .flush();
    let got = raw.replies_within(|r| r.starts_with("E:"), 10).await;
    assert!(got.is_some_and(|g| g.contains(&"E:22012".to_owned())));
    raw.parse("", "SELECT pg_is_in_recovery()")
        .bind("", &[])
        .execute()
        .flush();
    raw.send().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(terminate(&env.replicas[0], "skipped1").await, 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    raw.sync();
    let got = raw
        .replies_within(|r| r.starts_with("Z:") || r == "EOF", 10)
        .await
        .unwrap_or_default();
    assert!(
        !got.iter().any(|r| r == "2" || r.starts_with("D:")),
        "skipped messages ran: {got:?}"
    );
}

/// A Describe or Execute of a portal bound on the dead connection was sent
/// again on a fresh one, where the portal does not exist (34000 instead of
/// the lost connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_of_a_dead_connection_is_not_replayed() {
    let env = ReplicaEnv::start(1, "", "", true).await;
    let mut raw = Raw::login(env.addr).await;
    raw.parse(
        "",
        "SELECT pg_is_in_recovery() FROM pg_sleep(2) /* portal1 */",
    )
    .bind("", &[])
    .flush();
    let got = raw.replies_within(|r| r == "2", 10).await;
    assert!(got.is_some(), "no BindComplete");
    raw.describe(b'P', "").execute().sync();
    raw.send().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(terminate(&env.replicas[0], "portal1").await, 1);
    let got = raw
        .replies_within(|r| r.starts_with("Z:") || r == "EOF", 10)
        .await
        .unwrap_or_default();
    assert!(!got.contains(&"E:34000".to_owned()), "{got:?}");
}

/// A simple Query sent while the server skips to Sync after an error is
/// ignored by PostgreSQL; the proxy waited for its reply, and every later
/// query of the session hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_while_skipping_to_sync_does_not_hang_the_session() {
    let env = ReplicaEnv::start(1, "", "", true).await;
    let mut raw = Raw::login(env.addr).await;
    raw.parse("", "SELECT 1/(id-id) FROM t WHERE id = 1")
        .bind("", &[])
        .execute()
        .flush();
    let got = raw.replies_within(|r| r.starts_with("E:"), 10).await;
    assert!(got.is_some());
    raw.query("SELECT 5");
    raw.send().await;
    raw.sync();
    let got = raw.replies_within(|r| r.starts_with("Z:"), 5).await;
    assert_eq!(
        got,
        Some(vec!["Z:I".to_owned()]),
        "the skipped Query got a reply"
    );
    raw.query("SELECT 6");
    let got = raw.replies_within(|r| r.starts_with("Z:"), 5).await;
    assert_eq!(
        got,
        Some(vec![
            "T".into(),
            "D:6".into(),
            "C:SELECT 1".into(),
            "Z:I".into()
        ])
    );
}
