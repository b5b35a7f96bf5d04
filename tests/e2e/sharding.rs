//! Statement routing over several shards: rows land on the shard that owns
//! their key, parameterised statements follow their key, and reads through
//! the proxy answer exactly what one plain PostgreSQL holding the same rows
//! answers (or are refused with 0A000 when the proxy cannot answer them
//! correctly).

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error as StdError;
use std::fmt::Write as _;
use std::time::Duration;

use futures_util::SinkExt;
use router::hash::KeyValue;
use router::{KeyType, ShardId};
use testkit::Cluster;
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{eventually, sqlstate, Options};
use crate::sharded_env::ShardedEnv;

const ACCOUNTS: &str = "CREATE TABLE accounts (id int8 PRIMARY KEY, v text)";

/// Inserts `(id, v)` rows into `accounts` straight into the shards that own
/// them (bypassing the proxy); PostgreSQL refuses a row a shard has no
/// partition for, so a wrong owner fails here rather than later.
async fn load_accounts_directly(env: &ShardedEnv, rows: &BTreeMap<i64, String>) {
    for shard in 0..env.pg.len() {
        let (ids, vs): (Vec<i64>, Vec<String>) = rows
            .iter()
            .filter(|(id, _)| env.owner("accounts", &KeyValue::Int8(**id)) == ShardId(shard as u32))
            .map(|(id, v)| (*id, v.clone()))
            .unzip();
        env.direct(shard)
            .await
            .execute(
                "INSERT INTO accounts (id, v) SELECT * FROM unnest($1::int8[], $2::text[])",
                &[&ids, &vs],
            )
            .await
            .unwrap_or_else(|e| panic!("loading shard {shard}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_land_on_exactly_the_shard_that_owns_their_key() {
    let env = ShardedEnv::start(3).await;
    env.declare("accounts", "id", KeyType::Int8, 12).await;
    let db = env.client().await;
    db.batch_execute(ACCOUNTS)
        .await
        .expect("CREATE TABLE through the proxy lays it out on every shard");
    let mut expected: BTreeMap<i64, String> = BTreeMap::new();

    // Single-row INSERTs with literal keys, in both protocols.
    for id in 1..=24i64 {
        let v = format!("literal {id}");
        let sql = format!("INSERT INTO accounts (id, v) VALUES ({id}, '{v}')");
        if id % 2 == 0 {
            db.simple_query(&sql).await.expect("simple INSERT");
        } else {
            assert_eq!(db.execute(&sql, &[]).await.expect("extended INSERT"), 1);
        }
        expected.insert(id, v);
    }
    // The key as a parameter of one prepared statement.
    let insert = db
        .prepare("INSERT INTO accounts (id, v) VALUES ($1, $2)")
        .await
        .expect("prepare INSERT");
    for id in 101..=140i64 {
        let v = format!("param {id}");
        assert_eq!(db.execute(&insert, &[&id, &v]).await.expect("INSERT $1"), 1);
        expected.insert(id, v);
    }
    // One multi-row INSERT whose rows belong to several shards.
    let multi: Vec<i64> = (201..=230).collect();
    let owners: BTreeSet<ShardId> = multi
        .iter()
        .map(|&id| env.owner("accounts", &KeyValue::Int8(id)))
        .collect();
    assert!(
        owners.len() >= 2,
        "the multi-row keys all live on {owners:?}"
    );
    let values: Vec<String> = multi
        .iter()
        .map(|id| format!("({id}, 'multi {id}')"))
        .collect();
    let inserted = db
        .execute(
            &format!("INSERT INTO accounts (id, v) VALUES {}", values.join(", ")),
            &[],
        )
        .await
        .expect("multi-row INSERT");
    assert_eq!(inserted, multi.len() as u64);
    expected.extend(multi.iter().map(|id| (*id, format!("multi {id}"))));
    // COPY FROM STDIN, sent in chunks that split lines.
    let mut data = String::new();
    for id in 1001..=2000i64 {
        writeln!(data, "{id}\tcopied {id}").expect("write to a String");
        expected.insert(id, format!("copied {id}"));
    }
    let sink = db
        .copy_in("COPY accounts (id, v) FROM STDIN")
        .await
        .expect("COPY starts");
    futures_util::pin_mut!(sink);
    for chunk in data.as_bytes().chunks(1000) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .expect("COPY data");
    }
    assert_eq!(sink.finish().await.expect("COPY finishes"), 1000);

    // Every row is on its owner, and only there; nothing else is anywhere.
    let mut found: BTreeMap<i64, Vec<(u32, String)>> = BTreeMap::new();
    for shard in 0..env.pg.len() {
        let rows = env
            .direct(shard)
            .await
            .query("SELECT id, v FROM accounts", &[])
            .await
            .unwrap_or_else(|e| panic!("reading shard {shard} directly: {e}"));
        for row in rows {
            found
                .entry(row.get(0))
                .or_default()
                .push((shard as u32, row.get(1)));
        }
    }
    for (id, v) in &expected {
        let owner = env.owner("accounts", &KeyValue::Int8(*id));
        assert_eq!(
            found.get(id),
            Some(&vec![(owner.0, v.clone())]),
            "id {id} belongs on shard {owner} only"
        );
    }
    let unexpected: Vec<&i64> = found
        .keys()
        .filter(|id| !expected.contains_key(id))
        .collect();
    assert!(
        unexpected.is_empty(),
        "rows nobody inserted: {unexpected:?}"
    );
    for shard in 0..env.pg.len() as u32 {
        let owned = expected
            .keys()
            .filter(|id| env.owner("accounts", &KeyValue::Int8(**id)) == ShardId(shard))
            .count();
        let held = found
            .values()
            .flatten()
            .filter(|(s, _)| *s == shard)
            .count();
        assert_eq!(held, owned, "rows on shard {shard}");
    }
}

/// A CancelRequest during a fanned-out query reaches the backend on every
/// shard, not only one: the client gets 57014 at once and no shard keeps
/// running the statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_fanned_out_query_on_every_shard() {
    let env = ShardedEnv::start(2).await;
    env.declare("accounts", "id", KeyType::Int8, 12).await;
    env.lay_out("accounts", ACCOUNTS).await;
    let rows: BTreeMap<i64, String> = (1..=20).map(|id| (id, format!("row {id}"))).collect();
    let owners: BTreeSet<ShardId> = (rows.keys())
        .map(|id| env.owner("accounts", &KeyValue::Int8(*id)))
        .collect();
    assert_eq!(owners.len(), 2, "a row on each shard, so each one sleeps");
    load_accounts_directly(&env, &rows).await;

    // `pg_sleep` itself is volatile, which a fanned-out query refuses; a
    // function of the test's own hides it.
    for shard in 0..2 {
        (env.direct(shard).await)
            .batch_execute(
                "CREATE FUNCTION slow_id(int8) RETURNS int8 LANGUAGE plpgsql IMMUTABLE \
                 AS 'BEGIN PERFORM pg_sleep(60); RETURN $1; END'",
            )
            .await
            .unwrap();
    }
    const SLEEP: &str = "SELECT slow_id(id) FROM accounts";
    let client = env.client().await;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.query(SLEEP, &[]).await });
    let running = |shard: usize| {
        let env = &env;
        async move {
            let rows = (env.direct(shard).await)
                .query(
                    "SELECT 1 FROM pg_stat_activity \
                     WHERE query LIKE '%slow_id(id)%' AND state = 'active' \
                     AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap();
            !rows.is_empty()
        }
    };
    for shard in 0..2 {
        let started = eventually(Duration::from_secs(10), || running(shard)).await;
        if !started && sleeper.is_finished() {
            panic!("the statement ended early: {:?}", sleeper.await);
        }
        assert!(started, "the statement reached shard {shard}");
    }

    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("cancelled in time, not after the 60 s sleep")
        .unwrap();
    let err = result.expect_err("the query was cancelled");
    assert_eq!(sqlstate(&err), "57014", "{err}");
    for shard in 0..2 {
        let stopped = eventually(Duration::from_secs(10), || async { !running(shard).await }).await;
        assert!(stopped, "shard {shard} still runs the cancelled statement");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_statement_keyed_by_its_parameter_reaches_the_right_shard_every_time() {
    let env = ShardedEnv::with(
        3,
        Options {
            pool_size: 2,
            ..Options::default()
        },
    )
    .await;
    env.declare("accounts", "id", KeyType::Int8, 12).await;
    env.lay_out("accounts", ACCOUNTS).await;
    let rows: BTreeMap<i64, String> = (1..=300).map(|id| (id, format!("row {id}"))).collect();
    load_accounts_directly(&env, &rows).await;

    // Three clients over a pool of two connections per shard, each running
    // its own prepared statement 100 times with keys spread over all shards.
    let run = |client: i64| {
        let env = &env;
        async move {
            let db = env.client().await;
            let select = db
                .prepare("SELECT id, v FROM accounts WHERE id = $1")
                .await
                .expect("prepare");
            let mut shards = BTreeSet::new();
            for i in 0..100i64 {
                let id = (i * 7 + client * 31) % 300 + 1;
                shards.insert(env.owner("accounts", &KeyValue::Int8(id)));
                let got = db.query(&select, &[&id]).await.expect("execute");
                let got: Vec<(i64, String)> = got.iter().map(|r| (r.get(0), r.get(1))).collect();
                assert_eq!(
                    got,
                    vec![(id, format!("row {id}"))],
                    "client {client}, key {id}"
                );
            }
            shards.len()
        }
    };
    let (a, b, c) = tokio::join!(run(0), run(1), run(2));
    assert_eq!((a, b, c), (3, 3, 3), "the keys cover every shard");
}

// ---------------------------------------------------------------------------
// The differential test: a plain PostgreSQL against three shards behind the
// proxy, holding the same `items` rows.
// ---------------------------------------------------------------------------

const ITEMS: &str = "CREATE TABLE items (id int8 PRIMARY KEY, grp int4, name text, \
                     price numeric, qty int4, note text NULL)";
/// Sharded like `items` and in its colocation group; only used to be joined.
const TAGS: &str = "CREATE TABLE tags (id int8 PRIMARY KEY, grp int4, label text)";
const NAMES: [&str; 12] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "o'brien",
    "zoë",
];

/// How two answers are compared.
#[derive(Clone, Copy, Debug)]
enum Order {
    /// Row for row: the query orders by something unique.
    Exact,
    /// As multisets: the order is unspecified.
    Bag,
}
use Order::{Bag, Exact};

/// A statement parameter: sent typed in the extended protocol, inlined as a
/// literal in the simple one.
#[derive(Clone, Copy, Debug)]
enum P {
    I4(i32),
    I8(i64),
    T(&'static str),
    I8s(&'static [i64]),
}

struct Case(Order, &'static str, &'static [P]);

/// Read queries whose answers must match a plain PostgreSQL exactly.
#[rustfmt::skip]
const CORPUS: &[Case] = &[
    // Point reads.
    Case(Bag,   "SELECT * FROM items WHERE id = 42", &[]),
    Case(Bag,   "SELECT * FROM items WHERE id = $1", &[P::I8(42)]),
    Case(Bag,   "SELECT name, price FROM items WHERE id = $1", &[P::I8(1999)]),
    Case(Bag,   "SELECT * FROM items WHERE id = $1", &[P::I8(-5)]),
    Case(Bag,   "SELECT * FROM items WHERE id = $1", &[P::I8(9_000_000_000)]),
    Case(Bag,   "SELECT * FROM items WHERE id = $1", &[P::I8(123_456)]),
    Case(Bag,   "SELECT id, note FROM items WHERE id = 3", &[]),
    Case(Bag,   "SELECT id, grp FROM items WHERE id = 42 AND grp IS NOT NULL", &[]),
    Case(Bag,   "SELECT count(*) FROM items WHERE id = 7", &[]),
    Case(Bag,   "SELECT 1 AS one FROM items WHERE id = 1", &[]),
    Case(Bag,   "SELECT id, qty > 10 AS big, price IS NULL AS unpriced FROM items WHERE id = $1", &[P::I8(53)]),
    // IN lists and = ANY.
    Case(Exact, "SELECT id, name FROM items WHERE id IN (1, 2, 3, 500, 1500) ORDER BY id", &[]),
    Case(Bag,   "SELECT * FROM items WHERE id IN (10, 20, 30, 40)", &[]),
    Case(Bag,   "SELECT id FROM items WHERE id IN (5000, 6000)", &[]),
    Case(Exact, "SELECT id, price FROM items WHERE id IN ($1, $2, $3) ORDER BY id", &[P::I8(11), P::I8(12), P::I8(1313)]),
    Case(Bag,   "SELECT count(*), sum(qty) FROM items WHERE id IN (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)", &[]),
    Case(Exact, "SELECT id, name FROM items WHERE id = ANY($1) ORDER BY id", &[P::I8s(&[1, 17, 33, 900, 1800, -5])]),
    Case(Bag,   "SELECT * FROM items WHERE id = ANY($1)", &[P::I8s(&[])]),
    Case(Bag,   "SELECT sum(price), count(note) FROM items WHERE id = ANY($1)", &[P::I8s(&[2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])]),
    Case(Bag,   "SELECT id, qty FROM items WHERE id = ANY(ARRAY[7, 77, 777]::int8[])", &[]),
    // Ranges.
    Case(Exact, "SELECT id, qty FROM items WHERE id BETWEEN 100 AND 140 ORDER BY id", &[]),
    Case(Exact, "SELECT id FROM items WHERE id > 1990 ORDER BY id DESC", &[]),
    Case(Bag,   "SELECT count(*) FROM items WHERE id < 0", &[]),
    Case(Exact, "SELECT id, price FROM items WHERE price > 450 ORDER BY price DESC, id", &[]),
    Case(Exact, "SELECT id FROM items WHERE id >= $1 AND id < $2 ORDER BY id", &[P::I8(500), P::I8(530)]),
    Case(Bag,   "SELECT * FROM items WHERE qty BETWEEN 10 AND 12", &[]),
    // ORDER BY, LIMIT and OFFSET.
    Case(Exact, "SELECT id, name FROM items ORDER BY id LIMIT 10", &[]),
    Case(Exact, "SELECT id, name FROM items ORDER BY id DESC LIMIT 10 OFFSET 5", &[]),
    Case(Exact, "SELECT id, price FROM items ORDER BY price NULLS FIRST, id LIMIT 15", &[]),
    Case(Exact, "SELECT id, price FROM items ORDER BY price DESC NULLS LAST, id DESC LIMIT 15", &[]),
    Case(Exact, "SELECT id, price FROM items ORDER BY price DESC, id LIMIT 20", &[]),
    Case(Exact, "SELECT name FROM items ORDER BY qty, id LIMIT 12", &[]),
    Case(Exact, "SELECT id FROM items ORDER BY note NULLS FIRST, id LIMIT 10 OFFSET 100", &[]),
    Case(Exact, "SELECT id, grp FROM items ORDER BY grp DESC NULLS LAST, name, id LIMIT 25 OFFSET 10", &[]),
    Case(Exact, "SELECT id FROM items ORDER BY id LIMIT $1 OFFSET $2", &[P::I8(7), P::I8(1990)]),
    Case(Exact, "SELECT id FROM items ORDER BY id OFFSET 5000", &[]),
    Case(Exact, "SELECT * FROM items ORDER BY id LIMIT 0", &[]),
    Case(Exact, "SELECT id, name FROM items WHERE grp = 3 ORDER BY name NULLS FIRST, id DESC LIMIT 8", &[]),
    Case(Exact, "SELECT id, price * qty AS total FROM items ORDER BY price * qty DESC NULLS LAST, id LIMIT 10", &[]),
    Case(Exact, "SELECT upper(name), id FROM items ORDER BY 2 DESC LIMIT 5", &[]),
    Case(Exact, "SELECT * FROM items WHERE name = $1 ORDER BY price, qty DESC, id LIMIT 6", &[P::T("zoë")]),
    // Aggregates, GROUP BY and HAVING.
    Case(Bag,   "SELECT count(*) FROM items", &[]),
    Case(Bag,   "SELECT count(*), count(note), count(price), count(grp) FROM items", &[]),
    Case(Bag,   "SELECT sum(qty), sum(price), sum(id) FROM items", &[]),
    Case(Bag,   "SELECT min(price), max(price), min(name), max(name) FROM items", &[]),
    Case(Bag,   "SELECT avg(qty), avg(price) FROM items", &[]),
    Case(Bag,   "SELECT min(id), max(id) FROM items", &[]),
    Case(Exact, "SELECT grp, count(*) FROM items GROUP BY grp ORDER BY grp NULLS FIRST", &[]),
    Case(Bag,   "SELECT grp, sum(qty), min(price), max(price) FROM items GROUP BY grp", &[]),
    Case(Exact, "SELECT grp, avg(price) FROM items GROUP BY grp ORDER BY grp", &[]),
    Case(Exact, "SELECT name, count(*) FROM items GROUP BY name HAVING count(*) > 165 ORDER BY name", &[]),
    Case(Exact, "SELECT grp, count(*) AS n FROM items GROUP BY grp HAVING sum(qty) > 1900 ORDER BY n DESC, grp", &[]),
    Case(Exact, "SELECT name, grp, count(*) FROM items GROUP BY name, grp ORDER BY name, grp LIMIT 20", &[]),
    Case(Bag,   "SELECT count(*) FROM items WHERE grp = $1", &[P::I4(7)]),
    Case(Exact, "SELECT grp, count(*) FROM items WHERE qty > 20 GROUP BY grp ORDER BY count(*) DESC, grp NULLS LAST LIMIT 5", &[]),
    Case(Bag,   "SELECT sum(qty), max(name) FROM items WHERE id < 0 AND id > 0", &[]),
    Case(Bag,   "SELECT count(*) FROM items WHERE name = 'nobody'", &[]),
    Case(Bag,   "SELECT max(price) FROM items WHERE grp IS NULL", &[]),
    Case(Bag,   "SELECT grp, count(*) FROM items WHERE id > 100000 GROUP BY grp", &[]),
    Case(Bag,   "SELECT name, sum(price) FROM items WHERE note IS NOT NULL GROUP BY name HAVING min(qty) < 0", &[]),
    // DISTINCT.
    Case(Exact, "SELECT DISTINCT grp FROM items ORDER BY grp", &[]),
    Case(Bag,   "SELECT DISTINCT name FROM items", &[]),
    Case(Exact, "SELECT DISTINCT name, grp FROM items WHERE grp < 3 ORDER BY name, grp", &[]),
    Case(Exact, "SELECT DISTINCT qty FROM items ORDER BY qty DESC NULLS LAST LIMIT 5", &[]),
    // NULLs.
    Case(Exact, "SELECT id FROM items WHERE note IS NULL AND id < 40 ORDER BY id", &[]),
    Case(Exact, "SELECT id FROM items WHERE grp IS NULL ORDER BY id", &[]),
    Case(Bag,   "SELECT count(*) FROM items WHERE price IS NULL", &[]),
    Case(Exact, "SELECT id, coalesce(note, '-') FROM items WHERE id BETWEEN 1 AND 12 ORDER BY id", &[]),
    Case(Exact, "SELECT id FROM items WHERE name IS DISTINCT FROM 'alice' AND id < 30 ORDER BY id", &[]),
    Case(Bag,   "SELECT id FROM items WHERE name = NULL", &[]),
    Case(Exact, "SELECT id, name FROM items WHERE name = $1 AND id < 300 ORDER BY id", &[P::T("carol")]),
    Case(Bag,   "SELECT count(*) FROM items WHERE name = $1", &[P::T("o'brien")]),
    Case(Exact, "SELECT id, name FROM items WHERE name LIKE 'a%' AND qty < 0 ORDER BY id", &[]),
];

/// Statements the proxy cannot answer correctly over several shards; it must
/// refuse them with SQLSTATE 0A000 (feature_not_supported).
const REFUSED: &[&str] = &[
    "SELECT id, row_number() OVER (ORDER BY price) FROM items",
    "SELECT id, sum(qty) OVER (PARTITION BY grp) FROM items",
    "SELECT i.id, t.label FROM items i JOIN tags t ON t.grp = i.grp",
    "UPDATE items SET qty = 0 WHERE grp = 3",
    "DELETE FROM items WHERE name = 'alice'",
    "SELECT count(DISTINCT grp) FROM items",
];

/// One `items` row; `price` is numeric's text.
struct Item {
    id: i64,
    grp: Option<i32>,
    name: Option<String>,
    price: Option<String>,
    qty: Option<i32>,
    note: Option<String>,
}

/// About 2000 rows with NULLs in every nullable column, many duplicate
/// `grp`, `name`, `price` and `qty` values, and a few keys far from the rest.
fn items() -> Vec<Item> {
    let ids = (1..=2000i64).chain([-5, 9_000_000_000]);
    ids.map(|id| {
        // SplitMix64's finaliser: a fixed, well-spread value per id.
        let mut r = (id as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
        r = (r ^ (r >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        r = (r ^ (r >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        r ^= r >> 31;
        Item {
            id,
            grp: (id % 97 != 0).then_some((r % 20) as i32),
            name: (id % 89 != 0).then(|| NAMES[(r >> 8) as usize % NAMES.len()].to_owned()),
            price: (id % 53 != 0).then(|| format!("{}.{:02}", (r >> 16) % 500, (r >> 24) % 100)),
            qty: (id % 61 != 0).then_some(((r >> 32) % 50) as i32 - 5),
            note: (id % 3 != 0).then(|| format!("note {}", (r >> 40) % 100)),
        }
    })
    .collect()
}

async fn insert_items(db: &Client, rows: &[&Item]) {
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let grps: Vec<Option<i32>> = rows.iter().map(|r| r.grp).collect();
    let names: Vec<Option<&str>> = rows.iter().map(|r| r.name.as_deref()).collect();
    let prices: Vec<Option<&str>> = rows.iter().map(|r| r.price.as_deref()).collect();
    let qtys: Vec<Option<i32>> = rows.iter().map(|r| r.qty).collect();
    let notes: Vec<Option<&str>> = rows.iter().map(|r| r.note.as_deref()).collect();
    db.execute(
        "INSERT INTO items (id, grp, name, price, qty, note) \
         SELECT i, g, n, p::numeric, q, o \
         FROM unnest($1::int8[], $2::int4[], $3::text[], $4::text[], $5::int4[], $6::text[]) \
              AS u(i, g, n, p, q, o)",
        &[&ids, &grps, &names, &prices, &qtys, &notes],
    )
    .await
    .expect("insert items");
}

/// A result cell of the extended protocol (binary), rendered as PostgreSQL's
/// text output renders it, so it can be compared with the simple protocol too.
struct Cell(String);

impl<'a> FromSql<'a> for Cell {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Cell, Box<dyn StdError + Sync + Send>> {
        let text = match *ty {
            Type::BOOL => (if bool::from_sql(ty, raw)? { "t" } else { "f" }).to_owned(),
            Type::INT2 => i16::from_sql(ty, raw)?.to_string(),
            Type::INT4 => i32::from_sql(ty, raw)?.to_string(),
            Type::INT8 => i64::from_sql(ty, raw)?.to_string(),
            Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => {
                std::str::from_utf8(raw)?.to_owned()
            }
            Type::NUMERIC => numeric_text(raw)?,
            _ => return Err(format!("the test has no rendering for type {ty}").into()),
        };
        Ok(Cell(text))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// numeric's binary form (`numeric_send` in src/backend/utils/adt/numeric.c:
/// ndigits, weight, sign, dscale, then base-10000 digits) as `numeric_out`
/// would print it.
fn numeric_text(raw: &[u8]) -> Result<String, Box<dyn StdError + Sync + Send>> {
    let word = |i: usize| -> Result<u16, String> {
        raw.get(2 * i..2 * i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("numeric of {} bytes is too short", raw.len()))
    };
    let ndigits = word(0)? as usize;
    let weight = word(1)? as i16 as i32;
    let sign = word(2)?;
    let dscale = word(3)? as usize;
    let digits = (0..ndigits)
        .map(|i| word(4 + i))
        .collect::<Result<Vec<u16>, String>>()?;
    let digit = |index: i32| -> u16 {
        usize::try_from(index)
            .ok()
            .and_then(|i| digits.get(i).copied())
            .unwrap_or(0)
    };
    let mut out = match sign {
        0x0000 => String::new(),
        0x4000 => "-".to_owned(),
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        other => return Err(format!("numeric sign {other:#x}").into()),
    };
    if weight < 0 {
        out.push('0');
    } else {
        write!(out, "{}", digit(0))?;
        for i in 1..=weight {
            write!(out, "{:04}", digit(i))?;
        }
    }
    if dscale > 0 {
        let mut fraction = String::new();
        let mut i = weight + 1;
        while fraction.len() < dscale {
            write!(fraction, "{:04}", digit(i))?;
            i += 1;
        }
        fraction.truncate(dscale);
        out.push('.');
        out.push_str(&fraction);
    }
    Ok(out)
}

/// An answer: column headers, then rows of text (`None` for NULL).
#[derive(Debug, PartialEq)]
struct Answer {
    columns: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
}

impl Answer {
    fn compared_as(mut self, order: Order) -> Answer {
        if matches!(order, Bag) {
            self.rows.sort();
        }
        self
    }
}

fn literal(p: P) -> String {
    match p {
        P::I4(v) => v.to_string(),
        P::I8(v) => v.to_string(),
        P::T(s) => format!("'{}'", s.replace('\'', "''")),
        P::I8s(vs) => {
            let items: Vec<String> = vs.iter().map(|v| v.to_string()).collect();
            format!("'{{{}}}'::int8[]", items.join(","))
        }
    }
}

/// `sql` with its parameters written in as literals, for the simple protocol.
fn inlined(case: &Case) -> String {
    let mut sql = case.1.to_owned();
    // Highest first, so `$1` does not eat the start of `$10`.
    for (i, p) in case.2.iter().enumerate().rev() {
        sql = sql.replace(&format!("${}", i + 1), &literal(*p));
    }
    sql
}

fn describe(e: &tokio_postgres::Error) -> String {
    format!("{} {e}", sqlstate(e))
}

/// The case over the simple protocol (text results).
async fn simple(db: &Client, case: &Case) -> Result<Answer, String> {
    let messages = db
        .simple_query(&inlined(case))
        .await
        .map_err(|e| describe(&e))?;
    let mut answer = Answer {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    for message in messages {
        match message {
            SimpleQueryMessage::RowDescription(columns) => {
                answer.columns = columns.iter().map(|c| c.name().to_owned()).collect();
            }
            SimpleQueryMessage::Row(row) => answer.rows.push(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => {}
        }
    }
    Ok(answer.compared_as(case.0))
}

/// The case over the extended protocol, with typed parameters (binary results).
async fn extended(db: &Client, case: &Case) -> Result<Answer, String> {
    let params: Vec<Box<dyn ToSql + Sync>> = case
        .2
        .iter()
        .map(|p| -> Box<dyn ToSql + Sync> {
            match *p {
                P::I4(v) => Box::new(v),
                P::I8(v) => Box::new(v),
                P::T(s) => Box::new(s),
                P::I8s(vs) => Box::new(vs),
            }
        })
        .collect();
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
    let statement = db.prepare(case.1).await.map_err(|e| describe(&e))?;
    let rows = db
        .query(&statement, &refs)
        .await
        .map_err(|e| describe(&e))?;
    let columns = statement
        .columns()
        .iter()
        .map(|c| format!("{} {}", c.name(), c.type_()))
        .collect();
    let rows = rows
        .iter()
        .map(|row| {
            (0..row.len())
                .map(|i| {
                    row.try_get::<_, Option<Cell>>(i)
                        .map(|cell| cell.map(|c| c.0))
                        .map_err(|e| format!("column {i}: {e}"))
                })
                .collect::<Result<Vec<_>, String>>()
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Answer { columns, rows }.compared_as(case.0))
}

/// Where two answers first differ, briefly.
fn difference(expected: &Answer, got: &Answer) -> String {
    if expected.columns != got.columns {
        return format!("columns {:?}, proxy {:?}", expected.columns, got.columns);
    }
    if expected.rows.len() != got.rows.len() {
        return format!(
            "{} rows, proxy {} rows",
            expected.rows.len(),
            got.rows.len()
        );
    }
    let (i, (e, g)) = expected
        .rows
        .iter()
        .zip(&got.rows)
        .enumerate()
        .find(|(_, (e, g))| e != g)
        .expect("answers that differ differ somewhere");
    format!("row {i}: {e:?}, proxy {g:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_through_the_proxy_answer_as_one_postgresql_would() {
    // Arrange: the same rows in one plain PostgreSQL and over three shards
    // (laid out and loaded directly, so only reads go through the proxy).
    let plain = tokio::task::spawn_blocking(Cluster::start);
    let env = ShardedEnv::start(3).await;
    let plain = plain.await.expect("join").expect("PostgreSQL starts");
    let reference = plain
        .connect()
        .await
        .expect("connect to the plain PostgreSQL");
    reference
        .batch_execute(&format!("{ITEMS}; {TAGS}"))
        .await
        .expect("create");
    env.declare("items", "id", KeyType::Int8, 12).await;
    env.declare("tags", "id", KeyType::Int8, 12).await;
    env.lay_out("items", ITEMS).await;
    env.lay_out("tags", TAGS).await;
    let items = items();
    insert_items(&reference, &items.iter().collect::<Vec<_>>()).await;
    for shard in 0..env.pg.len() {
        let owned: Vec<&Item> = items
            .iter()
            .filter(|r| env.owner("items", &KeyValue::Int8(r.id)) == ShardId(shard as u32))
            .collect();
        assert!(!owned.is_empty(), "shard {shard} owns no items");
        insert_items(&env.direct(shard).await, &owned).await;
    }
    let db = env.client().await;

    // The corpus itself is sound: every query runs on PostgreSQL, both
    // protocols agree there, and most queries return rows.
    assert!(CORPUS.len() >= 60, "{} queries", CORPUS.len());
    let mut answered = 0;
    for (n, case) in CORPUS.iter().enumerate() {
        let text = simple(&reference, case)
            .await
            .unwrap_or_else(|e| panic!("[{n}] {}: {e}", case.1));
        let binary = extended(&reference, case)
            .await
            .unwrap_or_else(|e| panic!("[{n}] {}: {e}", case.1));
        assert_eq!(text.rows, binary.rows, "[{n}] {}", case.1);
        answered += usize::from(!text.rows.is_empty());
    }
    assert!(answered >= 50, "only {answered} queries return rows");

    // Act and check: every query, both protocols, through the proxy.
    let mut failures = Vec::new();
    for (n, case) in CORPUS.iter().enumerate() {
        for (protocol, expected, got) in [
            (
                "simple",
                simple(&reference, case).await,
                simple(&db, case).await,
            ),
            (
                "extended",
                extended(&reference, case).await,
                extended(&db, case).await,
            ),
        ] {
            let expected = expected.expect("checked above");
            match got {
                Ok(got) if got == expected => {}
                Ok(got) => failures.push(format!(
                    "[{n}] {protocol} {}: {}",
                    case.1,
                    difference(&expected, &got)
                )),
                Err(e) => failures.push(format!("[{n}] {protocol} {}: proxy error {e}", case.1)),
            }
        }
    }

    // Statements the proxy cannot run correctly are refused, in both protocols.
    for sql in REFUSED {
        let simple = db.simple_query(sql).await.map(|_| ());
        let extended = db.query(*sql, &[]).await.map(|_| ());
        for (protocol, outcome) in [("simple", simple), ("extended", extended)] {
            match outcome {
                Err(e) if sqlstate(&e) == "0A000" => {}
                Err(e) => failures.push(format!(
                    "{protocol} {sql}: want 0A000, got {}",
                    describe(&e)
                )),
                Ok(()) => failures.push(format!("{protocol} {sql}: want 0A000, it ran")),
            }
        }
    }
    // So is a transaction that writes on two shards, at its second write.
    let (a, b) = two_keys_on_different_shards(&env, &items);
    let tx = env.client().await;
    tx.batch_execute("BEGIN").await.expect("BEGIN");
    let update = "UPDATE items SET qty = qty + 1 WHERE id = $1";
    match tx.execute(update, &[&a]).await {
        Ok(1) => match tx.execute(update, &[&b]).await {
            Err(e) if sqlstate(&e) == "0A000" => {}
            Err(e) => failures.push(format!(
                "second shard's write in a transaction: want 0A000, got {}",
                describe(&e)
            )),
            Ok(_) => {
                failures.push("second shard's write in a transaction: want 0A000, it ran".into())
            }
        },
        other => failures.push(format!("first write in a transaction: {other:?}")),
    }
    let _ = tx.batch_execute("ROLLBACK").await;

    assert!(
        failures.is_empty(),
        "{} of {} checks failed:\n{}",
        failures.len(),
        CORPUS.len() * 2 + REFUSED.len() * 2 + 1,
        failures.join("\n")
    );
}

/// Two `items` keys owned by different shards.
fn two_keys_on_different_shards(env: &ShardedEnv, items: &[Item]) -> (i64, i64) {
    let a = items[0].id;
    let a_owner = env.owner("items", &KeyValue::Int8(a));
    let b = items
        .iter()
        .map(|r| r.id)
        .find(|id| env.owner("items", &KeyValue::Int8(*id)) != a_owner)
        .expect("items span several shards");
    (a, b)
}
