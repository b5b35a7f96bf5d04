//! Errors of the metadata group, its storage and its clients.

use crate::command::Refused;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command was checked and refused; nothing changed.
    #[error("refused: {0}")]
    Refused(#[from] Refused),
    #[error("encoding: {0}")]
    Codec(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("metadata node {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata RPC frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge { len: u64, max: u64 },
    /// No node answered as leader within the client's time budget.
    #[error("no metadata leader reachable ({0})")]
    NoLeader(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("metadata node answered unexpectedly: {0}")]
    Protocol(String),
}

impl Error {
    /// Whether trying again (on another node, or later) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Io { .. } | Error::NoLeader(_) | Error::Raft(_))
    }
}
