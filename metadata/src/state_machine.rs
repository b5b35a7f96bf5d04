//! StateMachineStore: the metadata group's Raft state machine, the applied
//! `MetaState`, kept in memory, with the map history watchers are served from.
//!
//! It exists so that the rest of the crate reads the shard map without going
//! through Raft: `state()` hands out the latest applied `Arc<MetaState>`,
//! `subscribe()` wakes a watcher when the map's epoch changes, and
//! `maps_after()` returns the maps it missed, in epoch order.
//!
//! The state is small and changes rarely, so an apply batch works on a copy of
//! the state and then publishes it with one pointer swap under a short write
//! lock: readers never wait for a batch, only for the swap.
//!
//! The applied state itself is not persisted; the latest snapshot is, when the
//! store was opened with [`StateMachineStore::open`]. Every snapshot built or
//! installed is written to `<dir>/snapshot.bin` before it is reported done
//! (to a temp file in the same directory, fsynced, renamed over the old one,
//! then the directory fsynced), so the file always holds a whole snapshot and
//! openraft never purges log entries that no file on disk covers. On restart
//! `open` loads that snapshot, and openraft re-applies the log from just after
//! it up to the committed log id the `LogStore` saved. The writes run in
//! `tokio::task::spawn_blocking`, as the `LogStore`'s do; the load in `open`
//! is blocking, like `LogStore::open`, because it runs once, at startup.
//! [`StateMachineStore::new`] keeps everything in memory (for tests): a node
//! using it could not restart once its log was purged.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use router::ShardMap;

use crate::codec;
use crate::error::{Error, Result};
use crate::state::MetaState;
use crate::types::{Applied, LogId, NodeId, StorageError, TypeConfig};

/// How many of the most recent maps `maps_after` can return.
pub const HISTORY_MAX: usize = 1024;

/// The file inside the data directory that holds the latest snapshot.
pub const SNAPSHOT_FILE: &str = "snapshot.bin";

/// Where a snapshot is written before it is renamed over [`SNAPSHOT_FILE`].
/// One left behind by a crash is never read, and is overwritten by the next
/// write.
const SNAPSHOT_TEMP_FILE: &str = "snapshot.bin.tmp";

type Membership = StoredMembership<NodeId, BasicNode>;

/// The Raft state machine of the metadata group. Clones share the state.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Serialises the writers (apply, install_snapshot). openraft already
    /// calls them one at a time; this keeps clones from racing if one ever
    /// does not. Readers never take it.
    writer: tokio::sync::Mutex<()>,
    /// What readers see; replaced whole by each writer.
    applied: RwLock<Published>,
    /// The current map epoch, sent after `applied` changed it.
    epoch: watch::Sender<u64>,
    /// The latest snapshot built or installed.
    snapshot: RwLock<Option<StoredSnapshot>>,
    /// Makes snapshot ids unique when two are built at the same log id.
    snapshots_built: AtomicU64,
    /// Where snapshots are persisted; `None` for an in-memory store.
    disk: Option<Arc<SnapshotFile>>,
}

/// The snapshot file of a store opened with a directory.
struct SnapshotFile {
    dir: PathBuf,
    /// The last log id of the snapshot the file holds (outer `None`: no file
    /// yet). Held while the file is written, by the blocking task itself, so
    /// writes never interleave (even if the future that started one was
    /// dropped) and an older snapshot whose build finished late never
    /// replaces a newer one.
    saved: Mutex<Option<Option<LogId>>>,
}

struct Published {
    state: Arc<MetaState>,
    last_applied: Option<LogId>,
    last_membership: Membership,
    /// Maps of the most recent epochs, oldest first. Never empty: the last
    /// one is always `state.map`.
    history: VecDeque<Arc<ShardMap>>,
}

#[derive(Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// What a snapshot's bytes hold (codec-encoded).
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    last_applied: Option<LogId>,
    last_membership: Membership,
    state: MetaState,
}

// A writer only ever assigns fully built values under these locks, so a
// panic elsewhere while one was held cannot leave them half-updated: it is
// safe to keep using them after a poison.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl Default for StateMachineStore {
    fn default() -> Self {
        StateMachineStore::new()
    }
}

/// A snapshot's id: its last log id, and a counter that tells apart snapshots
/// of the same log id within one process (0 for one loaded from disk). Across
/// restarts an id may repeat, but only for the same log id, whose snapshot
/// holds the same bytes: the state is a deterministic function of the log.
fn snapshot_id(last_log_id: Option<LogId>, n: u64) -> String {
    match last_log_id {
        Some(log_id) => format!("{log_id}-{n}"),
        None => format!("none-{n}"),
    }
}

impl StateMachineStore {
    /// An empty state machine kept only in memory: nothing applied, the empty
    /// map at epoch 0, and snapshots that are lost with the process.
    pub fn new() -> StateMachineStore {
        StateMachineStore::with(
            MetaState::default(),
            None,
            Membership::default(),
            None,
            None,
        )
    }

    /// Opens the state machine of the node whose data directory is `dir`,
    /// creating `dir` if needed: restored from `<dir>/snapshot.bin` if there
    /// is one (its state, last applied log id and membership, with the map
    /// history starting at its map), else empty. Every snapshot built or
    /// installed from now on is saved there (see the module doc).
    ///
    /// Blocking (it reads the file): call it at startup, before serving. A
    /// file that cannot be read or decoded is an error, never an empty state:
    /// the log it covered may be gone.
    pub fn open(dir: &Path) -> Result<StateMachineStore> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Storage(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(SNAPSHOT_FILE);
        let data = match std::fs::read(&path) {
            Ok(data) => Some(data),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::Storage(format!("reading {}: {e}", path.display()))),
        };
        let Some(data) = data else {
            let disk = SnapshotFile {
                dir: dir.to_owned(),
                saved: Mutex::new(None),
            };
            return Ok(StateMachineStore::with(
                MetaState::default(),
                None,
                Membership::default(),
                None,
                Some(disk),
            ));
        };
        let body: SnapshotBody = codec::decode(&data)
            .map_err(|e| Error::Storage(format!("decoding {}: {e}", path.display())))?;
        let meta = SnapshotMeta {
            last_log_id: body.last_applied,
            last_membership: body.last_membership.clone(),
            snapshot_id: snapshot_id(body.last_applied, 0),
        };
        let disk = SnapshotFile {
            dir: dir.to_owned(),
            saved: Mutex::new(Some(body.last_applied)),
        };
        Ok(StateMachineStore::with(
            body.state,
            body.last_applied,
            body.last_membership,
            Some(StoredSnapshot { meta, data }),
            Some(disk),
        ))
    }

    fn with(
        state: MetaState,
        last_applied: Option<LogId>,
        last_membership: Membership,
        snapshot: Option<StoredSnapshot>,
        disk: Option<SnapshotFile>,
    ) -> StateMachineStore {
        let (epoch, _) = watch::channel(state.map.epoch.0);
        let history = VecDeque::from([Arc::new(state.map.clone())]);
        StateMachineStore {
            inner: Arc::new(Inner {
                writer: tokio::sync::Mutex::new(()),
                applied: RwLock::new(Published {
                    state: Arc::new(state),
                    last_applied,
                    last_membership,
                    history,
                }),
                epoch,
                snapshot: RwLock::new(snapshot),
                snapshots_built: AtomicU64::new(0),
                disk: disk.map(Arc::new),
            }),
        }
    }

    /// The latest applied state.
    pub fn state(&self) -> Arc<MetaState> {
        read(&self.inner.applied).state.clone()
    }

    /// The current map epoch; changes whenever an applied entry or an
    /// installed snapshot changes it. The state is published before the
    /// epoch is sent, so `state()` and `maps_after()` already show it.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.epoch.subscribe()
    }

    /// The maps with an epoch greater than `epoch`, oldest first.
    ///
    /// Served from the last `HISTORY_MAX` epochs, and only from the installed
    /// map after a snapshot install (or the loaded one after `open` restored
    /// a snapshot): if `epoch` is older than that, the first
    /// map returned has an epoch above `epoch + 1` (the caller missed some).
    /// The latest map is always included when its epoch is above `epoch`.
    pub fn maps_after(&self, epoch: u64) -> Vec<Arc<ShardMap>> {
        let applied = read(&self.inner.applied);
        let first = applied.history.partition_point(|m| m.epoch.0 <= epoch);
        applied.history.range(first..).cloned().collect()
    }

    /// The id of the last entry applied (or covered by the installed snapshot).
    pub fn last_applied(&self) -> Option<LogId> {
        read(&self.inner.applied).last_applied
    }

    /// Makes `snapshot` the current one, unless a newer one already is.
    /// With a directory, it is written durably first (see the module doc),
    /// and an error leaves the current snapshot as it was.
    async fn save(&self, snapshot: StoredSnapshot) -> Result<(), StorageError> {
        let snapshot = match &self.inner.disk {
            Some(disk) => {
                let disk = disk.clone();
                let signature = snapshot.meta.signature();
                let written = match tokio::task::spawn_blocking(move || disk.save(snapshot)).await {
                    Ok(written) => written.map_err(|e| AnyError::new(&e)),
                    Err(join) => Err(AnyError::new(&join)),
                };
                written.map_err(|e| StorageIOError::write_snapshot(Some(signature), e))?
            }
            None => snapshot,
        };
        let mut current = write(&self.inner.snapshot);
        let newer_kept = current
            .as_ref()
            .is_some_and(|c| c.meta.last_log_id > snapshot.meta.last_log_id);
        if !newer_kept {
            *current = Some(snapshot);
        }
        Ok(())
    }

    /// Replaces the published state; sends the epoch if it changed.
    fn publish(&self, published: Published) {
        let epoch = published.state.map.epoch.0;
        debug_assert_eq!(
            published.history.back().map(|m| m.epoch.0),
            Some(epoch),
            "the newest map in the history is the current one"
        );
        *write(&self.inner.applied) = published;
        self.inner.epoch.send_if_modified(|current| {
            let changed = *current != epoch;
            *current = epoch;
            changed
        });
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        let applied = read(&self.inner.applied);
        Ok((applied.last_applied, applied.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let _writer = self.inner.writer.lock().await;
        let (state, mut last_applied, mut last_membership, mut history) = {
            let applied = read(&self.inner.applied);
            (
                applied.state.clone(),
                applied.last_applied,
                applied.last_membership.clone(),
                applied.history.clone(),
            )
        };
        // Copied on the first command only: blank and membership entries
        // leave the state as it is.
        let mut changed: Option<MetaState> = None;
        let mut replies = Vec::new();
        for entry in entries {
            last_applied = Some(entry.log_id);
            let mut refused = None;
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(command) => {
                    let working = changed.get_or_insert_with(|| (*state).clone());
                    let before = working.map.epoch;
                    if let Err(e) = command.apply(working) {
                        refused = Some(e.0);
                    }
                    if working.map.epoch != before {
                        if history.len() == HISTORY_MAX {
                            history.pop_front();
                        }
                        history.push_back(Arc::new(working.map.clone()));
                    }
                }
                EntryPayload::Membership(membership) => {
                    last_membership = StoredMembership::new(Some(entry.log_id), membership);
                }
            }
            let epoch = changed.as_ref().unwrap_or(&*state).map.epoch.0;
            replies.push(Applied { epoch, refused });
        }
        self.publish(Published {
            state: changed.map_or(state, Arc::new),
            last_applied,
            last_membership,
            history,
        });
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> StateMachineStore {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = codec::decode(&data).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        if body.last_applied != meta.last_log_id || body.last_membership != meta.last_membership {
            let e = AnyError::error(format!(
                "snapshot {} holds state up to {:?}, membership {}",
                meta, body.last_applied, body.last_membership
            ));
            return Err(StorageIOError::read_snapshot(Some(meta.signature()), e).into());
        }
        let _writer = self.inner.writer.lock().await;
        // Saved (durably, with a directory) before it is published: if that
        // fails, the state machine is left as it was.
        self.save(StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .await?;
        // Maps between the old state and the snapshot are unknown here: the
        // history restarts at the installed map.
        let history = VecDeque::from([Arc::new(body.state.map.clone())]);
        self.publish(Published {
            state: Arc::new(body.state),
            last_applied: body.last_applied,
            last_membership: body.last_membership,
            history,
        });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(read(&self.inner.snapshot).as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let body = {
            let applied = read(&self.inner.applied);
            SnapshotBody {
                last_applied: applied.last_applied,
                last_membership: applied.last_membership.clone(),
                state: (*applied.state).clone(),
            }
        };
        let built = self.inner.snapshots_built.fetch_add(1, Ordering::Relaxed) + 1;
        let meta = SnapshotMeta {
            last_log_id: body.last_applied,
            last_membership: body.last_membership.clone(),
            snapshot_id: snapshot_id(body.last_applied, built),
        };
        let data = codec::encode(&body).map_err(|e| {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        // Saved (durably, with a directory) before it is returned: openraft
        // purges the log it covers once it has it.
        self.save(StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        })
        .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl SnapshotFile {
    /// Writes `snapshot` to the file unless it already holds a newer one, and
    /// hands `snapshot` back. Blocking: run it in `spawn_blocking`.
    fn save(&self, snapshot: StoredSnapshot) -> std::io::Result<StoredSnapshot> {
        // Only assigned after the file was replaced, so still right after a
        // panic elsewhere while the lock was held.
        let mut saved = self.saved.lock().unwrap_or_else(PoisonError::into_inner);
        if saved
            .as_ref()
            .is_some_and(|s| *s > snapshot.meta.last_log_id)
        {
            return Ok(snapshot);
        }
        let temp = self.dir.join(SNAPSHOT_TEMP_FILE);
        let mut file = File::create(&temp)?;
        file.write_all(&snapshot.data)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temp, self.dir.join(SNAPSHOT_FILE))?;
        sync_dir(&self.dir)?;
        *saved = Some(snapshot.meta.last_log_id);
        Ok(snapshot)
    }
}

/// Makes a rename in `dir` durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Elsewhere std cannot open a directory to fsync it; the rename is as
/// durable as the platform makes it.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> std::io::Result<()> {
    Ok(())
}
