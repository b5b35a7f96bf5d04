//! The metadata group: the shard map replicated with Raft (openraft), its
//! persistent storage, RPC, and the client proxies and the admin CLI use.

pub mod codec;
pub mod command;
mod error;
pub mod state;
pub mod types;

pub use command::{Command, Refused};
pub use error::{Error, Result};
pub use state::{EpochAcks, MetaState, ProxyLease};
pub use types::{Applied, NodeId, Raft, TypeConfig};
