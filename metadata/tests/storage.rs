//! Storage tests: openraft's conformance suite over `LogStore` +
//! `StateMachineStore` (in memory and with snapshots on disk), durability of
//! the redb log and of snapshots across a reopen, and the state machine's
//! commands, snapshots and map history.
//!
//! The suite is what openraft itself trusts a storage implementation with;
//! the other tests cover what it cannot see: our `Command`s and what readers
//! of the applied map are promised.

use std::collections::{BTreeMap, BTreeSet};

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{log_id, StoreBuilder, Suite};
use openraft::{
    BasicNode, Entry, EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder, StorageIOError,
    Vote,
};
use tempfile::TempDir;

use metadata::state_machine::{HISTORY_MAX, SNAPSHOT_FILE};
use metadata::{Applied, Command, LogStore, StateMachineStore, TypeConfig};
use router::{KeyType, ShardId};

type StorageError = openraft::StorageError<u64>;

/// A fresh log store in its own temp dir (removed when the guard drops) and
/// a fresh state machine, in memory or saving its snapshots in the same dir.
struct Builder {
    snapshots_on_disk: bool,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("a temp dir can be created");
        let error = |e: metadata::Error| StorageIOError::write(openraft::AnyError::new(&e));
        let log = LogStore::open(dir.path()).map_err(error)?;
        let sm = if self.snapshots_on_disk {
            StateMachineStore::open(dir.path()).map_err(error)?
        } else {
            StateMachineStore::new()
        };
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    // Runs each case in its own tokio runtime, so this is a plain #[test].
    Suite::test_all(Builder {
        snapshots_on_disk: false,
    })
    .expect("LogStore + StateMachineStore pass openraft's suite");
}

#[test]
fn openraft_storage_suite_with_snapshots_on_disk() {
    Suite::test_all(Builder {
        snapshots_on_disk: true,
    })
    .expect("LogStore + StateMachineStore::open pass openraft's suite");
}

fn normal(term: u64, index: u64, command: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Normal(command),
    }
}

fn blank(term: u64, index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Blank,
    }
}

fn membership(term: u64, index: u64) -> Entry<TypeConfig> {
    let voters = BTreeSet::from([1u64, 2, 3]);
    let nodes: BTreeMap<u64, BasicNode> = voters
        .iter()
        .map(|&id| (id, BasicNode::new(format!("127.0.0.1:{}", 7000 + id))))
        .collect();
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)),
    }
}

fn add_shard(id: u32) -> Command {
    Command::AddShard {
        id: ShardId(id),
        primary: format!("127.0.0.1:{}", 5432 + id),
        replicas: vec![],
    }
}

#[tokio::test]
async fn log_and_vote_survive_reopen() {
    // Arrange: a store with entries, a vote, a commit point and a purge.
    let dir = tempfile::tempdir().expect("a temp dir can be created");
    let entries = vec![
        blank(1, 0),
        membership(1, 1),
        normal(1, 2, add_shard(0)),
        normal(2, 3, add_shard(1)),
        normal(2, 4, Command::RemoveShard { id: ShardId(1) }),
    ];
    let vote = Vote::new(2, 1);
    {
        let mut store = LogStore::open(dir.path()).expect("open");
        store
            .blocking_append(entries.clone())
            .await
            .expect("append");
        store.save_vote(&vote).await.expect("save_vote");
        store
            .save_committed(Some(log_id(2, 1, 3)))
            .await
            .expect("save_committed");
        store.purge(log_id(1, 1, 0)).await.expect("purge");
        store.truncate(log_id(2, 1, 4)).await.expect("truncate");
    }

    // Act: reopen the same directory.
    let mut store = LogStore::open(dir.path()).expect("reopen");

    // Check: everything written is read back.
    assert_eq!(store.read_vote().await.expect("read_vote"), Some(vote));
    assert_eq!(
        store.read_committed().await.expect("read_committed"),
        Some(log_id(2, 1, 3))
    );
    let state = store.get_log_state().await.expect("get_log_state");
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 0)));
    assert_eq!(state.last_log_id, Some(log_id(2, 1, 3)));
    let read = store.try_get_log_entries(0..).await.expect("read entries");
    assert_eq!(read, entries[1..4].to_vec());
    let mut reader = store.get_log_reader().await;
    let read = reader.try_get_log_entries(2..=2).await.expect("read one");
    assert_eq!(read, entries[2..3].to_vec());
}

#[tokio::test]
async fn an_empty_store_reopens_empty() {
    let dir = tempfile::tempdir().expect("a temp dir can be created");
    drop(LogStore::open(dir.path()).expect("open"));

    let mut store = LogStore::open(dir.path()).expect("reopen");

    assert_eq!(store.read_vote().await.expect("read_vote"), None);
    assert_eq!(store.read_committed().await.expect("read_committed"), None);
    let state = store.get_log_state().await.expect("get_log_state");
    assert_eq!((state.last_purged_log_id, state.last_log_id), (None, None));
}

#[tokio::test]
async fn applies_commands_and_reports_refusals() {
    let mut sm = StateMachineStore::new();
    let mut epochs = sm.subscribe();

    let replies = sm
        .apply([
            blank(1, 1),
            normal(1, 2, add_shard(0)),
            normal(1, 3, add_shard(0)),
            membership(1, 4),
            normal(1, 5, add_shard(1)),
            normal(
                1,
                6,
                Command::DeclareTable {
                    name: "users".into(),
                    key: "id".into(),
                    key_type: KeyType::Int8,
                    group: None,
                    partitions: Some(8),
                },
            ),
        ])
        .await
        .expect("apply");

    let epochs_seen: Vec<u64> = replies.iter().map(|r| r.epoch).collect();
    assert_eq!(epochs_seen, [0, 1, 1, 1, 2, 3]);
    let refused: Vec<bool> = replies.iter().map(|r| r.refused.is_some()).collect();
    assert_eq!(refused, [false, false, true, false, false, false]);
    assert_eq!(
        replies[1],
        Applied {
            epoch: 1,
            refused: None
        }
    );

    let state = sm.state();
    assert_eq!(state.map.epoch.0, 3);
    assert_eq!(state.map.shards.len(), 2);
    assert!(state.map.tables.contains_key("users"));
    assert_eq!(sm.last_applied(), Some(log_id(1, 1, 6)));
    let (applied, members) = sm.applied_state().await.expect("applied_state");
    assert_eq!(applied, Some(log_id(1, 1, 6)));
    assert_eq!(members.log_id(), &Some(log_id(1, 1, 4)));

    assert!(epochs.has_changed().expect("sender alive"));
    assert_eq!(*epochs.borrow_and_update(), 3);

    // A registry-only command moves the log but not the map's epoch.
    sm.apply([normal(
        1,
        7,
        Command::RegisterProxy {
            id: "p1".into(),
            addr: "127.0.0.1:6432".into(),
            now_ms: 1_000,
            ttl_ms: 10_000,
        },
    )])
    .await
    .expect("apply");
    assert_eq!(sm.state().map.epoch.0, 3);
    assert!(sm.state().proxies.contains_key("p1"));
    assert!(!epochs.has_changed().expect("sender alive"));
}

#[tokio::test]
async fn snapshot_installs_into_a_fresh_state_machine() {
    // Arrange: a leader state machine with shards, a table and a proxy.
    let mut leader = StateMachineStore::new();
    leader.apply(populated()).await.expect("apply");
    let snapshot = snapshot_of(&mut leader).await;
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 1, 5)));

    // Act: stream it into a fresh follower.
    let mut follower = StateMachineStore::new();
    let mut epochs = follower.subscribe();
    let mut receiving = follower
        .begin_receiving_snapshot()
        .await
        .expect("begin_receiving_snapshot");
    *receiving = *snapshot.snapshot.clone();
    follower
        .install_snapshot(&snapshot.meta, receiving)
        .await
        .expect("install_snapshot");

    // Check: same state, same applied log id and membership, and the
    // follower's watchers hear the new epoch and get the map.
    assert_eq!(follower.state(), leader.state());
    assert_eq!(follower.last_applied(), leader.last_applied());
    assert_eq!(
        follower.applied_state().await.expect("applied_state"),
        leader.applied_state().await.expect("applied_state"),
    );
    assert!(epochs.has_changed().expect("sender alive"));
    assert_eq!(*epochs.borrow_and_update(), 3);
    let maps = follower.maps_after(0);
    assert_eq!(maps.len(), 1, "history restarts at the installed map");
    assert_eq!(*maps[0], leader.state().map);
    let current = follower
        .get_current_snapshot()
        .await
        .expect("get_current_snapshot")
        .expect("a snapshot was installed");
    assert_eq!(current.meta, snapshot.meta);
    assert_eq!(current.snapshot.get_ref(), snapshot.snapshot.get_ref());
}

#[tokio::test]
async fn a_snapshot_that_does_not_match_its_meta_is_refused() {
    let mut leader = StateMachineStore::new();
    leader
        .apply([normal(1, 1, add_shard(0))])
        .await
        .expect("apply");
    let snapshot = snapshot_of(&mut leader).await;
    let mut follower = StateMachineStore::new();

    let mut wrong_meta = snapshot.meta.clone();
    wrong_meta.last_log_id = Some(log_id(1, 1, 9));
    let err = follower
        .install_snapshot(&wrong_meta, snapshot.snapshot.clone())
        .await;
    assert!(err.is_err(), "meta that disagrees with the body");
    let garbage = Box::new(std::io::Cursor::new(vec![0xff; 7]));
    let err = follower.install_snapshot(&snapshot.meta, garbage).await;
    assert!(err.is_err(), "bytes that do not decode");

    assert_eq!(follower.last_applied(), None);
    assert_eq!(follower.state().map.epoch.0, 0);
}

#[tokio::test]
async fn maps_after_returns_every_epoch_in_order() {
    let mut sm = StateMachineStore::new();
    let flag = |index: u64, n: u64| {
        normal(
            1,
            index,
            Command::SetFlag {
                name: "f".into(),
                value: Some(n.to_string()),
            },
        )
    };
    // Two batches, so history crosses batch boundaries.
    sm.apply((1..=10).map(|i| flag(i, i))).await.expect("apply");
    sm.apply((11..=20).map(|i| flag(i, i)))
        .await
        .expect("apply");

    let epochs = |maps: Vec<std::sync::Arc<router::ShardMap>>| -> Vec<u64> {
        maps.iter().map(|m| m.epoch.0).collect()
    };
    assert_eq!(epochs(sm.maps_after(0)), (1..=20).collect::<Vec<_>>());
    assert_eq!(epochs(sm.maps_after(17)), [18, 19, 20]);
    assert!(sm.maps_after(20).is_empty());
    assert!(sm.maps_after(1_000).is_empty());
    // Each map is the map as it was at its epoch.
    for map in sm.maps_after(0) {
        assert_eq!(map.flags["f"], map.epoch.0.to_string());
    }
}

#[tokio::test]
async fn maps_after_keeps_a_bounded_history_ending_at_the_latest_map() {
    let mut sm = StateMachineStore::new();
    let total = HISTORY_MAX as u64 + 10;
    let entries: Vec<Entry<TypeConfig>> = (1..=total)
        .map(|i| {
            normal(
                1,
                i,
                Command::SetFlag {
                    name: "f".into(),
                    value: Some(i.to_string()),
                },
            )
        })
        .collect();
    sm.apply(entries).await.expect("apply");

    let maps = sm.maps_after(0);

    assert_eq!(maps.len(), HISTORY_MAX);
    assert_eq!(maps[0].epoch.0, total - HISTORY_MAX as u64 + 1);
    assert_eq!(maps[HISTORY_MAX - 1].epoch.0, total);
    assert!(maps.windows(2).all(|w| w[0].epoch.0 + 1 == w[1].epoch.0));
    assert_eq!(*maps[HISTORY_MAX - 1], sm.state().map);
}

#[tokio::test]
async fn readers_keep_their_state_while_later_entries_apply() {
    let mut sm = StateMachineStore::new();
    sm.apply([normal(1, 1, add_shard(0))]).await.expect("apply");
    let before = sm.state();

    sm.apply([normal(1, 2, add_shard(1))]).await.expect("apply");

    assert_eq!(before.map.shards.len(), 1, "a held state never changes");
    assert_eq!(sm.state().map.shards.len(), 2);
}

/// A membership, two shards, a table and a proxy: indexes 1 to 5.
fn populated() -> Vec<Entry<TypeConfig>> {
    vec![
        membership(1, 1),
        normal(1, 2, add_shard(0)),
        normal(1, 3, add_shard(1)),
        normal(
            1,
            4,
            Command::DeclareTable {
                name: "orders".into(),
                key: "customer_id".into(),
                key_type: KeyType::Int8,
                group: None,
                partitions: None,
            },
        ),
        normal(
            1,
            5,
            Command::RegisterProxy {
                id: "p1".into(),
                addr: "127.0.0.1:6432".into(),
                now_ms: 1_000,
                ttl_ms: 10_000,
            },
        ),
    ]
}

#[tokio::test]
async fn a_built_snapshot_survives_reopen() {
    // Arrange: a store opened from a dir, with a snapshot at index 5 and one
    // more entry applied after it.
    let dir = tempfile::tempdir().expect("a temp dir can be created");
    let (state, applied, snapshot) = {
        let mut sm = StateMachineStore::open(dir.path()).expect("open");
        sm.apply(populated()).await.expect("apply");
        let snapshot = snapshot_of(&mut sm).await;
        let at_snapshot = (
            sm.state(),
            sm.applied_state().await.expect("applied_state"),
            snapshot,
        );
        sm.apply([normal(1, 6, add_shard(2))]).await.expect("apply");
        at_snapshot
    };
    assert!(dir.path().join(SNAPSHOT_FILE).exists());

    // Act: reopen the same directory.
    let mut sm = StateMachineStore::open(dir.path()).expect("reopen");

    // Check: the state, applied log id and membership of the snapshot, the
    // snapshot itself, and a history that starts at its map.
    assert_eq!(sm.state(), state);
    assert_eq!(sm.last_applied(), Some(log_id(1, 1, 5)));
    assert_eq!(sm.applied_state().await.expect("applied_state"), applied);
    assert_eq!(applied.1.log_id(), &Some(log_id(1, 1, 1)));
    let current = sm
        .get_current_snapshot()
        .await
        .expect("get_current_snapshot")
        .expect("the snapshot was loaded");
    assert_eq!(current.meta.last_log_id, snapshot.meta.last_log_id);
    assert_eq!(current.meta.last_membership, snapshot.meta.last_membership);
    assert_eq!(current.snapshot.get_ref(), snapshot.snapshot.get_ref());
    let maps = sm.maps_after(0);
    assert_eq!(maps.len(), 1, "history starts at the loaded map");
    assert_eq!(*maps[0], state.map);
    assert_eq!(*sm.subscribe().borrow(), state.map.epoch.0);

    // A later snapshot replaces it on disk.
    sm.apply([normal(1, 6, add_shard(2))]).await.expect("apply");
    snapshot_of(&mut sm).await;
    let state = sm.state();
    drop(sm);
    let sm = StateMachineStore::open(dir.path()).expect("reopen");
    assert_eq!(sm.state(), state);
    assert_eq!(sm.last_applied(), Some(log_id(1, 1, 6)));
}

#[tokio::test]
async fn an_installed_snapshot_survives_reopen() {
    let mut leader = StateMachineStore::new();
    leader.apply(populated()).await.expect("apply");
    let snapshot = snapshot_of(&mut leader).await;
    let dir = tempfile::tempdir().expect("a temp dir can be created");
    {
        let mut follower = StateMachineStore::open(dir.path()).expect("open");
        follower
            .install_snapshot(&snapshot.meta, snapshot.snapshot.clone())
            .await
            .expect("install_snapshot");
    }

    let mut follower = StateMachineStore::open(dir.path()).expect("reopen");

    assert_eq!(follower.state(), leader.state());
    assert_eq!(follower.last_applied(), leader.last_applied());
    assert_eq!(
        follower.applied_state().await.expect("applied_state"),
        leader.applied_state().await.expect("applied_state"),
    );
    let current = follower
        .get_current_snapshot()
        .await
        .expect("get_current_snapshot")
        .expect("the snapshot was loaded");
    assert_eq!(current.snapshot.get_ref(), snapshot.snapshot.get_ref());
}

#[tokio::test]
async fn a_store_opened_from_a_dir_without_a_snapshot_is_empty() {
    let dir = tempfile::tempdir().expect("a temp dir can be created");
    let mut sm = StateMachineStore::open(dir.path()).expect("open");
    sm.apply(populated()).await.expect("apply");
    drop(sm);

    // Nothing was saved without a snapshot: applied entries are the log's job.
    assert!(!dir.path().join(SNAPSHOT_FILE).exists());
    let mut sm = StateMachineStore::open(dir.path()).expect("reopen");
    assert_eq!(*sm.state(), metadata::MetaState::default());
    assert_eq!(sm.last_applied(), None);
    let current = sm
        .get_current_snapshot()
        .await
        .expect("get_current_snapshot");
    assert!(current.is_none());
}

#[tokio::test]
async fn a_snapshot_file_that_does_not_decode_is_an_error() {
    let dir = tempfile::tempdir().expect("a temp dir can be created");
    {
        let mut sm = StateMachineStore::open(dir.path()).expect("open");
        sm.apply(populated()).await.expect("apply");
        snapshot_of(&mut sm).await;
    }
    let path = dir.path().join(SNAPSHOT_FILE);
    let bytes = std::fs::read(&path).expect("the snapshot was saved");

    for (what, broken) in [
        ("truncated", bytes[..bytes.len() - 1].to_vec()),
        ("trailing bytes", [bytes.as_slice(), &[0]].concat()),
        ("garbage", vec![0xff; 7]),
    ] {
        std::fs::write(&path, broken).expect("write");
        let opened = StateMachineStore::open(dir.path());
        assert!(
            matches!(opened, Err(metadata::Error::Storage(_))),
            "{what}: opened anyway"
        );
    }
}

/// Builds a snapshot of `sm` as openraft would.
async fn snapshot_of(sm: &mut StateMachineStore) -> openraft::Snapshot<TypeConfig> {
    sm.get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("build_snapshot")
}
