//! ShardedEnv: several PostgreSQL shards, a one-node metadata group and an
//! in-process proxy following it, for tests of statement routing.
//!
//! Shard `i` is `pg[i]`; shard 0 is the home shard and also the proxy's
//! `[[databases]]` entry, whose database name and credentials the proxy uses
//! on every shard. The harness can bypass the proxy (`direct`, `lay_out`) so a
//! test can arrange data, or check where rows landed, without trusting the
//! code under test.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metadata::client::MetaClient;
use metadata::node::{MetaNode, NodeConfig};
use metadata::Command;
use router::hash::{partition_of, KeyValue};
use router::{KeyType, ShardId, ShardMap};
use testkit::Cluster;
use tokio::sync::oneshot;
use tokio_postgres::Client;

use crate::harness::{
    connect, eventually, start_proxy, start_proxy_with_metrics, Options, APP_PASSWORD,
};

/// The proxy's id in the metadata group's registry.
const PROXY_ID: &str = "sharded-env-proxy";
/// How long the proxy may take to apply and acknowledge a new map.
const ACK_TIMEOUT: Duration = Duration::from_secs(15);

pub struct ShardedEnv {
    /// Shard `i`'s PostgreSQL (superuser `postgres`, database `postgres`).
    pub pg: Vec<Cluster>,
    pub meta: MetaClient,
    /// The proxy; clients log in as `app` to database `db`.
    pub addr: SocketAddr,
    /// Its metrics listener, when the sections have an `[admin]` one.
    pub metrics: Option<SocketAddr>,
    /// The config of a second proxy on the same shards and metadata group.
    second_config: String,
    /// The map as last read back by the harness (after start and each `declare`).
    map: Mutex<Arc<ShardMap>>,
    node: Option<MetaNode>,
    stop: Option<oneshot::Sender<()>>,
    // Dropped last: the metadata node's files.
    _meta_dir: tempfile::TempDir,
}

impl ShardedEnv {
    /// `shards` shards behind a proxy with the default options (pool size 4,
    /// transaction pooling).
    pub async fn start(shards: usize) -> ShardedEnv {
        ShardedEnv::with(shards, Options::default()).await
    }

    pub async fn with(shards: usize, options: Options) -> ShardedEnv {
        ShardedEnv::with_sections(shards, options, "").await
    }

    /// Like [`ShardedEnv::with`], with more config sections (`[cache]`,
    /// `[[users]]`, ...) appended to the proxy's config. The shards run with
    /// `wal_level = logical`, so the cache's change feeds can follow them.
    pub async fn with_sections(shards: usize, options: Options, sections: &str) -> ShardedEnv {
        assert!(shards >= 1, "a sharded env needs at least one shard");
        // Arrange: the shards, started side by side (each is mostly waiting
        // for its postmaster).
        let starts: Vec<_> = (0..shards)
            .map(|_| {
                tokio::task::spawn_blocking(|| {
                    Cluster::builder()
                        .setting("max_connections", "100")
                        .setting("wal_level", "logical")
                        .setting("shared_preload_libraries", "pg_stat_statements")
                        .start()
                })
            })
            .collect();
        let mut pg = Vec::with_capacity(shards);
        for start in starts {
            pg.push(start.await.expect("join").expect("PostgreSQL starts"));
        }

        let meta_dir = tempfile::tempdir().expect("tempdir");
        let node = MetaNode::start(NodeConfig::new(
            1,
            "127.0.0.1:0".parse().expect("addr"),
            meta_dir.path().to_path_buf(),
        ))
        .await
        .expect("metadata node starts");
        node.initialize_if_new().await.expect("initialize");
        let meta = MetaClient::new(vec![node.addr().to_owned()]);
        for (i, cluster) in pg.iter().enumerate() {
            let applied = meta
                .propose(Command::AddShard {
                    id: ShardId(i as u32),
                    primary: format!("127.0.0.1:{}", cluster.port()),
                    replicas: vec![],
                })
                .await
                .expect("add shard");
            assert_eq!(applied.refused, None, "adding shard {i}");
        }

        let config = format!(
            r#"
{proxy}
[[users]]
name = "app"
password = "{APP_PASSWORD}"

[[users]]
name = "trusted"
auth = "trust"

[[databases]]
name = "db"
port = {home_port}
dbname = "postgres"
server_user = "postgres"
server_password = "postgres"

[metadata]
endpoints = ["{meta_addr}"]
proxy_id = "{PROXY_ID}"

{sections}
"#,
            proxy = options.proxy_section(),
            home_port = pg[0].port(),
            meta_addr = node.addr(),
        );
        let (addr, metrics, stop) = start_proxy_with_metrics(&config).await;
        let second_config = config.replace(PROXY_ID, "sharded-env-second-proxy");

        let env = ShardedEnv {
            pg,
            meta,
            addr,
            metrics,
            map: Mutex::new(Arc::default()),
            second_config,
            node: Some(node),
            stop: Some(stop),
            _meta_dir: meta_dir,
        };
        let epoch = env.meta.status().await.expect("status").epoch;
        env.wait_acknowledged(epoch).await;
        env.refresh_map().await;
        env
    }

    /// Starts a second proxy like the first (its own pools, cache and
    /// change feeds) and returns its address; it runs until the sender is
    /// dropped.
    pub async fn second_proxy(&self) -> (SocketAddr, oneshot::Sender<()>) {
        start_proxy(&self.second_config).await
    }

    /// A tokio-postgres client through the proxy as `app` on `db`.
    pub async fn client(&self) -> Client {
        connect(self.addr, "app", APP_PASSWORD, "db")
            .await
            .expect("connect through the proxy")
    }

    /// A superuser connection straight to shard `shard`'s PostgreSQL.
    pub async fn direct(&self, shard: usize) -> Client {
        self.pg[shard]
            .connect()
            .await
            .expect("direct connection to a shard")
    }

    /// Declares `table` sharded by `key` into `partitions` partitions (placed
    /// over all shards) and waits until the proxy has acknowledged the map.
    pub async fn declare(&self, table: &str, key: &str, key_type: KeyType, partitions: u32) {
        let applied = self
            .meta
            .propose(Command::DeclareTable {
                name: table.into(),
                key: key.into(),
                key_type,
                group: None,
                partitions: Some(partitions),
            })
            .await
            .expect("declare table");
        assert_eq!(applied.refused, None, "declaring {table}");
        self.wait_acknowledged(applied.epoch).await;
        self.refresh_map().await;
    }

    /// Creates declared `table` on every shard directly, as the proxy lays it
    /// out (a hash-partitioned parent plus the partitions the shard owns), so
    /// a test can arrange data without going through the proxy.
    pub async fn lay_out(&self, table: &str, create_sql: &str) {
        let map = self.map();
        let t = map.tables.get(table).expect("the table is declared");
        let group = map.groups.get(&t.group).expect("the table's group exists");
        for shard in 0..self.pg.len() {
            let statements =
                router::ddl::create_on_shard(create_sql, t, group, ShardId(shard as u32))
                    .expect("a valid layout");
            self.direct(shard)
                .await
                .batch_execute(&statements.join(";\n"))
                .await
                .unwrap_or_else(|e| panic!("laying out {table} on shard {shard}: {e}"));
        }
    }

    /// The shard that owns `key` of declared `table`, by the harness's map.
    pub fn owner(&self, table: &str, key: &KeyValue) -> ShardId {
        let map = self.map();
        let t = map
            .tables
            .get(table)
            .unwrap_or_else(|| panic!("{table} is not declared"));
        let group = map.groups.get(&t.group).expect("the table's group exists");
        let p = partition_of(&[Some(key)], group.modulus());
        group.partitions[p as usize].owner
    }

    /// The map as the harness last read it.
    pub fn map(&self) -> Arc<ShardMap> {
        self.map.lock().expect("lock poisoned").clone()
    }

    /// Reads the map back from the metadata group.
    pub async fn refresh_map(&self) {
        let (state, _) = self.meta.read().await.expect("read the map");
        *self.map.lock().expect("lock poisoned") = Arc::new(state.map);
    }

    /// Waits until the proxy has acknowledged `epoch` (or a later one).
    pub async fn wait_acknowledged(&self, epoch: u64) {
        let acked = eventually(ACK_TIMEOUT, || async {
            let s = self.meta.status().await.expect("status");
            s.epoch >= epoch && s.acks.acknowledged.iter().any(|p| p == PROXY_ID)
        })
        .await;
        assert!(
            acked,
            "the proxy did not acknowledge epoch {epoch}: {:?}",
            self.meta.status().await.expect("status")
        );
    }
}

impl Drop for ShardedEnv {
    fn drop(&mut self) {
        // The proxy first, then the metadata group; the shards stop when `pg`
        // drops right after this.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(node) = self.node.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { node.shutdown().await });
            }
        }
    }
}
