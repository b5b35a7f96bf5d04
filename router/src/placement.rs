//! Placement: which shard should own each partition, by rendezvous hashing.
//!
//! Every (partition, shard) pair gets a score `xxh3(partition, shard)`; the
//! partition belongs to the shard with the highest score. Adding a shard then
//! moves only the partitions it wins (about `P/N`), and removing one moves only
//! its own; nothing else is reshuffled. The metadata group stores the actual
//! placement explicitly; this is the *target* a rebalancer moves towards.

use twox_hash::XxHash3_64;

use crate::shard_map::{Group, KeyType, Partition, PartitionIdx, PartitionState, ShardId};

/// The rendezvous score of `shard` for `partition`.
pub fn score(partition: PartitionIdx, shard: ShardId) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&partition.0.to_le_bytes());
    bytes[4..].copy_from_slice(&shard.0.to_le_bytes());
    XxHash3_64::oneshot(&bytes)
}

/// The shard that should own `partition` among `shards`; `None` if there are none.
/// Ties (vanishingly rare) go to the lower shard id, so the answer is deterministic.
pub fn owner(partition: PartitionIdx, shards: &[ShardId]) -> Option<ShardId> {
    shards
        .iter()
        .copied()
        .max_by_key(|&s| (score(partition, s), std::cmp::Reverse(s)))
}

/// The target owner of every partition `0..modulus` among `shards`.
pub fn target(modulus: u32, shards: &[ShardId]) -> Vec<ShardId> {
    if shards.is_empty() {
        return Vec::new();
    }
    (0..modulus)
        .map(|i| owner(PartitionIdx(i), shards).expect("shards is not empty"))
        .collect()
}

/// A new group of `modulus` partitions, each stable on its rendezvous owner.
pub fn placed_group(name: &str, key_type: KeyType, modulus: u32, shards: &[ShardId]) -> Group {
    Group {
        name: name.to_owned(),
        key_type,
        partitions: target(modulus, shards)
            .into_iter()
            .map(|owner| Partition {
                owner,
                state: PartitionState::Stable,
            })
            .collect(),
    }
}

/// A partition whose current owner differs from its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Misplaced {
    pub partition: PartitionIdx,
    pub from: ShardId,
    pub to: ShardId,
}

/// The moves that would bring `group` to the rendezvous target over `shards`.
pub fn misplaced(group: &Group, shards: &[ShardId]) -> Vec<Misplaced> {
    let target = target(group.modulus(), shards);
    group
        .partitions
        .iter()
        .zip(target)
        .enumerate()
        .filter(|(_, (p, to))| p.owner != *to)
        .map(|(i, (p, to))| Misplaced {
            partition: PartitionIdx(i as u32),
            from: p.owner,
            to,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u32) -> Vec<ShardId> {
        (0..n).map(ShardId).collect()
    }

    #[test]
    fn adding_a_fifth_shard_moves_a_fifth_and_only_onto_it() {
        let before = target(64, &ids(4));
        let after = target(64, &ids(5));
        let moved: Vec<_> = (0..64).filter(|&i| before[i] != after[i]).collect();
        for &i in &moved {
            assert_eq!(
                after[i],
                ShardId(4),
                "partition {i} moved between old shards"
            );
        }
        let share = moved.len() as f64 / 64.0;
        assert!(
            (0.15..=0.25).contains(&share),
            "{} of 64 partitions moved ({share:.2})",
            moved.len()
        );
    }

    #[test]
    fn removing_a_shard_moves_only_its_partitions() {
        let before = target(256, &ids(5));
        let after = target(256, &[ShardId(0), ShardId(1), ShardId(3), ShardId(4)]);
        for i in 0..256 {
            if before[i] != ShardId(2) {
                assert_eq!(before[i], after[i], "partition {i} moved needlessly");
            } else {
                assert_ne!(after[i], ShardId(2));
            }
        }
    }

    #[test]
    fn placement_is_roughly_even_and_order_independent() {
        let shards = ids(4);
        let mut reversed = shards.clone();
        reversed.reverse();
        let t = target(1024, &shards);
        assert_eq!(t, target(1024, &reversed));
        for s in &shards {
            let n = t.iter().filter(|o| *o == s).count();
            assert!((192..=320).contains(&n), "shard {s} owns {n} of 1024");
        }
    }

    #[test]
    fn no_shards_no_placement() {
        assert!(target(8, &[]).is_empty());
        assert_eq!(owner(PartitionIdx(0), &[]), None);
    }
}
