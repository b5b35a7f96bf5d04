//! Change feed: a shard primary's committed row changes, from its WAL.
//!
//! The cache must drop results whose rows changed, also when another client
//! wrote them directly on PostgreSQL. So each proxy follows each primary's WAL
//! through logical decoding: the built-in `pgoutput` plugin, protocol version
//! 1, on a TEMPORARY slot, which the server drops when the connection ends, so
//! a proxy that dies leaves nothing behind that would pin WAL. The tables it
//! wants are in publication [`PUBLICATION`], which [`ensure_publication`]
//! maintains; [`follow`] streams. Decoding is `cache::pgoutput` (sans-IO);
//! this file is the IO and the transaction bookkeeping.
//!
//! A feed sees the changes committed after its slot's consistent point
//! ([`FeedEvent::Started`]). After it fails, the changes committed until the
//! next feed's consistent point are never seen: the caller must treat
//! everything cached for that server as stale when it reconnects.
//!
//! One change never reaches the stream: a TRUNCATE naming a partition of a
//! table published through its root (`publish_via_partition_root`), rather
//! than the root itself. pgoutput drops it (PostgreSQL 15, `pgoutput_truncate`)
//! and the transaction then looks empty.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{BufMut, BytesMut};
use cache::pgoutput::{self, LogicalMessage, ReplicationMessage, StandbyStatusUpdate};
pub use cache::pgoutput::{Relation, Tuple, Value};
use router::KeyType;
use tokio::io::AsyncWriteExt;
use tokio::time::MissedTickBehavior;
use wire::backend;

use crate::config::CacheKey;
use crate::error::{Error, Result};
use crate::quote;
use crate::server::{read_frame, ServerConn, ServerTarget};

/// Publication the cache's tables are published in, on every shard.
pub const PUBLICATION: &str = "shardline_cache";

/// Row changes one transaction may hold before it is handed over as one
/// [`ChangeKind::Truncate`] per relation it touched.
pub const TRANSACTION_CHANGES_MAX: usize = 10_000;

/// Bytes of column values one transaction may hold, likewise.
pub const TRANSACTION_VALUE_BYTES_MAX: usize = 64 << 20;

/// Advisory lock key taken while the publication is changed, so that proxies
/// starting together do not race on CREATE or ALTER PUBLICATION (the second
/// would fail on the catalog's unique index). "shardlin" in ASCII.
const PUBLICATION_LOCK_KEY: i64 = 0x7368_6172_646c_696e;

/// What [`ensure_publication`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicationState {
    /// The tables (names as given) whose changes the feed reports.
    pub published: Vec<String>,
    /// The tables (names as given) that are not published, each with the
    /// reason.
    pub left_out: Vec<LeftOut>,
    /// The server's `pg_current_wal_insert_lsn()` read after the publication
    /// change committed: a feed positioned at or past it reports every later
    /// change to `published`.
    pub lsn: u64,
}

/// A table [`ensure_publication`] did not publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOut {
    /// As given.
    pub table: String,
    pub reason: String,
}

/// One thing a feed reports, in stream order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedEvent<'a> {
    /// Streaming has started; changes committed after `lsn` (the slot's
    /// consistent point) will be seen.
    Started { lsn: u64 },
    /// One committed transaction's changes to published tables, in the order
    /// made, at its end LSN; everything up to `end_lsn` has been handled.
    Commit {
        end_lsn: u64,
        changes: &'a [RowChange],
    },
    /// Everything committed up to `lsn` has been handled (from keepalives and
    /// from transactions with no change to report).
    Position { lsn: u64 },
}

/// One row change to a published table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowChange {
    /// As the server described it. With `publish_via_partition_root`, a
    /// partition's change names the partitioned table it belongs to.
    pub relation: Arc<Relation>,
    pub kind: ChangeKind,
}

/// What happened to the row; tuples hold one value per column of the
/// relation, in text format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    Insert {
        new: Tuple,
    },
    /// `old` is sent only when the update changed a key column (key columns
    /// only, the others `Value::Null`) or the table has REPLICA IDENTITY FULL
    /// (every column). Unchanged TOASTed columns of `new` are
    /// `Value::Unchanged`.
    Update {
        old: Option<Tuple>,
        new: Tuple,
    },
    /// `old` holds the key columns (the others `Value::Null`), or every column
    /// with REPLICA IDENTITY FULL.
    Delete {
        old: Tuple,
    },
    /// Any row of the relation may have changed: a TRUNCATE, or a transaction
    /// too large to report row by row (see [`TransactionMax`]), which then
    /// reports exactly one `Truncate` per relation it touched and nothing else.
    Truncate,
}

/// Bounds on the changes one transaction may hold in memory. Past either,
/// the transaction is reported as one [`ChangeKind::Truncate`] per relation
/// it touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransactionMax {
    pub changes_max: usize,
    /// Sum of the lengths of the text (or binary) values held.
    pub value_bytes_max: usize,
}

impl Default for TransactionMax {
    fn default() -> Self {
        TransactionMax {
            changes_max: TRANSACTION_CHANGES_MAX,
            value_bytes_max: TRANSACTION_VALUE_BYTES_MAX,
        }
    }
}

/// Makes sure publication [`PUBLICATION`] exists on the server of `target` (a
/// normal, non-replication connection) WITH (publish_via_partition_root =
/// true) and contains each of `tables` (names as given, possibly
/// schema-qualified; missing ones are added, none is ever removed: other
/// proxies may use them).
///
/// A table that cannot safely be published is left out and reported: a table
/// (or partition) without a usable replica identity (DEFAULT without a
/// primary key, NOTHING, or a dropped identity index) would make every UPDATE
/// and DELETE on it fail once published, and a foreign or unlogged one has no
/// changes in the WAL. Tables not found are reported the same way.
///
/// Publication changes run in one transaction under an advisory lock, so
/// proxies may call this concurrently. Cancel-safe: dropping the future drops
/// the connection, which rolls an unfinished change back.
pub async fn ensure_publication(
    target: &ServerTarget,
    tables: &[String],
) -> Result<PublicationState> {
    ensure_publication_keyed(target, tables, &BTreeMap::new()).await
}

/// [`ensure_publication`], where the tables named in `keys` are cached by
/// that column, so it must have the configured type and be in the replica
/// identity of every partition (or the identity be FULL): otherwise the WAL
/// would not show the old value when an UPDATE changes it. A table where it
/// is not is left out, and reported.
pub async fn ensure_publication_keyed(
    target: &ServerTarget,
    tables: &[String],
    keys: &BTreeMap<String, CacheKey>,
) -> Result<PublicationState> {
    let max = target.message_bytes_max;
    let mut conn = ServerConn::connect(target, 0).await?;
    let mut left_out = Vec::new();

    // Names to oids first, each in its own statement outside the transaction:
    // a name that does not even parse fails its own statement only.
    let mut found = Vec::new();
    for table in tables {
        if table.contains('\0') {
            left_out.push(LeftOut {
                table: table.clone(),
                reason: "the name contains a NUL byte".into(),
            });
            continue;
        }
        let sql = format!("SELECT to_regclass({})::oid", quote::literal(table));
        let oid = match simple_query(&mut conn, &sql, max).await? {
            Ok(rows) => first_value(&rows).and_then(|oid| oid.parse::<u32>().ok()),
            Err(message) => {
                left_out.push(LeftOut {
                    table: table.clone(),
                    reason: message,
                });
                continue;
            }
        };
        match oid {
            Some(oid) => found.push((table, oid)),
            None => left_out.push(LeftOut {
                table: table.clone(),
                reason: "no such table".into(),
            }),
        }
    }

    // Then, by oid, the publication itself.
    let publication = quote::literal(PUBLICATION);
    let ident = quote::identifier(PUBLICATION);
    run(&mut conn, "BEGIN", max).await?;
    run(
        &mut conn,
        &format!("SELECT pg_advisory_xact_lock({PUBLICATION_LOCK_KEY})"),
        max,
    )
    .await?;
    let options = run(
        &mut conn,
        &format!(
            "SELECT pubviaroot AND pubinsert AND pubupdate AND pubdelete AND pubtruncate \
             FROM pg_publication WHERE pubname = {publication}"
        ),
        max,
    )
    .await?;
    const OPTIONS: &str =
        "publish = 'insert, update, delete, truncate', publish_via_partition_root = true";
    match first_value(&options).as_deref() {
        None => run(
            &mut conn,
            &format!("CREATE PUBLICATION {ident} WITH ({OPTIONS})"),
            max,
        )
        .await
        .map(drop)?,
        Some("f") => run(
            &mut conn,
            &format!("ALTER PUBLICATION {ident} SET ({OPTIONS})"),
            max,
        )
        .await
        .map(drop)?,
        Some(_) => {}
    }
    let mut published = Vec::new();
    for (table, oid) in found {
        let rows = run(&mut conn, &table_check_sql(oid, keys.get(table)), max).await?;
        let Some(row) = rows.first() else {
            left_out.push(LeftOut {
                table: table.clone(),
                reason: "no such table (dropped meanwhile)".into(),
            });
            continue;
        };
        let value = |i: usize| row.get(i).cloned().flatten();
        let (Some(name), Some(member)) = (value(0), value(1)) else {
            return Err(Error::ServerProtocol(
                "unexpected answer to the publication check".into(),
            ));
        };
        if let Some(problem) = value(2) {
            let mut reason = problem;
            if member == "t" {
                reason.push_str(" (and it is in the publication already)");
            }
            left_out.push(LeftOut {
                table: table.clone(),
                reason,
            });
            continue;
        }
        if member != "t" {
            run(
                &mut conn,
                &format!("ALTER PUBLICATION {ident} ADD TABLE {name}"),
                max,
            )
            .await?;
        }
        published.push(table.clone());
    }
    run(&mut conn, "COMMIT", max).await?;

    let lsn = run(&mut conn, "SELECT pg_current_wal_insert_lsn()", max).await?;
    let lsn = first_value(&lsn)
        .as_deref()
        .and_then(pgoutput::parse_lsn)
        .ok_or_else(|| {
            Error::ServerProtocol("unexpected answer to pg_current_wal_insert_lsn()".into())
        })?;
    Ok(PublicationState {
        published,
        left_out,
        lsn,
    })
}

/// For the table with `oid`: its name as SQL (quoted as needed), whether it
/// is in the publication, and why it must not be published (NULL if it may).
/// Changes are checked where PostgreSQL checks them: on the table, or on each
/// partition of a partitioned one (`pg_partition_tree` has no row for a table
/// outside any partition tree, hence the UNION).
/// Where a write to a table may write besides its own rows, as far as the
/// catalog of `target`'s server shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reach {
    /// The table written (`relname`; the root of a partition tree).
    pub table: String,
    /// A table a cascading foreign key changes with it; `None` when the
    /// table has triggers or rules, which may write anything.
    pub changes: Option<String>,
}

/// Every table whose writes may change rows of other tables (or other rows
/// of itself) without the statement naming them: tables and views with
/// user triggers or non-SELECT rules (which may run anything), and tables
/// referenced by a foreign key with a cascading, SET NULL or SET DEFAULT
/// action (which changes the referencing table). Partitions count as their
/// partition tree's root.
pub async fn write_reach(target: &ServerTarget) -> Result<Vec<Reach>> {
    const SQL: &str = "
        WITH rel AS (
          SELECT c.oid, (SELECT r.relname FROM pg_class r
                         WHERE r.oid = coalesce(pg_partition_root(c.oid), c.oid)) AS root
          FROM pg_class c
          WHERE c.relnamespace NOT IN ('pg_catalog'::regnamespace,
                                       'information_schema'::regnamespace))
        SELECT rel.root, NULL::name FROM rel
        WHERE EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = rel.oid AND NOT t.tgisinternal)
           OR EXISTS (SELECT FROM pg_rewrite w WHERE w.ev_class = rel.oid AND w.ev_type <> '1')
        UNION
        SELECT referenced.root, referencing.root
        FROM pg_constraint k
          JOIN rel referenced ON referenced.oid = k.confrelid
          JOIN rel referencing ON referencing.oid = k.conrelid
        WHERE k.contype = 'f'
          AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))";
    let mut conn = ServerConn::connect(target, 0).await?;
    let rows = run(&mut conn, SQL, target.message_bytes_max).await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let mut values = row.into_iter();
            Some(Reach {
                table: values.next()??,
                changes: values.next().flatten(),
            })
        })
        .collect())
}

fn table_check_sql(oid: u32, key: Option<&CacheKey>) -> String {
    const FAILS: &str = "once published, every UPDATE and DELETE on it would fail";
    let publication = quote::literal(PUBLICATION);
    let (column, type_name, type_oids) = match key {
        Some(k) => (
            quote::literal(&k.column),
            quote::literal(k.key_type.as_str()),
            match k.key_type {
                KeyType::Int2 => "21",
                KeyType::Int4 => "23",
                KeyType::Int8 => "20",
                KeyType::Text => "25, 1043",
                KeyType::Uuid => "2950",
            },
        ),
        None => ("NULL::text".into(), "NULL::text".into(), "0"),
    };
    format!(
        "SELECT c.oid::regclass::text,
            EXISTS (SELECT FROM pg_publication p WHERE p.pubname = {publication} AND p.puballtables)
            OR EXISTS (SELECT FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                       WHERE p.pubname = {publication} AND r.prrelid = c.oid),
            CASE
              WHEN c.relkind NOT IN ('r', 'p') THEN 'it is not a table'
              ELSE (
                SELECT string_agg(format('%s %s', l.oid::regclass, l.problem), '; ' ORDER BY l.oid)
                FROM (
                  SELECT t.oid, CASE
                    WHEN t.relkind = 'f'
                      THEN 'is a foreign table, whose changes are not in this server''s WAL'
                    WHEN t.relpersistence <> 'p'
                      THEN 'is not a logged table, its changes are not in the WAL'
                    WHEN t.relreplident = 'n'
                      THEN 'has REPLICA IDENTITY NOTHING: {FAILS}'
                    WHEN t.relreplident = 'd' AND NOT EXISTS (
                        SELECT FROM pg_index i WHERE i.indrelid = t.oid
                          AND i.indisprimary AND i.indisvalid AND i.indimmediate)
                      THEN 'has REPLICA IDENTITY DEFAULT but no primary key '
                        || '(a deferrable one does not count): {FAILS}'
                    WHEN t.relreplident = 'i' AND NOT EXISTS (
                        SELECT FROM pg_index i WHERE i.indrelid = t.oid
                          AND i.indisreplident AND i.indisvalid AND i.indimmediate)
                      THEN 'has no usable replica identity index: {FAILS}'
                    WHEN {column} IS NOT NULL AND NOT EXISTS (
                        SELECT FROM pg_attribute a WHERE a.attrelid = t.oid
                          AND a.attname = {column} AND NOT a.attisdropped
                          AND a.atttypid IN ({type_oids}))
                      THEN format('has no column %I of type %s (the configured cache key)',
                                  {column}, {type_name})
                    WHEN {column} IS NOT NULL AND t.relreplident <> 'f' AND NOT EXISTS (
                        SELECT FROM pg_index i
                          JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = ANY (i.indkey)
                        WHERE i.indrelid = t.oid AND a.attname = {column}
                          AND CASE t.relreplident WHEN 'd' THEN i.indisprimary
                                                  ELSE i.indisreplident END)
                      THEN format('does not have its cache key %I in its replica identity, so the '
                                  || 'WAL would not show its old value when it changes (make it '
                                  || 'the primary key, or set REPLICA IDENTITY FULL)', {column})
                  END AS problem
                  FROM (SELECT c.oid AS relid UNION SELECT relid FROM pg_partition_tree(c.oid)) tree
                    JOIN pg_class t ON t.oid = tree.relid
                  WHERE t.relkind IN ('r', 'f')
                ) l
                WHERE l.problem IS NOT NULL)
            END
         FROM pg_class c WHERE c.oid = {oid}"
    )
}

/// Follows the WAL of `target`'s server with the default [`TransactionMax`];
/// see [`follow_bounded`].
pub async fn follow(
    target: &ServerTarget,
    slot: &str,
    status_interval: Duration,
    on_event: impl FnMut(FeedEvent<'_>),
) -> Result<()> {
    follow_bounded(
        target,
        slot,
        status_interval,
        TransactionMax::default(),
        on_event,
    )
    .await
}

/// Follows one server's WAL: logs in with `replication=database`, creates a
/// TEMPORARY logical slot named `slot` with pgoutput, starts streaming with
/// [`PUBLICATION`] (which must exist before: [`ensure_publication`]), then
/// for ever: keeps the relation descriptions, collects the row changes of the
/// current transaction and hands them over at its commit, answers keepalives
/// that ask for a reply, and every `status_interval` sends a standby status
/// update (the last position handled) that asks for a reply, so the server
/// answers with a keepalive carrying its current WAL end and
/// [`FeedEvent::Position`] advances even when nothing published changes.
///
/// Returns only with an error (connection lost, server error, an undecodable
/// message); the caller reconnects, with a new slot. Cancel-safe: dropping
/// the future closes the connection, and the server drops the temporary slot.
pub async fn follow_bounded(
    target: &ServerTarget,
    slot: &str,
    status_interval: Duration,
    bounds: TransactionMax,
    mut on_event: impl FnMut(FeedEvent<'_>),
) -> Result<()> {
    let max = target.message_bytes_max;
    let mut conn = ServerConn::connect_with(target, 0, &[("replication", "database")]).await?;

    // Replication commands, PostgreSQL 15 syntax (protocol-replication.html).
    // No snapshot: the feed only wants changes from the consistent point on.
    let create = format!(
        "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput (SNAPSHOT 'nothing')",
        quote::identifier(slot)
    );
    let rows = run(&mut conn, &create, max).await?;
    // Columns: slot_name, consistent_point, snapshot_name, output_plugin.
    let start_lsn = rows
        .first()
        .and_then(|row| row.get(1).cloned().flatten())
        .as_deref()
        .and_then(pgoutput::parse_lsn)
        .ok_or_else(|| {
            Error::ServerProtocol("unexpected answer to CREATE_REPLICATION_SLOT".into())
        })?;
    let start = format!(
        "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {})",
        quote::identifier(slot),
        quote::literal(&quote::identifier(PUBLICATION))
    );
    let mut out = BytesMut::new();
    wire::frontend::encode_query(&mut out, start.as_bytes());
    conn.stream.write_all(&out).await.map_err(Error::ServerIo)?;
    loop {
        let frame = read_frame(&mut conn.stream, &mut conn.buf, max).await?;
        match frame.tag() {
            backend::COPY_BOTH_RESPONSE => break,
            backend::NOTICE_RESPONSE => {}
            backend::ERROR_RESPONSE => return Err(server_error(frame.body())),
            other => {
                return Err(Error::ServerProtocol(format!(
                    "unexpected message 0x{other:02x} in reply to START_REPLICATION"
                )))
            }
        }
    }
    tracing::debug!(slot, lsn = %pgoutput::format_lsn(start_lsn), "change feed started");
    on_event(FeedEvent::Started { lsn: start_lsn });

    let mut feed = Feed::new(start_lsn, bounds);
    // A zero period would make `interval` panic.
    let mut ticker = tokio::time::interval(status_interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let reply_requested = tokio::select! {
            frame = read_frame(&mut conn.stream, &mut conn.buf, max) => {
                let frame = frame?;
                match frame.tag() {
                    backend::COPY_DATA => {
                        if !feed.handle(frame.body(), &mut on_event)? {
                            continue;
                        }
                        // The server asked for a reply; asking back would ping-pong.
                        false
                    }
                    backend::NOTICE_RESPONSE => continue,
                    backend::ERROR_RESPONSE => return Err(server_error(frame.body())),
                    backend::COPY_DONE => {
                        let message = "the server ended the replication stream";
                        return Err(Error::ServerProtocol(message.into()));
                    }
                    other => {
                        return Err(Error::ServerProtocol(format!(
                            "unexpected message 0x{other:02x} in the replication stream"
                        )))
                    }
                }
            }
            _ = ticker.tick() => true,
        };
        let position = feed.position();
        let update = StandbyStatusUpdate {
            written: position,
            flushed: position,
            applied: position,
            clock: pgoutput::pg_timestamp(SystemTime::now()),
            reply_requested,
        }
        .encode();
        out.clear();
        out.put_u8(wire::frontend::COPY_DATA);
        out.put_i32(4 + update.len() as i32);
        out.put_slice(&update);
        conn.stream.write_all(&out).await.map_err(Error::ServerIo)?;
    }
}

/// The stream's state between messages: relation descriptions, the open
/// transaction, and the position handled. No IO.
struct Feed {
    relations: HashMap<u32, Arc<Relation>>,
    transaction: Option<Transaction>,
    /// Every transaction committed up to here has been handed over.
    position: u64,
    bounds: TransactionMax,
}

/// The changes of the transaction being received.
#[derive(Default)]
struct Transaction {
    changes: Vec<RowChange>,
    value_bytes: usize,
    /// Past the bounds: only the relations touched, in first-touch order.
    overflowed: Option<Vec<Arc<Relation>>>,
}

impl Transaction {
    fn push(&mut self, relation: Arc<Relation>, kind: ChangeKind, bounds: TransactionMax) {
        if self.overflowed.is_none() {
            self.value_bytes = self.value_bytes.saturating_add(value_bytes(&kind));
            if self.changes.len() < bounds.changes_max && self.value_bytes <= bounds.value_bytes_max
            {
                self.changes.push(RowChange { relation, kind });
                return;
            }
            let mut touched: Vec<Arc<Relation>> = Vec::new();
            for change in self.changes.drain(..) {
                if !touched.iter().any(|r| r.oid == change.relation.oid) {
                    touched.push(change.relation);
                }
            }
            self.changes = Vec::new(); // give the memory back
            self.overflowed = Some(touched);
        }
        let touched = self.overflowed.as_mut().expect("set above");
        if !touched.iter().any(|r| r.oid == relation.oid) {
            touched.push(relation);
        }
    }

    fn into_changes(self) -> Vec<RowChange> {
        match self.overflowed {
            None => self.changes,
            Some(touched) => touched
                .into_iter()
                .map(|relation| RowChange {
                    relation,
                    kind: ChangeKind::Truncate,
                })
                .collect(),
        }
    }
}

fn value_bytes(kind: &ChangeKind) -> usize {
    let sum = |tuple: &Tuple| tuple.iter().filter_map(Value::bytes).map(<[u8]>::len).sum();
    match kind {
        ChangeKind::Insert { new } => sum(new),
        ChangeKind::Update { old, new } => old.as_ref().map_or(0, sum) + sum(new),
        ChangeKind::Delete { old } => sum(old),
        ChangeKind::Truncate => 0,
    }
}

impl Feed {
    fn new(position: u64, bounds: TransactionMax) -> Self {
        Feed {
            relations: HashMap::new(),
            transaction: None,
            position,
            bounds,
        }
    }

    fn position(&self) -> u64 {
        self.position
    }

    /// Handles one CopyData payload; returns whether the server wants a
    /// status update now.
    fn handle(&mut self, payload: &[u8], on_event: &mut impl FnMut(FeedEvent<'_>)) -> Result<bool> {
        match ReplicationMessage::decode(payload).map_err(decode_error)? {
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                // Sent between messages, so every transaction that committed
                // before `wal_end` has been received (one still being
                // received commits after it).
                self.position = self.position.max(wal_end);
                on_event(FeedEvent::Position { lsn: self.position });
                Ok(reply_requested)
            }
            ReplicationMessage::XLogData { data, .. } => {
                let message = LogicalMessage::decode(data).map_err(decode_error)?;
                self.apply(message, on_event)?;
                Ok(false)
            }
        }
    }

    fn apply(
        &mut self,
        message: LogicalMessage,
        on_event: &mut impl FnMut(FeedEvent<'_>),
    ) -> Result<()> {
        let (relation, kind) = match message {
            LogicalMessage::Begin { .. } => {
                if self.transaction.is_some() {
                    return Err(out_of_order("Begin inside a transaction"));
                }
                self.transaction = Some(Transaction::default());
                return Ok(());
            }
            LogicalMessage::Commit { end_lsn, .. } => {
                let transaction = self
                    .transaction
                    .take()
                    .ok_or_else(|| out_of_order("Commit outside a transaction"))?;
                self.position = self.position.max(end_lsn);
                let changes = transaction.into_changes();
                if changes.is_empty() {
                    on_event(FeedEvent::Position { lsn: self.position });
                } else {
                    on_event(FeedEvent::Commit {
                        end_lsn,
                        changes: &changes,
                    });
                }
                return Ok(());
            }
            LogicalMessage::Relation(relation) => {
                self.relations.insert(relation.oid, Arc::new(relation));
                return Ok(());
            }
            LogicalMessage::Other(_) => return Ok(()),
            LogicalMessage::Truncate { relations, .. } => {
                let bounds = self.bounds;
                for oid in relations {
                    let relation = self.relation(oid)?;
                    self.open()?.push(relation, ChangeKind::Truncate, bounds);
                }
                return Ok(());
            }
            LogicalMessage::Insert { relation, new } => (relation, ChangeKind::Insert { new }),
            LogicalMessage::Update { relation, old, new } => {
                (relation, ChangeKind::Update { old, new })
            }
            LogicalMessage::Delete { relation, old } => (relation, ChangeKind::Delete { old }),
        };
        let relation = self.relation(relation)?;
        let bounds = self.bounds;
        self.open()?.push(relation, kind, bounds);
        Ok(())
    }

    fn relation(&self, oid: u32) -> Result<Arc<Relation>> {
        self.relations.get(&oid).cloned().ok_or_else(|| {
            Error::ServerProtocol(format!(
                "pgoutput change to relation {oid} before its description"
            ))
        })
    }

    fn open(&mut self) -> Result<&mut Transaction> {
        self.transaction
            .as_mut()
            .ok_or_else(|| out_of_order("change outside a transaction"))
    }
}

fn decode_error(e: pgoutput::DecodeError) -> Error {
    Error::ServerProtocol(format!("replication stream: {e}"))
}

fn out_of_order(what: &str) -> Error {
    Error::ServerProtocol(format!("replication stream: {what}"))
}

/// An ErrorResponse from the server, as an error of this proxy.
fn server_error(body: &[u8]) -> Error {
    match backend::ErrorFields::decode(body) {
        Ok(fields) => Error::ServerProtocol(format!(
            "{} (SQLSTATE {})",
            String::from_utf8_lossy(fields.message),
            String::from_utf8_lossy(fields.code)
        )),
        Err(e) => Error::ServerProtocol(e.to_string()),
    }
}

/// Rows of a simple-protocol reply, each column as text (`None` for NULL).
type Rows = Vec<Vec<Option<String>>>;

/// Runs `sql` (simple protocol) and returns the rows of its results, or the
/// server's first error message. Not cancel-safe: dropped midway, it leaves
/// the connection in an unknown state (its callers then drop the connection).
async fn simple_query(
    conn: &mut ServerConn,
    sql: &str,
    max: u32,
) -> Result<std::result::Result<Rows, String>> {
    let mut out = BytesMut::new();
    wire::frontend::encode_query(&mut out, sql.as_bytes());
    conn.stream.write_all(&out).await.map_err(Error::ServerIo)?;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let frame = read_frame(&mut conn.stream, &mut conn.buf, max).await?;
        match frame.tag() {
            backend::DATA_ROW => rows.push(
                wire::rows::data_row(frame.body())?
                    .into_iter()
                    .map(|v| v.map(|v| String::from_utf8_lossy(v).into_owned()))
                    .collect(),
            ),
            backend::ERROR_RESPONSE if error.is_none() => {
                let fields = backend::ErrorFields::decode(frame.body())?;
                error = Some(String::from_utf8_lossy(fields.message).into_owned());
            }
            backend::READY_FOR_QUERY => return Ok(error.map_or(Ok(rows), Err)),
            _ => {}
        }
    }
}

/// [`simple_query`] where a server error is an error.
async fn run(conn: &mut ServerConn, sql: &str, max: u32) -> Result<Rows> {
    simple_query(conn, sql, max)
        .await?
        .map_err(Error::ServerProtocol)
}

fn first_value(rows: &Rows) -> Option<String> {
    rows.first()?.first()?.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    use testkit::Cluster;
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;

    /// How long any expected event may take.
    const EVENT_DEADLINE: Duration = Duration::from_secs(20);

    async fn start_cluster() -> Cluster {
        tokio::task::spawn_blocking(|| {
            Cluster::builder()
                .setting("wal_level", "logical")
                .start()
                .expect("cluster starts")
        })
        .await
        .expect("cluster start task")
    }

    fn target(cluster: &Cluster) -> ServerTarget {
        ServerTarget {
            host: cluster.host().to_string(),
            port: cluster.port(),
            database: "postgres".into(),
            user: cluster.superuser().to_string(),
            password: Some(cluster.password().to_string()),
            connect_timeout: Duration::from_secs(10),
            message_bytes_max: 1 << 20,
        }
    }

    async fn lsn(client: &tokio_postgres::Client, sql: &str) -> u64 {
        let text: String = client.query_one(sql, &[]).await.expect(sql).get(0);
        pgoutput::parse_lsn(&text).expect("an LSN")
    }

    /// A feed's events, owned.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Seen {
        Started(u64),
        Commit(u64, Vec<RowChange>),
        Position(u64),
    }

    struct Follower {
        events: mpsc::UnboundedReceiver<Seen>,
        task: JoinHandle<Result<()>>,
    }

    impl Follower {
        fn spawn(target: ServerTarget, status_interval: Duration, bounds: TransactionMax) -> Self {
            static SLOTS: AtomicU32 = AtomicU32::new(0);
            let slot = format!("test_{}", SLOTS.fetch_add(1, Ordering::Relaxed));
            let (tx, events) = mpsc::unbounded_channel();
            let task = tokio::spawn(async move {
                follow_bounded(&target, &slot, status_interval, bounds, |event| {
                    let _ = tx.send(match event {
                        FeedEvent::Started { lsn } => Seen::Started(lsn),
                        FeedEvent::Commit { end_lsn, changes } => {
                            Seen::Commit(end_lsn, changes.to_vec())
                        }
                        FeedEvent::Position { lsn } => Seen::Position(lsn),
                    });
                })
                .await
            });
            Follower { events, task }
        }

        async fn next(&mut self) -> Seen {
            match tokio::time::timeout(EVENT_DEADLINE, self.events.recv()).await {
                Ok(Some(seen)) => seen,
                Ok(None) => {
                    let ended = (&mut self.task).await.expect("feed task");
                    panic!("the feed ended: {ended:?}")
                }
                Err(_) => panic!("no feed event within {EVENT_DEADLINE:?}"),
            }
        }

        async fn started(&mut self) -> u64 {
            match self.next().await {
                Seen::Started(lsn) => lsn,
                other => panic!("expected Started, got {other:?}"),
            }
        }

        /// The next transaction's changes, skipping positions.
        async fn commit(&mut self) -> (u64, Vec<RowChange>) {
            loop {
                match self.next().await {
                    Seen::Commit(lsn, changes) => return (lsn, changes),
                    Seen::Position(_) => {}
                    other => panic!("expected a commit, got {other:?}"),
                }
            }
        }

        /// The next commit as (relation name, change) pairs.
        async fn commit_changes(&mut self) -> Vec<(String, ChangeKind)> {
            let (_, changes) = self.commit().await;
            named(&changes)
        }
    }

    impl Drop for Follower {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn named(changes: &[RowChange]) -> Vec<(String, ChangeKind)> {
        changes
            .iter()
            .map(|c| {
                let r = &c.relation;
                (format!("{}.{}", r.schema, r.name), c.kind.clone())
            })
            .collect()
    }

    fn t(s: &str) -> Value {
        Value::Text(s.as_bytes().to_vec())
    }

    fn row(values: &[Option<&str>]) -> Tuple {
        values.iter().map(|v| v.map_or(Value::Null, t)).collect()
    }

    fn insert(table: &str, new: &[Option<&str>]) -> (String, ChangeKind) {
        (table.into(), ChangeKind::Insert { new: row(new) })
    }

    fn update(
        table: &str,
        old: Option<&[Option<&str>]>,
        new: &[Option<&str>],
    ) -> (String, ChangeKind) {
        (
            table.into(),
            ChangeKind::Update {
                old: old.map(row),
                new: row(new),
            },
        )
    }

    fn delete(table: &str, old: &[Option<&str>]) -> (String, ChangeKind) {
        (table.into(), ChangeKind::Delete { old: row(old) })
    }

    fn truncate(table: &str) -> (String, ChangeKind) {
        (table.into(), ChangeKind::Truncate)
    }

    const ACCOUNTS: &str =
        "CREATE TABLE accounts (id int8 PRIMARY KEY, balance int8) PARTITION BY HASH (id);
        CREATE TABLE accounts_p0 PARTITION OF accounts FOR VALUES WITH (MODULUS 2, REMAINDER 0);
        CREATE TABLE accounts_p1 PARTITION OF accounts FOR VALUES WITH (MODULUS 2, REMAINDER 1);";

    /// Keys of `accounts` that land in partition 0 and in partition 1.
    async fn keys_by_partition(client: &tokio_postgres::Client) -> (Vec<String>, Vec<String>) {
        let rows = client
            .query(
                "SELECT id::text, satisfies_hash_partition('accounts'::regclass, 2, 0, id)
                 FROM generate_series(1::int8, 20) id",
                &[],
            )
            .await
            .expect("partition of each key");
        let (p0, p1): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r.get::<_, bool>(1));
        let ids = |rows: Vec<&tokio_postgres::Row>| rows.iter().map(|r| r.get(0)).collect();
        (ids(p0), ids(p1))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn feed_reports_each_committed_change_under_the_partition_root() {
        let cluster = start_cluster().await;
        let client = cluster.connect().await.expect("connect");
        client
            .batch_execute(ACCOUNTS)
            .await
            .expect("create accounts");
        let (p0, p1) = keys_by_partition(&client).await;
        let (a, b, c) = (p0[0].as_str(), p0[1].as_str(), p1[0].as_str());
        let state = ensure_publication(&target(&cluster), &["accounts".into()])
            .await
            .expect("ensure publication");
        assert_eq!(state.published, ["accounts"]);
        assert_eq!(state.left_out, []);

        let mut feed = Follower::spawn(
            target(&cluster),
            Duration::from_secs(1),
            TransactionMax::default(),
        );
        let started = feed.started().await;
        assert!(
            started >= state.lsn,
            "the slot starts after the publication"
        );

        let acc = "public.accounts";
        let steps: Vec<(String, Vec<(String, ChangeKind)>)> = vec![
            (
                format!("INSERT INTO accounts VALUES ({a}, 100)"),
                vec![insert(acc, &[Some(a), Some("100")])],
            ),
            (
                format!("UPDATE accounts SET balance = 150 WHERE id = {a}"),
                vec![update(acc, None, &[Some(a), Some("150")])],
            ),
            (
                // Same partition: an update whose old tuple is the old key.
                format!("UPDATE accounts SET id = {b} WHERE id = {a}"),
                vec![update(
                    acc,
                    Some(&[Some(a), None][..]),
                    &[Some(b), Some("150")],
                )],
            ),
            (
                // Another partition: PostgreSQL moves the row, delete then insert.
                format!("UPDATE accounts SET id = {c} WHERE id = {b}"),
                vec![
                    delete(acc, &[Some(b), None]),
                    insert(acc, &[Some(c), Some("150")]),
                ],
            ),
            (
                format!("DELETE FROM accounts WHERE id = {c}"),
                vec![delete(acc, &[Some(c), None])],
            ),
            (
                format!(
                    "BEGIN;
                     INSERT INTO accounts VALUES ({a}, 1), ({c}, 2);
                     UPDATE accounts SET balance = 3 WHERE id = {a};
                     DELETE FROM accounts WHERE id = {c};
                     COMMIT"
                ),
                vec![
                    insert(acc, &[Some(a), Some("1")]),
                    insert(acc, &[Some(c), Some("2")]),
                    update(acc, None, &[Some(a), Some("3")]),
                    delete(acc, &[Some(c), None]),
                ],
            ),
            (
                // Rolled back: nothing; the next commit seen is the TRUNCATE.
                format!("BEGIN; INSERT INTO accounts VALUES ({b}, 9); ROLLBACK; TRUNCATE accounts"),
                vec![truncate(acc)],
            ),
        ];
        let mut last = started;
        for (sql, expected) in steps {
            client.batch_execute(&sql).await.expect(&sql);
            let (end_lsn, changes) = feed.commit().await;
            assert_eq!(named(&changes), expected, "{sql}");
            assert!(end_lsn > last, "{sql}: commit LSNs increase");
            last = end_lsn;
        }

        let oid: u32 = client
            .query_one("SELECT 'accounts'::regclass::oid", &[])
            .await
            .expect("oid")
            .get(0);
        client
            .batch_execute(&format!("INSERT INTO accounts VALUES ({a}, 5)"))
            .await
            .expect("insert");
        let (_, changes) = feed.commit().await;
        let relation = &changes[0].relation;
        assert_eq!(relation.oid, oid);
        let columns: Vec<_> = relation
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.type_oid, c.key))
            .collect();
        assert_eq!(columns, [("id", 20, true), ("balance", 20, false)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tables_that_cannot_be_published_are_left_out_and_stay_writable() {
        let cluster = start_cluster().await;
        let client = cluster.connect().await.expect("connect");
        client
            .batch_execute(&format!(
                "{ACCOUNTS}
                 CREATE SCHEMA \"Odd\";
                 CREATE TABLE \"Odd\".\"Full\" (v text) ;
                 ALTER TABLE \"Odd\".\"Full\" REPLICA IDENTITY FULL;
                 CREATE TABLE keyless (id int8, v text);
                 CREATE TABLE nothing (id int8 PRIMARY KEY);
                 ALTER TABLE nothing REPLICA IDENTITY NOTHING;
                 CREATE TABLE split (id int8 PRIMARY KEY) PARTITION BY HASH (id);
                 CREATE TABLE split_p0 PARTITION OF split FOR VALUES WITH (MODULUS 2, REMAINDER 0);
                 CREATE TABLE split_p1 PARTITION OF split FOR VALUES WITH (MODULUS 2, REMAINDER 1);
                 ALTER TABLE split_p1 REPLICA IDENTITY NOTHING;
                 CREATE UNLOGGED TABLE scratch (id int8 PRIMARY KEY);
                 CREATE VIEW names AS SELECT 1 AS id;
                 INSERT INTO keyless VALUES (1, 'x');"
            ))
            .await
            .expect("create tables");
        let tables: Vec<String> = [
            "accounts",
            "\"Odd\".\"Full\"",
            "keyless",
            "nothing",
            "split",
            "scratch",
            "names",
            "missing",
            "a.b.c.d",
        ]
        .map(String::from)
        .to_vec();

        let state = ensure_publication(&target(&cluster), &tables)
            .await
            .expect("ensure publication");

        assert_eq!(state.published, ["accounts", "\"Odd\".\"Full\""]);
        let reasons: Vec<(&str, &str)> = state
            .left_out
            .iter()
            .map(|l| (l.table.as_str(), l.reason.as_str()))
            .collect();
        let expected_reasons = [
            ("a.b.c.d", "improper relation name"),
            ("missing", "no such table"),
            (
                "keyless",
                "keyless has REPLICA IDENTITY DEFAULT but no primary key",
            ),
            ("nothing", "nothing has REPLICA IDENTITY NOTHING"),
            ("split", "split_p1 has REPLICA IDENTITY NOTHING"),
            ("scratch", "scratch is not a logged table"),
            ("names", "it is not a table"),
        ];
        assert_eq!(reasons.len(), expected_reasons.len(), "{reasons:?}");
        for (table, reason) in expected_reasons {
            assert!(
                reasons
                    .iter()
                    .any(|(t, r)| *t == table && r.contains(reason)),
                "{table}: {reason:?} in {reasons:?}"
            );
        }
        let in_publication: Vec<String> = client
            .query(
                "SELECT schemaname || '.' || tablename FROM pg_publication_tables
                 WHERE pubname = 'shardline_cache' ORDER BY 1",
                &[],
            )
            .await
            .expect("publication tables")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(in_publication, ["Odd.Full", "public.accounts"]);
        let via_root: bool = client
            .query_one(
                "SELECT pubviaroot FROM pg_publication WHERE pubname = 'shardline_cache'",
                &[],
            )
            .await
            .expect("publication")
            .get(0);
        assert!(via_root);
        client
            .batch_execute(
                "UPDATE keyless SET v = 'y'; DELETE FROM keyless;
                 INSERT INTO split VALUES (1), (2), (3), (4); UPDATE split SET id = id + 10",
            )
            .await
            .expect("tables left out stay writable");

        // Again: nothing to change, same answer.
        let again = ensure_publication(&target(&cluster), &tables)
            .await
            .expect("ensure publication again");
        assert_eq!(again.published, state.published);
        assert_eq!(again.left_out, state.left_out);
        assert!(again.lsn >= state.lsn);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn position_advances_while_nothing_published_changes() {
        let cluster = start_cluster().await;
        let client = cluster.connect().await.expect("connect");
        client
            .batch_execute(&format!(
                "{ACCOUNTS} CREATE TABLE other (id int8 PRIMARY KEY)"
            ))
            .await
            .expect("create tables");
        ensure_publication(&target(&cluster), &["accounts".into()])
            .await
            .expect("ensure publication");
        let mut feed = Follower::spawn(
            target(&cluster),
            Duration::from_millis(50),
            TransactionMax::default(),
        );
        let started = feed.started().await;

        // A write the feed does not report; the insert's WAL ends before the
        // commit record, so a position past it means the commit was read.
        client.batch_execute("BEGIN").await.expect("begin");
        client
            .batch_execute("INSERT INTO other VALUES (1)")
            .await
            .expect("insert");
        let written = lsn(&client, "SELECT pg_current_wal_insert_lsn()::text").await;
        client.batch_execute("COMMIT").await.expect("commit");
        assert!(written > started);

        let mut last = started;
        let mut positions_past_write = 0;
        while positions_past_write < 3 {
            match feed.next().await {
                Seen::Position(lsn) => {
                    assert!(lsn >= last, "positions never go back");
                    last = lsn;
                    if lsn >= written {
                        positions_past_write += 1;
                    }
                }
                other => panic!("nothing to report, got {other:?}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_transactions_become_one_truncate_per_relation() {
        let cluster = start_cluster().await;
        let client = cluster.connect().await.expect("connect");
        client
            .batch_execute(&format!(
                "{ACCOUNTS} CREATE TABLE notes (id int8 PRIMARY KEY, body text)"
            ))
            .await
            .expect("create tables");
        ensure_publication(&target(&cluster), &["accounts".into(), "notes".into()])
            .await
            .expect("ensure publication");
        let bounds = TransactionMax {
            changes_max: 3,
            value_bytes_max: 100,
        };
        let mut feed = Follower::spawn(target(&cluster), Duration::from_secs(1), bounds);
        feed.started().await;

        let cases: &[(&str, Vec<(String, ChangeKind)>)] = &[
            (
                "INSERT INTO notes VALUES (1, 'a');
                 INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 5) g",
                vec![truncate("public.notes"), truncate("public.accounts")],
            ),
            (
                // Within bounds again: row by row.
                "INSERT INTO notes VALUES (2, 'b'), (3, 'c')",
                vec![
                    insert("public.notes", &[Some("2"), Some("b")]),
                    insert("public.notes", &[Some("3"), Some("c")]),
                ],
            ),
            (
                "UPDATE notes SET body = repeat('x', 200) WHERE id = 2",
                vec![truncate("public.notes")],
            ),
        ];
        for (sql, expected) in cases {
            client
                .batch_execute(&format!("BEGIN; {sql}; COMMIT"))
                .await
                .expect(sql);
            assert_eq!(&feed.commit_changes().await, expected, "{sql}");
        }
    }
}
