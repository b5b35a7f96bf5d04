//! MetaNode: one member of the metadata group — Raft, its storage, and the
//! RPC server that peers, proxies and the admin CLI talk to.
//!
//! Writes and linearizable reads are served by the leader; any other node
//! answers `NotLeader` with the leader's address and the client retries there.
//! Watches are served by any node from its own applied state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Config, SnapshotPolicy};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::command::Command;
use crate::error::{Error, Result};
use crate::log_store::LogStore;
use crate::network::{Cut, Network};
use crate::rpc::{read_frame, write_frame, ClusterStatus, Request, Response};
use crate::state::{now_ms, MetaState};
use crate::state_machine::StateMachineStore;
use crate::types::{NodeId, Raft};

/// How a node is started.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Where to listen; port 0 picks a free one.
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub heartbeat: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// A proposal or linearizable read not done within this fails (a leader
    /// cut off from its quorum must not hang its clients).
    pub request_timeout: Duration,
    /// Log entries between snapshots; older entries are purged after one.
    pub snapshot_every: u64,
    /// Open RPC connections (peers, proxies' watches, admin) at most.
    pub connections_max: usize,
}

impl NodeConfig {
    pub fn new(id: NodeId, listen: SocketAddr, data_dir: PathBuf) -> NodeConfig {
        NodeConfig {
            id,
            listen,
            data_dir,
            heartbeat: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(400),
            election_timeout_max: Duration::from_millis(800),
            request_timeout: Duration::from_secs(5),
            snapshot_every: 1000,
            connections_max: 4096,
        }
    }
}

struct Inner {
    id: NodeId,
    addr: String,
    raft: Raft,
    sm: StateMachineStore,
    cut: Cut,
    request_timeout: Duration,
    connections_max: usize,
}

/// A running metadata node. Dropping it does not stop it: call [`MetaNode::shutdown`].
#[derive(Clone)]
pub struct MetaNode {
    inner: Arc<Inner>,
    stop: watch::Sender<bool>,
}

impl MetaNode {
    /// Opens the node's storage under `data_dir`, starts Raft and the RPC
    /// listener. A node that was part of a group rejoins it from its log.
    pub async fn start(config: NodeConfig) -> Result<MetaNode> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| Error::Storage(format!("creating {}: {e}", config.data_dir.display())))?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Io {
                addr: config.listen.to_string(),
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Io {
                addr: config.listen.to_string(),
                source,
            })?
            .to_string();
        let raft_config = Config {
            cluster_name: "shardline-metadata".into(),
            heartbeat_interval: config.heartbeat.as_millis() as u64,
            election_timeout_min: config.election_timeout_min.as_millis() as u64,
            election_timeout_max: config.election_timeout_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: config.snapshot_every / 2,
            purge_batch_size: 64,
            ..Config::default()
        }
        .validate()
        .map_err(|e| Error::Raft(e.to_string()))?;
        let log_store = LogStore::open(&config.data_dir)?;
        let sm = StateMachineStore::open(&config.data_dir)?;
        let cut = Cut::default();
        let network = Network { cut: cut.clone() };
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            network,
            log_store,
            sm.clone(),
        )
        .await
        .map_err(|e| Error::Raft(e.to_string()))?;
        let inner = Arc::new(Inner {
            id: config.id,
            addr,
            raft,
            sm,
            cut,
            request_timeout: config.request_timeout,
            connections_max: config.connections_max,
        });
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(listener, inner.clone(), stopped));
        tracing::info!(id = config.id, addr = %inner.addr, "metadata node started");
        Ok(MetaNode { inner, stop })
    }

    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The address the node listens on (`host:port`).
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    pub fn state_machine(&self) -> &StateMachineStore {
        &self.inner.sm
    }

    /// Drops (or restores) all Raft traffic to and from this node.
    pub fn set_cut(&self, cut: bool) {
        self.inner.cut.set(cut);
    }

    /// Makes this node a group of one, unless it already belongs to a group.
    pub async fn initialize_if_new(&self) -> Result<()> {
        let raft = &self.inner.raft;
        if raft
            .is_initialized()
            .await
            .map_err(|e| Error::Raft(e.to_string()))?
        {
            return Ok(());
        }
        let members = BTreeMap::from([(
            self.inner.id,
            BasicNode {
                addr: self.inner.addr.clone(),
            },
        )]);
        raft.initialize(members)
            .await
            .map_err(|e| Error::Raft(e.to_string()))
    }

    /// Stops serving and stops Raft.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let _ = self.inner.raft.shutdown().await;
    }
}

async fn serve(listener: TcpListener, node: Arc<Inner>, mut stopped: watch::Receiver<bool>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(node.connections_max));
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Beyond the bound a connection is closed at once; clients retry.
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, max = node.connections_max, "metadata connection refused: too many connections");
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let stopped = stopped.clone();
                    let node = node.clone();
                    tokio::spawn(async move {
                        handle(stream, node, stopped).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metadata accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn handle(mut stream: TcpStream, node: Arc<Inner>, mut stopped: watch::Receiver<bool>) {
    loop {
        let request = tokio::select! {
            _ = stopped.changed() => return,
            r = read_frame::<_, Request>(&mut stream) => r,
        };
        let request = match request {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "bad metadata request");
                return;
            }
        };
        if let Request::Watch { after } = request {
            watch_stream(stream, node, after, stopped).await;
            return;
        }
        let reply = answer(&node, request).await;
        if write_frame(&mut stream, &reply).await.is_err() {
            return;
        }
    }
}

async fn answer(node: &Inner, request: Request) -> Response {
    let raft = &node.raft;
    let peer_rpc = matches!(
        request,
        Request::AppendEntries(_) | Request::Vote(_) | Request::InstallSnapshot(_)
    );
    if peer_rpc && node.cut.is_cut() {
        return Response::Unavailable("this node's traffic is cut".into());
    }
    match request {
        Request::AppendEntries(rpc) => Response::AppendEntries(raft.append_entries(rpc).await),
        Request::Vote(rpc) => Response::Vote(raft.vote(rpc).await),
        Request::InstallSnapshot(rpc) => {
            Response::InstallSnapshot(raft.install_snapshot(rpc).await)
        }
        Request::Propose(command) => bounded(node, propose(node, command)).await,
        Request::Read => bounded(node, read(node)).await,
        Request::Status => bounded(node, status(node)).await,
        Request::AddMember { id, addr } => bounded(node, add_member(node, id, addr)).await,
        Request::RemoveMember { id } => bounded(node, remove_member(node, id)).await,
        Request::Watch { .. } => unreachable!("handled by the caller"),
    }
}

async fn bounded(node: &Inner, work: impl std::future::Future<Output = Response>) -> Response {
    match tokio::time::timeout(node.request_timeout, work).await {
        Ok(r) => r,
        Err(_) => Response::Unavailable(format!(
            "node {} could not complete the request within {:?} (no quorum?)",
            node.id, node.request_timeout
        )),
    }
}

fn not_leader(node: &Inner, leader: Option<NodeId>) -> Response {
    let metrics = node.raft.metrics().borrow().clone();
    let leader = leader.or(metrics.current_leader).and_then(|id| {
        metrics
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| (id, n.addr.clone()))
    });
    Response::NotLeader { leader }
}

fn write_error(
    node: &Inner,
    e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
) -> Response {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => not_leader(node, f.leader_id),
        other => Response::Failed(other.to_string()),
    }
}

/// Leader-stamped time for lease commands, so every replica applies the same value.
fn stamp(command: Command) -> Command {
    match command {
        Command::RegisterProxy {
            id, addr, ttl_ms, ..
        } => Command::RegisterProxy {
            id,
            addr,
            now_ms: now_ms(),
            ttl_ms,
        },
        Command::RenewLease { id, ttl_ms, .. } => Command::RenewLease {
            id,
            now_ms: now_ms(),
            ttl_ms,
        },
        other => other,
    }
}

async fn propose(node: &Inner, command: Command) -> Response {
    if node.raft.current_leader().await != Some(node.id) {
        return not_leader(node, None);
    }
    let command = stamp(command);
    if let Err(refused) = command.validate(&node.sm.state()) {
        return Response::Refused(refused.0);
    }
    match node.raft.client_write(command).await {
        Ok(written) => match written.data.refused {
            Some(why) => Response::Refused(why),
            None => Response::Applied(written.data),
        },
        Err(e) => write_error(node, e),
    }
}

/// The applied state once it is known to be current (linearizable), with
/// the leader's clock; otherwise the reply to send instead.
async fn linearizable(node: &Inner) -> Result<(Arc<MetaState>, u64), Response> {
    match node.raft.ensure_linearizable().await {
        Ok(_) => Ok((node.sm.state(), now_ms())),
        Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
            Err(not_leader(node, f.leader_id))
        }
        Err(e) => Err(Response::Failed(e.to_string())),
    }
}

async fn read(node: &Inner) -> Response {
    match linearizable(node).await {
        Ok((state, now_ms)) => Response::State {
            state: (*state).clone(),
            now_ms,
        },
        Err(reply) => reply,
    }
}

async fn status(node: &Inner) -> Response {
    let (state, now_ms) = match linearizable(node).await {
        Ok(current) => current,
        Err(reply) => return reply,
    };
    let metrics = node.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, n)| (*id, n.addr.clone(), voters.contains(id)))
        .collect();
    Response::Status(Box::new(ClusterStatus {
        leader: metrics.current_leader,
        term: metrics.current_term,
        members,
        last_applied: metrics.last_applied.map(|l| l.index),
        epoch: state.map.epoch.0,
        acks: state.acks(state.map.epoch, now_ms),
        proxies: state.proxies.values().cloned().collect(),
        now_ms,
    }))
}

async fn add_member(node: &Inner, id: NodeId, addr: String) -> Response {
    if node.raft.current_leader().await != Some(node.id) {
        return not_leader(node, None);
    }
    let metrics = node.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    if let Some(existing) = membership.get_node(&id) {
        if existing.addr != addr {
            return Response::Refused(format!(
                "node id {id} is already a member at {}; node ids are never reused",
                existing.addr
            ));
        }
    }
    // A learner first, so it catches up before it counts towards the quorum.
    if let Err(e) = node.raft.add_learner(id, BasicNode { addr }, true).await {
        return write_error(node, e);
    }
    let change = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
    match node.raft.change_membership(change, false).await {
        Ok(_) => Response::Done,
        Err(e) => write_error(node, e),
    }
}

async fn remove_member(node: &Inner, id: NodeId) -> Response {
    if node.raft.current_leader().await != Some(node.id) {
        return not_leader(node, None);
    }
    let change = ChangeMembers::RemoveVoters(BTreeSet::from([id]));
    match node.raft.change_membership(change, false).await {
        Ok(_) => Response::Done,
        Err(e) => write_error(node, e),
    }
}

/// Streams maps in epoch order, starting after `after`, until the client goes
/// away or the node stops. Served from this node's applied state.
async fn watch_stream(
    mut stream: TcpStream,
    node: Arc<Inner>,
    mut last: u64,
    mut stopped: watch::Receiver<bool>,
) {
    let mut epochs = node.sm.subscribe();
    loop {
        for map in node.sm.maps_after(last) {
            if map.epoch.0 <= last {
                continue;
            }
            last = map.epoch.0;
            if write_frame(&mut stream, &Response::Map(Box::new((*map).clone())))
                .await
                .is_err()
            {
                return;
            }
        }
        tokio::select! {
            _ = stopped.changed() => return,
            changed = epochs.changed() => if changed.is_err() { return },
        }
    }
}
