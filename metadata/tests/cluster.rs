//! A real metadata group on loopback: three nodes, their RPC, leader
//! fail-over, restart from disk (also after the log was purged behind a
//! snapshot), a partitioned node, watches and leases.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metadata::client::MetaClient;
use metadata::node::{MetaNode, NodeConfig};
use metadata::{Command, Error};
use router::{KeyType, ShardId, ShardMap};

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("valid")
}

async fn start(id: u64, listen: SocketAddr, dir: &Path) -> MetaNode {
    MetaNode::start(NodeConfig::new(id, listen, dir.join(format!("node{id}"))))
        .await
        .expect("node starts")
}

/// Polls `check` until it holds or `within` passes.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three nodes: the first starts the group, the others join through it.
async fn three_nodes(dir: &Path) -> Vec<MetaNode> {
    let first = start(1, any_port(), dir).await;
    first.initialize_if_new().await.expect("initialize");
    let mut nodes = vec![first];
    for id in 2..=3 {
        let node = start(id, any_port(), dir).await;
        MetaClient::new(vec![nodes[0].addr().to_owned()])
            .add_member(id, node.addr())
            .await
            .expect("join");
        nodes.push(node);
    }
    nodes
}

fn client(nodes: &[MetaNode]) -> MetaClient {
    MetaClient::new(nodes.iter().map(|n| n.addr().to_owned()).collect())
}

fn add_shard(id: u32) -> Command {
    Command::AddShard {
        id: ShardId(id),
        primary: format!("127.0.0.1:{}", 5432 + id),
        replicas: vec![],
    }
}

async fn leader_of(nodes: &[MetaNode]) -> Option<u64> {
    for n in nodes {
        if let Some(l) = n.raft().current_leader().await {
            if nodes.iter().any(|m| m.id() == l) {
                return Some(l);
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_commit_fail_over_and_recover_from_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = three_nodes(dir.path()).await;
    let client = client(&nodes);

    // Commands commit and every node applies them.
    for id in 0..4 {
        client.propose(add_shard(id)).await.expect("commit");
    }
    let applied = client
        .propose(Command::DeclareTable {
            name: "accounts".into(),
            key: "id".into(),
            key_type: KeyType::Int8,
            group: None,
            partitions: Some(16),
        })
        .await
        .expect("declare");
    assert_eq!(applied.epoch, 5);
    for n in &nodes {
        eventually(
            "every node applies epoch 5",
            Duration::from_secs(5),
            || async { n.state_machine().state().map.epoch.0 == 5 },
        )
        .await;
    }

    // A refused command changes nothing, on any node.
    let refused = client.propose(add_shard(1)).await;
    assert!(matches!(refused, Err(Error::Refused(_))), "{refused:?}");
    assert_eq!(client.read().await.expect("read").0.map.epoch.0, 5);

    // Kill the leader: a new one is elected and the next command commits.
    let leader = leader_of(&nodes).await.expect("a leader");
    let idx = nodes
        .iter()
        .position(|n| n.id() == leader)
        .expect("leader is a node");
    let killed = nodes.remove(idx);
    let killed_addr: SocketAddr = killed.addr().parse().expect("addr");
    killed.shutdown().await;
    drop(killed);
    let started = Instant::now();
    let survivors = MetaClient::new(nodes.iter().map(|n| n.addr().to_owned()).collect());
    let applied = survivors
        .propose(add_shard(4))
        .await
        .expect("commit after fail-over");
    let fail_over = started.elapsed();
    eprintln!("leader fail-over: next command committed {fail_over:?} after the leader died");
    assert!(
        fail_over < Duration::from_secs(3),
        "the next command took {fail_over:?} after the leader died"
    );
    assert_eq!(applied.epoch, 6);
    // Nothing committed before the fail-over was lost.
    let (state, _) = survivors.read().await.expect("read");
    assert_eq!(state.map.shards.len(), 5);
    assert!(state.map.tables.contains_key("accounts"));

    // The old leader restarts from its disk (same id, address and data) and catches up.
    let restarted = start(leader, killed_addr, dir.path()).await;
    eventually(
        "the restarted node catches up",
        Duration::from_secs(10),
        || async { restarted.state_machine().state().map.epoch.0 == 6 },
    )
    .await;
    assert_eq!(restarted.state_machine().state().map, state.map);
    nodes.push(restarted);
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_node_cannot_commit_and_catches_up_when_reconnected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = three_nodes(dir.path()).await;
    let all = client(&nodes);
    all.propose(add_shard(0)).await.expect("commit");

    // Cut off the leader: it cannot commit; the other two elect a leader and can.
    let leader = leader_of(&nodes).await.expect("a leader");
    let cut = nodes.iter().find(|n| n.id() == leader).expect("leader");
    cut.set_cut(true);
    let mut only_cut = MetaClient::new(vec![cut.addr().to_owned()]);
    only_cut.rpc_timeout = Duration::from_secs(2);
    only_cut.budget = Duration::from_secs(3);
    let attempt = only_cut.propose(add_shard(1)).await;
    assert!(attempt.is_err(), "a cut-off node committed: {attempt:?}");

    let others = MetaClient::new(
        nodes
            .iter()
            .filter(|n| n.id() != leader)
            .map(|n| n.addr().to_owned())
            .collect(),
    );
    let applied = others
        .propose(add_shard(2))
        .await
        .expect("majority commits");
    // The cut-off node has not seen it (its own attempt may not count either).
    let cut_epoch = cut.state_machine().state().map.epoch.0;
    assert!(
        cut_epoch < applied.epoch,
        "cut-off node applied epoch {cut_epoch}"
    );
    assert!(!cut
        .state_machine()
        .state()
        .map
        .shards
        .contains_key(&ShardId(2)));

    // Reconnected, it catches up with exactly the majority's history.
    cut.set_cut(false);
    eventually(
        "the reconnected node catches up",
        Duration::from_secs(10),
        || async { cut.state_machine().state().map == others.read().await.expect("read").0.map },
    )
    .await;
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_sees_every_epoch_once_in_order_across_a_leader_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = three_nodes(dir.path()).await;
    let client = client(&nodes);
    let mut watch = client.watch(0);

    let mut expected = 0u64;
    let mut propagation = Vec::new();
    for id in 0..40u32 {
        if id == 20 {
            // Kill the leader half way through.
            let leader = leader_of(&nodes).await.expect("a leader");
            let idx = nodes.iter().position(|n| n.id() == leader).expect("leader");
            nodes.remove(idx).shutdown().await;
        }
        let started = Instant::now();
        let applied = client.propose(add_shard(id)).await.expect("commit");
        // Every epoch up to this one arrives, in order, once.
        while expected < applied.epoch {
            let map: Arc<ShardMap> = tokio::time::timeout(Duration::from_secs(10), watch.recv())
                .await
                .expect("watch delivers within 10s")
                .expect("watch open");
            expected += 1;
            assert_eq!(map.epoch.0, expected, "epochs out of order or repeated");
        }
        propagation.push(started.elapsed());
    }
    assert_eq!(expected, 40);
    // Nothing more is pending: no duplicates after the last epoch.
    let extra = tokio::time::timeout(Duration::from_millis(300), watch.recv()).await;
    assert!(extra.is_err(), "unexpected extra map: {extra:?}");
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_and_acknowledgements_are_visible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start(1, any_port(), dir.path()).await;
    node.initialize_if_new().await.expect("initialize");
    let client = MetaClient::new(vec![node.addr().to_owned()]);
    client.propose(add_shard(0)).await.expect("commit");

    for (id, ttl_ms) in [("proxy-a", 60_000), ("proxy-b", 300)] {
        client
            .propose(Command::RegisterProxy {
                id: id.into(),
                addr: "127.0.0.1:6432".into(),
                now_ms: 0,
                ttl_ms,
            })
            .await
            .expect("register");
    }
    client
        .propose(Command::AckEpoch {
            id: "proxy-a".into(),
            epoch: 1,
        })
        .await
        .expect("ack");
    let status = client.status().await.expect("status");
    assert_eq!(status.epoch, 1, "registry commands do not bump the epoch");
    assert_eq!(status.acks.acknowledged, vec!["proxy-a".to_owned()]);
    assert_eq!(status.acks.pending, vec!["proxy-b".to_owned()]);

    // proxy-b does not renew: its lease lapses and it drops out of the pending set.
    eventually(
        "proxy-b's lease expires",
        Duration::from_secs(5),
        || async {
            let s = client.status().await.expect("status");
            let b = s
                .proxies
                .iter()
                .find(|p| p.id == "proxy-b")
                .expect("still registered");
            !b.is_live(s.now_ms) && s.acks.pending.is_empty()
        },
    )
    .await;
    // A new epoch is pending for proxy-a until it acknowledges it.
    client.propose(add_shard(1)).await.expect("commit");
    let s = client.status().await.expect("status");
    assert_eq!(
        (s.epoch, s.acks.pending.clone()),
        (2, vec!["proxy-a".to_owned()])
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarts_after_its_log_was_purged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = NodeConfig::new(1, any_port(), dir.path().join("node1"));
    config.snapshot_every = 20;
    let node = MetaNode::start(config.clone()).await.expect("node starts");
    node.initialize_if_new().await.expect("initialize");
    let client = MetaClient::new(vec![node.addr().to_owned()]);
    for i in 0..100 {
        client
            .propose(Command::SetFlag {
                name: format!("f{i}"),
                value: Some("x".into()),
            })
            .await
            .expect("commit");
    }
    // Snapshots every 20 entries, keeping 10 behind the latest: the log is
    // purged well past its start.
    eventually("the log is purged", Duration::from_secs(10), || async {
        node.raft()
            .metrics()
            .borrow()
            .purged
            .is_some_and(|p| p.index > 20)
    })
    .await;
    let before = node.state_machine().state();
    assert_eq!(before.map.flags.len(), 100);
    assert!(config
        .data_dir
        .join(metadata::state_machine::SNAPSHOT_FILE)
        .exists());

    // Restart on the same address and data dir.
    config.listen = node.addr().parse().expect("addr");
    node.shutdown().await;
    drop(node);
    let node = MetaNode::start(config).await.expect("node restarts");

    eventually(
        "the restarted node recovers its state",
        Duration::from_secs(10),
        || async { node.state_machine().state() == before },
    )
    .await;
    assert_eq!(*node.state_machine().state(), *before);
    client
        .propose(Command::SetFlag {
            name: "after_restart".into(),
            value: Some("y".into()),
        })
        .await
        .expect("commit after restart");
    let (state, _) = client.read().await.expect("read");
    assert_eq!(state.map.flags.len(), 101);
    assert_eq!(state.map.flags["after_restart"], "y");
    node.shutdown().await;
}
