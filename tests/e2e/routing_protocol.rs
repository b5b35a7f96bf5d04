//! Routing under the raw extended protocol: the message sequences drivers
//! really send (pgjdbc's Parse/Describe/Bind in one batch, pipelined
//! Bind/Execute pairs, BEGIN through the extended protocol, Flush instead of
//! Sync), checked reply by reply against what PostgreSQL itself answers.

use router::hash::KeyValue;
use router::{KeyType, ShardId};

use crate::raw::Raw;
use crate::sharded_env::ShardedEnv;

/// `n` keys of `accounts` owned by `shard`, from `from` up.
fn keys_from(env: &ShardedEnv, shard: u32, from: i64, n: usize) -> Vec<i64> {
    (from..from + 100_000)
        .filter(|k| env.owner("accounts", &KeyValue::Int8(*k)) == ShardId(shard))
        .take(n)
        .collect()
}

async fn env() -> ShardedEnv {
    let env = ShardedEnv::start(2).await;
    env.declare("accounts", "id", KeyType::Int8, 8).await;
    let db = env.client().await;
    db.batch_execute("CREATE TABLE accounts (id int8 PRIMARY KEY, v int4 NOT NULL)")
        .await
        .expect("create through the proxy");
    let rows: Vec<String> = (1..=40).map(|g| format!("({g}, {g})")).collect();
    db.batch_execute(&format!(
        "INSERT INTO accounts (id, v) VALUES {}",
        rows.join(", ")
    ))
    .await
    .expect("fill through the proxy");
    env
}

/// Column v of row `id`, read on shard `shard` directly.
async fn v_on(env: &ShardedEnv, shard: usize, id: i64) -> i32 {
    env.direct(shard)
        .await
        .query_one("SELECT v FROM accounts WHERE id = $1", &[&id])
        .await
        .expect("row")
        .get(0)
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_batches_route_and_answer_in_order() {
    let env = env().await;
    let one = keys_from(&env, 1, 1, 2);
    let zero = keys_from(&env, 0, 1, 1);
    let (a, b, z) = (one[0].to_string(), one[1].to_string(), zero[0].to_string());
    let sel = "SELECT id FROM accounts WHERE id = $1";
    let mut c = Raw::login(env.addr).await;

    // Two Bind/Execute pairs for one shard in one batch (pgx SendBatch).
    c.parse("", sel).bind("", &[&a]).execute();
    c.parse("", sel).bind("", &[&b]).execute().sync();
    let got = c.until_ready().await;
    assert_eq!(
        got,
        s(&[
            "1",
            "2",
            &format!("D:{a}"),
            "C:SELECT 1",
            "1",
            "2",
            &format!("D:{b}"),
            "C:SELECT 1",
            "Z:I"
        ])
    );

    // Named statement, prepared then executed twice in one batch.
    c.parse("s1", sel).describe(b'S', "s1").sync();
    assert_eq!(c.until_ready().await, s(&["1", "t", "T", "Z:I"]));
    c.bind("s1", &[&a])
        .execute()
        .bind("s1", &[&b])
        .execute()
        .sync();
    let got = c.until_ready().await;
    assert_eq!(
        got,
        s(&[
            "2",
            &format!("D:{a}"),
            "C:SELECT 1",
            "2",
            &format!("D:{b}"),
            "C:SELECT 1",
            "Z:I"
        ])
    );

    // pgjdbc's single statement: Parse, Describe statement, Bind, Describe
    // portal, Execute, Sync, for a key off the home shard.
    c.parse("", sel)
        .describe(b'S', "")
        .bind("", &[&a])
        .describe(b'P', "")
        .execute()
        .sync();
    let got = c.until_ready().await;
    assert_eq!(
        got,
        s(&[
            "1",
            "t",
            "T",
            "2",
            "T",
            &format!("D:{a}"),
            "C:SELECT 1",
            "Z:I"
        ])
    );

    // A Flush instead of a Sync gets the rows; the Sync then ends the batch.
    c.parse("", sel).bind("", &[&z]).execute().flush();
    let got = c.replies(|r| r.starts_with("C:")).await;
    assert_eq!(got, s(&["1", "2", &format!("D:{z}"), "C:SELECT 1"]));
    c.sync();
    assert_eq!(c.until_ready().await, s(&["Z:I"]));

    // A multi-shard SELECT with a bad LIMIT parameter is refused, and the
    // session (and the pool) carry on cleanly.
    c.parse("", "SELECT id FROM accounts ORDER BY id LIMIT $1")
        .bind("", &["abc"]);
    c.describe(b'P', "").execute().sync();
    let got = c.until_ready().await;
    assert_eq!(got, s(&["1", "2", "E:0A000", "Z:I"]));
    c.parse("", "SELECT count(*) FROM accounts")
        .bind("", &[])
        .execute()
        .sync();
    assert_eq!(
        c.until_ready().await,
        s(&["1", "2", "D:40", "C:SELECT 1", "Z:I"])
    );
    c.query("SELECT 2");
    assert_eq!(c.until_ready().await, s(&["T", "D:2", "C:SELECT 1", "Z:I"]));

    // A statement that fails, then one for another shard in the same batch:
    // PostgreSQL skips everything up to the Sync after an error, so the
    // client gets that one error, not a second for the shard change.
    c.parse("", "SELECT id / 0 FROM accounts WHERE id = $1")
        .bind("", &[&a])
        .execute();
    c.parse("", sel).bind("", &[&z]).execute().sync();
    assert_eq!(c.until_ready().await, s(&["1", "2", "E:22012", "Z:I"]));
    c.parse("", sel).bind("", &[&z]).execute().sync();
    let got = c.until_ready().await;
    assert_eq!(got, s(&["1", "2", &format!("D:{z}"), "C:SELECT 1", "Z:I"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_through_the_extended_protocol() {
    let env = env().await;
    let one = keys_from(&env, 1, 1, 1)[0].to_string();
    let zero = keys_from(&env, 0, 1, 1)[0].to_string();
    let upd = "UPDATE accounts SET v = v + 100 WHERE id = $1";
    let mut c = Raw::login(env.addr).await;

    // BEGIN bound like any statement (pgjdbc), then a write off the home
    // shard in the same batch: the transaction runs where the write goes.
    c.parse("", "BEGIN").bind("", &[]).execute();
    c.parse("", upd).bind("", &[&one]).execute().sync();
    assert_eq!(
        c.until_ready().await,
        s(&["1", "2", "C:BEGIN", "1", "2", "C:UPDATE 1", "Z:T"])
    );
    c.parse("", "COMMIT").bind("", &[]).execute().sync();
    assert_eq!(c.until_ready().await, s(&["1", "2", "C:COMMIT", "Z:I"]));
    let v = v_on(&env, 1, one.parse::<i64>().unwrap()).await;
    assert_eq!(
        v,
        one.parse::<i32>().unwrap() + 100,
        "the committed update is on its shard"
    );

    // A refusal in a transaction aborts it: later statements get 25P02,
    // Close and Sync still work, and COMMIT (a named statement, as pgjdbc
    // keeps it) answers ROLLBACK; the same statement commits next time.
    c.parse("c1", "COMMIT").sync();
    assert_eq!(c.until_ready().await, s(&["1", "Z:I"]));
    c.query("BEGIN");
    assert_eq!(c.until_ready().await, s(&["C:BEGIN", "Z:T"]));
    c.parse("", upd).bind("", &[&zero]).execute().sync();
    assert_eq!(c.until_ready().await, s(&["1", "2", "C:UPDATE 1", "Z:T"]));
    c.parse("", upd).bind("", &[&one]).execute().sync();
    assert_eq!(c.until_ready().await, s(&["1", "E:0A000", "Z:E"]));
    c.parse("", upd).bind("", &[&zero]).execute().sync();
    assert_eq!(c.until_ready().await, s(&["E:25P02", "Z:E"]));
    c.sync();
    assert_eq!(c.until_ready().await, s(&["Z:E"]));
    c.close_statement("nothing").sync();
    assert_eq!(c.until_ready().await, s(&["3", "Z:E"]));
    c.bind("c1", &[]).execute().sync();
    assert_eq!(c.until_ready().await, s(&["2", "C:ROLLBACK", "Z:I"]));
    let zero_id: i64 = zero.parse().unwrap();
    let v = v_on(&env, 0, zero_id).await;
    assert_eq!(
        v, zero_id as i32,
        "the aborted transaction's update was rolled back"
    );
    c.query("BEGIN");
    assert_eq!(c.until_ready().await, s(&["C:BEGIN", "Z:T"]));
    c.parse("", upd).bind("", &[&zero]).execute().sync();
    assert_eq!(c.until_ready().await, s(&["1", "2", "C:UPDATE 1", "Z:T"]));
    c.bind("c1", &[]).execute().sync();
    assert_eq!(c.until_ready().await, s(&["2", "C:COMMIT", "Z:I"]));
    let v = v_on(&env, 0, zero_id).await;
    assert_eq!(
        v,
        zero_id as i32 + 100,
        "c1 commits once the transaction is healthy"
    );

    // A write, flushed but not synced, then a statement for another shard in
    // the same batch: refused, and like PostgreSQL the batch's write is gone.
    c.parse("", upd).bind("", &[&zero]).execute().flush();
    assert_eq!(
        c.replies(|r| r.starts_with("C:")).await,
        s(&["1", "2", "C:UPDATE 1"])
    );
    c.parse("", upd).bind("", &[&one]).execute().sync();
    assert_eq!(c.until_ready().await, s(&["1", "E:0A000", "Z:I"]));
    let v = v_on(&env, 0, zero_id).await;
    assert_eq!(
        v,
        zero_id as i32 + 100,
        "the refused batch's first write was rolled back"
    );

    // A BEGIN PostgreSQL rejects is not answered as if it began anything.
    c.query("BEGIN ISOLATION LEVEL SERIALIZABLEX");
    assert_eq!(c.until_ready().await, s(&["E:42601", "Z:I"]));

    // SET shardline.shard never overrules a key.
    c.query("SET shardline.shard = 0");
    assert_eq!(c.until_ready().await, s(&["C:SET", "Z:I"]));
    c.query(&format!("SELECT id FROM accounts WHERE id = {one}"));
    assert_eq!(c.until_ready().await, s(&["E:0A000", "Z:I"]));
    c.query("RESET shardline.shard");
    assert_eq!(c.until_ready().await, s(&["C:SET", "Z:I"]));

    // A multi-shard INSERT: Describe gets NoData, and without Execute
    // nothing is written.
    let (new0, new1) = (
        keys_from(&env, 0, 1000, 1)[0],
        keys_from(&env, 1, 1000, 1)[0],
    );
    let ins = format!("INSERT INTO accounts (id, v) VALUES ({new0}, 1), ({new1}, 1)");
    c.parse("", &ins).bind("", &[]).sync();
    assert_eq!(c.until_ready().await, s(&["1", "2", "Z:I"]));
    c.query("SELECT count(*) FROM accounts");
    assert_eq!(
        c.until_ready().await,
        s(&["T", "D:40", "C:SELECT 1", "Z:I"])
    );
    c.parse("", &ins)
        .bind("", &[])
        .describe(b'P', "")
        .execute()
        .sync();
    assert_eq!(
        c.until_ready().await,
        s(&["1", "2", "n", "C:INSERT 0 2", "Z:I"])
    );
}
