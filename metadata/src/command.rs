//! Command: every change to the metadata, as a typed Raft log entry.
//!
//! A command is validated against the current state before it is proposed
//! (so a client hears "no" without a round of consensus) and again when it is
//! applied, because another command may have committed in between; an invalid
//! command applies as a no-op with an error. After every successful apply the
//! map's invariants are asserted (TigerBeetle's paired assertions).

use serde::{Deserialize, Serialize};

use router::{placement, Group, KeyType, PartitionState, Shard, ShardId, ShardMap, Table};

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
            Command::AddShard {
                id,
                primary,
                replicas,
            } => {
                if map.shards.contains_key(id) {
                    return refuse(format!("shard {id} already exists"));
                }
                check_address(primary)?;
                replicas.iter().try_for_each(|r| check_address(r))?;
            }
            Command::SetShardAddresses {
                id,
                primary,
                replicas,
            } => {
                if !map.shards.contains_key(id) {
                    return refuse(format!("no shard {id}; add it with add-shard"));
                }
                check_address(primary)?;
                replicas.iter().try_for_each(|r| check_address(r))?;
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
                let (group, modulus) = group_of(*key_type, group, *partitions);
                if modulus == 0 || modulus > PARTITIONS_MAX {
                    return refuse(format!(
                        "partitions must be between 1 and {PARTITIONS_MAX}, not {modulus}"
                    ));
                }
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
                let (group, modulus) = group_of(*key_type, group, *partitions);
                if !map.groups.contains_key(&group) {
                    let shards: Vec<ShardId> = map.shards.keys().copied().collect();
                    let placed = placement::placed_group(&group, *key_type, modulus, &shards);
                    map.groups.insert(group.clone(), placed);
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

/// The group a declared table joins (named, or the default one for its key
/// type and modulus) and the modulus it asks for.
fn group_of(key_type: KeyType, group: &Option<String>, partitions: Option<u32>) -> (String, u32) {
    let modulus = partitions.unwrap_or(PARTITIONS_DEFAULT);
    let name = group
        .clone()
        .unwrap_or_else(|| Group::default_name(key_type, modulus));
    (name, modulus)
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

#[cfg(test)]
mod tests {
    use router::{MovePhase, PartitionIdx};

    use super::*;

    fn add_shard(id: u32) -> Command {
        Command::AddShard {
            id: ShardId(id),
            primary: format!("db{id}:5432"),
            replicas: vec![format!("db{id}r:5432")],
        }
    }

    fn declare(name: &str, key_type: KeyType, group: Option<&str>, p: Option<u32>) -> Command {
        Command::DeclareTable {
            name: name.into(),
            key: "id".into(),
            key_type,
            group: group.map(Into::into),
            partitions: p,
        }
    }

    fn drop_table(name: &str) -> Command {
        Command::DropTable { name: name.into() }
    }

    fn register(id: &str, now_ms: u64, ttl_ms: u64) -> Command {
        Command::RegisterProxy {
            id: id.into(),
            addr: "10.0.0.9:6432".into(),
            now_ms,
            ttl_ms,
        }
    }

    fn renew(id: &str, now_ms: u64, ttl_ms: u64) -> Command {
        Command::RenewLease {
            id: id.into(),
            now_ms,
            ttl_ms,
        }
    }

    fn ack(id: &str, epoch: u64) -> Command {
        Command::AckEpoch {
            id: id.into(),
            epoch,
        }
    }

    fn shard_addresses(id: u32, primary: &str, replicas: &[&str]) -> Command {
        Command::SetShardAddresses {
            id: ShardId(id),
            primary: primary.into(),
            replicas: replicas.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn state(setup: &[Command]) -> MetaState {
        let mut state = MetaState::default();
        for c in setup {
            c.apply(&mut state)
                .unwrap_or_else(|r| panic!("setup command {c:?} refused: {r}"));
        }
        state
    }

    /// Shards 0 and 1 with table `t` (int4, 4 partitions, group `int4_4`), and
    /// proxy `p` registered until 10_000 ms. The map is at epoch 3.
    fn populated() -> Vec<Command> {
        vec![
            add_shard(0),
            add_shard(1),
            declare("t", KeyType::Int4, None, Some(4)),
            register("p", 0, 10_000),
        ]
    }

    fn with(mut setup: Vec<Command>, more: impl IntoIterator<Item = Command>) -> Vec<Command> {
        setup.extend(more);
        setup
    }

    /// A shard id `s` that wins partition 0 of a one-partition group over shard
    /// 0, so shard 0 can own nothing while a table exists.
    fn shard_beating_home() -> u32 {
        (1..100)
            .find(|&s| {
                placement::owner(PartitionIdx(0), &[ShardMap::HOME, ShardId(s)]) == Some(ShardId(s))
            })
            .expect("some shard out of 99 outscores shard 0 for partition 0")
    }

    /// Marks partition 0 of `group` as moving to `to`.
    fn start_move(state: &mut MetaState, group: &str, to: u32) {
        let p = &mut state
            .map
            .groups
            .get_mut(group)
            .expect("group exists")
            .partitions[0];
        assert_ne!(p.owner, ShardId(to), "a move needs another shard");
        p.state = PartitionState::Moving {
            to: ShardId(to),
            phase: MovePhase::Copying,
        };
        state.map.check_invariants().expect("a valid move");
    }

    #[test]
    fn accepted_commands_and_their_epochs() {
        let long_name = "a".repeat(48);
        // (what, setup, command, whether it bumps the map's epoch)
        let cases: Vec<(&str, Vec<Command>, Command, bool)> = vec![
            ("first shard", vec![], add_shard(0), true),
            (
                "shard without replicas, ipv6 primary",
                vec![add_shard(0)],
                Command::AddShard {
                    id: ShardId(7),
                    primary: "[::1]:65535".into(),
                    replicas: vec![],
                },
                true,
            ),
            (
                "new shard addresses",
                populated(),
                shard_addresses(1, "db1new:5433", &["db1a:5432", "db1b:5432"]),
                true,
            ),
            (
                "remove an empty shard",
                with(populated(), [add_shard(5)]),
                Command::RemoveShard { id: ShardId(5) },
                true,
            ),
            (
                "remove the home shard without tables",
                vec![add_shard(0), add_shard(1)],
                Command::RemoveShard { id: ShardId(0) },
                true,
            ),
            (
                "table into a new default group",
                populated(),
                declare("u", KeyType::Int8, None, None),
                true,
            ),
            (
                "table into the existing default group",
                populated(),
                declare("u", KeyType::Int4, None, Some(4)),
                true,
            ),
            (
                "table into a named new group",
                populated(),
                declare("u", KeyType::Text, Some("g"), Some(8)),
                true,
            ),
            (
                "table into a named group, modulus implied",
                populated(),
                declare("u", KeyType::Int4, Some("int4_4"), None),
                true,
            ),
            (
                "one partition",
                populated(),
                declare("u", KeyType::Uuid, None, Some(1)),
                true,
            ),
            (
                "the most partitions",
                populated(),
                declare("u", KeyType::Int2, None, Some(PARTITIONS_MAX)),
                true,
            ),
            (
                "48-character names",
                populated(),
                declare(&long_name, KeyType::Int4, Some(&long_name), Some(2)),
                true,
            ),
            (
                "drop the last table of a group",
                populated(),
                drop_table("t"),
                true,
            ),
            (
                "drop one of two tables of a group",
                with(populated(), [declare("u", KeyType::Int4, None, Some(4))]),
                drop_table("t"),
                true,
            ),
            (
                "set a flag",
                populated(),
                Command::SetFlag {
                    name: "read_only".into(),
                    value: Some("on".into()),
                },
                true,
            ),
            (
                "clear a flag that was never set",
                populated(),
                Command::SetFlag {
                    name: "read_only".into(),
                    value: None,
                },
                true,
            ),
            (
                "register a proxy",
                populated(),
                register("host:6432-123", 5, 1),
                false,
            ),
            (
                "register a proxy again",
                populated(),
                register("p", 20_000, 1_000),
                false,
            ),
            (
                "register before any shard",
                vec![],
                register("p", 0, 1),
                false,
            ),
            (
                "renew a lease",
                populated(),
                renew("p", 9_000, 10_000),
                false,
            ),
            (
                "renew an expired lease",
                populated(),
                renew("p", 50_000, 10_000),
                false,
            ),
            ("ack the current epoch", populated(), ack("p", 3), false),
            ("ack an old epoch", populated(), ack("p", 0), false),
            (
                "deregister",
                populated(),
                Command::DeregisterProxy { id: "p".into() },
                false,
            ),
        ];
        for (what, setup, command, bumps) in cases {
            let before = state(&setup);
            let mut after = before.clone();
            assert_eq!(command.validate(&before), Ok(()), "{what}: validate");
            assert_eq!(command.apply(&mut after), Ok(()), "{what}: apply");
            assert_eq!(command.changes_map(), bumps, "{what}: changes_map");
            assert_eq!(after.map.check_invariants(), Ok(()), "{what}");
            let expected = before.map.epoch.0 + u64::from(bumps);
            assert_eq!(after.map.epoch.0, expected, "{what}: epoch");
            if bumps {
                assert_eq!(after.proxies, before.proxies, "{what}: registry touched");
            } else {
                assert_eq!(after.map, before.map, "{what}: map touched");
            }
        }
    }

    #[test]
    fn refused_commands_change_nothing() {
        let home_loser = shard_beating_home();
        let long_name = "a".repeat(49);
        let long_proxy = "p".repeat(129);
        // (what, setup, command, a phrase of the refusal)
        let mut cases: Vec<(String, Vec<Command>, Command, &str)> = vec![
            (
                "duplicate shard".into(),
                populated(),
                add_shard(1),
                "already exists",
            ),
            (
                "duplicate shard, other addresses".into(),
                vec![add_shard(0)],
                Command::AddShard {
                    id: ShardId(0),
                    primary: "other:5432".into(),
                    replicas: vec![],
                },
                "already exists",
            ),
            (
                "addresses of an unknown shard".into(),
                populated(),
                shard_addresses(9, "db9:5432", &[]),
                "no shard 9",
            ),
            (
                "remove an unknown shard".into(),
                populated(),
                Command::RemoveShard { id: ShardId(9) },
                "no shard 9",
            ),
            (
                "remove a shard that owns partitions".into(),
                populated(),
                Command::RemoveShard { id: ShardId(1) },
                "owns",
            ),
            (
                "remove the only shard under a table".into(),
                vec![add_shard(3), declare("t", KeyType::Int8, None, Some(8))],
                Command::RemoveShard { id: ShardId(3) },
                "owns 8 partitions",
            ),
            (
                "remove the home shard while tables exist".into(),
                vec![
                    add_shard(0),
                    add_shard(home_loser),
                    declare("t", KeyType::Int4, None, Some(1)),
                ],
                Command::RemoveShard { id: ShardMap::HOME },
                "home shard",
            ),
            (
                "table without shards".into(),
                vec![],
                declare("t", KeyType::Int4, None, None),
                "no shards",
            ),
            (
                "table after the last shard left".into(),
                vec![add_shard(0), Command::RemoveShard { id: ShardId(0) }],
                declare("t", KeyType::Int4, None, None),
                "no shards",
            ),
            (
                "duplicate table".into(),
                populated(),
                declare("t", KeyType::Int4, None, Some(4)),
                "already declared",
            ),
            (
                "duplicate table, other type".into(),
                populated(),
                declare("t", KeyType::Text, None, None),
                "already declared",
            ),
            (
                "zero partitions".into(),
                populated(),
                declare("u", KeyType::Int4, None, Some(0)),
                "partitions must be",
            ),
            (
                "too many partitions".into(),
                populated(),
                declare("u", KeyType::Int4, None, Some(PARTITIONS_MAX + 1)),
                "partitions must be",
            ),
            (
                "far too many partitions".into(),
                populated(),
                declare("u", KeyType::Int4, None, Some(5000)),
                "partitions must be",
            ),
            (
                "zero partitions in an existing group".into(),
                populated(),
                declare("u", KeyType::Int4, Some("int4_4"), Some(0)),
                "partitions must be",
            ),
            (
                "group key type mismatch".into(),
                populated(),
                declare("u", KeyType::Int8, Some("int4_4"), Some(4)),
                "has key type int4, not int8",
            ),
            (
                "default group name taken by another key type".into(),
                with(
                    populated(),
                    [declare("u", KeyType::Text, Some("int8_64"), Some(64))],
                ),
                declare("v", KeyType::Int8, None, None),
                "has key type text, not int8",
            ),
            (
                "group modulus mismatch".into(),
                populated(),
                declare("u", KeyType::Int4, Some("int4_4"), Some(8)),
                "has 4 partitions, not 8",
            ),
            (
                "drop an unknown table".into(),
                populated(),
                drop_table("nope"),
                "not declared",
            ),
            (
                "drop a dropped table".into(),
                with(populated(), [drop_table("t")]),
                drop_table("t"),
                "not declared",
            ),
            (
                "renew for an unknown proxy".into(),
                populated(),
                renew("q", 0, 1_000),
                "not registered",
            ),
            (
                "renew after deregistering".into(),
                with(populated(), [Command::DeregisterProxy { id: "p".into() }]),
                renew("p", 0, 1_000),
                "not registered",
            ),
            (
                "renew with zero ttl".into(),
                populated(),
                renew("p", 0, 0),
                "positive ttl",
            ),
            (
                "register with zero ttl".into(),
                populated(),
                register("q", 0, 0),
                "positive ttl",
            ),
            (
                "ack for an unknown proxy".into(),
                populated(),
                ack("q", 1),
                "not registered",
            ),
            (
                "ack an epoch ahead of the map".into(),
                populated(),
                ack("p", 4),
                "ahead of the map",
            ),
            (
                "ack far ahead".into(),
                populated(),
                ack("p", u64::MAX),
                "ahead of the map",
            ),
            (
                "deregister an unknown proxy".into(),
                populated(),
                Command::DeregisterProxy { id: "q".into() },
                "not registered",
            ),
        ];
        for bad in [
            "",
            "Users",
            "1t",
            "a-b",
            "a b",
            "naïve",
            "t;drop",
            long_name.as_str(),
        ] {
            cases.push((
                format!("table name {bad:?}"),
                populated(),
                declare(bad, KeyType::Int4, None, None),
                "must be 1-48 characters",
            ));
            cases.push((
                format!("key column {bad:?}"),
                populated(),
                Command::DeclareTable {
                    name: "u".into(),
                    key: bad.into(),
                    key_type: KeyType::Int4,
                    group: None,
                    partitions: None,
                },
                "must be 1-48 characters",
            ));
            cases.push((
                format!("new group name {bad:?}"),
                populated(),
                declare("u", KeyType::Int4, Some(bad), None),
                "must be 1-48 characters",
            ));
            cases.push((
                format!("flag name {bad:?}"),
                populated(),
                Command::SetFlag {
                    name: bad.into(),
                    value: Some("on".into()),
                },
                "must be 1-48 characters",
            ));
        }
        for bad in [
            "", "db", "db:", ":5432", "db:0", "db:65536", "db:port", "db:-1", "db:5432 ",
        ] {
            let refusal = "is not host:port";
            cases.push((
                format!("primary {bad:?}"),
                vec![],
                Command::AddShard {
                    id: ShardId(0),
                    primary: bad.into(),
                    replicas: vec![],
                },
                refusal,
            ));
            cases.push((
                format!("replica {bad:?}"),
                vec![],
                Command::AddShard {
                    id: ShardId(0),
                    primary: "db0:5432".into(),
                    replicas: vec!["db0r:5432".into(), bad.into()],
                },
                refusal,
            ));
            cases.push((
                format!("new primary {bad:?}"),
                populated(),
                shard_addresses(1, bad, &[]),
                refusal,
            ));
            cases.push((
                format!("new replica {bad:?}"),
                populated(),
                shard_addresses(1, "db1:5432", &[bad]),
                refusal,
            ));
        }
        for bad in ["", "a b", "p\t1", "é", long_proxy.as_str()] {
            cases.push((
                format!("proxy id {bad:?}"),
                populated(),
                register(bad, 0, 1_000),
                "proxy id",
            ));
        }
        for (what, setup, command, because) in cases {
            let before = state(&setup);
            let mut after = before.clone();
            let refused = command.validate(&before).expect_err(&what);
            assert!(
                refused.0.contains(because),
                "{what}: refused with {refused:?}, expected {because:?}"
            );
            assert_eq!(command.apply(&mut after), Err(refused), "{what}: apply");
            assert_eq!(after, before, "{what}: a refused command changed the state");
        }
    }

    #[test]
    fn the_last_table_of_a_moving_group_cannot_be_dropped() {
        let mut state = state(&populated());
        let from = state.map.groups["int4_4"].partitions[0].owner;
        let to = if from == ShardId(0) { 1 } else { 0 };
        start_move(&mut state, "int4_4", to);

        // Dropping it would drop the group while a rebalancer works on it.
        let before = state.clone();
        let refused = drop_table("t")
            .apply(&mut state)
            .expect_err("last table of a moving group");
        assert!(
            refused.0.contains("partition move in progress"),
            "{refused:?}"
        );
        assert_eq!(state, before);

        // With a second table in the group, one of them can go.
        declare("t2", KeyType::Int4, Some("int4_4"), None)
            .apply(&mut state)
            .expect("joins the group");
        drop_table("t")
            .apply(&mut state)
            .expect("not the last table");
        assert!(state.map.groups.contains_key("int4_4"));
        assert_eq!(state.map.check_invariants(), Ok(()));
    }

    #[test]
    fn a_move_target_cannot_be_removed_though_it_owns_nothing() {
        // Shard 9 joins after the group was placed, so it owns nothing.
        let mut state = state(&with(populated(), [add_shard(9)]));
        assert_eq!(state.map.partitions_owned(ShardId(9)), 0);
        start_move(&mut state, "int4_4", 9);

        let before = state.clone();
        let refused = Command::RemoveShard { id: ShardId(9) }
            .apply(&mut state)
            .expect_err("a move target");
        assert!(
            refused.0.contains("target of a partition move"),
            "{refused:?}"
        );
        assert_eq!(state, before);

        // Once the move is rolled back the shard can go.
        state
            .map
            .groups
            .get_mut("int4_4")
            .expect("exists")
            .partitions[0]
            .state = PartitionState::Stable;
        Command::RemoveShard { id: ShardId(9) }
            .apply(&mut state)
            .expect("owns nothing, receives nothing");
    }

    #[test]
    fn a_new_group_is_placed_by_rendezvous_hashing() {
        let shards = [ShardId(0), ShardId(2), ShardId(3), ShardId(5)];
        let mut state = state(&shards.map(|s| add_shard(s.0)));
        declare("events", KeyType::Int8, None, None)
            .apply(&mut state)
            .expect("valid");

        let group = &state.map.groups["int8_64"];
        assert_eq!(group.name, "int8_64");
        assert_eq!(group.key_type, KeyType::Int8);
        assert_eq!(group.modulus(), PARTITIONS_DEFAULT);
        let owners: Vec<ShardId> = group.partitions.iter().map(|p| p.owner).collect();
        assert_eq!(owners, placement::target(PARTITIONS_DEFAULT, &shards));
        assert!(group
            .partitions
            .iter()
            .all(|p| p.state == PartitionState::Stable));
        assert_eq!(
            state.map.tables["events"],
            Table {
                name: "events".into(),
                key: "id".into(),
                key_type: KeyType::Int8,
                group: "int8_64".into(),
            }
        );

        // A second table joins the group as it is, even after the shards changed.
        add_shard(7).apply(&mut state).expect("new shard");
        let placed = state.map.groups["int8_64"].clone();
        declare("clicks", KeyType::Int8, None, None)
            .apply(&mut state)
            .expect("valid");
        assert_eq!(state.map.groups["int8_64"], placed);
        assert_eq!(state.map.tables["clicks"].group, "int8_64");

        // A named group over the new shard set follows the new target.
        declare("users", KeyType::Text, Some("accounts"), Some(16))
            .apply(&mut state)
            .expect("valid");
        let owners: Vec<ShardId> = state.map.groups["accounts"]
            .partitions
            .iter()
            .map(|p| p.owner)
            .collect();
        let all: Vec<ShardId> = state.map.shards.keys().copied().collect();
        assert_eq!(owners, placement::target(16, &all));
    }

    #[test]
    fn dropping_the_last_table_of_a_group_removes_the_group() {
        let mut state = state(&with(
            populated(),
            [
                declare("u", KeyType::Int4, None, Some(4)),
                declare("v", KeyType::Text, Some("g"), Some(2)),
            ],
        ));
        drop_table("t").apply(&mut state).expect("declared");
        assert!(state.map.groups.contains_key("int4_4"), "u still uses it");
        drop_table("u").apply(&mut state).expect("declared");
        assert!(!state.map.groups.contains_key("int4_4"));
        assert!(state.map.groups.contains_key("g"));
        drop_table("v").apply(&mut state).expect("declared");
        assert!(state.map.groups.is_empty());
        assert!(state.map.tables.is_empty());
        // With no tables left, every shard can go, the home shard included.
        for id in [0, 1] {
            Command::RemoveShard { id: ShardId(id) }
                .apply(&mut state)
                .expect("owns nothing");
        }
        assert!(state.map.shards.is_empty());
        assert_eq!(state.map.epoch, router::Epoch(10));
    }

    #[test]
    fn shard_addresses_and_flags_are_replaced() {
        let mut state = state(&populated());
        shard_addresses(1, "db1new:5433", &["db1a:5432"])
            .apply(&mut state)
            .expect("known shard");
        assert_eq!(
            state.map.shards[&ShardId(1)],
            Shard {
                id: ShardId(1),
                primary: "db1new:5433".into(),
                replicas: vec!["db1a:5432".into()],
            }
        );
        let set = |value: Option<&str>| Command::SetFlag {
            name: "read_only".into(),
            value: value.map(Into::into),
        };
        set(Some("on")).apply(&mut state).expect("valid");
        set(Some("off")).apply(&mut state).expect("valid");
        assert_eq!(state.map.flags["read_only"], "off");
        set(None).apply(&mut state).expect("valid");
        assert!(state.map.flags.is_empty());
    }

    #[test]
    fn renewing_a_lease_never_shortens_it() {
        let mut state = state(&[register("p", 1_000, 10_000)]);
        let expires = |s: &MetaState| s.proxies["p"].expires_ms;
        assert_eq!(expires(&state), 11_000);
        // (now_ms, ttl_ms, expiry after the renewal)
        for (now_ms, ttl_ms, after) in [
            (2_000, 1_000, 11_000),
            (5_000, 6_000, 11_000),
            (5_000, 6_001, 11_001),
            (0, 1, 11_001),
            (20_000, 1_000, 21_000),
            (u64::MAX - 1, 10, u64::MAX),
            (0, 1, u64::MAX),
        ] {
            renew("p", now_ms, ttl_ms)
                .apply(&mut state)
                .expect("registered");
            assert_eq!(expires(&state), after, "renew at {now_ms} for {ttl_ms}");
        }
    }

    #[test]
    fn acks_keep_the_newest_epoch_across_reregistration() {
        let mut state = state(&populated());
        ack("p", 3).apply(&mut state).expect("current epoch");
        ack("p", 1).apply(&mut state).expect("an old epoch is fine");
        assert_eq!(state.proxies["p"].acked_epoch, 3, "an ack never goes back");
        register("p", 50_000, 1_000)
            .apply(&mut state)
            .expect("again");
        assert_eq!(
            state.proxies["p"],
            ProxyLease {
                id: "p".into(),
                addr: "10.0.0.9:6432".into(),
                expires_ms: 51_000,
                acked_epoch: 3,
            }
        );
        Command::DeregisterProxy { id: "p".into() }
            .apply(&mut state)
            .expect("registered");
        register("p", 0, 1_000).apply(&mut state).expect("fresh");
        assert_eq!(
            state.proxies["p"].acked_epoch, 0,
            "a new registration starts over"
        );
    }

    #[test]
    fn acks_split_live_proxies_and_ignore_expired_ones() {
        let lease = |id: &str, expires_ms: u64, acked_epoch: u64| ProxyLease {
            id: id.into(),
            addr: "10.0.0.9:6432".into(),
            expires_ms,
            acked_epoch,
        };
        let mut state = MetaState::default();
        for p in [
            lease("ahead", 2_000, 7),
            lease("current", 2_000, 5),
            lease("behind", 2_000, 4),
            lease("never", 1_001, 0),
            lease("expired_acked", 1_000, 9),
            lease("expired_behind", 999, 1),
        ] {
            state.proxies.insert(p.id.clone(), p);
        }
        // (epoch, now_ms, acknowledged, pending)
        let cases: [(u64, u64, &[&str], &[&str]); 5] = [
            (5, 1_000, &["ahead", "current"], &["behind", "never"]),
            (0, 1_000, &["ahead", "behind", "current", "never"], &[]),
            (8, 1_000, &[], &["ahead", "behind", "current", "never"]),
            (5, 1_500, &["ahead", "current"], &["behind"]),
            (5, 2_000, &[], &[]),
        ];
        for (epoch, now_ms, acknowledged, pending) in cases {
            let acks = state.acks(router::Epoch(epoch), now_ms);
            assert_eq!(acks.epoch, epoch);
            assert_eq!(acks.acknowledged, acknowledged, "epoch {epoch} at {now_ms}");
            assert_eq!(acks.pending, pending, "epoch {epoch} at {now_ms}");
        }
    }
}
