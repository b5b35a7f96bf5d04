//! MetaState: what the Raft state machine holds, the shard map and, beside it,
//! the registry of proxies with their leases and acknowledged epochs.
//!
//! The registry is kept out of the `ShardMap` on purpose: leases are renewed
//! every few seconds, and if each renewal bumped the map's epoch every proxy
//! would be woken to apply a map that did not change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use router::{Epoch, ShardMap};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    pub map: ShardMap,
    /// Registered proxies by id.
    pub proxies: BTreeMap<String, ProxyLease>,
}

/// A proxy's registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyLease {
    pub id: String,
    /// Where clients reach it (for operators; not used for routing).
    pub addr: String,
    /// Wall-clock milliseconds (Unix epoch) at which the lease lapses unless renewed.
    pub expires_ms: u64,
    /// The newest map epoch the proxy has applied.
    pub acked_epoch: u64,
}

impl ProxyLease {
    pub fn is_live(&self, now_ms: u64) -> bool {
        now_ms < self.expires_ms
    }
}

/// Which live proxies have applied an epoch, as the leader sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochAcks {
    pub epoch: u64,
    pub acknowledged: Vec<String>,
    /// Live proxies that have not acknowledged `epoch` yet.
    pub pending: Vec<String>,
}

impl MetaState {
    /// Acknowledgement of `epoch` among proxies whose lease is live at `now_ms`.
    pub fn acks(&self, epoch: Epoch, now_ms: u64) -> EpochAcks {
        let mut acks = EpochAcks {
            epoch: epoch.0,
            ..EpochAcks::default()
        };
        for p in self.proxies.values().filter(|p| p.is_live(now_ms)) {
            if p.acked_epoch >= epoch.0 {
                acks.acknowledged.push(p.id.clone());
            } else {
                acks.pending.push(p.id.clone());
            }
        }
        acks
    }
}

/// Milliseconds since the Unix epoch by this machine's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
