//! The openraft type configuration of the metadata group.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::command::Command;

pub type NodeId = u64;

/// The outcome of applying one command, returned to whoever proposed it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The map's epoch after the command.
    pub epoch: u64,
    /// Set if the command was refused when applied (it was valid when
    /// proposed, but a command committed in between made it invalid).
    pub refused: Option<String>,
}

openraft::declare_raft_types!(
    /// Commands in, `Applied` out; nodes are addressed by `host:port`.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
