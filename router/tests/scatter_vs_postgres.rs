//! Scatter plans against a real PostgreSQL: every query of a corpus gives the same rows,
//! column names and column types when run on one table holding all rows as when planned
//! by `router::scatter::plan`, run on three "shards" (three schemas with a third of the
//! rows each) and merged (the k-way merge done here with `router::merge::compare`, the
//! final aggregate step with `FinalPlan::final_sql`). This proves the plans end to end
//! without the proxy. A failure prints the seed that reproduces the data
//! (`SCATTER_TEST_SEED=<seed> cargo test -p router --test scatter_vs_postgres`).

use std::cmp::Ordering;
use std::error::Error;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use router::merge::compare;
use router::scatter::{plan, Bound, Merge, SortColumn, SortKey};
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{Client, SimpleQueryMessage};

const SHARDS: usize = 3;
const ROWS: i32 = 400;

fn seed() -> u64 {
    std::env::var("SCATTER_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

/// One row value as it came off the wire; `None` is NULL.
type Value = Option<Vec<u8>>;

/// Any column's raw bytes, in whatever format the server sent them.
struct Raw(Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A result: column names, type OIDs and rows.
#[derive(Debug, PartialEq)]
struct Answer {
    names: Vec<String>,
    types: Vec<u32>,
    rows: Vec<Vec<Value>>,
}

/// Runs `sql` with the simple protocol (text results), and its types from a prepare.
async fn run_text(db: &Client, sql: &str) -> Answer {
    let types = db
        .prepare(sql)
        .await
        .unwrap_or_else(|e| panic!("prepare {sql}: {e}"))
        .columns()
        .iter()
        .map(|c| c.type_().oid())
        .collect();
    let mut names = Vec::new();
    let mut rows = Vec::new();
    for message in db
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    {
        if let SimpleQueryMessage::Row(row) = message {
            if names.is_empty() {
                names = row.columns().iter().map(|c| c.name().to_owned()).collect();
            }
            rows.push(
                (0..row.len())
                    .map(|i| row.get(i).map(|v| v.as_bytes().to_vec()))
                    .collect(),
            );
        }
    }
    Answer { names, types, rows }
}

/// Runs `sql` with parameters (binary results).
async fn run_binary(db: &Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Answer {
    let statement = db
        .prepare(sql)
        .await
        .unwrap_or_else(|e| panic!("prepare {sql}: {e}"));
    let rows = db
        .query(&statement, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    Answer {
        names: statement
            .columns()
            .iter()
            .map(|c| c.name().to_owned())
            .collect(),
        types: statement
            .columns()
            .iter()
            .map(|c| c.type_().oid())
            .collect(),
        rows: rows
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| r.get::<_, Option<Raw>>(i).map(|v| v.0))
                    .collect()
            })
            .collect(),
    }
}

/// The k-way merge the proxy does: always the smallest head, the lowest shard on ties.
fn merge_sorted(
    shards: Vec<Vec<Vec<Value>>>,
    keys: &[SortKey],
    visible: usize,
    types: &[u32],
    format: i16,
) -> Vec<Vec<Value>> {
    let column = |k: &SortKey| match k.column {
        SortColumn::Visible(i) => i,
        SortColumn::Hidden(j) => visible + j,
    };
    let cmp = |a: &[Value], b: &[Value]| -> Ordering {
        for k in keys {
            let c = column(k);
            let order = compare(k, types[c], format, a[c].as_deref(), b[c].as_deref())
                .unwrap_or_else(|e| panic!("compare: {e}"));
            if order != Ordering::Equal {
                return order;
            }
        }
        Ordering::Equal
    };
    for rows in &shards {
        for pair in rows.windows(2) {
            assert_ne!(
                cmp(&pair[0], &pair[1]),
                Ordering::Greater,
                "a shard's rows are not in the merge order: {pair:?}"
            );
        }
    }
    let mut heads = vec![0usize; shards.len()];
    let mut out = Vec::new();
    loop {
        let mut best: Option<usize> = None;
        for (s, rows) in shards.iter().enumerate() {
            let Some(row) = rows.get(heads[s]) else {
                continue;
            };
            if best.map_or(true, |b| cmp(row, &shards[b][heads[b]]) == Ordering::Less) {
                best = Some(s);
            }
        }
        let Some(b) = best else { break };
        out.push(shards[b][heads[b]].clone());
        heads[b] += 1;
    }
    out
}

fn resolve(bound: Option<Bound>, params: &[i64]) -> Option<i64> {
    match bound? {
        Bound::Const(v) => Some(v),
        Bound::Param(n) => params.get(usize::from(n) - 1).copied(),
    }
}

fn apply_bounds(
    rows: Vec<Vec<Value>>,
    limit: Option<Bound>,
    offset: Option<Bound>,
    params: &[i64],
) -> Vec<Vec<Value>> {
    let offset = resolve(offset, params).unwrap_or(0);
    let limit = resolve(limit, params);
    let rows = rows
        .into_iter()
        .skip(usize::try_from(offset).expect("offset"));
    match limit {
        Some(l) => rows.take(usize::try_from(l).expect("limit")).collect(),
        None => rows.collect(),
    }
}

fn show(rows: &[Vec<Value>]) -> Vec<Vec<Option<String>>> {
    rows.iter()
        .map(|r| {
            r.iter()
                .map(|v| v.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()))
                .collect()
        })
        .collect()
}

struct Fixture {
    whole: Client,
    shards: Vec<Client>,
}

impl Fixture {
    /// The scattered answer to `sql` (text results unless `params` are given).
    async fn scattered(&self, sql: &str, params: &[i64]) -> Answer {
        let plan = plan(sql).unwrap_or_else(|e| panic!("{sql}: refused: {e}"));
        let bound_params: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let mut per_shard = Vec::new();
        for db in &self.shards {
            per_shard.push(if params.is_empty() {
                run_text(db, &plan.shard_sql).await
            } else {
                run_binary(db, &plan.shard_sql, &bound_params).await
            });
        }
        let format = if params.is_empty() { 0 } else { 1 };
        let first = &per_shard[0];
        let types = first.types.clone();
        let visible = types.len() - plan.hidden_columns;
        let names = first.names.iter().take(visible).cloned().collect();
        let all_rows = per_shard.into_iter().map(|a| a.rows).collect::<Vec<_>>();
        let hide = |rows: Vec<Vec<Value>>| -> Vec<Vec<Value>> {
            rows.into_iter()
                .map(|mut r| {
                    r.truncate(visible);
                    r
                })
                .collect()
        };
        match plan.merge {
            Merge::Concat { limit, offset } => Answer {
                names,
                types: types[..visible].to_vec(),
                rows: apply_bounds(hide(all_rows.concat()), limit, offset, params),
            },
            Merge::Sorted {
                keys,
                limit,
                offset,
            } => {
                let merged = merge_sorted(all_rows, &keys, visible, &types, format);
                Answer {
                    names,
                    types: types[..visible].to_vec(),
                    rows: apply_bounds(hide(merged), limit, offset, params),
                }
            }
            Merge::Final(fin) => {
                assert!(params.is_empty(), "final plans take no parameters here");
                let partials: Vec<Vec<Option<String>>> = show(&all_rows.concat());
                let final_sql = fin
                    .final_sql(&types, &partials)
                    .unwrap_or_else(|e| panic!("{sql}: final_sql refused: {e}"));
                run_text(&self.whole, &final_sql).await
            }
        }
    }
}

async fn setup(rng: &mut StdRng) -> (testkit::Cluster, Fixture) {
    let pg = tokio::task::spawn_blocking(testkit::Cluster::start)
        .await
        .expect("join")
        .expect("PostgreSQL starts");
    let admin = pg.connect().await.expect("connect");
    let columns =
        "id int4 NOT NULL, g int4, h text, n numeric, b int8, f float8, d date, c char(4)";
    for schema in ["whole", "sh0", "sh1", "sh2"] {
        admin
            .batch_execute(&format!(
                "CREATE SCHEMA {schema}; CREATE TABLE {schema}.t ({columns});"
            ))
            .await
            .expect("create");
    }
    let words = ["a", "b", "B", "a b", "it's", "back\\slash", "é", "", "zz"];
    for id in 1..=ROWS {
        let g: Option<i32> = rng.gen_bool(0.85).then(|| rng.gen_range(0..6));
        let h: Option<String> = rng
            .gen_bool(0.85)
            .then(|| words[rng.gen_range(0..words.len())].to_owned());
        let n: Option<String> = rng.gen_bool(0.85).then(|| {
            let scale = rng.gen_range(0..4);
            let whole: i64 = rng.gen_range(-100_000..100_000);
            let frac: u32 = rng.gen_range(0..10u32.pow(scale));
            if scale == 0 {
                whole.to_string()
            } else {
                format!("{whole}.{frac:0width$}", width = scale as usize)
            }
        });
        let b: Option<i64> = rng
            .gen_bool(0.85)
            .then(|| rng.gen_range(-(1i64 << 50)..(1i64 << 50)));
        // Quarters: sums and averages are exact in float8, whatever the order.
        let f: Option<f64> = rng
            .gen_bool(0.85)
            .then(|| f64::from(rng.gen_range(-400..400)) * 0.25);
        let d: Option<String> = rng.gen_bool(0.85).then(|| {
            format!(
                "{:04}-{:02}-{:02}",
                rng.gen_range(1990..2030),
                rng.gen_range(1..13),
                rng.gen_range(1..29)
            )
        });
        let c: Option<String> = rng
            .gen_bool(0.85)
            .then(|| ["x", "x ", "xy", "ab"][rng.gen_range(0..4)].to_owned());
        let shard = rng.gen_range(0..SHARDS);
        for schema in ["whole".to_owned(), format!("sh{shard}")] {
            admin
                .execute(
                    &format!(
                        "INSERT INTO {schema}.t VALUES ($1, $2, $3, $4::text::numeric, $5, $6, $7::text::date, $8)"
                    ),
                    &[&id, &g, &h, &n, &b, &f, &d, &c],
                )
                .await
                .expect("insert");
        }
    }
    async fn in_schema(pg: &testkit::Cluster, schema: &str) -> Client {
        let db = pg.connect().await.expect("connect");
        db.batch_execute(&format!("SET search_path TO {schema}"))
            .await
            .expect("search_path");
        db
    }
    let whole = in_schema(&pg, "whole").await;
    let mut shards = Vec::new();
    for i in 0..SHARDS {
        shards.push(in_schema(&pg, &format!("sh{i}")).await);
    }
    (pg, Fixture { whole, shards })
}

/// How to compare a scattered answer with the expected one.
#[derive(Clone, Copy, PartialEq)]
enum Check {
    /// Same rows in the same order (the query orders them totally).
    Exact,
    /// Same rows in any order.
    AnyOrder,
    /// As many rows, each one of the query's rows without LIMIT (LIMIT without ORDER BY).
    Subset,
}

use Check::{AnyOrder, Exact, Subset};

const CORPUS: &[(&str, Check)] = &[
    // Aggregates without GROUP BY.
    ("SELECT count(*) FROM t", Exact),
    (
        "SELECT count(*), count(g), sum(g), min(h), max(h), avg(g), sum(b), avg(b), min(c), max(d) FROM t",
        Exact,
    ),
    ("SELECT sum(n), avg(n), min(n), max(n), sum(f), avg(f) FROM t", Exact),
    ("SELECT sum(g) + 1 AS s1, count(*) * 2, max(n) - min(n) FROM t WHERE g IS NULL", Exact),
    ("SELECT count(*), sum(n), avg(n), avg(f), max(h) FROM t WHERE false", Exact),
    ("SELECT 1 AS one FROM t HAVING count(*) > 0", Exact),
    ("SELECT count(*) FROM t HAVING count(*) > 100000", Exact),
    // GROUP BY.
    (
        "SELECT g, count(*), sum(n), avg(n), min(n), max(b) FROM t GROUP BY g ORDER BY g",
        Exact,
    ),
    (
        "SELECT h, count(*) FROM t GROUP BY h ORDER BY count(*) DESC, h NULLS FIRST",
        Exact,
    ),
    (
        "SELECT g, sum(b) AS total FROM t WHERE id > 50 GROUP BY g HAVING count(*) > 10 ORDER BY total",
        Exact,
    ),
    (
        "SELECT g % 2 AS parity, avg(b), sum(n), avg(f) FROM t GROUP BY 1 ORDER BY 1",
        Exact,
    ),
    ("SELECT g, count(*) FROM t WHERE false GROUP BY g", AnyOrder),
    (
        "SELECT lower(h), count(*) FROM t GROUP BY lower(h) ORDER BY 1 NULLS FIRST",
        Exact,
    ),
    ("SELECT g FROM t GROUP BY g ORDER BY g DESC NULLS LAST", Exact),
    ("SELECT DISTINCT count(*) FROM t GROUP BY g ORDER BY 1", Exact),
    ("SELECT d, min(id) FROM t GROUP BY d ORDER BY d LIMIT 5 OFFSET 1", Exact),
    (
        "SELECT coalesce(h, 'none') AS hh, max(f), min(d) FROM t GROUP BY 1 ORDER BY hh",
        Exact,
    ),
    (
        "SELECT g, count(*) FROM t GROUP BY g HAVING avg(n) > 0 ORDER BY g",
        Exact,
    ),
    (
        "SELECT g, max(n) FROM t GROUP BY g ORDER BY min(b) NULLS FIRST, g",
        Exact,
    ),
    ("SELECT c, count(*), g FROM t GROUP BY c, g", AnyOrder),
    ("SELECT t.g, count(h) FROM t GROUP BY g ORDER BY 1", Exact),
    // DISTINCT.
    ("SELECT DISTINCT h FROM t ORDER BY h", Exact),
    ("SELECT DISTINCT g, h FROM t ORDER BY 1, 2 LIMIT 7 OFFSET 2", Exact),
    ("SELECT DISTINCT c FROM t", AnyOrder),
    ("SELECT DISTINCT g * 10 AS g10 FROM t ORDER BY g10 DESC", Exact),
    // Sorted rows.
    ("SELECT id, h FROM t ORDER BY id LIMIT 10 OFFSET 5", Exact),
    ("SELECT id, n FROM t ORDER BY n DESC, id LIMIT 20", Exact),
    ("SELECT id FROM t ORDER BY h NULLS FIRST, id", Exact),
    ("SELECT id, b FROM t WHERE g = 1 ORDER BY b * 2, id", Exact),
    ("SELECT h, id FROM t ORDER BY h DESC, id DESC OFFSET 100", Exact),
    ("SELECT id, f FROM t ORDER BY f, id LIMIT 15", Exact),
    ("SELECT id, d FROM t ORDER BY d DESC NULLS LAST, id LIMIT 25", Exact),
    ("SELECT * FROM t ORDER BY id LIMIT 5", Exact),
    ("SELECT id, c FROM t ORDER BY c, id", Exact),
    ("SELECT id AS k, g FROM t ORDER BY g NULLS FIRST, k DESC LIMIT 30", Exact),
    // Concatenated rows.
    ("SELECT id, h FROM t WHERE g = 2", AnyOrder),
    ("SELECT id, n FROM t LIMIT 7", Subset),
];

fn sorted(mut rows: Vec<Vec<Value>>) -> Vec<Vec<Value>> {
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scattered_queries_match_one_postgresql() {
    // Arrange: one table with all rows, three shards with a third each.
    let seed = seed();
    eprintln!("SCATTER_TEST_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let (_pg, fx) = setup(&mut rng).await;

    for &(sql, check) in CORPUS {
        // Act.
        let expected = run_text(&fx.whole, sql).await;
        let got = fx.scattered(sql, &[]).await;

        // Check.
        let context = format!("{sql} (SCATTER_TEST_SEED={seed})");
        if !expected.rows.is_empty() {
            assert_eq!(got.names, expected.names, "names of {context}");
        }
        assert_eq!(got.types, expected.types, "types of {context}");
        match check {
            Exact => assert_eq!(show(&got.rows), show(&expected.rows), "rows of {context}"),
            AnyOrder => assert_eq!(
                show(&sorted(got.rows)),
                show(&sorted(expected.rows)),
                "rows of {context}"
            ),
            Subset => {
                let unlimited = sql.split(" LIMIT").next().expect("text");
                let all = run_text(&fx.whole, unlimited).await;
                assert_eq!(got.rows.len(), expected.rows.len(), "count of {context}");
                for row in &got.rows {
                    assert!(
                        all.rows.contains(row),
                        "{context}: {:?}",
                        show(std::slice::from_ref(row))
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_and_binary_results_merge_like_one_postgresql() {
    let seed = seed();
    eprintln!("SCATTER_TEST_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let (_pg, fx) = setup(&mut rng).await;

    // The parameters are all int8 (the test binds i64s), cast where the column is not.
    for (sql, params) in [
        (
            "SELECT id, n, h FROM t WHERE g >= $1::int8 ORDER BY n, id LIMIT $2 OFFSET $3",
            vec![1i64, 12, 3],
        ),
        (
            "SELECT id, d, f FROM t WHERE id > $1::int8 ORDER BY d DESC, f, id LIMIT $2",
            vec![10, 40],
        ),
        (
            "SELECT id FROM t WHERE b > $1 ORDER BY h NULLS FIRST, id OFFSET $2",
            vec![0, 50],
        ),
        (
            "SELECT id, b FROM t WHERE g = $1::int8 ORDER BY b DESC, id LIMIT $2 OFFSET $3",
            vec![3, 5, 0],
        ),
    ] {
        let bound: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let expected = run_binary(&fx.whole, sql, &bound).await;
        let got = fx.scattered(sql, &params).await;
        let context = format!("{sql} {params:?} (SCATTER_TEST_SEED={seed})");
        assert_eq!(got.names, expected.names, "names of {context}");
        assert_eq!(got.types, expected.types, "types of {context}");
        assert_eq!(got.rows, expected.rows, "rows of {context}");
    }

    // Negative parameter values raise PostgreSQL's own errors on the shards.
    let sql = "SELECT id FROM t ORDER BY id LIMIT $1 OFFSET $2";
    let shard_sql = plan(sql).expect("plan").shard_sql;
    for (params, state) in [
        ([-1i64, 0], "2201W"), // LIMIT must not be negative
        ([5, -1], "2201X"),    // OFFSET must not be negative
    ] {
        let error = fx.shards[0]
            .query(&shard_sql, &[&params[0], &params[1]])
            .await
            .expect_err("negative bound");
        let code = error.code().map(|c| c.code().to_owned());
        assert_eq!(code.as_deref(), Some(state), "{params:?}: {error}");
        let original = fx.whole.query(sql, &[&params[0], &params[1]]).await;
        let original_code = original
            .expect_err("negative bound")
            .code()
            .map(|c| c.code().to_owned());
        assert_eq!(original_code, code, "{params:?}");
    }
}
