//! ShardMap: which shard owns every partition, as the metadata group agreed.
//!
//! The types live here, beside the router that reads them, because routing
//! needs them without IO; only the metadata crate's state machine changes a
//! map (through Raft), and everyone else holds an `Arc<ShardMap>` snapshot.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A shard: one primary PostgreSQL and its streaming replicas.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ShardId(pub u32);

/// A partition index within a colocation group: `0..modulus`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct PartitionIdx(pub u32);

/// The map's version; every change to the map increments it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Epoch(pub u64);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for PartitionIdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Shard-key column types whose hash the router computes as PostgreSQL does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum KeyType {
    Int2,
    Int4,
    Int8,
    Text,
    Uuid,
}

impl KeyType {
    pub const ALL: [KeyType; 5] = [
        KeyType::Int2,
        KeyType::Int4,
        KeyType::Int8,
        KeyType::Text,
        KeyType::Uuid,
    ];

    /// The PostgreSQL type name, as in `CREATE TABLE`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Int2 => "int2",
            KeyType::Int4 => "int4",
            KeyType::Int8 => "int8",
            KeyType::Text => "text",
            KeyType::Uuid => "uuid",
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = String;

    fn from_str(s: &str) -> Result<KeyType, String> {
        match s.to_ascii_lowercase().as_str() {
            "int2" | "smallint" => Ok(KeyType::Int2),
            "int4" | "int" | "integer" => Ok(KeyType::Int4),
            "int8" | "bigint" => Ok(KeyType::Int8),
            "text" | "varchar" | "character varying" => Ok(KeyType::Text),
            "uuid" => Ok(KeyType::Uuid),
            other => Err(format!(
                "unsupported shard key type \"{other}\" (supported: int2, int4, int8, text, uuid)"
            )),
        }
    }
}

/// One shard's addresses (`host:port`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub id: ShardId,
    pub primary: String,
    pub replicas: Vec<String>,
}

/// A sharded table: hash-partitioned on `key` on every shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub name: String,
    pub key: String,
    pub key_type: KeyType,
    /// The colocation group whose placement the table follows.
    pub group: String,
}

/// Tables with the same key type and modulus whose partition `i` always lives
/// on the same shard. The unit of placement and movement is a group's partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub key_type: KeyType,
    /// One entry per partition index; the modulus is `partitions.len()`.
    pub partitions: Vec<Partition>,
}

impl Group {
    pub fn modulus(&self) -> u32 {
        self.partitions.len() as u32
    }

    /// The default name of the group for a key type and modulus.
    pub fn default_name(key_type: KeyType, modulus: u32) -> String {
        format!("{key_type}_{modulus}")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub owner: ShardId,
    pub state: PartitionState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartitionState {
    Stable,
    /// Being moved to `to`; routing still goes to the owner until cut-over.
    Moving {
        to: ShardId,
        phase: MovePhase,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MovePhase {
    Copying,
    CatchingUp,
    /// Cut-over: new statements for the partition are held by proxies.
    Paused,
}

/// The whole map. Cloned per change (it is small: shards, tables, and one
/// entry per partition of each group); readers share `Arc<ShardMap>`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    pub epoch: Epoch,
    pub shards: BTreeMap<ShardId, Shard>,
    pub tables: BTreeMap<String, Table>,
    pub groups: BTreeMap<String, Group>,
    /// Runtime switches set by operators (`name -> value`).
    pub flags: BTreeMap<String, String>,
}

impl ShardMap {
    /// Unsharded tables live here.
    pub const HOME: ShardId = ShardId(0);

    /// A sharded table and its colocation group, or the reason for the
    /// client when the map (changed since the statement was analysed) lacks one.
    pub fn table_and_group(&self, name: &str) -> Result<(&Table, &Group), String> {
        let table = self
            .tables
            .get(name)
            .ok_or_else(|| format!("table {name} is no longer sharded; retry"))?;
        let group = self
            .groups
            .get(&table.group)
            .ok_or_else(|| format!("group {} of table {} is missing", table.group, table.name))?;
        Ok((table, group))
    }

    /// How many partitions (of all groups) `shard` owns.
    pub fn partitions_owned(&self, shard: ShardId) -> usize {
        self.groups
            .values()
            .flat_map(|g| &g.partitions)
            .filter(|p| p.owner == shard)
            .count()
    }

    /// Whether `shard` is the destination of a partition move.
    pub fn is_move_target(&self, shard: ShardId) -> bool {
        self.groups
            .values()
            .flat_map(|g| &g.partitions)
            .any(|p| matches!(p.state, PartitionState::Moving { to, .. } if to == shard))
    }

    /// Checks every invariant of the map; the metadata state machine calls it
    /// after applying each command.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (id, shard) in &self.shards {
            if *id != shard.id {
                return Err(format!("shard {id} is stored under id {}", shard.id));
            }
            if shard.primary.is_empty() {
                return Err(format!("shard {id} has no primary address"));
            }
        }
        for (name, group) in &self.groups {
            if *name != group.name {
                return Err(format!("group {name} is stored as {}", group.name));
            }
            if group.partitions.is_empty() {
                return Err(format!("group {name} has no partitions"));
            }
            for (i, p) in group.partitions.iter().enumerate() {
                if !self.shards.contains_key(&p.owner) {
                    return Err(format!(
                        "partition {i} of group {name} is owned by unknown shard {}",
                        p.owner
                    ));
                }
                if let PartitionState::Moving { to, .. } = p.state {
                    if to == p.owner || !self.shards.contains_key(&to) {
                        return Err(format!(
                            "partition {i} of group {name} moves to invalid shard {to}"
                        ));
                    }
                }
            }
        }
        for (name, table) in &self.tables {
            if *name != table.name {
                return Err(format!("table {name} is stored as {}", table.name));
            }
            let Some(group) = self.groups.get(&table.group) else {
                return Err(format!("table {name} is in unknown group {}", table.group));
            };
            if group.key_type != table.key_type {
                return Err(format!(
                    "table {name} has key type {} but group {} has {}",
                    table.key_type, group.name, group.key_type
                ));
            }
        }
        for group in self.groups.values() {
            if !self.tables.values().any(|t| t.group == group.name) {
                return Err(format!("group {} has no tables", group.name));
            }
        }
        Ok(())
    }
}
