//! Session behaviour of a routing proxy: transactions pinned to the shard of
//! their first statement, refusals that abort the transaction as PostgreSQL
//! errors do, multi-shard writes that apply everywhere or nowhere, DDL on
//! every shard, routing hints, and COPY split by key.

use futures_util::SinkExt;
use router::hash::KeyValue;
use router::{KeyType, ShardId};

use crate::harness::sqlstate;
use crate::sharded_env::ShardedEnv;

/// Two ids owned by different shards.
fn ids_on_two_shards(env: &ShardedEnv) -> (i64, i64) {
    let first = 1i64;
    let owner = env.owner("accounts", &KeyValue::Int8(first));
    let second = (2..1000)
        .find(|id| env.owner("accounts", &KeyValue::Int8(*id)) != owner)
        .expect("some key lives elsewhere");
    (first, second)
}

async fn count_on(env: &ShardedEnv, shard: ShardId) -> i64 {
    env.direct(shard.0 as usize)
        .await
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .expect("count")
        .get(0)
}

async fn env_with_accounts() -> ShardedEnv {
    with_accounts(ShardedEnv::start(2).await).await
}

/// `env` with the sharded table `accounts (id int8, v int4)`, keyed by id.
async fn with_accounts(env: ShardedEnv) -> ShardedEnv {
    env.declare("accounts", "id", KeyType::Int8, 8).await;
    env.client()
        .await
        .batch_execute("CREATE TABLE accounts (id int8 PRIMARY KEY, v int4 NOT NULL)")
        .await
        .expect("create through the proxy");
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_stays_on_the_shard_of_its_first_statement() {
    let env = env_with_accounts().await;
    let (a, b) = ids_on_two_shards(&env);
    let mut db = env.client().await;

    // BEGIN is deferred: the first statement chooses the shard, and the
    // transaction commits there.
    let tx = db.transaction().await.expect("begin");
    tx.execute("INSERT INTO accounts (id, v) VALUES ($1, 1)", &[&a])
        .await
        .expect("first write picks the shard");
    tx.execute("UPDATE accounts SET v = v + 1 WHERE id = $1", &[&a])
        .await
        .expect("same shard");
    let now: bool = tx
        .query_one("SELECT now() IS NOT NULL", &[])
        .await
        .expect("table-less statements run where the transaction is")
        .get(0);
    assert!(now);
    // Another shard inside the transaction: refused, and the transaction is
    // aborted as a PostgreSQL error would abort it.
    let err = tx
        .execute("INSERT INTO accounts (id, v) VALUES ($1, 1)", &[&b])
        .await
        .expect_err("second shard refused");
    assert_eq!(sqlstate(&err), "0A000", "{err}");
    // As in PostgreSQL, COMMIT of an aborted transaction rolls it back.
    assert_aborted(tx, "UPDATE accounts SET v = 0 WHERE id = $1", &[&a]).await;
    let rows = db
        .query("SELECT v FROM accounts WHERE id = $1", &[&a])
        .await
        .expect("read");
    assert!(rows.is_empty(), "the aborted transaction left rows behind");

    // A committed transaction's writes are there, on the owner only.
    let tx = db.transaction().await.expect("begin");
    tx.execute("INSERT INTO accounts (id, v) VALUES ($1, 7)", &[&b])
        .await
        .expect("insert");
    tx.commit().await.expect("commit");
    let owner = env.owner("accounts", &KeyValue::Int8(b));
    let direct = env.direct(owner.0 as usize).await;
    let v: i32 = direct
        .query_one("SELECT v FROM accounts WHERE id = $1", &[&b])
        .await
        .expect("on its owner")
        .get(0);
    assert_eq!(v, 7);

    // BEGIN then COMMIT with nothing in between needs no server.
    db.batch_execute("BEGIN; COMMIT")
        .await
        .expect("empty transaction");
    db.simple_query("BEGIN").await.expect("begin");
    db.simple_query("ROLLBACK").await.expect("rollback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_shard_writes_apply_everywhere_or_nowhere() {
    let env = env_with_accounts().await;
    let (a, b) = ids_on_two_shards(&env);
    let db = env.client().await;
    let owner_a = env.owner("accounts", &KeyValue::Int8(a));
    let owner_b = env.owner("accounts", &KeyValue::Int8(b));

    // A multi-row INSERT over two shards is split and lands on both.
    let inserted = db
        .execute(
            "INSERT INTO accounts (id, v) VALUES ($1, 1), ($2, 2)",
            &[&a, &b],
        )
        .await
        .expect("split insert");
    assert_eq!(inserted, 2);
    assert_eq!(count_on(&env, owner_a).await, 1);
    assert_eq!(count_on(&env, owner_b).await, 1);

    // One piece fails (duplicate key on b's shard): no shard keeps its rows.
    let c = (b + 1..10_000)
        .find(|id| env.owner("accounts", &KeyValue::Int8(*id)) == owner_a)
        .expect("another key on a's shard");
    let sql = format!("INSERT INTO accounts (id, v) VALUES ({c}, 3), ({b}, 4)");
    let err = db.simple_query(&sql).await.expect_err("duplicate key");
    assert_eq!(sqlstate(&err), "23505", "{err}");
    assert_eq!(count_on(&env, owner_a).await, 1, "a's shard kept a row");

    // Keyless UPDATE/DELETE would write every shard: refused.
    for sql in [
        "UPDATE accounts SET v = 0",
        "DELETE FROM accounts WHERE v = 1",
    ] {
        let err = db.simple_query(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err}");
    }
    // RETURNING over several shards would reorder rows: refused.
    let err = db
        .simple_query(&format!(
            "INSERT INTO accounts (id, v) VALUES ({}, 1), ({}, 1) RETURNING id",
            c,
            b + 100_000
        ))
        .await
        .expect_err("returning");
    assert!(matches!(sqlstate(&err).as_str(), "0A000"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_hints_and_copy_reach_the_right_shards() {
    let env = env_with_accounts().await;
    let db = env.client().await;

    // DDL on a sharded table runs on every shard; the client gets one reply.
    db.batch_execute("CREATE INDEX accounts_v ON accounts (v)")
        .await
        .expect("index everywhere");
    for shard in 0..2 {
        let n: i64 = env
            .direct(shard)
            .await
            .query_one(
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'accounts_v'",
                &[],
            )
            .await
            .expect("indexes")
            .get(0);
        assert_eq!(n, 1, "index on shard {shard}");
    }

    // COPY in CSV with a header, split by key.
    let sink = db
        .copy_in("COPY accounts (v, id) FROM STDIN WITH (FORMAT csv, HEADER)")
        .await
        .expect("copy starts");
    let mut data = String::from("v,id\n");
    for id in 1..=500 {
        data.push_str(&format!("{},{id}\n", id * 10));
    }
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data)).await.expect("send");
    let copied = sink.finish().await.expect("copy done");
    assert_eq!(copied, 500);
    let mut total = 0;
    for shard in 0..2u32 {
        let direct = env.direct(shard as usize).await;
        let ids: Vec<i64> = direct
            .query("SELECT id FROM accounts", &[])
            .await
            .expect("ids")
            .iter()
            .map(|r| r.get(0))
            .collect();
        for id in &ids {
            assert_eq!(env.owner("accounts", &KeyValue::Int8(*id)), ShardId(shard));
        }
        total += ids.len();
    }
    assert_eq!(total, 500);

    // A row whose key does not read as int8: nothing is copied anywhere.
    let sink = db
        .copy_in("COPY accounts (id, v) FROM STDIN")
        .await
        .expect("copy starts");
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from("1001\t1\nnot-a-number\t2\n"))
        .await
        .expect("send");
    let err = sink.finish().await.expect_err("bad key");
    assert_eq!(sqlstate(&err), "22P04", "{err}");
    let n: i64 = db
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 500);

    // Hints and SET shardline.shard pick a shard for what has no key.
    let on_shard = |sql: String| {
        let db = &db;
        async move {
            let rows = db.simple_query(&sql).await.expect("hinted");
            rows.iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                    _ => None,
                })
                .expect("a row")
        }
    };
    let port0 = env.pg[0].port().to_string();
    let port1 = env.pg[1].port().to_string();
    assert_eq!(
        on_shard("/* shardline: shard=1 */ SELECT current_setting('port')".into()).await,
        port1
    );
    db.simple_query("SET shardline.shard = 1")
        .await
        .expect("set");
    assert_eq!(
        on_shard("SELECT current_setting('port')".into()).await,
        port1
    );
    db.simple_query("RESET shardline.shard")
        .await
        .expect("reset");
    assert_eq!(
        on_shard("SELECT current_setting('port')".into()).await,
        port0
    );
    let key_owner = env.owner("accounts", &KeyValue::Int8(77));
    let port = env.pg[key_owner.0 as usize].port().to_string();
    assert_eq!(
        on_shard("/* shardline: key=77 */ SELECT current_setting('port')".into()).await,
        port
    );

    // DROP TABLE reaches every shard too.
    db.batch_execute("DROP TABLE accounts").await.expect("drop");
    for shard in 0..2 {
        let exists: bool = env
            .direct(shard)
            .await
            .query_one("SELECT to_regclass('accounts') IS NOT NULL", &[])
            .await
            .expect("regclass")
            .get(0);
        assert!(!exists, "accounts still on shard {shard}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_catalog_knows_decides_what_is_refused() {
    let env = env_with_accounts().await;
    let db = env.client().await;
    let (a, b) = ids_on_two_shards(&env);
    db.execute(
        "INSERT INTO accounts (id, v) VALUES ($1, 1), ($2, 2)",
        &[&a, &b],
    )
    .await
    .expect("rows on both shards");

    // Functions the planner cannot judge are looked up: an aggregate made
    // by the user is not mistaken for a per-row function.
    for shard in 0..2 {
        env.direct(shard)
            .await
            .batch_execute(
                "CREATE AGGREGATE mysum(int8) (sfunc = int8pl, stype = int8, initcond = '0')",
            )
            .await
            .expect("aggregate on every shard");
    }
    for sql in [
        "SELECT mysum(id) FROM accounts",
        "SELECT id, now() FROM accounts ORDER BY id",
        "SELECT id, random() FROM accounts",
    ] {
        let err = db.simple_query(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err}");
    }
    let lower: i64 = db
        .query_one("SELECT count(abs(id)) FROM accounts", &[])
        .await
        .expect("plain functions are fine")
        .get(0);
    assert_eq!(lower, 2);

    // Text in a collation that does not sort as bytes is not merged.
    env.declare("people", "id", KeyType::Int8, 8).await;
    db.batch_execute("CREATE TABLE people (id int8 PRIMARY KEY, name text COLLATE \"en-x-icu\")")
        .await
        .expect("create");
    db.execute(
        "INSERT INTO people (id, name) VALUES ($1, 'b'), ($2, 'B')",
        &[&a, &b],
    )
    .await
    .expect("insert");
    for sql in [
        "SELECT name FROM people ORDER BY name",
        "SELECT min(name) FROM people",
        "SELECT DISTINCT name FROM people",
    ] {
        let err = db.simple_query(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err}");
    }
    let ids: Vec<i64> = db
        .query("SELECT id FROM people ORDER BY id", &[])
        .await
        .expect("ordering by a number is fine")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, {
        let mut v = vec![a, b];
        v.sort();
        v
    });

    // Rounded float text is not merged; aggregates read exact partials.
    env.declare("floats", "id", KeyType::Int8, 8).await;
    db.batch_execute("CREATE TABLE floats (id int8 PRIMARY KEY, f float8)")
        .await
        .expect("create");
    db.execute(
        "INSERT INTO floats (id, f) VALUES ($1, 1e15 + 0.375), ($2, -1e15)",
        &[&a, &b],
    )
    .await
    .expect("insert");
    db.batch_execute("SET extra_float_digits = 0")
        .await
        .expect("set");
    let sum = db
        .simple_query("SELECT sum(f) FROM floats")
        .await
        .expect("sum");
    let sum = sum
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row");
    assert_eq!(sum, "0.375");
    let err = db
        .simple_query("SELECT id FROM floats ORDER BY f")
        .await
        .expect_err("rounded floats");
    assert_eq!(sqlstate(&err), "0A000", "{err}");
    db.batch_execute("RESET extra_float_digits")
        .await
        .expect("reset");

    // DDL that fails on one shard changes no shard.
    let owner_b = env.owner("accounts", &KeyValue::Int8(b));
    env.direct(owner_b.0 as usize)
        .await
        .batch_execute("CREATE VIEW floats_view AS SELECT * FROM floats")
        .await
        .expect("a view on one shard");
    let err = db
        .batch_execute("DROP TABLE floats")
        .await
        .expect_err("the view depends on it");
    assert_eq!(sqlstate(&err), "2BP01", "{err}");
    for shard in 0..2 {
        let exists: bool = env
            .direct(shard)
            .await
            .query_one("SELECT to_regclass('floats') IS NOT NULL", &[])
            .await
            .expect("regclass")
            .get(0);
        assert!(exists, "floats was dropped on shard {shard}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_failed_statement_aborts_the_transaction_even_before_it_has_a_server() {
    // One server connection per shard, and a short wait for it.
    let options = crate::harness::Options {
        pool_size: 1,
        proxy_extra: "checkout_timeout = \"300ms\"".into(),
        ..Default::default()
    };
    let env = with_accounts(ShardedEnv::with(2, options).await).await;
    let owner = env.owner("accounts", &KeyValue::Int8(1));
    let same: Vec<i64> = (2..1000)
        .filter(|id| env.owner("accounts", &KeyValue::Int8(*id)) == owner)
        .take(2)
        .collect();

    // Another client's transaction holds the shard's only connection.
    let mut holder = env.client().await;
    let held = holder.transaction().await.expect("begin");
    held.execute("INSERT INTO accounts (id, v) VALUES (1, 1)", &[])
        .await
        .expect("insert");

    // BEGIN is answered by the proxy; the first statement finds no
    // connection and fails...
    let mut db = env.client().await;
    let tx = db.transaction().await.expect("begin");
    let err = tx
        .execute("INSERT INTO accounts (id, v) VALUES ($1, 1)", &[&same[0]])
        .await
        .expect_err("the pool is exhausted");
    assert_eq!(sqlstate(&err), "53300", "{err}");
    held.commit().await.expect("the holder commits");
    // ... and, as after any PostgreSQL error, the transaction is aborted:
    // the next statement must not run and COMMIT must not keep it.
    assert_aborted(
        tx,
        "INSERT INTO accounts (id, v) VALUES ($1, 1)",
        &[&same[1]],
    )
    .await;
    let n: i64 = env
        .direct(owner.0 as usize)
        .await
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1, "only the holder's row");
}

/// The transaction is aborted: `sql` is refused with 25P02, and COMMIT is
/// answered (as a ROLLBACK), as PostgreSQL does after an error.
async fn assert_aborted(
    tx: tokio_postgres::Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) {
    let err = tx
        .execute(sql, params)
        .await
        .expect_err("aborted transaction");
    assert_eq!(sqlstate(&err), "25P02", "{err}");
    tx.batch_execute("COMMIT")
        .await
        .expect("COMMIT of an aborted transaction is answered (ROLLBACK)");
}
