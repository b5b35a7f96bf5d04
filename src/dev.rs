//! `shardline dev`: local PostgreSQL shards under `--dir`, a one-node metadata
//! group, and a proxy in front of them.
//!
//! The first run creates the database clusters (as the `postgres` OS user when
//! started as root: initdb refuses root) and a demo sharded table, `accounts`,
//! with a few thousand rows; later runs reuse all of it. Shard 0 lives in
//! `<dir>/pgdata` (where single-shard dev dirs kept it), shard `i` in
//! `<dir>/pgdata-<i>`; replica `j` (from 1) of a shard is a streaming replica
//! (`pg_basebackup` on first use) in `<shard's pgdata>-replica-<j>`. The proxy
//! config is written to `<dir>/shardline.toml` so it can be read and reused.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use metadata::client::MetaClient;
use metadata::node::{MetaNode, NodeConfig};
use metadata::state::MetaState;
use metadata::Command;
use router::hash::{partition_of, KeyValue};
use router::{KeyType, ShardId, ShardMap};

#[derive(Args)]
pub struct DevArgs {
    /// Where the local clusters and config live.
    #[arg(long, default_value = "./.shardline/dev")]
    dir: PathBuf,
    /// Port the proxy listens on (127.0.0.1).
    #[arg(long, default_value_t = 6432)]
    port: u16,
    #[arg(long, value_enum, default_value_t = PoolModeArg::Transaction)]
    pool_mode: PoolModeArg,
    /// Server connections in the pool.
    #[arg(long, default_value_t = 20)]
    pool_size: u32,
    /// Number of shards, each its own local PostgreSQL.
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Streaming replicas per shard, each its own local PostgreSQL.
    #[arg(long, default_value_t = 1)]
    replicas: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum PoolModeArg {
    Transaction,
    Session,
}

const USER: &str = "shardline";
const DATABASE: &str = "app";

/// The demo sharded table made on the first run.
const DEMO_TABLE: &str = "accounts";
const DEMO_KEY: &str = "id";
const DEMO_PARTITIONS: u32 = 16;
const DEMO_ROWS: i64 = 5000;
const DEMO_CREATE: &str =
    "CREATE TABLE accounts (id int8 PRIMARY KEY, owner text NOT NULL, balance numeric NOT NULL DEFAULT 0)";

/// One local PostgreSQL and the shard it serves, with its replicas.
struct LocalShard {
    id: ShardId,
    pgdata: PathBuf,
    /// Dropped before the replicas: a primary's shutdown sends its connected
    /// replicas all of its WAL first, so next run they resume from there.
    cluster: testkit::Cluster,
    replicas: Vec<testkit::Cluster>,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    if args.shards == 0 {
        anyhow::bail!("--shards must be at least 1");
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let password = password(&dir)?;

    let meta = start_metadata(&dir).await?;
    let client = MetaClient::new(vec![meta.addr().to_owned()]);
    let (state, _) = client.read().await.context("reading the dev shard map")?;
    if let Err(e) = check_shard_count(&state.map, args.shards, &dir) {
        meta.shutdown().await;
        return Err(e);
    }

    let mut shards = start_shards(&dir, args.shards, &password).await?;
    start_replicas(&mut shards, args.replicas).await?;
    for shard in &shards {
        ensure_database(shard.cluster.port(), &password).await?;
    }
    register_shards(&client, &state, &shards).await?;
    ensure_demo_table(&client, &shards, &password).await?;

    let pool_mode = match args.pool_mode {
        PoolModeArg::Transaction => "transaction",
        PoolModeArg::Session => "session",
    };
    // The proxy reaches every shard at its map address with the credentials
    // of this one database entry; shard 0 is the home shard.
    let home_port = shards[0].cluster.port();
    let config_text = format!(
        "# Written by `shardline dev`; rewritten on every start.\n\
         [proxy]\nlisten = \"127.0.0.1:{port}\"\npool_mode = \"{pool_mode}\"\npool_size = {pool_size}\n\n\
         [[users]]\nname = \"{USER}\"\npassword = \"{password}\"\nadmin = true\n\n\
         [[databases]]\nname = \"{DATABASE}\"\nhost = \"127.0.0.1\"\nport = {home_port}\n\n\
         [metadata]\nendpoints = [\"{meta_addr}\"]\n",
        meta_addr = meta.addr(),
        port = args.port,
        pool_size = args.pool_size,
    );
    let config_path = dir.join("shardline.toml");
    std::fs::write(&config_path, &config_text)?;
    // Loaded from the file, so that RELOAD on the console re-reads it.
    let config = proxy::Config::load(&config_path)?;
    let proxy = proxy::Proxy::bind(config)
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{}", args.port))?;
    let addr = proxy.local_addr()?;
    println!("postgres://{USER}:{password}@{addr}/{DATABASE}");
    println!("metadata: {}", meta.addr());
    if let Some(metrics) = proxy.metrics_addr() {
        println!("metrics: http://{metrics}/metrics");
    }
    for shard in &shards {
        eprintln!(
            "shardline dev: shard {} is PostgreSQL on 127.0.0.1:{} (data in {})",
            shard.id,
            shard.cluster.port(),
            shard.pgdata.display()
        );
        for (j, replica) in (1..).zip(&shard.replicas) {
            eprintln!(
                "shardline dev:   replica {j} of shard {} is PostgreSQL on 127.0.0.1:{} (data in {})",
                shard.id,
                replica.port(),
                replica.data_dir().display()
            );
        }
    }
    eprintln!(
        "shardline dev: proxy config {}; demo table {DEMO_TABLE} is sharded by {DEMO_KEY}. Ctrl-C stops everything.",
        config_path.display()
    );
    proxy.run(crate::shutdown_signal()).await;
    eprintln!("shardline dev: stopping");
    meta.shutdown().await;
    drop(shards);
    Ok(())
}

/// The data directory of shard `i`: shard 0 keeps the single-shard location.
fn pgdata(dir: &Path, i: u32) -> PathBuf {
    if i == 0 {
        dir.join("pgdata")
    } else {
        dir.join(format!("pgdata-{i}"))
    }
}

/// The data directory of replica `j` (from 1) of the shard in `pgdata`.
fn replica_pgdata(pgdata: &Path, j: u32) -> PathBuf {
    let mut dir = pgdata.as_os_str().to_owned();
    dir.push(format!("-replica-{j}"));
    PathBuf::from(dir)
}

/// Refuses to run fewer shards than the map already has: their partitions
/// (and rows) would be unreachable.
fn check_shard_count(map: &ShardMap, shards: u32, dir: &Path) -> anyhow::Result<()> {
    let known = map.shards.keys().map(|id| id.0 + 1).max().unwrap_or(0);
    if known > shards {
        anyhow::bail!(
            "{} has {known} shards from an earlier run and their data stays on them; \
             run with --shards {known} (or more), or remove the directory to start over",
            dir.display()
        );
    }
    Ok(())
}

/// Opens (creating on first use) one PostgreSQL per shard, in parallel, each
/// on a free port.
async fn start_shards(dir: &Path, count: u32, password: &str) -> anyhow::Result<Vec<LocalShard>> {
    let starts: Vec<_> = (0..count)
        .map(|i| {
            let pgdata = pgdata(dir, i);
            let password = password.to_owned();
            tokio::task::spawn_blocking(move || {
                let cluster = testkit::Cluster::builder()
                    // Partition moves copy data with logical replication.
                    .setting("wal_level", "logical")
                    .open_or_init(&pgdata, testkit::free_port(), USER, &password)
                    .with_context(|| format!("starting shard {i} in {}", pgdata.display()))?;
                anyhow::Ok(LocalShard {
                    id: ShardId(i),
                    pgdata,
                    cluster,
                    replicas: Vec::new(),
                })
            })
        })
        .collect();
    let mut shards = Vec::with_capacity(starts.len());
    for start in starts {
        shards.push(start.await??);
    }
    Ok(shards)
}

/// Opens (copying its primary on first use) `count` streaming replicas of
/// every shard, all in parallel, each on a free port; each follows its
/// primary on the port the primary has in this run.
async fn start_replicas(shards: &mut [LocalShard], count: u32) -> anyhow::Result<()> {
    let mut starts = Vec::new();
    for (slot, shard) in shards.iter().enumerate() {
        for j in 1..=count {
            let dir = replica_pgdata(&shard.pgdata, j);
            let builder = shard.cluster.replica();
            let id = shard.id;
            let start = tokio::task::spawn_blocking(move || {
                builder
                    .open_or_init(&dir, testkit::free_port())
                    .with_context(|| {
                        format!("starting replica {j} of shard {id} in {}", dir.display())
                    })
            });
            starts.push((slot, start));
        }
    }
    // In order of `j`, so a shard's replicas keep their order across runs.
    for (slot, start) in starts {
        let replica = start.await??;
        shards[slot].replicas.push(replica);
    }
    Ok(())
}

/// Runs a one-node metadata group persisted under `<dir>/meta`, on the port
/// it had last time if that is free (its address is part of the group's
/// membership).
async fn start_metadata(dir: &Path) -> anyhow::Result<MetaNode> {
    let addr_file = dir.join(crate::admin::DEV_META_ADDR_FILE);
    let previous: Option<std::net::SocketAddr> = std::fs::read_to_string(&addr_file)
        .ok()
        .and_then(|a| a.trim().parse().ok());
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("a valid address");
    let data_dir = dir.join("meta");
    let node = match previous {
        Some(prev) => match MetaNode::start(NodeConfig::new(1, prev, data_dir.clone())).await {
            Ok(node) => node,
            Err(e) => {
                tracing::warn!(error = %e, "metadata port {prev} is taken; using another");
                MetaNode::start(NodeConfig::new(1, any, data_dir)).await?
            }
        },
        None => MetaNode::start(NodeConfig::new(1, any, data_dir)).await?,
    };
    std::fs::write(&addr_file, node.addr())?;
    node.initialize_if_new().await?;
    Ok(node)
}

/// Records each local PostgreSQL as its shard with its replicas, or their new
/// ports if they moved (ports are picked afresh on every run).
async fn register_shards(
    client: &MetaClient,
    state: &MetaState,
    shards: &[LocalShard],
) -> anyhow::Result<()> {
    for shard in shards {
        let primary = format!("127.0.0.1:{}", shard.cluster.port());
        let replicas: Vec<String> = shard
            .replicas
            .iter()
            .map(|replica| format!("127.0.0.1:{}", replica.port()))
            .collect();
        let command = match state.map.shards.get(&shard.id) {
            None => Command::AddShard {
                id: shard.id,
                primary,
                replicas,
            },
            Some(s) if s.primary != primary || s.replicas != replicas => {
                Command::SetShardAddresses {
                    id: shard.id,
                    primary,
                    replicas,
                }
            }
            Some(_) => continue,
        };
        propose(client, command)
            .await
            .with_context(|| format!("recording shard {}", shard.id))?;
    }
    Ok(())
}

/// On the first run, declares the demo table, lays it out on every shard and
/// loads it, each row straight into the shard that owns it. Later runs only
/// make sure every shard has its layout (a shard added since has none).
async fn ensure_demo_table(
    client: &MetaClient,
    shards: &[LocalShard],
    password: &str,
) -> anyhow::Result<()> {
    let mut dbs = Vec::with_capacity(shards.len());
    for shard in shards {
        dbs.push(connect(shard.cluster.port(), password, DATABASE).await?);
    }
    let (state, _) = client.read().await.context("reading the dev shard map")?;
    let first_run = !state.map.tables.contains_key(DEMO_TABLE);
    if first_run {
        // An earlier single-shard dev run may have left a plain table of this
        // name; it is the user's, so leave it alone and skip the demo.
        for (shard, db) in shards.iter().zip(&dbs) {
            let exists = db
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&DEMO_TABLE])
                .await?
                .get::<_, bool>(0);
            if exists {
                tracing::warn!(
                    "shard {} already has a table {DEMO_TABLE}; not making the demo table",
                    shard.id
                );
                return Ok(());
            }
        }
        propose(
            client,
            Command::DeclareTable {
                name: DEMO_TABLE.into(),
                key: DEMO_KEY.into(),
                key_type: KeyType::Int8,
                group: None,
                partitions: Some(DEMO_PARTITIONS),
            },
        )
        .await
        .context("declaring the demo table")?;
    }
    let (state, _) = client.read().await.context("reading the dev shard map")?;
    let map = &state.map;
    let table = map
        .tables
        .get(DEMO_TABLE)
        .context("the demo table is declared")?;
    let group = map
        .groups
        .get(&table.group)
        .context("the demo table's group exists")?;
    let create_if_missing = DEMO_CREATE.replacen("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1);
    for (shard, db) in shards.iter().zip(&dbs) {
        let statements = router::ddl::create_on_shard(&create_if_missing, table, group, shard.id)
            .map_err(|e| anyhow::anyhow!("laying out {DEMO_TABLE}: {e}"))?;
        db.batch_execute(&statements.join(";\n"))
            .await
            .with_context(|| format!("creating {DEMO_TABLE} on shard {}", shard.id))?;
    }
    if !first_run {
        return Ok(());
    }

    let modulus = group.modulus();
    let mut ids_by_shard: Vec<Vec<i64>> = vec![Vec::new(); shards.len()];
    for id in 1..=DEMO_ROWS {
        let p = partition_of(&[Some(&KeyValue::Int8(id))], modulus) as usize;
        let owner = group.partitions[p].owner;
        let slot = shards
            .iter()
            .position(|s| s.id == owner)
            .with_context(|| format!("partition {p} is owned by shard {owner}, not running"))?;
        ids_by_shard[slot].push(id);
    }
    for ((shard, db), ids) in shards.iter().zip(&dbs).zip(&ids_by_shard) {
        // Into the parent: PostgreSQL picks the partition, and refuses a row
        // this shard has no partition for.
        db.execute(
            "INSERT INTO accounts (id, owner, balance) \
             SELECT id, (ARRAY['alice','bob','carol','dave','erin','frank','grace','heidi'])[1 + id % 8], \
                    (id * 7919 % 100000) * 0.01 \
             FROM unnest($1::int8[]) AS id",
            &[ids],
        )
        .await
        .with_context(|| format!("loading {DEMO_TABLE} on shard {}", shard.id))?;
    }
    tracing::info!(
        rows = DEMO_ROWS,
        shards = shards.len(),
        "made the demo table {DEMO_TABLE}"
    );
    Ok(())
}

/// Proposes `command`; a command refused when applied is an error too.
async fn propose(client: &MetaClient, command: Command) -> anyhow::Result<()> {
    let applied = client.propose(command).await?;
    match applied.refused {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

async fn connect(pg_port: u16, password: &str, db: &str) -> anyhow::Result<tokio_postgres::Client> {
    let url = format!("postgres://{USER}:{password}@127.0.0.1:{pg_port}/{db}");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to the local PostgreSQL on port {pg_port}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// Creates the dev database on first run.
async fn ensure_database(pg_port: u16, password: &str) -> anyhow::Result<()> {
    let client = connect(pg_port, password, "postgres").await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DATABASE])
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
            .await?;
    }
    Ok(())
}

/// The dev password: made on the first run, kept in `<dir>/password`.
fn password(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("password");
    if let Ok(p) = std::fs::read_to_string(&path) {
        if !p.trim().is_empty() {
            return Ok(p.trim().to_owned());
        }
    }
    let p: String = {
        use rand::Rng;
        rand::thread_rng()
            .sample_iter(rand::distributions::Alphanumeric)
            .take(20)
            .map(char::from)
            .collect()
    };
    std::fs::write(&path, &p)?;
    Ok(p)
}
