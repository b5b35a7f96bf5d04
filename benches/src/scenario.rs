//! `Scenario`: what each operation does, and `Workload`, one client's
//! prepared statements and random draws for it. Statements are prepared once
//! per connection (the extended protocol with named statements, as pooled
//! applications run), so an operation is one Bind/Execute/Sync round trip.

use anyhow::Context;
use rand::distributions::{Distribution, Uniform};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::Zipf;
use serde::Serialize;
use tokio_postgres::{Client, Statement};

use crate::custom::{CustomSql, Sampler};
use crate::schema;

/// The operation mix of a run.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum Scenario {
    /// A primary-key read of a uniformly drawn id.
    PointSelect,
    /// An update of one row by a uniformly drawn id.
    PointUpdate,
    /// Point selects with probability `read_ratio`, else point updates.
    ReadWrite { read_ratio: f64 },
    /// Point selects of Zipf-distributed ids (id 1 the hottest).
    HotKeys { skew: f64 },
    /// An aggregate over the whole table: no key, so every shard answers.
    Scatter,
    /// Inserts of new ids, each client from its own disjoint sequence.
    Insert,
    /// A statement from a file with drawn parameters.
    Custom(CustomSql),
}

impl Scenario {
    /// The kebab-case name used on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::PointSelect => "point-select",
            Scenario::PointUpdate => "point-update",
            Scenario::ReadWrite { .. } => "read-write",
            Scenario::HotKeys { .. } => "hot-keys",
            Scenario::Scatter => "scatter",
            Scenario::Insert => "insert",
            Scenario::Custom(_) => "custom",
        }
    }
}

const SELECT: &str = "SELECT v, pad FROM shardline_bench WHERE id = $1";
const UPDATE: &str = "UPDATE shardline_bench SET v = v + 1 WHERE id = $1";
const SCATTER: &str = "SELECT count(*), sum(v) FROM shardline_bench";
const INSERT: &str = "INSERT INTO shardline_bench (id, v, pad) VALUES ($1, $2, $3)";

/// The ids one client inserts: `next`, `next + step`, ... (the clients of a
/// run start at consecutive ids and step by the client count, so their
/// sequences never meet).
#[derive(Clone, Copy, Debug)]
pub struct InsertIds {
    pub next: i64,
    pub step: i64,
}

/// One client's statements and draws.
pub struct Workload {
    kind: Kind,
    rng: StdRng,
    ids: Uniform<i64>,
    insert: InsertIds,
}

/// The prepared statements of each scenario.
enum Kind {
    PointSelect(Statement),
    PointUpdate(Statement),
    ReadWrite {
        select: Statement,
        update: Statement,
        read_ratio: f64,
    },
    HotKeys(Statement, Zipf<f64>),
    Scatter(Statement),
    Insert(Statement),
    Custom(Statement, Sampler),
}

impl Workload {
    /// Prepares `scenario`'s statements on `client`.
    pub async fn prepare(
        client: &Client,
        scenario: &Scenario,
        rows: i64,
        insert: InsertIds,
    ) -> anyhow::Result<Workload> {
        let prepare = |sql: &'static str| async move {
            client
                .prepare(sql)
                .await
                .with_context(|| format!("preparing `{sql}` (did you run with --init?)"))
        };
        let kind = match scenario {
            Scenario::PointSelect => Kind::PointSelect(prepare(SELECT).await?),
            Scenario::PointUpdate => Kind::PointUpdate(prepare(UPDATE).await?),
            Scenario::ReadWrite { read_ratio } => Kind::ReadWrite {
                select: prepare(SELECT).await?,
                update: prepare(UPDATE).await?,
                read_ratio: *read_ratio,
            },
            Scenario::HotKeys { skew } => {
                let zipf = Zipf::new(rows as u64, *skew).context("the hot-keys skew")?;
                Kind::HotKeys(prepare(SELECT).await?, zipf)
            }
            Scenario::Scatter => Kind::Scatter(prepare(SCATTER).await?),
            Scenario::Insert => Kind::Insert(prepare(INSERT).await?),
            Scenario::Custom(custom) => {
                let statement = client
                    .prepare(&custom.sql)
                    .await
                    .with_context(|| format!("preparing the SQL of {}", custom.path.display()))?;
                let sampler = Sampler::new(&custom.params, statement.params())
                    .with_context(|| format!("in {}", custom.path.display()))?;
                Kind::Custom(statement, sampler)
            }
        };
        Ok(Workload {
            kind,
            rng: StdRng::from_entropy(),
            ids: Uniform::new_inclusive(1, rows),
            insert,
        })
    }

    /// Runs one operation on `client`. Cancel-safe for the workload (only the
    /// connection is left mid-statement, as any dropped query leaves it).
    pub async fn run_one(&mut self, client: &Client) -> Result<(), tokio_postgres::Error> {
        match &self.kind {
            Kind::PointSelect(select) => {
                let id = self.ids.sample(&mut self.rng);
                client.query(select, &[&id]).await?;
            }
            Kind::PointUpdate(update) => {
                let id = self.ids.sample(&mut self.rng);
                client.execute(update, &[&id]).await?;
            }
            Kind::ReadWrite {
                select,
                update,
                read_ratio,
            } => {
                let id = self.ids.sample(&mut self.rng);
                if self.rng.gen_bool(*read_ratio) {
                    client.query(select, &[&id]).await?;
                } else {
                    client.execute(update, &[&id]).await?;
                }
            }
            Kind::HotKeys(select, zipf) => {
                let id = zipf.sample(&mut self.rng) as i64;
                client.query(select, &[&id]).await?;
            }
            Kind::Scatter(scatter) => {
                client.query(scatter, &[]).await?;
            }
            Kind::Insert(insert) => {
                let id = self.insert.next;
                self.insert.next += self.insert.step;
                client
                    .execute(insert, &[&id, &id, &schema::pad(id)])
                    .await?;
            }
            Kind::Custom(statement, sampler) => {
                let values = sampler.draw(&mut self.rng);
                let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values
                    .iter()
                    .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                client.query(statement, &params).await?;
            }
        }
        Ok(())
    }

    /// Where this client's inserts continue (kept across reconnects).
    pub fn insert_ids(&self) -> InsertIds {
        self.insert
    }
}
