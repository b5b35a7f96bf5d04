//! The bench table, `shardline_bench`, and `--init`: declaring it sharded in
//! a metadata group (when one is given), then creating and loading it
//! through each target whose database does not hold it yet.
//!
//! Rows are loaded with COPY FROM STDIN rather than INSERT ... SELECT
//! generate_series: Shardline splits COPY rows to the shards that own them,
//! while an INSERT ... SELECT into a sharded table has no single owner.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::SinkExt;
use metadata::client::MetaClient;
use metadata::Command;
use router::KeyType;

use crate::config::{BenchConfig, Target};
use crate::run::connect;

pub const TABLE: &str = "shardline_bench";
const CREATE: &str =
    "CREATE TABLE shardline_bench (id int8 PRIMARY KEY, v int8 NOT NULL, pad text NOT NULL)";
/// Partitions of the table when declared sharded.
const PARTITIONS: u32 = 16;
/// How long the proxies may take to apply the map that declares the table.
const ACK_TIMEOUT: Duration = Duration::from_secs(15);
/// Rows per COPY data message.
const COPY_ROWS_PER_CHUNK: i64 = 1000;

/// The `pad` column of row `id`: 64 characters, as in a narrow real row.
pub fn pad(id: i64) -> String {
    format!("{id:0>64}")
}

/// Runs `--init`.
pub async fn init(config: &BenchConfig) -> anyhow::Result<()> {
    if !config.meta.is_empty() {
        declare(&config.meta).await?;
    }
    for target in &config.targets {
        init_target(target, config.rows)
            .await
            .with_context(|| format!("initialising {TABLE} through target {}", target.name))?;
    }
    Ok(())
}

/// Declares the table sharded by `id` (if it is not yet) and waits until
/// every live proxy has applied that map, so DDL through a proxy lays the
/// table out on every shard.
async fn declare(meta: &[String]) -> anyhow::Result<()> {
    let client = MetaClient::new(meta.to_vec());
    let (state, _) = client
        .read()
        .await
        .with_context(|| format!("reading the shard map from {}", meta.join(",")))?;
    if state.map.tables.contains_key(TABLE) {
        return Ok(());
    }
    let applied = client
        .propose(Command::DeclareTable {
            name: TABLE.into(),
            key: "id".into(),
            key_type: KeyType::Int8,
            group: None,
            partitions: Some(PARTITIONS),
        })
        .await
        .with_context(|| format!("declaring {TABLE} sharded"))?;
    if let Some(why) = applied.refused {
        bail!("declaring {TABLE} sharded was refused: {why}");
    }
    let deadline = Instant::now() + ACK_TIMEOUT;
    loop {
        let status = client
            .status()
            .await
            .context("reading the metadata status")?;
        if status.epoch >= applied.epoch && status.acks.pending.is_empty() {
            eprintln!("shardline bench: declared {TABLE} sharded by id ({PARTITIONS} partitions)");
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "proxies {:?} did not apply the map declaring {TABLE} within {ACK_TIMEOUT:?}",
                status.acks.pending
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates and loads the table through `target` unless it already has
/// exactly `rows` rows there (another target reaching the same database
/// made it, or an earlier run did).
async fn init_target(target: &Target, rows: i64) -> anyhow::Result<()> {
    let client = connect(target).await?;
    let count = match client
        .query_one(&format!("SELECT count(*) FROM {TABLE}"), &[])
        .await
    {
        Ok(row) => Some(row.get::<_, i64>(0)),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
        Err(e) => return Err(e).context("counting its rows"),
    };
    if count == Some(rows) {
        eprintln!(
            "shardline bench: {TABLE} through {} already has {rows} rows; kept",
            target.name
        );
        return Ok(());
    }
    let started = Instant::now();
    if count.is_some() {
        client
            .batch_execute(&format!("DROP TABLE {TABLE}"))
            .await
            .context("dropping the old table")?;
    }
    client.batch_execute(CREATE).await.context("creating it")?;
    let sink = client
        .copy_in(&format!("COPY {TABLE} (id, v, pad) FROM STDIN"))
        .await
        .context("starting COPY")?;
    futures_util::pin_mut!(sink);
    let mut id = 1;
    while id <= rows {
        let last = (id + COPY_ROWS_PER_CHUNK - 1).min(rows);
        let mut chunk = String::with_capacity(((last - id + 1) * 90) as usize);
        for i in id..=last {
            chunk.push_str(&format!("{i}\t{i}\t{}\n", pad(i)));
        }
        sink.send(bytes::Bytes::from(chunk))
            .await
            .context("sending COPY data")?;
        id = last + 1;
    }
    let loaded = sink.finish().await.context("finishing COPY")?;
    if loaded != rows as u64 {
        bail!("COPY loaded {loaded} rows, expected {rows}");
    }
    eprintln!(
        "shardline bench: loaded {rows} rows into {TABLE} through {} in {:.1?}",
        target.name,
        started.elapsed()
    );
    Ok(())
}
