//! The point-read cache: hits without a server round trip, strict
//! invalidation by this proxy's writes, by writes made directly on a shard
//! and through another proxy (the WAL change feed), bypass while the feed is
//! down, and the fill/invalidate race.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use router::KeyType;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{connect, eventually, Options};
use crate::sharded_env::ShardedEnv;

const CACHE_SECTIONS: &str = r#"
[cache]
tables = ["accounts"]
max_stream_lag = "5s"

[[users]]
name = "ops"
auth = "trust"
admin = true

[admin]
listen = "127.0.0.1:0"
"#;

/// Two shards, `accounts(id, balance)` sharded by id with ids 1..=200
/// (balance = id), the cache on for it, and its feeds serving.
async fn cached_env() -> ShardedEnv {
    cached_env_with("transaction").await
}

async fn cached_env_with(pool_mode: &'static str) -> ShardedEnv {
    let options = Options {
        pool_size: 20,
        pool_mode,
        ..Options::default()
    };
    let env = ShardedEnv::with_sections(2, options, CACHE_SECTIONS).await;
    env.declare("accounts", "id", KeyType::Int8, 8).await;
    env.lay_out(
        "accounts",
        "CREATE TABLE accounts (id int8 PRIMARY KEY, balance int8 NOT NULL)",
    )
    .await;
    let rows: Vec<String> = (1..=200).map(|id| format!("({id}, {id})")).collect();
    env.client()
        .await
        .simple_query(&format!(
            "INSERT INTO accounts (id, balance) VALUES {}",
            rows.join(", ")
        ))
        .await
        .expect("load accounts");
    for shard in 0..env.pg.len() {
        env.direct(shard)
            .await
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await
            .expect("pg_stat_statements");
    }
    wait_serving(&env.addr).await;
    if pool_mode == "transaction" {
        wait_hit(&env.addr, &env.client().await, 200).await;
    }
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_timed_by_shard_and_cache_hits_as_answered_by_the_proxy() {
    use crate::metrics::{scrape, sum};
    let env = cached_env().await;
    let metrics = env.metrics.expect("the metrics listener is bound");
    let owner = env
        .owner("accounts", &router::hash::KeyValue::Int8(77))
        .0
        .to_string();
    let client = env.client().await;
    let count = |s: &prometheus_parse::Scrape, shard: &str, role: &str, cached: &str| {
        let route = [("shard", shard), ("role", role), ("cached", cached)];
        sum(s, "shardline_statement_duration_seconds_count", &route)
    };
    let before = scrape(metrics).await;
    let hits_before = cache_count(&env.addr, "hits").await;
    // Misses (filled from the owner's primary) until the cache answers.
    let mut reads = 0;
    while cache_count(&env.addr, "hits").await == hits_before {
        assert!(reads < 200, "the cache never answered");
        balance(&client, 77).await;
        reads += 1;
    }
    client
        .simple_query("SELECT count(*) FROM accounts")
        .await
        .expect("scatter");
    let after = scrape(metrics).await;
    let delta = |shard: &str, role: &str, cached: &str| {
        count(&after, shard, role, cached) - count(&before, shard, role, cached)
    };
    assert_eq!(
        delta(&owner, "primary", "false"),
        f64::from(reads - 1),
        "misses on shard {owner}"
    );
    assert_eq!(delta(&owner, "proxy", "true"), 1.0, "the hit");
    assert_eq!(delta("all", "primary", "false"), 1.0, "the fan-out");
}

/// Waits until a point read through `client` (of the proxy at `addr`) is
/// answered from the cache.
async fn wait_hit(addr: &std::net::SocketAddr, client: &Client, id: i64) {
    let hit = eventually(Duration::from_secs(20), || async {
        let before = cache_count(addr, "hits").await;
        balance(client, id).await;
        balance(client, id).await;
        cache_count(addr, "hits").await > before
    })
    .await;
    assert!(
        hit,
        "the cache never served: {}",
        cache_stat(addr, "feeds").await
    );
}

/// Waits until every feed of the proxy at `addr` serves.
async fn wait_serving(addr: &std::net::SocketAddr) {
    let serving = eventually(Duration::from_secs(20), || async {
        let feeds = cache_stat(addr, "feeds").await;
        feeds.lines().count() >= 2
            && feeds
                .lines()
                .all(|l| l.contains(" serving ") && l.contains("published [accounts]"))
    })
    .await;
    assert!(
        serving,
        "the cache feeds never served: {}",
        cache_stat(addr, "feeds").await
    );
}

/// One column of `SHOW CACHE` on the proxy at `addr`.
async fn cache_stat(addr: &std::net::SocketAddr, column: &str) -> String {
    let admin = connect(*addr, "ops", "", "shardline")
        .await
        .expect("admin console");
    let messages = admin.simple_query("SHOW CACHE").await.expect("SHOW CACHE");
    for m in messages {
        if let SimpleQueryMessage::Row(row) = m {
            return row.get(column).unwrap_or_default().to_owned();
        }
    }
    panic!("SHOW CACHE returned no row")
}

async fn cache_count(addr: &std::net::SocketAddr, column: &str) -> u64 {
    cache_stat(addr, column).await.parse().expect("a counter")
}

/// `balance` of account `id`, read with a simple query (cacheable).
async fn balance(client: &Client, id: i64) -> i64 {
    let messages = client
        .simple_query(&format!("SELECT balance FROM accounts WHERE id = {id}"))
        .await
        .expect("point read");
    for m in messages {
        if let SimpleQueryMessage::Row(row) = m {
            return row.get(0).expect("balance").parse().expect("a number");
        }
    }
    panic!("account {id} not found")
}

/// How many times `shard` ran the point read of accounts, from
/// pg_stat_statements (updated as each statement ends).
async fn server_reads(env: &ShardedEnv, shard: usize) -> i64 {
    statement_calls(env, shard, "SELECT balance FROM accounts WHERE id = $1").await
}

/// How many times `shard` ran statements normalized to `query`.
async fn statement_calls(env: &ShardedEnv, shard: usize, query: &str) -> i64 {
    let row = env
        .direct(shard)
        .await
        .query_one(
            "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements WHERE query = $1",
            &[&query],
        )
        .await
        .expect("statement counts");
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_point_read_does_not_reach_the_server() {
    let env = cached_env().await;
    let client = env.client().await;
    let owner = env.owner("accounts", &router::hash::KeyValue::Int8(42)).0 as usize;
    assert_eq!(balance(&client, 42).await, 42, "first read fills");
    wait_hit(&env.addr, &client, 42).await;
    let hits_before = cache_count(&env.addr, "hits").await;
    let before = server_reads(&env, owner).await;
    for _ in 0..50 {
        assert_eq!(balance(&client, 42).await, 42);
    }
    let after = server_reads(&env, owner).await;
    println!(
        "server reads of shard {owner}: {before} -> {after}; hits {hits_before} -> {}",
        cache_count(&env.addr, "hits").await
    );
    assert_eq!(after - before, 0, "cached reads reached the shard");
    assert!(cache_count(&env.addr, "hits").await >= hits_before + 50);

    // The same reads with the cache off do reach it: the measure works.
    let admin = connect(env.addr, "ops", "", "shardline")
        .await
        .expect("admin");
    admin
        .simple_query("CACHE DISABLE accounts")
        .await
        .expect("disable");
    let before = server_reads(&env, owner).await;
    for _ in 0..50 {
        assert_eq!(balance(&client, 42).await, 42);
    }
    let after = server_reads(&env, owner).await;
    assert!(after - before >= 50, "{} server reads", after - before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_the_proxy_is_seen_by_the_next_read() {
    let env = cached_env().await;
    let client = env.client().await;
    let other = env.client().await;
    assert_eq!(balance(&client, 7).await, 7);
    assert_eq!(balance(&client, 7).await, 7);
    other
        .simple_query("UPDATE accounts SET balance = 700 WHERE id = 7")
        .await
        .expect("update");
    assert_eq!(balance(&client, 7).await, 700, "after an autocommit UPDATE");
    // In an explicit transaction: invalidated at COMMIT.
    other
        .batch_execute("BEGIN; UPDATE accounts SET balance = 701 WHERE id = 7")
        .await
        .expect("update in a transaction");
    assert_eq!(balance(&client, 7).await, 700, "not committed yet");
    other.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(balance(&client, 7).await, 701, "after COMMIT");
    // A keyless write invalidates the whole table.
    assert_eq!(balance(&client, 8).await, 8);
    other
        .simple_query("UPDATE accounts SET balance = balance + 1000 WHERE balance < 100")
        .await
        .expect_err("a keyless UPDATE on every shard is refused");
    other
        .simple_query("DELETE FROM accounts WHERE id = 8")
        .await
        .expect("delete");
    let rows = client
        .simple_query("SELECT balance FROM accounts WHERE id = 8")
        .await
        .expect("read");
    assert!(
        !rows.iter().any(|m| matches!(m, SimpleQueryMessage::Row(_))),
        "a deleted row came back"
    );
    other
        .simple_query("INSERT INTO accounts (id, balance) VALUES (8, 88)")
        .await
        .expect("insert");
    assert_eq!(balance(&client, 8).await, 88, "an insert is seen");
    // Extended protocol writes invalidate too.
    other
        .execute(
            "UPDATE accounts SET balance = $2 WHERE id = $1",
            &[&8i64, &89i64],
        )
        .await
        .expect("extended update");
    assert_eq!(balance(&client, 8).await, 89);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_value_older_than_the_last_acknowledged_write() {
    const KEYS: i64 = 100;
    const WRITERS: i64 = 8;
    const READERS: usize = 8;
    let env = Arc::new(cached_env().await);
    // acked[k]: the last version of key k+1 a writer saw acknowledged.
    let acked: Arc<Vec<AtomicU64>> =
        Arc::new((1..=KEYS).map(|k| AtomicU64::new(k as u64)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let violations = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let hits_before = cache_count(&env.addr, "hits").await;

    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (env, acked, stop) = (env.clone(), acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let client = env.client().await;
            let mut version = 1000u64;
            while !stop.load(Ordering::Relaxed) {
                // Writer w owns the keys k with k % WRITERS == w, so each
                // key's versions only grow.
                for k in (1..=KEYS).filter(|k| k % WRITERS == w) {
                    version += 1;
                    client
                        .simple_query(&format!(
                            "UPDATE accounts SET balance = {version} WHERE id = {k}"
                        ))
                        .await
                        .expect("write");
                    acked[(k - 1) as usize].store(version, Ordering::SeqCst);
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
            }
        }));
    }
    for r in 0..READERS {
        let (env, acked, stop) = (env.clone(), acked.clone(), stop.clone());
        let (violations, reads) = (violations.clone(), reads.clone());
        tasks.push(tokio::spawn(async move {
            let client = env.client().await;
            let mut k = (r as i64 * 13) % KEYS + 1;
            while !stop.load(Ordering::Relaxed) {
                // Hot keys: most reads go to the first ten.
                k = if k % 3 == 0 {
                    k % 10 + 1
                } else {
                    (k * 7 + 3) % KEYS + 1
                };
                let floor = acked[(k - 1) as usize].load(Ordering::SeqCst);
                let seen = balance(&client, k).await as u64;
                reads.fetch_add(1, Ordering::Relaxed);
                if seen < floor {
                    violations.fetch_add(1, Ordering::Relaxed);
                    eprintln!("key {k}: read {seen} after {floor} was acknowledged");
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("task");
    }
    let hits = cache_count(&env.addr, "hits").await - hits_before;
    let reads = reads.load(Ordering::Relaxed);
    println!("strictness: {reads} reads, {hits} cache hits, 0 violations allowed");
    for column in [
        "misses",
        "fills",
        "fills_stale",
        "key_invalidations",
        "table_invalidations",
        "feeds",
    ] {
        println!("{column}: {}", cache_stat(&env.addr, column).await);
    }
    assert_eq!(violations.load(Ordering::Relaxed), 0, "stale reads");
    assert!(
        hits > 0,
        "the cache served nothing: the test proves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_racing_a_write_never_outlives_it() {
    let env = cached_env().await;
    let reader = Arc::new(env.client().await);
    let writer = env.client().await;
    let checker = env.client().await;
    for round in 0..300i64 {
        let version = 10_000 + round;
        let r = reader.clone();
        let read = tokio::spawn(async move { balance(&r, 5).await });
        writer
            .simple_query(&format!(
                "UPDATE accounts SET balance = {version} WHERE id = 5"
            ))
            .await
            .expect("write");
        read.await.expect("read task");
        assert_eq!(
            balance(&checker, 5).await,
            version,
            "round {round}: a stale fill survived the write"
        );
    }
    assert!(
        cache_count(&env.addr, "fills").await > 0,
        "nothing was filled: the race was not run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_write_on_the_shard_invalidates_through_the_wal() {
    let env = cached_env().await;
    let client = env.client().await;
    let owner = env.owner("accounts", &router::hash::KeyValue::Int8(11)).0 as usize;
    assert_eq!(balance(&client, 11).await, 11);
    assert_eq!(balance(&client, 11).await, 11);
    let hits = cache_count(&env.addr, "hits").await;
    assert!(hits > 0, "the read was not cached");
    let direct = env.direct(owner).await;
    direct
        .batch_execute("UPDATE accounts SET balance = 1100 WHERE id = 11")
        .await
        .expect("direct update");
    let written = Instant::now();
    let seen = eventually(Duration::from_secs(8), || async {
        balance(&client, 11).await == 1100
    })
    .await;
    let delay = written.elapsed();
    println!("direct write visible through the cache after {delay:?}");
    assert!(seen, "a direct write never reached the cache");
    // Within max_stream_lag (5 s here, for loaded test machines) plus
    // decoding; normally a few milliseconds.
    assert!(delay < Duration::from_secs(6), "took {delay:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_another_proxy_invalidates_this_one() {
    let env = cached_env().await;
    let (second, _stop) = env.second_proxy().await;
    wait_serving(&second).await;
    let here = env.client().await;
    let there = connect(second, "app", crate::harness::APP_PASSWORD, "db")
        .await
        .expect("second proxy");
    wait_hit(&second, &there, 200).await;
    assert_eq!(balance(&here, 21).await, 21);
    assert_eq!(balance(&here, 21).await, 21);
    there
        .simple_query("UPDATE accounts SET balance = 2100 WHERE id = 21")
        .await
        .expect("update through the second proxy");
    let seen = eventually(Duration::from_secs(3), || async {
        balance(&here, 21).await == 2100
    })
    .await;
    assert!(seen, "the first proxy kept serving the old value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_bypass_the_cache_while_the_feed_is_down() {
    let env = Arc::new(cached_env().await);
    let client = env.client().await;
    let owner = env.owner("accounts", &router::hash::KeyValue::Int8(31)).0 as usize;
    assert_eq!(balance(&client, 31).await, 31);
    assert_eq!(balance(&client, 31).await, 31);
    // Keep cutting the owner's feed (its walsender) for a while.
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let (env, stop) = (env.clone(), stop.clone());
        tokio::spawn(async move {
            let direct = env.direct(owner).await;
            while !stop.load(Ordering::Relaxed) {
                direct
                    .batch_execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE backend_type = 'walsender'",
                    )
                    .await
                    .expect("terminate walsenders");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let down = eventually(Duration::from_secs(3), || async {
        cache_stat(&env.addr, "feeds").await.contains(" down")
    })
    .await;
    assert!(down, "SHOW CACHE never reported the feed down");
    env.direct(owner)
        .await
        .batch_execute("UPDATE accounts SET balance = 3100 WHERE id = 31")
        .await
        .expect("direct write while the feed is down");
    for _ in 0..20 {
        assert_eq!(
            balance(&client, 31).await,
            3100,
            "stale read while the feed was down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    killer.await.expect("killer");
    // The feed comes back and the cache serves again.
    wait_serving(&env.addr).await;
    wait_hit(&env.addr, &client, 31).await;
    assert_eq!(balance(&client, 31).await, 3100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_point_reads_are_cached_in_binary_and_text() {
    let env = cached_env().await;
    let client = env.client().await;
    let owner = env.owner("accounts", &router::hash::KeyValue::Int8(42)).0 as usize;
    let read = || async {
        let row = client
            .query_one("SELECT balance FROM accounts WHERE id = $1", &[&42i64])
            .await
            .expect("prepared read");
        row.get::<_, i64>(0)
    };
    // Binary results (tokio-postgres asks for them).
    assert_eq!(read().await, 42);
    let hit = eventually(Duration::from_secs(20), || async {
        let before = cache_count(&env.addr, "hits").await;
        read().await;
        cache_count(&env.addr, "hits").await > before
    })
    .await;
    assert!(hit, "prepared reads were never answered from the cache");
    let before = server_reads(&env, owner).await;
    for _ in 0..20 {
        assert_eq!(read().await, 42);
    }
    assert_eq!(
        server_reads(&env, owner).await,
        before,
        "cached reads reached the shard"
    );
    // A write through the proxy is seen by the next prepared read.
    client
        .execute(
            "UPDATE accounts SET balance = $2 WHERE id = $1",
            &[&42i64, &4200i64],
        )
        .await
        .expect("update");
    assert_eq!(read().await, 4200);

    // Text results, with a Describe of the portal: the replayed reply is
    // the same, message for message.
    let mut raw = crate::raw::Raw::login(env.addr).await;
    let mut replies = Vec::new();
    let hits = cache_count(&env.addr, "hits").await;
    for _ in 0..4 {
        raw.parse("", "SELECT balance FROM accounts WHERE id = $1")
            .bind("", &["42"])
            .describe(b'P', "")
            .execute()
            .sync();
        replies.push(raw.until_ready().await);
    }
    let expected = ["1", "2", "T", "D:4200", "C:SELECT 1", "Z:I"];
    for reply in &replies {
        assert_eq!(reply, &expected);
    }
    assert!(
        cache_count(&env.addr, "hits").await >= hits + 2,
        "text-format reads were not answered from the cache"
    );
}

/// Stops every walsender of every shard until dropped (also when the test
/// fails): the change feeds then see nothing, so only the proxy's own
/// invalidations count (for up to max_stream_lag).
struct PausedFeeds(Vec<i32>);

impl PausedFeeds {
    async fn pause(env: &ShardedEnv) -> PausedFeeds {
        let mut pids = Vec::new();
        for shard in 0..env.pg.len() {
            let rows = env
                .direct(shard)
                .await
                .query(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender'",
                    &[],
                )
                .await
                .expect("walsenders");
            pids.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
        }
        let paused = PausedFeeds(pids);
        paused.signal("-STOP");
        paused
    }

    fn signal(&self, signal: &str) {
        for pid in &self.0 {
            let status = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success(), "kill {signal} {pid}");
        }
    }
}

impl Drop for PausedFeeds {
    fn drop(&mut self) {
        // A stopped walsender would keep its server from shutting down.
        for pid in &self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    }
}

/// The columns of account `id`'s row, read with a simple query.
async fn row_width(client: &Client, id: i64) -> usize {
    let messages = client
        .simple_query(&format!("SELECT * FROM accounts WHERE id = {id}"))
        .await
        .expect("point read");
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row.len()),
            _ => None,
        })
        .expect("the row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_invalidates_its_own_writes_without_the_feed() {
    // Writes the WAL feed would catch anyway, with the feeds paused: what
    // remains is the proxy's own invalidation, which must come before the
    // acknowledgement. (Review findings: extended-protocol multi-shard
    // writes and DDL, COMMIT executed then flushed without a Sync.)
    let env = cached_env().await;
    let reader = env.client().await;
    let writer = env.client().await;
    let key = router::hash::KeyValue::Int8;
    let a = 301i64;
    let b = (302..400)
        .find(|&k| env.owner("accounts", &key(k)) != env.owner("accounts", &key(a)))
        .expect("a key on the other shard");
    for id in [a, b] {
        let missing = reader
            .simple_query(&format!("SELECT balance FROM accounts WHERE id = {id}"))
            .await
            .expect("read");
        assert!(!missing
            .iter()
            .any(|m| matches!(m, SimpleQueryMessage::Row(_))));
    }
    wait_hit(&env.addr, &reader, 61).await;
    assert_eq!(row_width(&reader, 62).await, 2);
    assert_eq!(row_width(&reader, 62).await, 2);
    let paused = PausedFeeds::pause(&env).await;
    {
        // An INSERT split over both shards, with the extended protocol.
        writer
            .execute(
                "INSERT INTO accounts (id, balance) VALUES ($1, $2), ($3, $4)",
                &[&a, &1i64, &b, &2i64],
            )
            .await
            .expect("split insert");
        assert_eq!(balance(&reader, a).await, 1, "split insert, first shard");
        assert_eq!(balance(&reader, b).await, 2, "split insert, second shard");
        // COMMIT executed, then Flush: committed and acknowledged before Sync.
        let mut raw = crate::raw::Raw::login(env.addr).await;
        raw.query("BEGIN; UPDATE accounts SET balance = 6100 WHERE id = 61");
        raw.until_ready().await;
        raw.parse("", "COMMIT").bind("", &[]).execute().flush();
        raw.replies(|r| r == "C:COMMIT").await;
        assert_eq!(
            balance(&reader, 61).await,
            6100,
            "COMMIT acknowledged before its Sync"
        );
        raw.sync();
        raw.until_ready().await;
        // A write naming a partition of the cached table.
        let map = env.map();
        let group = &map.groups[&map.tables["accounts"].group];
        let p = router::hash::partition_of(&[Some(&key(63))], group.modulus());
        let partition =
            router::ddl::partition_name("accounts", router::PartitionIdx(p), group.modulus());
        let shard = group.partitions[p as usize].owner;
        assert_eq!(balance(&reader, 63).await, 63);
        assert_eq!(balance(&reader, 63).await, 63);
        writer
            .batch_execute(&format!("SET shardline.shard = {}", shard.0))
            .await
            .expect("pin the shard");
        writer
            .batch_execute(&format!(
                "UPDATE {partition} SET balance = -63 WHERE id = 63"
            ))
            .await
            .expect("write to the partition");
        writer
            .batch_execute("RESET shardline.shard")
            .await
            .expect("reset");
        assert_eq!(
            balance(&reader, 63).await,
            -63,
            "a write naming the partition"
        );
        // DDL with the extended protocol changes what the read returns.
        writer
            .execute("ALTER TABLE accounts ADD COLUMN extra int8 DEFAULT 7", &[])
            .await
            .expect("extended DDL");
        assert_eq!(row_width(&reader, 62).await, 3, "a column added");
    }
    drop(paused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pooling_does_not_cache() {
    // A session may hold state the cache key cannot (a temporary table
    // shadowing the cached one, set_config), so session mode never uses it.
    let env = cached_env_with("session").await;
    let client = env.client().await;
    client
        .batch_execute(
            "DO $$ BEGIN CREATE TEMP TABLE accounts (id int8, balance int8); \
             INSERT INTO accounts VALUES (10, 888); END $$",
        )
        .await
        .expect("temporary table");
    for _ in 0..3 {
        assert_eq!(balance(&client, 10).await, 888, "the session's own table");
    }
    let other = env.client().await;
    assert_eq!(
        balance(&other, 10).await,
        10,
        "another session's table leaked"
    );
    assert_eq!(cache_count(&env.addr, "hits").await, 0);
    assert_eq!(cache_count(&env.addr, "fills").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_stays_under_max_bytes() {
    const MAX: u64 = 256 * 1024;
    let sections = CACHE_SECTIONS.replace(
        "[cache]\n",
        &format!("[cache]\nmax_bytes = {MAX}\nentry_bytes_max = 4096\n"),
    );
    let options = Options {
        pool_size: 8,
        ..Options::default()
    };
    let env = ShardedEnv::with_sections(1, options, &sections).await;
    env.declare("accounts", "id", KeyType::Int8, 4).await;
    env.lay_out(
        "accounts",
        "CREATE TABLE accounts (id int8 PRIMARY KEY, balance int8 NOT NULL)",
    )
    .await;
    let client = env.client().await;
    client
        .simple_query("INSERT INTO accounts (id, balance) VALUES (1, 1)")
        .await
        .expect("insert");
    let serving = eventually(Duration::from_secs(20), || async {
        cache_stat(&env.addr, "feeds").await.contains(" serving ")
            && cache_stat(&env.addr, "feeds").await.contains("[accounts]")
    })
    .await;
    assert!(serving, "{}", cache_stat(&env.addr, "feeds").await);
    // 2,000 distinct cacheable reads of about 1 KiB each: 2 MiB of replies.
    let pad = "x".repeat(1000);
    for i in 0..2000 {
        client
            .simple_query(&format!(
                "SELECT balance, '{pad}{i}' AS pad FROM accounts WHERE id = 1"
            ))
            .await
            .expect("read");
    }
    let fills = cache_count(&env.addr, "fills").await;
    let bytes = cache_count(&env.addr, "bytes").await;
    let evictions = cache_count(&env.addr, "evictions").await;
    println!("memory bound: {fills} fills, {bytes} bytes kept (max {MAX}), {evictions} evicted");
    assert!(fills > 1000, "too few fills ({fills}) to test the bound");
    assert!(bytes <= MAX, "{bytes} bytes cached, max {MAX}");
    assert!(evictions > 0);
}

const KEYED_SECTIONS: &str = r#"
[cache]
max_stream_lag = "5s"

[cache.keys]
plans = { column = "code", type = "text" }
notes = { column = "label", type = "text" }

[[users]]
name = "ops"
auth = "trust"
admin = true
"#;

/// `shards` shards, no sharded table, the cache keeping `plans` and `notes`
/// (unsharded) by their `[cache.keys]` column.
async fn keyed_env(shards: usize) -> ShardedEnv {
    let options = Options {
        pool_size: 10,
        ..Options::default()
    };
    ShardedEnv::with_sections(shards, options, KEYED_SECTIONS).await
}

/// The price of plan `code` (an unsharded table), if there is one.
async fn price(client: &Client, code: &str) -> Option<i64> {
    let price = plan_column(client, code, "price").await?;
    Some(price?.parse().expect("a number"))
}

/// Column `column` of plan `code`, if there is one.
async fn plan_column(client: &Client, code: &str, column: &str) -> Option<Option<String>> {
    let messages = client
        .simple_query(&format!("SELECT {column} FROM plans WHERE code = '{code}'"))
        .await
        .expect("point read of plans");
    messages.into_iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_owned)),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsharded_table_is_cached_by_its_configured_key() {
    let env = keyed_env(2).await;
    let client = env.client().await;
    // Unsharded: both live on the home shard. `notes` is keyed by a column
    // outside its replica identity, which the WAL would not show changing.
    client
        .batch_execute(
            "CREATE TABLE plans (code text PRIMARY KEY, price int8 NOT NULL);
             INSERT INTO plans VALUES ('gold', 10), ('basic', 1);
             CREATE TABLE notes (id int8 PRIMARY KEY, label text UNIQUE);
             CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
        )
        .await
        .expect("unsharded tables");
    let published = eventually(Duration::from_secs(20), || async {
        let feeds = cache_stat(&env.addr, "feeds").await;
        feeds.contains("serving") && feeds.contains("published [plans]")
    })
    .await;
    let feeds = cache_stat(&env.addr, "feeds").await;
    assert!(published, "plans was never published: {feeds}");
    assert!(
        feeds.contains("notes not published: ")
            && feeds.contains("does not have its cache key label in its replica identity"),
        "notes was published although its key is not in its replica identity: {feeds}"
    );

    // Hits: the home shard sees the read once.
    let calls = || statement_calls(&env, 0, "SELECT price FROM plans WHERE code = $1");
    let hit = eventually(Duration::from_secs(20), || async {
        let before = cache_count(&env.addr, "hits").await;
        price(&client, "gold").await;
        price(&client, "gold").await;
        cache_count(&env.addr, "hits").await > before
    })
    .await;
    assert!(hit, "plans was never served from the cache");
    let before = calls().await;
    for _ in 0..30 {
        assert_eq!(price(&client, "gold").await, Some(10));
    }
    assert_eq!(calls().await, before, "cached reads reached the home shard");

    // This proxy's writes, by key and without.
    let other = env.client().await;
    other
        .simple_query("UPDATE plans SET price = 11 WHERE code = 'gold'")
        .await
        .expect("update by key");
    assert_eq!(price(&client, "gold").await, Some(11));
    assert_eq!(price(&client, "silver").await, None);
    assert_eq!(price(&client, "silver").await, None);
    other
        .execute(
            "INSERT INTO plans (code, price) VALUES ($1, $2)",
            &[&"silver", &5i64],
        )
        .await
        .expect("insert");
    assert_eq!(price(&client, "silver").await, Some(5), "an insert is seen");
    price(&client, "basic").await;
    other
        .simple_query("UPDATE plans SET price = price + 1 WHERE price < 3")
        .await
        .expect("keyless update");
    assert_eq!(price(&client, "basic").await, Some(2), "a keyless update");

    // Writes on the home shard itself, through the WAL: a new value, and
    // the key itself changing (the old key must stop answering).
    assert_eq!(price(&client, "gold").await, Some(11));
    let direct = env.direct(0).await;
    direct
        .batch_execute("UPDATE plans SET price = 12 WHERE code = 'gold'")
        .await
        .expect("direct update");
    let seen = eventually(Duration::from_secs(8), || async {
        price(&client, "gold").await == Some(12)
    })
    .await;
    assert!(seen, "a direct write never reached the cache");
    direct
        .batch_execute("UPDATE plans SET code = 'platinum' WHERE code = 'gold'")
        .await
        .expect("direct key change");
    let gone = eventually(Duration::from_secs(8), || async {
        price(&client, "gold").await.is_none()
    })
    .await;
    assert!(gone, "the old key kept answering after the key changed");
    assert_eq!(price(&client, "platinum").await, Some(12));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_reach_a_cached_table_through_triggers_or_cascades_invalidate_it() {
    let env = keyed_env(1).await;
    let client = env.client().await;
    // An insert into orders changes plans through a trigger; renaming a
    // tier changes plans through a cascading foreign key.
    client
        .batch_execute(
            "CREATE TABLE tiers (name text PRIMARY KEY);
             INSERT INTO tiers VALUES ('top'), ('low');
             CREATE TABLE plans (code text PRIMARY KEY, price int8 NOT NULL,
                                 tier text REFERENCES tiers ON UPDATE CASCADE);
             INSERT INTO plans VALUES ('gold', 10, 'top'), ('basic', 1, 'low');
             CREATE TABLE orders (id int8 PRIMARY KEY, plan text NOT NULL);
             CREATE FUNCTION count_order() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               UPDATE plans SET price = price + 1 WHERE code = NEW.plan;
               RETURN NEW;
             END $$;
             CREATE TRIGGER orders_count AFTER INSERT ON orders
               FOR EACH ROW EXECUTE FUNCTION count_order()",
        )
        .await
        .expect("tables, trigger and foreign key");
    let ready = eventually(Duration::from_secs(20), || async {
        let feeds = cache_stat(&env.addr, "feeds").await;
        feeds.contains("serving")
            && feeds.contains("published [plans]")
            && feeds.contains("triggers or rules on [orders]")
            && feeds.contains("cascading foreign keys [tiers -> plans]")
    })
    .await;
    let feeds = cache_stat(&env.addr, "feeds").await;
    assert!(
        ready,
        "the feed never saw the trigger and the foreign key: {feeds}"
    );
    let hit = eventually(Duration::from_secs(20), || async {
        let before = cache_count(&env.addr, "hits").await;
        price(&client, "gold").await;
        price(&client, "gold").await;
        plan_column(&client, "basic", "tier").await;
        plan_column(&client, "basic", "tier").await;
        cache_count(&env.addr, "hits").await >= before + 2
    })
    .await;
    assert!(hit, "plans was never served from the cache");

    // Only the proxy's own invalidation counts: the WAL feed is stopped
    // (for less than max_stream_lag, so the cache still serves).
    let writer = env.client().await;
    let _paused = PausedFeeds::pause(&env).await;
    writer
        .simple_query("INSERT INTO orders VALUES (1, 'gold')")
        .await
        .expect("an order");
    assert_eq!(
        price(&client, "gold").await,
        Some(11),
        "the trigger's write was not seen"
    );
    writer
        .simple_query("UPDATE tiers SET name = 'bottom' WHERE name = 'low'")
        .await
        .expect("a tier renamed");
    assert_eq!(
        plan_column(&client, "basic", "tier").await,
        Some(Some("bottom".to_owned())),
        "the cascade's write was not seen"
    );
}
