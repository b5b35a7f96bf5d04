//! Routing under the raw extended protocol: the message sequences drivers
//! really send (pgjdbc's Parse/Describe/Bind in one batch, pipelined
//! Bind/Execute pairs, BEGIN through the extended protocol, Flush instead of
//! Sync), checked reply by reply against what PostgreSQL itself answers.

use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use router::hash::KeyValue;
use router::{KeyType, ShardId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::backend::ErrorFields;
use wire::Frame;

use crate::sharded_env::ShardedEnv;

/// A client speaking the protocol message by message.
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
    out: BytesMut,
}

impl Raw {
    async fn login(env: &ShardedEnv) -> Raw {
        let mut raw = Raw {
            stream: TcpStream::connect(env.addr).await.expect("connect"),
            buf: BytesMut::new(),
            out: BytesMut::new(),
        };
        frontend::startup_message([("user", "trusted"), ("database", "db")], &mut raw.out)
            .expect("startup");
        raw.until_ready().await;
        raw
    }

    fn parse(&mut self, name: &str, sql: &str) -> &mut Self {
        frontend::parse(name, sql, std::iter::empty(), &mut self.out).expect("parse");
        self
    }

    /// Bind with text parameters.
    fn bind(&mut self, statement: &str, params: &[&str]) -> &mut Self {
        let r = frontend::bind(
            "",
            statement,
            std::iter::empty::<i16>(),
            params.iter(),
            |p, out| {
                out.extend_from_slice(p.as_bytes());
                Ok(postgres_protocol::IsNull::No)
            },
            std::iter::empty::<i16>(),
            &mut self.out,
        );
        assert!(r.is_ok(), "bind encodes");
        self
    }

    fn describe(&mut self, kind: u8, name: &str) -> &mut Self {
        frontend::describe(kind, name, &mut self.out).expect("describe");
        self
    }

    fn execute(&mut self) -> &mut Self {
        frontend::execute("", 0, &mut self.out).expect("execute");
        self
    }

    fn close_statement(&mut self, name: &str) -> &mut Self {
        frontend::close(b'S', name, &mut self.out).expect("close");
        self
    }

    fn sync(&mut self) -> &mut Self {
        frontend::sync(&mut self.out);
        self
    }

    fn flush(&mut self) -> &mut Self {
        frontend::flush(&mut self.out);
        self
    }

    fn query(&mut self, sql: &str) -> &mut Self {
        frontend::query(sql, &mut self.out).expect("query");
        self
    }

    /// Sends what was queued and reads replies up to the next ReadyForQuery,
    /// summarised: `1` `2` `3` `n` `T` for the bodiless ones, `D:<first
    /// column>`, `C:<tag>`, `E:<sqlstate>`, `Z:<status>`.
    async fn until_ready(&mut self) -> Vec<String> {
        self.replies(|r| r.starts_with("Z:")).await
    }

    async fn replies(&mut self, last: impl Fn(&str) -> bool) -> Vec<String> {
        let out = std::mem::take(&mut self.out);
        self.stream.write_all(&out).await.expect("send");
        let mut seen = Vec::new();
        let read = async {
            loop {
                let frame = loop {
                    if let Some(frame) = Frame::decode(&mut self.buf, 1 << 24).expect("frame") {
                        break frame;
                    }
                    let n = self.stream.read_buf(&mut self.buf).await.expect("read");
                    assert!(n > 0, "the proxy closed the connection after {seen:?}");
                };
                let body = frame.body();
                let summary = match frame.tag() {
                    b'D' => {
                        let row = wire::rows::data_row(body).expect("row");
                        let first = row.first().copied().flatten().unwrap_or(b"NULL");
                        format!("D:{}", String::from_utf8_lossy(first))
                    }
                    b'C' => format!("C:{}", String::from_utf8_lossy(&body[..body.len() - 1])),
                    b'E' => {
                        let fields = ErrorFields::decode(body).expect("error");
                        format!("E:{}", String::from_utf8_lossy(fields.code))
                    }
                    b'Z' => format!("Z:{}", body[0] as char),
                    b'R' | b'S' | b'K' | b'N' => continue,
                    tag => (tag as char).to_string(),
                };
                let done = last(&summary);
                seen.push(summary);
                if done {
                    return;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .is_err()
        {
            panic!("no reply in 10 s; so far: {seen:?}");
        }
        seen
    }
}

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
    let mut c = Raw::login(&env).await;

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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_through_the_extended_protocol() {
    let env = env().await;
    let one = keys_from(&env, 1, 1, 1)[0].to_string();
    let zero = keys_from(&env, 0, 1, 1)[0].to_string();
    let upd = "UPDATE accounts SET v = v + 100 WHERE id = $1";
    let mut c = Raw::login(&env).await;

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
