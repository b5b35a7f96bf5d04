//! The proxy following a metadata group: registration, epoch acknowledgement,
//! and refusing new work on sharded tables while its lease has lapsed.

use std::net::SocketAddr;
use std::time::Duration;

use metadata::client::MetaClient;
use metadata::node::{MetaNode, NodeConfig};
use metadata::Command;
use router::{KeyType, ShardId};

use crate::harness::{eventually, sqlstate, Env, Options};

async fn meta_node(listen: SocketAddr, dir: &std::path::Path) -> MetaNode {
    let node = MetaNode::start(NodeConfig::new(1, listen, dir.to_path_buf()))
        .await
        .expect("metadata node starts");
    node.initialize_if_new().await.expect("initialize");
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_registers_acknowledges_and_stops_sharded_work_when_its_lease_lapses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = meta_node("127.0.0.1:0".parse().expect("addr"), dir.path()).await;
    let meta_addr: SocketAddr = node.addr().parse().expect("addr");
    let client = MetaClient::new(vec![node.addr().to_owned()]);
    let env = Env::with(Options {
        proxy_extra: format!(
            "[metadata]\nendpoints = [\"{}\"]\nlease_ttl = \"900ms\"\nproxy_id = \"proxy-under-test\"\n",
            node.addr()
        ),
        ..Options::default()
    })
    .await;
    client
        .propose(Command::AddShard {
            id: ShardId(0),
            primary: format!("127.0.0.1:{}", env.pg.port()),
            replicas: vec![],
        })
        .await
        .expect("add shard");
    let declared = client
        .propose(Command::DeclareTable {
            name: "accounts".into(),
            key: "id".into(),
            key_type: KeyType::Int8,
            group: None,
            partitions: Some(8),
        })
        .await
        .expect("declare");

    // The proxy registers and acknowledges the epoch that declared the table.
    let acked = eventually(Duration::from_secs(10), || async {
        let s = client.status().await.expect("status");
        s.epoch == declared.epoch && s.acks.acknowledged == vec!["proxy-under-test".to_owned()]
    })
    .await;
    assert!(acked, "{:?}", client.status().await.expect("status"));

    let db = env.client().await;
    db.batch_execute("CREATE TABLE accounts (id int8 PRIMARY KEY, balance int8)")
        .await
        .expect("create");
    db.execute("INSERT INTO accounts (id, balance) VALUES (1, 100)", &[])
        .await
        .expect("insert while current");

    // The metadata group goes away: the lease lapses, sharded work is refused
    // with a retryable error, unsharded work carries on.
    node.shutdown().await;
    drop(node);
    let refused = eventually(Duration::from_secs(10), || async {
        matches!(db.query("SELECT balance FROM accounts WHERE id = 1", &[]).await,
            Err(e) if sqlstate(&e) == "40001")
    })
    .await;
    assert!(refused, "statements on a sharded table were not refused");
    let err = db
        .simple_query("SELECT * FROM public.accounts")
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&err), "40001");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("\"public.accounts\""), "{message}");
    let one: i32 = db
        .query_one("SELECT 1", &[])
        .await
        .expect("unsharded")
        .get(0);
    assert_eq!(one, 1);

    // The group comes back on the same address: the proxy is current again.
    let node = meta_node(meta_addr, dir.path()).await;
    let served = eventually(Duration::from_secs(15), || async {
        db.query("SELECT balance FROM accounts WHERE id = 1", &[])
            .await
            .is_ok()
    })
    .await;
    assert!(served, "the proxy did not become current again");
    node.shutdown().await;
}
