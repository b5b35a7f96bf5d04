//! `shardline dev`: a local PostgreSQL under `--dir` and a proxy in front of it.
//!
//! The first run creates the database cluster (as the `postgres` OS user when
//! started as root: initdb refuses root); later runs reuse it. The proxy
//! config is written to `<dir>/shardline.toml` so it can be read and reused.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use metadata::client::MetaClient;
use metadata::node::{MetaNode, NodeConfig};
use metadata::Command;

#[derive(Args)]
pub struct DevArgs {
    /// Where the local cluster and config live.
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
    /// Number of shards (only 1 until sharding lands).
    #[arg(long, default_value_t = 1)]
    shards: u32,
    /// Streaming replicas per shard (not yet started: replica routing lands later).
    #[arg(long, default_value_t = 0)]
    replicas: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum PoolModeArg {
    Transaction,
    Session,
}

const USER: &str = "shardline";
const DATABASE: &str = "app";

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    if args.shards != 1 {
        anyhow::bail!(
            "--shards {} is not supported yet: this build runs one shard",
            args.shards
        );
    }
    if args.replicas != 0 {
        tracing::warn!("--replicas is accepted but replicas are not started yet");
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let password = password(&dir)?;
    let pg_port = testkit::free_port();
    let pgdata = dir.join("pgdata");
    let cluster = tokio::task::spawn_blocking({
        let pgdata = pgdata.clone();
        let password = password.clone();
        move || testkit::Cluster::open_or_init(&pgdata, pg_port, USER, &password)
    })
    .await??;
    ensure_database(cluster.port(), &password).await?;

    let meta = start_metadata(&dir, cluster.port()).await?;
    let pool_mode = match args.pool_mode {
        PoolModeArg::Transaction => "transaction",
        PoolModeArg::Session => "session",
    };
    let config_text = format!(
        "# Written by `shardline dev`; rewritten on every start.\n\
         [proxy]\nlisten = \"127.0.0.1:{port}\"\npool_mode = \"{pool_mode}\"\npool_size = {pool_size}\n\n\
         [[users]]\nname = \"{USER}\"\npassword = \"{password}\"\n\n\
         [[databases]]\nname = \"{DATABASE}\"\nhost = \"127.0.0.1\"\nport = {pg_port}\n\n\
         [metadata]\nendpoints = [\"{meta_addr}\"]\n",
        meta_addr = meta.addr(),
        port = args.port,
        pool_size = args.pool_size,
    );
    let config_path = dir.join("shardline.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = proxy::Config::parse(&config_text)?;
    let proxy = proxy::Proxy::bind(config)
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{}", args.port))?;
    let addr = proxy.local_addr()?;
    println!("postgres://{USER}:{password}@{addr}/{DATABASE}");
    println!("metadata: {}", meta.addr());
    eprintln!(
        "shardline dev: PostgreSQL on 127.0.0.1:{pg_port} (data in {}), proxy config {}. Ctrl-C stops both.",
        pgdata.display(),
        config_path.display()
    );
    proxy.run(crate::shutdown_signal()).await;
    eprintln!("shardline dev: stopping");
    meta.shutdown().await;
    drop(cluster);
    Ok(())
}

/// Runs a one-node metadata group persisted under `<dir>/meta`, on the port
/// it had last time if that is free (its address is part of the group's
/// membership), and records the local PostgreSQL as shard 0.
async fn start_metadata(dir: &Path, pg_port: u16) -> anyhow::Result<MetaNode> {
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
    let client = MetaClient::new(vec![node.addr().to_owned()]);
    let (state, _) = client.read().await.context("reading the dev shard map")?;
    let primary = format!("127.0.0.1:{pg_port}");
    let shard = router::ShardMap::HOME;
    let command = match state.map.shards.get(&shard) {
        None => Some(Command::AddShard {
            id: shard,
            primary,
            replicas: Vec::new(),
        }),
        Some(s) if s.primary != primary => Some(Command::SetShardAddresses {
            id: shard,
            primary,
            replicas: Vec::new(),
        }),
        Some(_) => None,
    };
    if let Some(command) = command {
        client.propose(command).await.context("recording shard 0")?;
    }
    Ok(node)
}

/// Creates the dev database on first run.
async fn ensure_database(pg_port: u16, password: &str) -> anyhow::Result<()> {
    let url = format!("postgres://{USER}:{password}@127.0.0.1:{pg_port}/postgres");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to the local PostgreSQL")?;
    tokio::spawn(connection);
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
