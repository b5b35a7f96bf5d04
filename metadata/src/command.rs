//! Command: every change to the metadata, as a typed Raft log entry.
//!
//! A command is validated against the current state before it is proposed
//! (so a client hears "no" without a round of consensus) and again when it is
//! applied, because another command may have committed in between; an invalid
//! command applies as a no-op with an error. After every successful apply the
//! map's invariants are asserted (TigerBeetle's paired assertions).

use serde::{Deserialize, Serialize};

use router::{
    placement, Group, KeyType, Partition, PartitionState, Shard, ShardId, ShardMap, Table,
};

use crate::state::{MetaState, ProxyLease};

/// The largest modulus a group may have (PostgreSQL allows more partitions,
/// but each is a table on every shard that owns it).
pub const PARTITIONS_MAX: u32 = 4096;
/// Default modulus of a new group.
pub const PARTITIONS_DEFAULT: u32 = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    AddShard {
        id: ShardId,
        primary: String,
        replicas: Vec<String>,
    },
    /// New addresses for an existing shard (a replica added, a primary promoted).
    SetShardAddresses {
        id: ShardId,
        primary: String,
        replicas: Vec<String>,
    },
    RemoveShard {
        id: ShardId,
    },
    /// A sharded table. Its group is `group`, or the default group for its key
    /// type and modulus; a new group is placed by rendezvous hashing.
    DeclareTable {
        name: String,
        key: String,
        key_type: KeyType,
        group: Option<String>,
        partitions: Option<u32>,
    },
    DropTable {
        name: String,
    },
    /// Sets (or with `None` clears) a runtime flag.
    SetFlag {
        name: String,
        value: Option<String>,
    },
    /// A proxy announces itself and takes a lease until `now_ms + ttl_ms`.
    /// `now_ms` is stamped by the node that proposes the command, so applying
    /// it is deterministic on every replica.
    RegisterProxy {
        id: String,
        addr: String,
        now_ms: u64,
        ttl_ms: u64,
    },
    RenewLease {
        id: String,
        now_ms: u64,
        ttl_ms: u64,
    },
    /// The proxy has applied the map up to `epoch`.
    AckEpoch {
        id: String,
        epoch: u64,
    },
    DeregisterProxy {
        id: String,
    },
}

/// Why a command was refused; the text says what to do instead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn refuse<T>(msg: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(msg.into()))
}

impl Command {
    /// Whether the command changes the shard map (and so its epoch), as
    /// opposed to the proxy registry beside it.
    pub fn changes_map(&self) -> bool {
        !matches!(
            self,
            Command::RegisterProxy { .. }
                | Command::RenewLease { .. }
                | Command::AckEpoch { .. }
                | Command::DeregisterProxy { .. }
        )
    }

    /// Checks the command against `state` without changing it.
    pub fn validate(&self, state: &MetaState) -> Result<(), Refused> {
        let map = &state.map;
        match self {
            Command::AddShard { id, primary, .. } => {
                if map.shards.contains_key(id) {
                    return refuse(format!("shard {id} already exists"));
                }
                check_address(primary)?;
            }
            Command::SetShardAddresses { id, primary, .. } => {
                if !map.shards.contains_key(id) {
                    return refuse(format!("no shard {id}; add it with add-shard"));
                }
                check_address(primary)?;
            }
            Command::RemoveShard { id } => {
                if !map.shards.contains_key(id) {
                    return refuse(format!("no shard {id}"));
                }
                let owned = map.partitions_owned(*id);
                if owned > 0 {
                    return refuse(format!(
                        "shard {id} owns {owned} partitions; move them away first"
                    ));
                }
                if map.is_move_target(*id) {
                    return refuse(format!("shard {id} is the target of a partition move"));
                }
                if *id == ShardMap::HOME && !map.tables.is_empty() {
                    return refuse("shard 0 is the home shard of unsharded tables");
                }
            }
            Command::DeclareTable {
                name,
                key,
                key_type,
                group,
                partitions,
            } => {
                check_identifier("table", name)?;
                check_identifier("key column", key)?;
                if map.tables.contains_key(name) {
                    return refuse(format!("table {name} is already declared"));
                }
                let modulus = partitions.unwrap_or(PARTITIONS_DEFAULT);
                if modulus == 0 || modulus > PARTITIONS_MAX {
                    return refuse(format!(
                        "partitions must be between 1 and {PARTITIONS_MAX}, not {modulus}"
                    ));
                }
                let group = group
                    .clone()
                    .unwrap_or_else(|| Group::default_name(*key_type, modulus));
                match map.groups.get(&group) {
                    Some(g) => {
                        if g.key_type != *key_type {
                            return refuse(format!(
                                "group {group} has key type {}, not {key_type}",
                                g.key_type
                            ));
                        }
                        if partitions.is_some_and(|p| p != g.modulus()) {
                            return refuse(format!(
                                "group {group} has {} partitions, not {modulus}",
                                g.modulus()
                            ));
                        }
                    }
                    None => {
                        check_identifier("group", &group)?;
                        if map.shards.is_empty() {
                            return refuse("no shards yet; add one with add-shard first");
                        }
                    }
                }
            }
            Command::DropTable { name } => {
                let Some(table) = map.tables.get(name) else {
                    return refuse(format!("table {name} is not declared"));
                };
                let group = &map.groups[&table.group];
                let last = !map
                    .tables
                    .values()
                    .any(|t| t.group == table.group && t.name != *name);
                let moving = group
                    .partitions
                    .iter()
                    .any(|p| p.state != PartitionState::Stable);
                if last && moving {
                    return refuse(format!(
                        "group {} has a partition move in progress",
                        group.name
                    ));
                }
            }
            Command::SetFlag { name, .. } => check_identifier("flag", name)?,
            Command::RegisterProxy { id, ttl_ms, .. } => {
                check_proxy_id(id)?;
                if *ttl_ms == 0 {
                    return refuse("a lease needs a positive ttl");
                }
            }
            Command::RenewLease { id, ttl_ms, .. } => {
                if !state.proxies.contains_key(id) {
                    return refuse(format!("proxy {id} is not registered"));
                }
                if *ttl_ms == 0 {
                    return refuse("a lease needs a positive ttl");
                }
            }
            Command::AckEpoch { id, epoch } => {
                if !state.proxies.contains_key(id) {
                    return refuse(format!("proxy {id} is not registered"));
                }
                if *epoch > map.epoch.0 {
                    return refuse(format!(
                        "epoch {epoch} is ahead of the map (epoch {})",
                        map.epoch
                    ));
                }
            }
            Command::DeregisterProxy { id } => {
                if !state.proxies.contains_key(id) {
                    return refuse(format!("proxy {id} is not registered"));
                }
            }
        }
        Ok(())
    }

    /// Validates and applies the command. On success the map's epoch has
    /// advanced if the map changed; on refusal nothing changed.
    pub fn apply(&self, state: &mut MetaState) -> Result<(), Refused> {
        self.validate(state)?;
        let map = &mut state.map;
        match self {
            Command::AddShard {
                id,
                primary,
                replicas,
            }
            | Command::SetShardAddresses {
                id,
                primary,
                replicas,
            } => {
                map.shards.insert(
                    *id,
                    Shard {
                        id: *id,
                        primary: primary.clone(),
                        replicas: replicas.clone(),
                    },
                );
            }
            Command::RemoveShard { id } => {
                map.shards.remove(id);
            }
            Command::DeclareTable {
                name,
                key,
                key_type,
                group,
                partitions,
            } => {
                let modulus = partitions.unwrap_or(PARTITIONS_DEFAULT);
                let group = group
                    .clone()
                    .unwrap_or_else(|| Group::default_name(*key_type, modulus));
                if !map.groups.contains_key(&group) {
                    let shards: Vec<ShardId> = map.shards.keys().copied().collect();
                    let partitions = placement::target(modulus, &shards)
                        .into_iter()
                        .map(|owner| Partition {
                            owner,
                            state: PartitionState::Stable,
                        })
                        .collect();
                    map.groups.insert(
                        group.clone(),
                        Group {
                            name: group.clone(),
                            key_type: *key_type,
                            partitions,
                        },
                    );
                }
                map.tables.insert(
                    name.clone(),
                    Table {
                        name: name.clone(),
                        key: key.clone(),
                        key_type: *key_type,
                        group,
                    },
                );
            }
            Command::DropTable { name } => {
                let table = map.tables.remove(name).expect("validated");
                if !map.tables.values().any(|t| t.group == table.group) {
                    map.groups.remove(&table.group);
                }
            }
            Command::SetFlag { name, value } => match value {
                Some(v) => {
                    map.flags.insert(name.clone(), v.clone());
                }
                None => {
                    map.flags.remove(name);
                }
            },
            Command::RegisterProxy {
                id,
                addr,
                now_ms,
                ttl_ms,
            } => {
                let acked = state.proxies.get(id).map_or(0, |p| p.acked_epoch);
                state.proxies.insert(
                    id.clone(),
                    ProxyLease {
                        id: id.clone(),
                        addr: addr.clone(),
                        expires_ms: now_ms.saturating_add(*ttl_ms),
                        acked_epoch: acked,
                    },
                );
            }
            Command::RenewLease { id, now_ms, ttl_ms } => {
                let lease = state.proxies.get_mut(id).expect("validated");
                lease.expires_ms = lease.expires_ms.max(now_ms.saturating_add(*ttl_ms));
            }
            Command::AckEpoch { id, epoch } => {
                let lease = state.proxies.get_mut(id).expect("validated");
                lease.acked_epoch = lease.acked_epoch.max(*epoch);
            }
            Command::DeregisterProxy { id } => {
                state.proxies.remove(id);
            }
        }
        if self.changes_map() {
            state.map.epoch.0 += 1;
        }
        if let Err(broken) = state.map.check_invariants() {
            panic!("invariant broken after applying {self:?}: {broken}");
        }
        Ok(())
    }
}

fn check_address(addr: &str) -> Result<(), Refused> {
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(())
        }
        _ => refuse(format!("address \"{addr}\" is not host:port")),
    }
}

/// Table, column, group and flag names end up in SQL and in partition names:
/// plain lower-case identifiers, as PostgreSQL folds unquoted ones.
fn check_identifier(what: &str, name: &str) -> Result<(), Refused> {
    let ok = !name.is_empty()
        && name.len() <= 48 // leaves room for a `_p1234` partition suffix within 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        refuse(format!(
            "{what} \"{name}\" must be 1-48 characters of lower-case letters, digits and '_', not starting with a digit"
        ))
    }
}

/// Proxy ids are chosen by operators or generated (`host:port-pid`).
fn check_proxy_id(id: &str) -> Result<(), Refused> {
    if !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic()) {
        Ok(())
    } else {
        refuse(format!(
            "proxy id \"{id}\" must be 1-128 printable characters without spaces"
        ))
    }
}
