//! The metadata RPC: length-prefixed frames over TCP, one request and one
//! reply at a time per connection (a watch turns its connection into a
//! stream of maps).
//!
//! A frame is a big-endian `u32` length followed by that many bytes of
//! [`crate::codec`]-encoded value. The length is checked against
//! [`FRAME_BYTES_MAX`] before anything is buffered, so a peer cannot make a
//! node allocate more than that.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use router::ShardMap;

use crate::codec;
use crate::command::Command;
use crate::error::{Error, Result};
use crate::state::{EpochAcks, MetaState, ProxyLease};
use crate::types::{Applied, NodeId, TypeConfig};

/// The largest frame a node or client accepts (snapshots are sent whole).
pub const FRAME_BYTES_MAX: u32 = 64 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    // Between Raft nodes.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    // From clients. Writes and linearizable reads are answered by the leader;
    // other nodes answer `NotLeader` with its address.
    Propose(Command),
    Read,
    Status,
    AddMember {
        id: NodeId,
        addr: String,
    },
    RemoveMember {
        id: NodeId,
    },
    /// Stream every map with an epoch above `after`, then each new one.
    Watch {
        after: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Applied(Applied),
    State {
        state: MetaState,
        /// The leader's clock when it answered, to judge lease expiry by.
        now_ms: u64,
    },
    Status(Box<ClusterStatus>),
    Map(Box<ShardMap>),
    Done,
    NotLeader {
        leader: Option<(NodeId, String)>,
    },
    Refused(String),
    /// Traffic from/to this node is cut (tests) or it is shutting down.
    Unavailable(String),
    Failed(String),
}

/// What `shardline admin status` shows; answered by the leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub leader: Option<NodeId>,
    pub term: u64,
    /// (id, address, voter?)
    pub members: Vec<(NodeId, String, bool)>,
    pub last_applied: Option<u64>,
    pub epoch: u64,
    pub proxies: Vec<ProxyLease>,
    pub acks: EpochAcks,
    pub now_ms: u64,
}

/// Writes one frame. Not cancel-safe (a half-written frame poisons the stream).
pub async fn write_frame<W, T>(w: &mut W, value: &T) -> Result<(), std::io::Error>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let body = codec::encode(value)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&n| n <= FRAME_BYTES_MAX)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("frame of {} bytes exceeds {FRAME_BYTES_MAX}", body.len()),
            )
        })?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads one frame; `None` on a clean end of stream between frames.
/// Not cancel-safe.
pub async fn read_frame<R, T>(r: &mut R) -> Result<Option<T>, std::io::Error>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len);
    if len > FRAME_BYTES_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            Error::FrameTooLarge {
                len: len as u64,
                max: FRAME_BYTES_MAX as u64,
            }
            .to_string(),
        ));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await?;
    codec::decode(&body)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

/// One request, one reply over a fresh connection, within `timeout`.
pub async fn call(addr: &str, request: &Request, timeout: std::time::Duration) -> Result<Response> {
    let io = |source| Error::Io {
        addr: addr.to_owned(),
        source,
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        write_frame(&mut stream, request).await.map_err(io)?;
        read_frame(&mut stream).await.map_err(io)?.ok_or_else(|| {
            io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before the reply",
            ))
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no reply within {timeout:?}"),
            )))
        })
}
