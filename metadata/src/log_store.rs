//! LogStore: the Raft log and vote of one metadata node, persisted in redb.
//!
//! Raft is only safe if a node never forgets a vote it cast or an entry it
//! acknowledged, so appends, truncations, purges and votes are committed redb
//! transactions with redb's default durability (`Durability::Immediate`: the
//! file is fsynced before `commit` returns), and the append callback is
//! invoked, or `save_vote` returns, only after that commit. (The committed log
//! id is the exception; see `save_committed`.) One file, `<dir>/raft.redb`,
//! holds two tables: the entries by index, and a few named values (vote,
//! committed log id, last purged log id). Entries and values are encoded with
//! [`crate::codec`].
//!
//! redb is a blocking API and a durable commit waits for an fsync (milliseconds
//! on real disks). All of it runs in `tokio::task::spawn_blocking`, so a slow
//! disk never stalls the runtime threads that also serve RPCs and the proxy.
//! Each call awaits its blocking task before returning, and openraft issues
//! writes one at a time, so writes stay in the order openraft made them (and
//! redb allows a single write transaction at a time anyway). A future dropped
//! while its task runs does not cancel the task: the write still completes.

use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, Entry, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::codec;
use crate::error::{Error, Result};
use crate::types::{LogId, NodeId, StorageError, TypeConfig, Vote};

/// The database file inside the node's data directory.
pub const FILE_NAME: &str = "raft.redb";

/// Log entries by index, each a codec-encoded `Entry<TypeConfig>`.
const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Named single values, codec-encoded.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";

/// The Raft log and vote of this node. Clones share the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// Opens (or creates) `<dir>/raft.redb`, creating `dir` if needed.
    /// Blocking (it may fsync): call it at startup, before serving.
    pub fn open(dir: &Path) -> Result<LogStore> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Storage(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        let db = Database::create(&path)
            .map_err(|e| Error::Storage(format!("opening {}: {e}", path.display())))?;
        // Create both tables up front: a read transaction cannot open a table
        // that was never created.
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(LOGS).map_err(db_err)?;
        txn.open_table(META).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(LogStore { db: Arc::new(db) })
    }

    /// Runs `f` on a blocking thread; see the module doc for why.
    async fn blocking<T, F>(
        &self,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
        f: F,
    ) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T> + Send + 'static,
    {
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || f(&db)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StorageIOError::new(subject, verb, AnyError::new(&e)).into()),
            Err(join) => Err(StorageIOError::new(subject, verb, AnyError::new(&join)).into()),
        }
    }
}

fn db_err(e: impl Into<redb::Error>) -> Error {
    Error::Storage(e.into().to_string())
}

fn get_value<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>> {
    match table.get(key).map_err(db_err)? {
        Some(bytes) => codec::decode(bytes.value()).map(Some),
        None => Ok(None),
    }
}

fn read_value<T: serde::de::DeserializeOwned>(db: &Database, key: &str) -> Result<Option<T>> {
    let txn = db.begin_read().map_err(db_err)?;
    get_value(&txn.open_table(META).map_err(db_err)?, key)
}

/// Writes (or with `None` removes) one named value in its own transaction.
fn write_value<T: serde::Serialize>(
    db: &Database,
    key: &str,
    value: Option<&T>,
    durability: Durability,
) -> Result<()> {
    let mut txn = db.begin_write().map_err(db_err)?;
    txn.set_durability(durability).map_err(db_err)?;
    {
        let mut table = txn.open_table(META).map_err(db_err)?;
        match value {
            Some(value) => {
                let bytes = codec::encode(value)?;
                table.insert(key, bytes.as_slice()).map_err(db_err)?;
            }
            None => {
                table.remove(key).map_err(db_err)?;
            }
        }
    }
    txn.commit().map_err(db_err)
}

/// Decodes an entry stored under `index`, checking that it belongs there.
fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry<TypeConfig>> {
    let entry: Entry<TypeConfig> = codec::decode(bytes)?;
    if entry.log_id.index != index {
        return Err(Error::Storage(format!(
            "log entry stored at index {index} says it is {}",
            entry.log_id
        )));
    }
    Ok(entry)
}

/// Entries with index in `[start, end)` (`end: None` is unbounded), in order.
fn read_entries(db: &Database, start: u64, end: Option<u64>) -> Result<Vec<Entry<TypeConfig>>> {
    let txn = db.begin_read().map_err(db_err)?;
    let table = txn.open_table(LOGS).map_err(db_err)?;
    let range = match end {
        Some(end) => table.range::<u64>(start..end),
        None => table.range::<u64>(start..),
    }
    .map_err(db_err)?;
    let mut entries = Vec::new();
    for item in range {
        let (index, bytes) = item.map_err(db_err)?;
        entries.push(decode_entry(index.value(), bytes.value())?);
    }
    Ok(entries)
}

/// Turns any range of indexes into `[start, end)`, or `None` if it is empty.
fn half_open(range: &impl RangeBounds<u64>) -> Option<(u64, Option<u64>)> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        // `..=u64::MAX` reaches the last possible index: unbounded.
        Bound::Included(&e) => e.checked_add(1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => None,
    };
    match end {
        Some(end) if end <= start => None,
        _ => Some((start, end)),
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError>
    where
        RB: RangeBounds<u64> + Clone + std::fmt::Debug + OptionalSend,
    {
        let Some((start, end)) = half_open(&range) else {
            return Ok(Vec::new());
        };
        self.blocking(ErrorSubject::Logs, ErrorVerb::Read, move |db| {
            read_entries(db, start, end)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.blocking(ErrorSubject::Logs, ErrorVerb::Read, |db| {
            // One read transaction: the purge point and the last entry agree.
            let txn = db.begin_read().map_err(db_err)?;
            let meta = txn.open_table(META).map_err(db_err)?;
            let last_purged_log_id: Option<LogId> = get_value(&meta, KEY_LAST_PURGED)?;
            let table = txn.open_table(LOGS).map_err(db_err)?;
            let last = match table.last().map_err(db_err)? {
                Some((index, bytes)) => Some(decode_entry(index.value(), bytes.value())?.log_id),
                None => None,
            };
            Ok(LogState {
                last_log_id: last.or(last_purged_log_id),
                last_purged_log_id,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.blocking(ErrorSubject::Vote, ErrorVerb::Write, move |db| {
            write_value(db, KEY_VOTE, Some(&vote), Durability::Immediate)
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.blocking(ErrorSubject::Vote, ErrorVerb::Read, |db| {
            read_value(db, KEY_VOTE)
        })
        .await
    }

    /// Saved so that a restarting node re-applies committed entries to its
    /// in-memory state machine at once, instead of waiting for a leader.
    ///
    /// Without an fsync of its own: it reaches the disk with the next append
    /// or vote. A committed log id read back after a crash may be older than
    /// the last one saved, which is safe (it is a lower bound; openraft
    /// learns the rest from the leader) and saves an fsync per commit.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.blocking(ErrorSubject::Store, ErrorVerb::Write, move |db| {
            write_value(db, KEY_COMMITTED, committed.as_ref(), Durability::None)
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.blocking(ErrorSubject::Store, ErrorVerb::Read, |db| {
            read_value(db, KEY_COMMITTED)
        })
        .await
    }

    /// Writes and commits the entries before invoking `callback`, all before
    /// returning: openraft allows flushing later, but a metadata group
    /// appends rarely and a simple order is easier to trust.
    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        if entries.is_empty() {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        self.blocking(ErrorSubject::Logs, ErrorVerb::Write, move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut table = txn.open_table(LOGS).map_err(db_err)?;
                for entry in &entries {
                    let bytes = codec::encode(entry)?;
                    table
                        .insert(entry.log_id.index, bytes.as_slice())
                        .map_err(db_err)?;
                }
            }
            txn.commit().map_err(db_err)
        })
        .await?;
        // On error the callback is dropped instead: the error returned above
        // already stops the Raft node.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(ErrorSubject::Log(log_id), ErrorVerb::Delete, move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut table = txn.open_table(LOGS).map_err(db_err)?;
                table
                    .retain_in::<u64, _>(log_id.index.., |_, _| false)
                    .map_err(db_err)?;
            }
            txn.commit().map_err(db_err)
        })
        .await
    }

    /// Records the purge point and removes the entries up to it in one
    /// transaction, so the log never has a hole between the two.
    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(ErrorSubject::Log(log_id), ErrorVerb::Delete, move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut meta = txn.open_table(META).map_err(db_err)?;
                let previous: Option<LogId> = get_value(&meta, KEY_LAST_PURGED)?;
                if previous.is_some_and(|p| p >= log_id) {
                    // Already purged further; dropping `txn` aborts it.
                    return Ok(());
                }
                let bytes = codec::encode(&log_id)?;
                meta.insert(KEY_LAST_PURGED, bytes.as_slice())
                    .map_err(db_err)?;
                let mut logs = txn.open_table(LOGS).map_err(db_err)?;
                logs.retain_in::<u64, _>(..=log_id.index, |_, _| false)
                    .map_err(db_err)?;
            }
            txn.commit().map_err(db_err)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Bound;

    use super::half_open;

    #[test]
    fn half_open_ranges() {
        use std::ops::Bound::*;
        type Case = ((Bound<u64>, Bound<u64>), Option<(u64, Option<u64>)>);
        let cases: [Case; 6] = [
            ((Included(3), Excluded(5)), Some((3, Some(5)))),
            ((Excluded(3), Included(5)), Some((4, Some(6)))),
            ((Included(3), Excluded(3)), None),
            ((Included(5), Excluded(3)), None),
            ((Unbounded, Unbounded), Some((0, None))),
            ((Included(7), Included(u64::MAX)), Some((7, None))),
        ];
        for (range, want) in cases {
            assert_eq!(half_open(&range), want, "{range:?}");
        }
    }
}
