//! `shardline meta`: run one node of the metadata group.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use metadata::client::MetaClient;
use metadata::node::{MetaNode, NodeConfig};

#[derive(Args)]
pub struct MetaArgs {
    /// This node's id: unique in the group, never reused.
    #[arg(long)]
    id: u64,
    /// Address to listen on for peers, proxies and the admin CLI.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Where the Raft log and vote are kept.
    #[arg(long)]
    data_dir: PathBuf,
    /// An existing member to join through. Without it a new node starts a
    /// group of its own (a node that was a member rejoins from its log).
    #[arg(long)]
    join: Option<String>,
}

pub async fn run(args: MetaArgs) -> anyhow::Result<()> {
    let node = MetaNode::start(NodeConfig::new(args.id, args.listen, args.data_dir.clone()))
        .await
        .with_context(|| format!("starting metadata node {}", args.id))?;
    let initialized = node.raft().is_initialized().await?;
    match (&args.join, initialized) {
        (_, true) => tracing::info!(
            "rejoining the group recorded in {}",
            args.data_dir.display()
        ),
        (Some(seed), false) => {
            let client = MetaClient::new(vec![seed.clone()]);
            let mut tries = 0;
            loop {
                match client.add_member(args.id, node.addr()).await {
                    Ok(()) => break,
                    Err(e) if e.is_retryable() && tries < 10 => {
                        tries += 1;
                        tracing::warn!(error = %e, "joining through {seed} failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => return Err(e).context(format!("joining through {seed}")),
                }
            }
            tracing::info!("joined the group through {seed}");
        }
        (None, false) => {
            node.initialize_if_new().await?;
            tracing::info!("started a new group with this node as its only member");
        }
    }
    println!("metadata node {} listening on {}", args.id, node.addr());
    crate::shutdown_signal().await;
    node.shutdown().await;
    Ok(())
}
