//! MapFollower: this proxy's view of the shard map and its lease.
//!
//! A background task registers the proxy with the metadata group, follows
//! the map through a watch, acknowledges each epoch it applies and renews the
//! lease. The proxy is *current* while its lease, as last confirmed by the
//! leader, has not run out by this machine's monotonic clock; when it is not,
//! sessions refuse to start work on sharded tables (DESIGN.md, "Moving a
//! partition": a stale proxy must not route by an old map).

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use metadata::client::MetaClient;
use metadata::Command;
use router::ShardMap;
use tokio::time::Instant;

use crate::config::MetadataConfig;

pub struct MapFollower {
    map: RwLock<Arc<ShardMap>>,
    /// Until when the lease is known to hold (send time of the last confirmed
    /// renewal plus the ttl, minus a safety margin).
    lease_until: Mutex<Option<Instant>>,
    pub proxy_id: String,
}

impl MapFollower {
    pub fn map(&self) -> Arc<ShardMap> {
        self.map.read().expect("lock poisoned").clone()
    }

    /// Whether the lease holds, so the map may be routed by.
    pub fn is_current(&self) -> bool {
        self.lease_until
            .lock()
            .expect("lock poisoned")
            .is_some_and(|until| Instant::now() < until)
    }

    /// Starts following the group at `config.endpoints`; returns at once.
    pub fn start(config: &MetadataConfig, proxy_addr: String) -> Arc<MapFollower> {
        let proxy_id = config
            .proxy_id
            .clone()
            .unwrap_or_else(|| format!("{proxy_addr}-{}", std::process::id()));
        let follower = Arc::new(MapFollower {
            map: RwLock::new(Arc::new(ShardMap::default())),
            lease_until: Mutex::new(None),
            proxy_id,
        });
        let client = MetaClient::new(config.endpoints.clone());
        tokio::spawn(run(follower.clone(), client, proxy_addr, config.lease_ttl));
        follower
    }
}

async fn run(follower: Arc<MapFollower>, client: MetaClient, addr: String, ttl: Duration) {
    let ttl_ms = ttl.as_millis() as u64;
    let renew_every = ttl / 3;
    // The lease is trusted for a little less than it lasts, so that clock rate
    // differences and the renewal's own latency never make us overstay it.
    let margin = ttl / 10;
    let id = follower.proxy_id.clone();
    let mut watch = client.watch(0);
    let mut registered = false;
    let mut renew = tokio::time::interval(renew_every);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acked = 0u64;
    loop {
        tokio::select! {
            map = watch.recv() => {
                let Some(map) = map else { return };
                let epoch = map.epoch.0;
                *follower.map.write().expect("lock poisoned") = map;
                tracing::debug!(epoch, "shard map applied");
                if registered && epoch > acked {
                    acknowledge(&client, &id, epoch);
                    acked = epoch;
                }
            }
            _ = renew.tick() => {
                let sent = Instant::now();
                let command = if registered {
                    Command::RenewLease { id: id.clone(), now_ms: 0, ttl_ms }
                } else {
                    Command::RegisterProxy { id: id.clone(), addr: addr.clone(), now_ms: 0, ttl_ms }
                };
                match client.propose(command).await {
                    Ok(_) => {
                        if !registered {
                            tracing::info!(proxy_id = %id, "registered with the metadata group");
                            registered = true;
                            acked = 0; // acknowledge the current map below
                        }
                        *follower.lease_until.lock().expect("lock poisoned") =
                            Some(sent + ttl - margin);
                        let epoch = follower.map().epoch.0;
                        if epoch > acked {
                            acknowledge(&client, &id, epoch);
                            acked = epoch;
                        }
                    }
                    Err(metadata::Error::Refused(why)) => {
                        // Deregistered meanwhile (or never registered): start over.
                        tracing::warn!(%why, "lease renewal refused; registering again");
                        registered = false;
                    }
                    Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
                }
            }
        }
    }
}

/// Acknowledges `epoch` from a task of its own: a slow leader must not hold
/// up applying the next map or renewing the lease.
fn acknowledge(client: &MetaClient, id: &str, epoch: u64) {
    let client = client.clone();
    let id = id.to_owned();
    tokio::spawn(async move {
        if let Err(e) = client.propose(Command::AckEpoch { id, epoch }).await {
            tracing::debug!(error = %e, epoch, "acknowledging the epoch failed");
        }
    });
}
