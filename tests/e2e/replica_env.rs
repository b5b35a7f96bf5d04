//! ReplicaEnv: one shard with a primary and streaming replicas behind an
//! in-process proxy that follows a one-node metadata group, for the tests of
//! read routing.

use std::net::SocketAddr;
use std::time::Duration;

use metadata::client::MetaClient;
use metadata::node::{MetaNode, NodeConfig};
use metadata::Command;
use router::ShardId;
use testkit::Cluster;
use tokio::sync::oneshot;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{connect, eventually, start_proxy, Options, APP_PASSWORD};

pub struct ReplicaEnv {
    /// The shard's primary (superuser `postgres`, database `postgres`, with
    /// table `t (id int PRIMARY KEY, v int)`, ids 1 to 100).
    pub primary: Cluster,
    pub replicas: Vec<Cluster>,
    /// The proxy: users `app` (password), `trusted` (trust) and `ops` (admin) on `db`.
    pub addr: SocketAddr,
    _node: MetaNode,
    _stop: oneshot::Sender<()>,
    _meta_dir: tempfile::TempDir,
}

impl ReplicaEnv {
    pub async fn start(
        n_replicas: usize,
        replicas_section: &str,
        databases_before: &str,
        wait: bool,
    ) -> ReplicaEnv {
        ReplicaEnv::start_with(n_replicas, &[], replicas_section, databases_before, wait).await
    }

    pub async fn start_with(
        n_replicas: usize,
        settings: &[(&str, &str)],
        replicas_section: &str,
        databases_before: &str,
        wait: bool,
    ) -> ReplicaEnv {
        let primary = tokio::task::spawn_blocking(|| {
            Cluster::builder().setting("max_connections", "100").start()
        })
        .await
        .unwrap()
        .unwrap();
        let pc = primary.connect().await.unwrap();
        pc.batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);
             INSERT INTO t SELECT i, 0 FROM generate_series(1, 100) i;",
        )
        .await
        .unwrap();
        let mut replicas = Vec::new();
        for _ in 0..n_replicas {
            let mut builder = primary.replica();
            for (k, v) in settings {
                builder = builder.setting(*k, *v);
            }
            replicas.push(
                tokio::task::spawn_blocking(move || builder.start())
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        let meta_dir = tempfile::tempdir().unwrap();
        let node = MetaNode::start(NodeConfig::new(
            1,
            "127.0.0.1:0".parse().unwrap(),
            meta_dir.path().to_path_buf(),
        ))
        .await
        .unwrap();
        node.initialize_if_new().await.unwrap();
        let meta = MetaClient::new(vec![node.addr().to_owned()]);
        meta.propose(Command::AddShard {
            id: ShardId(0),
            primary: format!("127.0.0.1:{}", primary.port()),
            replicas: replicas
                .iter()
                .map(|r| format!("127.0.0.1:{}", r.port()))
                .collect(),
        })
        .await
        .unwrap();
        let options = Options {
            proxy_extra: "connect_timeout = \"2s\"\ncheckout_timeout = \"3s\"".into(),
            ..Options::default()
        };
        let config = format!(
            r#"
{proxy}
[[users]]
name = "app"
password = "{APP_PASSWORD}"

[[users]]
name = "trusted"
auth = "trust"

[[users]]
name = "ops"
password = "ops-secret"
admin = true

{databases_before}

[[databases]]
name = "db"
port = {port}
dbname = "postgres"
server_user = "postgres"
server_password = "postgres"

[metadata]
endpoints = ["{meta}"]

[replicas]
{replicas_section}
"#,
            proxy = options.proxy_section(),
            port = primary.port(),
            meta = node.addr(),
        );
        let (addr, stop) = start_proxy(&config).await;
        let env = ReplicaEnv {
            primary,
            replicas,
            addr,
            _node: node,
            _stop: stop,
            _meta_dir: meta_dir,
        };
        if wait {
            env.wait_for_replica_reads().await;
        }
        env
    }

    /// Waits until a read through the proxy runs on a replica (the proxy
    /// has the map and has seen a replica healthy and caught up).
    pub async fn wait_for_replica_reads(&self) {
        let client = self.client().await;
        assert!(
            eventually(Duration::from_secs(20), || async {
                first(&client, "SELECT pg_is_in_recovery()")
                    .await
                    .as_deref()
                    == Some("t")
            })
            .await,
            "reads never reached a replica"
        );
    }

    pub async fn client(&self) -> Client {
        connect(self.addr, "app", APP_PASSWORD, "db").await.unwrap()
    }
}

/// The first column of the first row of `sql` (simple protocol).
pub async fn first(client: &Client, sql: &str) -> Option<String> {
    let messages = client.simple_query(sql).await.ok()?;
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    })
}
