//! The metadata group: the shard map replicated with Raft (openraft), its
//! persistent storage, RPC, and the client proxies and the admin CLI use.

pub mod client;
pub mod codec;
pub mod command;
mod error;
pub mod log_store;
pub mod network;
pub mod node;
pub mod rpc;
pub mod state;
pub mod state_machine;
pub mod types;

pub use command::{Command, Refused};
pub use error::{Error, Result};
pub use log_store::LogStore;
pub use state::{EpochAcks, MetaState, ProxyLease};
pub use state_machine::StateMachineStore;
pub use types::{Applied, NodeId, Raft, TypeConfig};
