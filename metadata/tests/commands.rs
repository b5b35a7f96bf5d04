//! Random command sequences against the metadata state: a refused command
//! changes nothing, an accepted one keeps the map's invariants and its epoch rule.
//!
//! The id and name spaces are small on purpose so that sequences run into
//! duplicates, unknown ids, mismatched groups and shards that still own
//! partitions, the cases the unit tests in `command.rs` list one by one.

use metadata::{Command, MetaState};
use proptest::prelude::*;
use router::{KeyType, ShardId};

/// One generated step. `AckEpoch` is generated relative to the map's epoch at
/// the time it runs, since a sequence cannot know its epoch up front.
#[derive(Clone, Debug)]
enum Step {
    Command(Command),
    AckEpoch { id: String, delta: i64 },
}

impl Step {
    fn command(&self, state: &MetaState) -> Command {
        match self {
            Step::Command(c) => c.clone(),
            Step::AckEpoch { id, delta } => Command::AckEpoch {
                id: id.clone(),
                epoch: state.map.epoch.0.saturating_add_signed(*delta),
            },
        }
    }
}

/// Mostly valid, sometimes not.
fn address() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["db1:5432", "10.0.0.2:6432", "[::1]:5433"]),
        1 => prop::sample::select(vec!["", "db", "db:0", "db:99999", ":5432"]),
    ]
    .prop_map(String::from)
}

fn identifier(
    valid: &'static [&'static str],
    invalid: &'static [&'static str],
) -> BoxedStrategy<String> {
    prop_oneof![
        8 => prop::sample::select(valid),
        1 => prop::sample::select(invalid),
    ]
    .prop_map(String::from)
    .boxed()
}

fn table() -> BoxedStrategy<String> {
    identifier(
        &["users", "orders", "items", "events"],
        &["Users", "", "1t"],
    )
}

fn shard_id() -> impl Strategy<Value = ShardId> {
    (0u32..6).prop_map(ShardId)
}

fn proxy_id() -> BoxedStrategy<String> {
    identifier(&["p1", "p2", "10.0.0.9:6432-77"], &["", "bad id"])
}

fn key_type() -> impl Strategy<Value = KeyType> {
    prop::sample::select(KeyType::ALL.to_vec())
}

fn now_ms() -> impl Strategy<Value = u64> {
    0u64..100_000
}

fn ttl_ms() -> impl Strategy<Value = u64> {
    prop_oneof![1 => Just(0u64), 4 => 1u64..60_000]
}

fn step() -> impl Strategy<Value = Step> {
    let command = prop_oneof![
        4 => (shard_id(), address(), prop::collection::vec(address(), 0..3))
            .prop_map(|(id, primary, replicas)| Command::AddShard { id, primary, replicas }),
        1 => (shard_id(), address(), prop::collection::vec(address(), 0..3))
            .prop_map(|(id, primary, replicas)| Command::SetShardAddresses { id, primary, replicas }),
        2 => shard_id().prop_map(|id| Command::RemoveShard { id }),
        5 => (
            table(),
            identifier(&["id", "user_id"], &["Key"]),
            key_type(),
            prop::option::weighted(
                0.5,
                identifier(&["g1", "g2", "int4_8"], &["Bad-group"]),
            ),
            prop::option::weighted(
                0.7,
                prop::sample::select(vec![1u32, 4, 8, 64, 0, 5000]),
            ),
        )
            .prop_map(|(name, key, key_type, group, partitions)| Command::DeclareTable {
                name,
                key,
                key_type,
                group,
                partitions,
            }),
        3 => table().prop_map(|name| Command::DropTable { name }),
        1 => (
            identifier(&["read_only", "cache"], &["Flag"]),
            prop::option::of(prop::sample::select(vec!["on", "off"]).prop_map(String::from)),
        )
            .prop_map(|(name, value)| Command::SetFlag { name, value }),
        2 => (proxy_id(), address(), now_ms(), ttl_ms())
            .prop_map(|(id, addr, now_ms, ttl_ms)| Command::RegisterProxy { id, addr, now_ms, ttl_ms }),
        2 => (proxy_id(), now_ms(), ttl_ms())
            .prop_map(|(id, now_ms, ttl_ms)| Command::RenewLease { id, now_ms, ttl_ms }),
        1 => proxy_id().prop_map(|id| Command::DeregisterProxy { id }),
    ];
    prop_oneof![
        9 => command.prop_map(Step::Command),
        2 => (proxy_id(), -3i64..=2).prop_map(|(id, delta)| Step::AckEpoch { id, delta }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn commands_keep_the_state_valid(steps in prop::collection::vec(step(), 0..=60)) {
        let mut state = MetaState::default();
        for (i, step) in steps.iter().enumerate() {
            let command = step.command(&state);
            let before = state.clone();
            match command.validate(&state) {
                Err(refused) => {
                    prop_assert_eq!(command.apply(&mut state), Err(refused), "step {}: {:?}", i, command);
                    prop_assert_eq!(&state, &before, "step {}: refused {:?} changed the state", i, command);
                }
                Ok(()) => {
                    prop_assert_eq!(command.apply(&mut state), Ok(()), "step {}: {:?}", i, command);
                    prop_assert_eq!(state.map.check_invariants(), Ok(()), "step {}: {:?}", i, command);
                    let registry = matches!(
                        command,
                        Command::RegisterProxy { .. }
                            | Command::RenewLease { .. }
                            | Command::AckEpoch { .. }
                            | Command::DeregisterProxy { .. }
                    );
                    if registry {
                        prop_assert_eq!(&state.map, &before.map, "step {}: {:?} changed the map", i, command);
                    } else {
                        prop_assert_eq!(state.map.epoch.0, before.map.epoch.0 + 1, "step {}: {:?}", i, command);
                        prop_assert_eq!(&state.proxies, &before.proxies, "step {}: {:?} changed the registry", i, command);
                    }
                    for group in state.map.groups.values() {
                        for (p, partition) in group.partitions.iter().enumerate() {
                            prop_assert!(
                                state.map.shards.contains_key(&partition.owner),
                                "step {}: {:?}: partition {} of group {} is owned by missing shard {}",
                                i, command, p, group.name, partition.owner
                            );
                        }
                    }
                    if let Command::RenewLease { id, .. } = &command {
                        prop_assert!(
                            state.proxies[id].expires_ms >= before.proxies[id].expires_ms,
                            "step {}: {:?} shortened the lease", i, command
                        );
                    }
                    for lease in state.proxies.values() {
                        prop_assert!(
                            lease.acked_epoch <= state.map.epoch.0,
                            "step {}: {:?}: proxy {} acked epoch {} of map epoch {}",
                            i, command, lease.id, lease.acked_epoch, state.map.epoch
                        );
                    }
                }
            }
        }
    }
}
