//! Measures a 3-node metadata group on loopback: leader fail-over time and
//! watch propagation delay (from a proposal's commit being acknowledged to a
//! watching client holding that epoch's map), over N changes.
//!
//! `cargo run --release -p metadata --example propagation [CHANGES]`

use std::time::{Duration, Instant};

use metadata::client::MetaClient;
use metadata::node::{MetaNode, NodeConfig};
use metadata::Command;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let changes: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().expect("tempdir");
    let any = "127.0.0.1:0".parse().expect("addr");
    let mut nodes: Vec<MetaNode> = Vec::new();
    for id in 1..=3u64 {
        let node = MetaNode::start(NodeConfig::new(id, any, dir.path().join(format!("n{id}"))))
            .await
            .expect("start");
        if id == 1 {
            node.initialize_if_new().await.expect("init");
        } else {
            MetaClient::new(vec![nodes[0].addr().to_owned()])
                .add_member(id, node.addr())
                .await
                .expect("join");
        }
        nodes.push(node);
    }
    let client = MetaClient::new(nodes.iter().map(|n| n.addr().to_owned()).collect());
    // The watcher follows a node that is not the leader, as a proxy usually does.
    let leader = nodes[0].raft().current_leader().await.expect("leader");
    let follower = nodes.iter().find(|n| n.id() != leader).expect("follower");
    let mut watch = MetaClient::new(vec![follower.addr().to_owned()]).watch(0);

    let mut commit_to_applied = Vec::with_capacity(changes);
    let mut propose_to_applied = Vec::with_capacity(changes);
    for i in 0..changes {
        let started = Instant::now();
        let applied = client
            .propose(Command::SetFlag {
                name: format!("f{}", i % 50),
                value: Some(i.to_string()),
            })
            .await
            .expect("commit");
        let committed = Instant::now();
        loop {
            let map = watch.recv().await.expect("watch open");
            if map.epoch.0 >= applied.epoch {
                break;
            }
        }
        commit_to_applied.push(committed.elapsed());
        propose_to_applied.push(started.elapsed());
    }
    commit_to_applied.sort();
    propose_to_applied.sort();
    println!(
        "watch propagation over {changes} changes (3 nodes, watcher on a follower):\n  \
         commit acknowledged -> watcher has the map: median {:?}, p99 {:?}, max {:?}\n  \
         proposal sent -> watcher has the map:     median {:?}, p99 {:?}, max {:?}",
        percentile(&commit_to_applied, 0.5),
        percentile(&commit_to_applied, 0.99),
        commit_to_applied.last().expect("non-empty"),
        percentile(&propose_to_applied, 0.5),
        percentile(&propose_to_applied, 0.99),
        propose_to_applied.last().expect("non-empty"),
    );

    // Fail-over: kill the leader, time until the next command commits.
    let mut failovers = Vec::new();
    for _ in 0..3 {
        let leader = nodes[0].raft().current_leader().await.expect("leader");
        let idx = nodes
            .iter()
            .position(|n| n.id() == leader)
            .expect("leader is ours");
        let dead = nodes.remove(idx);
        let (id, addr) = (dead.id(), dead.addr().to_owned());
        dead.shutdown().await;
        drop(dead);
        let started = Instant::now();
        client
            .propose(Command::SetFlag {
                name: "failover".into(),
                value: Some(format!("{id}")),
            })
            .await
            .expect("commit after fail-over");
        failovers.push(started.elapsed());
        // Bring the node back (same id, address and data) for the next round.
        let node = MetaNode::start(NodeConfig::new(
            id,
            addr.parse().expect("addr"),
            dir.path().join(format!("n{id}")),
        ))
        .await
        .expect("restart");
        nodes.push(node);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!("leader fail-over (leader killed -> next command committed): {failovers:?}");
    for n in &nodes {
        n.shutdown().await;
    }
}
