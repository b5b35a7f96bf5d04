//! Network: openraft's RPCs to other metadata nodes over the [`crate::rpc`] frames.
//!
//! Each peer gets one TCP connection, kept open and re-dialled after a
//! failure; openraft sends to a peer from one replication task, so requests
//! on it are sequential. [`Cut`] lets tests drop a node's Raft traffic (both
//! directions) to partition it from the others without touching the OS.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory};
use tokio::net::TcpStream;

use crate::rpc::{read_frame, write_frame, Request, Response};
use crate::types::{NodeId, TypeConfig};

/// Whether a node's Raft traffic is dropped (a test-only network partition).
#[derive(Clone, Default, Debug)]
pub struct Cut(Arc<AtomicBool>);

impl Cut {
    pub fn set(&self, cut: bool) {
        self.0.store(cut, Ordering::SeqCst);
    }

    pub fn is_cut(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Makes a [`Peer`] for each node openraft replicates to.
#[derive(Clone)]
pub struct Network {
    pub cut: Cut,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
            conn: None,
            cut: self.cut.clone(),
        }
    }
}

pub struct Peer {
    target: NodeId,
    addr: String,
    conn: Option<TcpStream>,
    cut: Cut,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Peer {
    /// Sends `request` and returns the reply, re-dialling once if a kept
    /// connection turns out to be dead. Gives up after the RPC's hard TTL.
    async fn exchange<E: std::error::Error>(
        &mut self,
        request: Request,
        option: &RPCOption,
    ) -> RpcResult<Response, E> {
        if self.cut.is_cut() {
            return Err(RPCError::Unreachable(Unreachable::new(
                &std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "this node's traffic is cut",
                ),
            )));
        }
        let ttl = option.hard_ttl();
        match tokio::time::timeout(ttl, self.round_trip(&request)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                self.conn = None;
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(_) => {
                self.conn = None;
                Err(RPCError::Network(NetworkError::new(&std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no reply from node {} within {ttl:?}", self.target),
                ))))
            }
        }
    }

    async fn round_trip(&mut self, request: &Request) -> std::io::Result<Response> {
        for attempt in 0..2 {
            let fresh = self.conn.is_none();
            if fresh {
                let stream = TcpStream::connect(&self.addr).await?;
                stream.set_nodelay(true)?;
                self.conn = Some(stream);
            }
            let conn = self.conn.as_mut().expect("connected above");
            let result = async {
                write_frame(conn, request).await?;
                read_frame::<_, Response>(conn).await
            }
            .await;
            match result {
                Ok(Some(reply)) => return Ok(reply),
                // A kept connection the peer closed meanwhile: dial again once.
                Ok(None) | Err(_) if !fresh && attempt == 0 => self.conn = None,
                Ok(None) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "peer closed the connection",
                    ))
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the second attempt always returns")
    }

    fn unexpected<E: std::error::Error>(
        &self,
        reply: Response,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        let what = match reply {
            Response::Unavailable(why) => why,
            other => format!("unexpected reply {other:?}"),
        };
        RPCError::Unreachable(Unreachable::new(&std::io::Error::other(format!(
            "node {}: {what}",
            self.target
        ))))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        match self.exchange(Request::AppendEntries(rpc), &option).await? {
            Response::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self
            .exchange(Request::InstallSnapshot(rpc), &option)
            .await?
        {
            Response::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        match self.exchange(Request::Vote(rpc), &option).await? {
            Response::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }
}
