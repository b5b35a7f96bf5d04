//! Routing: which shard a session's statements run on, once the shard map
//! declares sharded tables.
//!
//! A transaction runs on one shard: the one its first statement routes to.
//! So the session defers what it cannot place yet: a BEGIN is answered at
//! once and sent ahead of the first real statement; the unnamed statement of
//! the extended protocol is answered at its Parse and sent with its Bind,
//! whose parameters may hold the shard key. Statements that need several
//! shards run through [`crate::scatter`] outside transactions, or are
//! refused with SQLSTATE 0A000 and the reason.

use std::ops::ControlFlow;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use router::insert_split::ShardInsert;
use router::scatter::ScatterPlan;
use router::{Route, ShardId, ShardMap, StatementKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wire::backend::{self, TransactionStatus};
use wire::frontend::{self, Bind, Parse, Target};
use wire::rows::{self, BindParams};
use wire::Frame;

use super::{write_some, ClientStatement, Retry, Session, WriteMark, READ_RETRIES_MAX};
use crate::backends::{Node, ShardNodes};
use crate::config::{PoolMode, ReadFrom};
use crate::error::{Error, Result};
use crate::pending::{Entry, Expect, LocalReply};
use crate::pool::{Borrower, Pool};
use crate::result_cache::{params_hash, several_statements, Fill, ResultCache};
use crate::scatter::{self, Request, ShardConn, Sink};
use cache::store::Origin;

/// What to do with a statement.
enum Decision {
    /// Run it on this shard: on a replica by this policy if it is a read
    /// that may, else on the primary.
    Run(ShardId, Option<ReadFrom>),
    /// A SELECT of this sharded table on several shards, merged.
    Scatter(Vec<ShardId>, String),
    /// DDL: these statements on these shards.
    Broadcast(Vec<(ShardId, String)>),
    /// A multi-row INSERT cut per shard.
    SplitInsert(Vec<ShardInsert>),
    /// COPY FROM STDIN into a sharded table, rows split by key.
    CopyIn(Arc<router::Analysis>),
    Refuse(String),
}

/// The Describe (of the unnamed portal, optional), Execute (of all its
/// rows) and Sync that follow a Bind at the start of `buf`, when all are
/// there: their total length, and whether the Describe is among them.
fn execute_batch(buf: &[u8]) -> Option<(usize, bool)> {
    let frame = |at: usize| -> Option<(u8, &[u8], usize)> {
        let tag = *buf.get(at)?;
        let len = u32::from_be_bytes(buf.get(at + 1..at + 5)?.try_into().ok()?) as usize;
        let body = buf.get(at + 5..(at + 1 + len).max(at + 5))?;
        Some((tag, body, 1 + len.max(4)))
    };
    let mut at = 0;
    let (mut tag, mut body, mut len) = frame(at)?;
    let describe = tag == frontend::DESCRIBE;
    if describe {
        if body != b"P\0" {
            return None;
        }
        at += len;
        (tag, body, len) = frame(at)?;
    }
    // The unnamed portal, every row (max_rows 0).
    if tag != frontend::EXECUTE || body != [0, 0, 0, 0, 0] {
        return None;
    }
    at += len;
    let (tag, body, len) = frame(at)?;
    (tag == frontend::SYNC && body.is_empty()).then_some((at + len, describe))
}

/// What the cache does for a point read.
enum CacheStep {
    /// Answered from the cache.
    Hit,
    /// Run on the primary; its reply fills the cache.
    Fill,
    /// The cache is not involved.
    Bypass,
}

/// Work on several shards for one extended-protocol statement.
pub(super) enum MultiJob {
    /// The plan, and the sharded table it reads.
    Scatter(ScatterPlan, String),
    Broadcast(Vec<(ShardId, String)>),
    Insert(Vec<ShardInsert>),
    CopyIn(Arc<router::Analysis>),
}

/// An extended-protocol statement bound for several shards, collected up to
/// its Sync (the replies are made then, in the order the messages came).
pub(super) struct MultiBatch {
    job: MultiJob,
    shards: Vec<ShardId>,
    /// The statement's Parse definition and the Bind frame.
    definition: Bytes,
    bind: Frame,
    describe: bool,
    execute: bool,
    closes: usize,
}

/// The transaction-control meaning of a one-statement text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxnWord {
    Begin,
    Commit,
    Rollback,
    RollbackTo,
    Other,
}

fn txn_word(sql: &str) -> TxnWord {
    let s = sql.trim().trim_end_matches(';').trim_end();
    if s.contains(';') || s.len() > 64 {
        return TxnWord::Other;
    }
    let lower = s.to_ascii_lowercase();
    let mut words = lower.split_whitespace();
    let first = words.next();
    let mut rest = words.filter(|w| *w != "work" && *w != "transaction");
    match first {
        Some("begin") => TxnWord::Begin,
        Some("start") if lower.split_whitespace().nth(1) == Some("transaction") => TxnWord::Begin,
        Some("commit") | Some("end") => match rest.next() {
            None => TxnWord::Commit,
            Some(_) => TxnWord::Other, // AND CHAIN, PREPARED
        },
        Some("rollback") | Some("abort") => match rest.next() {
            None => TxnWord::Rollback,
            Some("to") => TxnWord::RollbackTo,
            Some(_) => TxnWord::Other,
        },
        _ => TxnWord::Other,
    }
}

/// `SET shardline.<name> = V`, `SET shardline.<name> TO DEFAULT`, `RESET shardline.<name>`
/// (names and values in lowercase): `Some(Some(v))`, `Some(None)` for the
/// default, or `None` when the text is something else.
fn proxy_setting(sql: &str, name: &str) -> Option<Option<String>> {
    let s = sql.trim().trim_end_matches(';').trim_end();
    if s.len() > 64 {
        return None; // every form of the setting is shorter; spare long texts the copy
    }
    let lower = s.to_ascii_lowercase();
    if lower.strip_prefix("reset shardline.") == Some(name) {
        return Some(None);
    }
    let rest = lower
        .strip_prefix("set")?
        .trim_start()
        .strip_prefix("session")
        .map_or_else(|| lower[3..].trim_start(), str::trim_start);
    let value = rest
        .strip_prefix("shardline.")?
        .strip_prefix(name)?
        .trim_start();
    let value = value
        .strip_prefix('=')
        .or_else(|| value.strip_prefix("to "))?
        .trim()
        .trim_matches('\'');
    Some((value != "default").then(|| value.to_owned()))
}

/// `SET shardline.shard = N` and its other forms: `Some(Some(n))`,
/// `Some(None)` (back to routing by key), or `None` for other texts.
fn shard_setting(sql: &str) -> Option<Result<Option<ShardId>, String>> {
    Some(match proxy_setting(sql, "shard")? {
        None => Ok(None),
        Some(v) => v.parse().map(|n| Some(ShardId(n))).map_err(|_| {
            format!("invalid value for shardline.shard: \"{v}\" (a shard id, or DEFAULT)")
        }),
    })
}

/// `SET shardline.read_from = primary|replica|any` and its other forms
/// (`None` in the result: back to the configured default).
fn read_from_setting(sql: &str) -> Option<Result<Option<ReadFrom>, String>> {
    Some(match proxy_setting(sql, "read_from")? {
        None => Ok(None),
        Some(v) => ReadFrom::parse(&v).map(Some).ok_or_else(|| {
            format!(
                "invalid value for shardline.read_from: \"{v}\" (primary, replica, any, or DEFAULT)"
            )
        }),
    })
}

/// The query text of a Parse definition (query, NUL, parameter types).
pub(super) fn definition_sql(definition: &[u8]) -> &[u8] {
    let end = definition
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(definition.len());
    &definition[..end]
}

fn tables_of(analysis: &router::Analysis) -> String {
    let mut names: Vec<&str> = analysis.targets.iter().map(|t| t.table.as_str()).collect();
    names.dedup();
    names.join(", ")
}

/// The follower's shard map, when it declares sharded tables or replicas,
/// or the cache keeps unsharded tables by a configured key.
fn map_to_route(
    follower: &crate::follower::MapFollower,
    cache: Option<&Arc<crate::result_cache::ResultCache>>,
) -> Option<Arc<ShardMap>> {
    let map = follower.map();
    let replicas = map.shards.values().any(|s| !s.replicas.is_empty());
    let keyed = cache.is_some_and(|c| c.has_keys());
    (!map.tables.is_empty() || replicas || keyed).then_some(map)
}

impl Session {
    /// The shard map to route by (see [`map_to_route`]).
    #[inline]
    pub(super) fn routing_map(&self) -> Option<Arc<ShardMap>> {
        let follower = self.shared.follower.as_deref()?;
        map_to_route(follower, self.shared.cache.as_ref())
    }

    /// Handles the frames routing decides on; `false` leaves the frame to
    /// the usual path.
    pub(super) async fn route_frame(&mut self, frame: &Frame, map: &Arc<ShardMap>) -> Result<bool> {
        if self.aborted_locally && self.on_aborted_frame(frame).await? {
            return Ok(true);
        }
        if self.local_portal.is_some() && self.on_local_portal(frame)? {
            return Ok(true);
        }
        match frame.tag() {
            frontend::QUERY => {
                self.on_query_routed(frame, map).await?;
                Ok(true)
            }
            frontend::PARSE => {
                let parse = Parse::decode(frame.body())?;
                if !parse.name.is_empty() {
                    return Ok(false);
                }
                // Deferred to the Bind, which may carry the key.
                let start = frame.as_bytes().len() - parse.definition.len();
                let definition = frame.clone().into_bytes().slice(start..);
                let effects = self.statement_effects_of(parse.query);
                self.unnamed_effects = effects.clone();
                self.unnamed = Some(ClientStatement {
                    hash: 0,
                    definition,
                    effects,
                });
                self.unnamed_sent_on = None;
                self.pending
                    .push(Entry::Local(LocalReply::ParseComplete), &mut self.cout);
                Ok(true)
            }
            frontend::BIND => {
                self.on_bind_routed(frame, map).await?;
                Ok(true)
            }
            frontend::CLOSE => {
                let target = Target::decode(frame.body())?;
                let unsent =
                    self.unnamed_sent_on != Some(self.attach_count) || self.server.is_none();
                if target.kind == frontend::TARGET_STATEMENT && target.name.is_empty() && unsent {
                    self.unnamed = None;
                    self.pending
                        .push(Entry::Local(LocalReply::CloseComplete), &mut self.cout);
                    return Ok(true);
                }
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    /// Sends the deferred unnamed statement to the attached server if it is
    /// not there yet.
    pub(super) fn send_unnamed(&mut self) {
        if self.unnamed_sent_on == Some(self.attach_count) {
            return;
        }
        let Some(statement) = &self.unnamed else {
            return;
        };
        frontend::encode_parse(&mut self.sout, b"", &statement.definition);
        self.push_injected(Expect::ParseComplete);
        // Not "open": the proxy can send it again, so the batch may still be
        // synced early and the connection freed.
        self.unnamed_sent_on = Some(self.attach_count);
    }

    /// Makes sure a connection to `shard` is attached: the one in hand, or a
    /// new one once the one in hand is between transactions. `read`: the
    /// statement may run on a replica, by this policy (see [`Session::choose`]).
    pub(super) async fn attach(
        &mut self,
        shard: ShardId,
        map: &ShardMap,
        read: Option<ReadFrom>,
    ) -> Result<()> {
        let in_transaction = self.server_in_transaction();
        // Between transactions a read may want a replica, a write the primary.
        // Inside a batch the server in hand stays if it can run the statement
        // (a primary runs anything, a replica reads): only a write that would
        // land on a replica makes it move.
        let held_replica = self
            .server_hold
            .as_ref()
            .is_some_and(|h| h.node().in_recovery() != Some(false));
        let other_server = self.server.is_some()
            && self.server_shard == Some(shard)
            && !in_transaction
            && self.mode == crate::config::PoolMode::Transaction
            && if self.pending.is_idle() {
                let wanted = self.choose(shard, map, read)?;
                let held = self.server_hold.as_ref().map(|h| h.node().addr.as_str());
                wanted.as_ref().map(|n| n.addr.as_str()) != held
            } else {
                read.is_none() && held_replica
            };
        if self.server.is_some() && (self.server_shard != Some(shard) || other_server) {
            if !self.pending.is_empty() {
                // Whether the batch so far may be ended here depends on
                // what it did, which its replies tell.
                self.settle().await?;
            }
            if self.pending.is_skipping() {
                // A statement before it in the batch failed: PostgreSQL
                // skips the rest up to the Sync, whatever shard it needs,
                // so it goes to the server that is skipping (the client
                // gets that one error, as from PostgreSQL).
                return Ok(());
            }
            let current = self.server_shard.unwrap_or(ShardMap::HOME);
            if self.mode == crate::config::PoolMode::Session {
                return Err(Error::Refused(format!(
                    "in session pooling mode a client keeps one server connection, on shard \
                     {current}; this statement needs shard {shard} (use transaction pooling for \
                     sharded tables)"
                )));
            }
            if self.server_in_transaction() {
                return Err(Error::Refused(format!(
                    "this transaction runs on shard {current} and this statement needs shard {shard}: \
                     a transaction stays on the shard of its first statement (transactions across \
                     shards need two-phase commit, which Shardline does not support yet)"
                )));
            }
            if !self.pending.is_idle() {
                if !self.pending.can_sync_early() {
                    let why = if other_server {
                        "this extended-protocol batch started on a replica and this statement may \
                         write, so it needs the primary: send a Sync before it"
                            .to_owned()
                    } else {
                        format!(
                            "this extended-protocol batch started on shard {current} and this \
                             statement needs shard {shard}: send a Sync between statements for \
                             different shards"
                        )
                    };
                    return Err(Error::Refused(why));
                }
                self.sync_early();
                self.settle().await?;
            }
            self.release_server();
        }
        let mut attempts = 0;
        while self.server.is_none() {
            let node = self.choose(shard, map, read)?;
            self.pool = match &node {
                Some(node) => self.pool_at(&node.addr)?,
                None => self.home_pool.clone(),
            };
            self.server_shard = Some(shard);
            tracing::debug!(%shard, addr = node.as_ref().map(|n| n.addr.as_str()), ?read, "attaching");
            match self.ensure_server().await {
                Ok(()) => {
                    if let Some(node) = &node {
                        node.report_success();
                    }
                    self.server_hold = node.map(|n| n.hold());
                }
                Err(e) => {
                    let Some(node) = node else { return Err(e) };
                    if !matches!(e, Error::ServerUnavailable { .. } | Error::ServerIo(_)) {
                        return Err(e);
                    }
                    let reason = e.to_string();
                    node.report_failure(&reason, &self.shared.config.replicas);
                    attempts += 1;
                    // A read goes on to another server; a write has none.
                    if !(read.is_some() && attempts <= READ_RETRIES_MAX) {
                        return Err(Error::ShardUnavailable {
                            shard,
                            role: node.role_name(),
                            reason,
                            consequence: "statements that need it fail",
                        });
                    }
                }
            }
        }
        if self.statement_writes {
            self.txn_wrote = true;
        }
        self.ensure_server().await
    }

    /// A FunctionCall (the fast path of libpq's `lo_*` functions) may write:
    /// it runs on the primary, inside the client's transaction.
    pub(super) async fn attach_function_call(&mut self, map: &ShardMap) -> Result<()> {
        self.statement_writes = true;
        // The function may write anything.
        self.cache_writes.everything();
        let shard = self.server_shard.unwrap_or(ShardMap::HOME);
        self.attach(shard, map, None).await?;
        self.start_deferred_transaction();
        Ok(())
    }

    /// Attaches for a message that continues what is in flight (Describe,
    /// Execute, Sync, ...): the connection in hand, else the primary of the
    /// current shard.
    pub(super) async fn attach_current(&mut self, map: &ShardMap) -> Result<()> {
        if self.server.is_some() {
            return self.ensure_server().await;
        }
        // Preparing and describing run nothing: outside a transaction a
        // replica does (and does while the primary is down). A Bind that
        // follows in the same batch moves the batch to the primary if its
        // statement writes.
        let idle = self.txn_status == TransactionStatus::Idle
            && self.mode == crate::config::PoolMode::Transaction;
        let read = idle
            .then_some(self.read_from)
            .filter(|r| *r != ReadFrom::Primary);
        let shard = self.server_shard.unwrap_or(ShardMap::HOME);
        self.statement_writes = false;
        self.attach(shard, map, read).await
    }

    /// The server for a statement on `shard`: a replica for a read when one
    /// qualifies (healthy, caught up, and past the session's last write
    /// there), else the primary. `None`: the shard is not in the map, use
    /// the database's configured server.
    pub(super) fn choose(
        &mut self,
        shard: ShardId,
        map: &ShardMap,
        read: Option<ReadFrom>,
    ) -> Result<Option<Arc<Node>>> {
        let shared = self.shared.clone();
        let backends = &shared.backends;
        let Some(nodes) = backends.shard(shard, map) else {
            if shard == ShardMap::HOME {
                return Ok(None);
            }
            return Err(Error::Refused(format!(
                "shard {shard} is not in the shard map"
            )));
        };
        let read = read.filter(|_| nodes.has_replicas());
        let min_lsn = match read {
            Some(_) => self.last_write_lsn(shard, &nodes),
            None => None,
        };
        if let Some(read_from) = read {
            if let Some(replica) = backends.replica(&nodes, read_from, min_lsn) {
                return Ok(Some(replica));
            }
        }
        match backends.primary(&nodes) {
            Ok(primary) => Ok(Some(primary)),
            Err(down) => {
                // Reads carry on on replicas while the primary is down, as
                // long as they show the session's own writes.
                if read.is_some() {
                    if let Some(replica) = backends.replica(&nodes, ReadFrom::Replica, min_lsn) {
                        return Ok(Some(replica));
                    }
                }
                Err(Error::ShardUnavailable {
                    shard: down.shard,
                    role: "primary",
                    reason: down.reason,
                    consequence: match (read, min_lsn) {
                        (Some(_), Some(_)) => {
                            "reads that must see this session's last write fail (no replica \
                             has replayed it), and writes fail"
                        }
                        (Some(_), None) => "reads fail (no replica is up) and writes fail",
                        (None, _) => "writes fail",
                    },
                })
            }
        }
    }

    /// The WAL position a replica must have replayed to show this session's
    /// last write on `shard` (`u64::MAX` while that position is not known
    /// yet: the primary then serves the read).
    fn last_write_lsn(&mut self, shard: ShardId, nodes: &ShardNodes) -> Option<u64> {
        let ryw = self
            .shared
            .database(&self.database)
            .is_some_and(|d| d.read_your_writes);
        if !ryw {
            return None;
        }
        match *self.last_writes.get(&shard)? {
            WriteMark::Lsn(lsn) => Some(lsn),
            WriteMark::CommittedBefore(at) => match nodes.primary_lsn_after(at) {
                Some(lsn) => {
                    self.last_writes.insert(shard, WriteMark::Lsn(lsn));
                    Some(lsn)
                }
                None => Some(u64::MAX),
            },
        }
    }

    /// The pool of the server at `addr` for this client's database and user.
    pub(super) fn pool_at(&mut self, addr: &str) -> Result<Arc<Pool>> {
        if let Some(pool) = self.shard_pools.get(addr) {
            return Ok(pool.clone());
        }
        let database = self
            .shared
            .database(&self.database)
            .ok_or_else(|| Error::UnknownDatabase(self.database.clone()))?;
        let pool = self.shared.pool_at(database, &self.user, Some(addr));
        self.shard_pools.insert(addr.to_owned(), pool.clone());
        Ok(pool)
    }

    /// The pool of `shard`'s primary.
    pub(super) fn pool_for(&mut self, shard: ShardId, map: &ShardMap) -> Result<Arc<Pool>> {
        match self.choose(shard, map, None)? {
            Some(node) => self.pool_at(&node.addr),
            None => Ok(self.home_pool.clone()),
        }
    }

    /// Runs the attached server until every reply owed is in `cout`. A
    /// Flush goes first: inside a batch the server holds its replies back
    /// until Sync or Flush.
    pub(super) async fn settle(&mut self) -> Result<()> {
        if !self.pending.is_empty() && self.server.is_some() {
            frontend::encode_flush(&mut self.sout);
        }
        loop {
            self.process_server()?;
            if self.pending.is_empty() && self.sout.is_empty() {
                return Ok(());
            }
            if !self.cout.is_empty() {
                let sent = write_some(&mut self.client, &mut self.cout)
                    .await
                    .map_err(Error::ClientIo)?;
                self.registration.info().counters.add_sent(sent);
                continue;
            }
            let Some(conn) = self.server.as_deref_mut() else {
                return Ok(());
            };
            if !self.sout.is_empty() {
                conn.stream.write_all(&self.sout).await.map_err(|e| {
                    conn.broken = true;
                    Error::ServerIo(e)
                })?;
                self.sout.clear();
                continue;
            }
            conn.buf.reserve(8192);
            let n = conn.stream.read_buf(&mut conn.buf).await.map_err(|e| {
                conn.broken = true;
                Error::ServerIo(e)
            })?;
            if n == 0 {
                conn.broken = true;
                return Err(Error::ServerIo(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Reports `e` for the message with `tag` once the replies owed before
    /// it are out. If the server holds an unsynced batch, PostgreSQL would
    /// roll that batch back on this error: dropping the connection does.
    pub(super) async fn fail(&mut self, e: Error, tag: u8) -> Result<()> {
        if e.is_fatal() {
            return Err(e);
        }
        if self.server.is_some() && !self.pending.is_empty() {
            self.settle().await?;
        }
        if self.server.is_some() && !self.pending.is_idle() {
            self.drop_server();
            if self.txn_status != TransactionStatus::Idle {
                self.aborted_locally = true;
                self.txn_status = TransactionStatus::Failed;
            }
        }
        self.report(e, tag)
    }

    /// The route of `sql` with `params`, as a decision.
    fn decide(&mut self, sql: &str, map: &ShardMap, params: router::Params<'_>) -> Decision {
        let analysis = self.shared.analyses.get_or_analyse(sql, map);
        let mut route = router::route(&analysis, map, params);
        let hint = match router::hint::hint(sql) {
            Err(why) => return Decision::Refuse(why),
            Ok(hint) => hint,
        };
        if let Some(hint) = &hint {
            route = router::hint::apply_hint(route, hint, &analysis, map);
        }
        let safe = analysis.replica_safe_with(&self.shared.config.replicas.safe_functions);
        let read = self.read_policy(safe, hint.as_ref());
        // Transaction control alone writes nothing; what ran inside did. (A
        // `;` inside the text may separate a write: not alone then.)
        let control_alone = analysis.kind == StatementKind::Transaction && !several_statements(sql);
        self.statement_writes = !control_alone && !safe;
        self.point_read = None;
        if let Some(cache) = self.shared.cache.as_ref().filter(|c| c.is_caching()) {
            if self.statement_writes {
                cache.note_write(&analysis, sql, map, params, &mut self.cache_writes);
            } else if self.txn_status == TransactionStatus::Idle {
                self.point_read = cache.point_read(&analysis, sql, map, params);
            }
        }
        if let Some(shard) = self.forced_shard {
            // Like a hint: it decides what the keys leave open, and a key
            // that says otherwise is refused rather than overruled.
            route =
                router::hint::apply_hint(route, &router::hint::Hint::Shard(shard), &analysis, map);
        }
        let shards: Vec<ShardId> = match route {
            Route::Refused(why) => return Decision::Refuse(why),
            Route::Shard(shard) => return Decision::Run(shard, read),
            Route::Home => {
                // Inside a transaction on another shard, a statement that
                // touches no table at all (COMMIT, SELECT now(), SET LOCAL)
                // runs where the transaction is.
                if let Some(current) = self.server_shard {
                    let tableless = analysis.kind == StatementKind::Transaction
                        || router::referenced_tables(sql).is_some_and(|t| t.is_empty());
                    if current != ShardMap::HOME && tableless {
                        return Decision::Run(current, read);
                    }
                }
                return Decision::Run(ShardMap::HOME, read);
            }
            Route::Shards(set) => set.into_iter().collect(),
            Route::Every => map.shards.keys().copied().collect(),
        };
        let tables = tables_of(&analysis);
        let writes = analysis.targets.iter().any(|t| t.writes);
        match analysis.kind {
            StatementKind::Select if !writes => {
                let table = analysis.targets.first().map(|t| t.table.clone());
                Decision::Scatter(shards, table.unwrap_or_default())
            }
            StatementKind::Ddl if shards.len() == map.shards.len() => {
                self.ddl_statements(sql, &analysis, map, &shards)
            }
            // The shards come from the map, so as many means every one.
            StatementKind::Update | StatementKind::Delete if shards.len() == map.shards.len() => {
                Decision::Refuse(format!(
                    "{} on sharded table {tables} without its shard key in WHERE would change rows on \
                     every shard, which needs two-phase commit (not supported yet): add a condition \
                     on the shard key",
                    kind_name(analysis.kind)
                ))
            }
            StatementKind::Insert if sql.to_ascii_lowercase().contains("returning") => {
                Decision::Refuse(format!(
                    "RETURNING on an INSERT whose rows go to several shards of {tables} is not \
                     supported (the rows could not come back in the order they were inserted); \
                     insert per shard, or without RETURNING"
                ))
            }
            StatementKind::Insert => {
                match router::insert_split::split_insert(sql, &analysis, map, params) {
                    Ok(pieces) => Decision::SplitInsert(pieces),
                    Err(why) => Decision::Refuse(why),
                }
            }
            StatementKind::Copy { from_stdin: true } => Decision::CopyIn(analysis.clone()),
            StatementKind::Copy { .. } => Decision::Refuse(format!(
                "COPY of sharded table {tables} across shards is not supported; use \
                 COPY (SELECT ...) TO STDOUT with a shard key, or query each shard"
            )),
            kind => Decision::Refuse(format!(
                "this {} touches sharded table {tables} on several shards, which needs two-phase \
                 commit (not supported yet)",
                kind_name(kind)
            )),
        }
    }

    /// `SET shardline.shard` / `shardline.read_from` (and their RESET forms),
    /// which the proxy keeps for itself; `None` for any other text.
    fn apply_proxy_setting(&mut self, sql: &str) -> Option<Result<(), String>> {
        if let Some(setting) = read_from_setting(sql) {
            return Some(setting.map(|read_from| {
                self.read_from = read_from.unwrap_or(self.shared.config.replicas.read_from);
            }));
        }
        let setting = shard_setting(sql)?;
        Some(setting.map(|shard| self.forced_shard = shard))
    }

    /// Whether a statement may run on a replica, and by which policy: a
    /// replica-safe read (`safe`, see `router::Analysis`), outside a transaction or
    /// in one begun READ ONLY that has not run anything yet, unless the
    /// session or a hint says primary.
    fn read_policy(&self, safe: bool, hint: Option<&router::hint::Hint>) -> Option<ReadFrom> {
        let read_from = match hint {
            Some(router::hint::Hint::Primary) => return None,
            Some(router::hint::Hint::Replica) => ReadFrom::Replica,
            _ => self.read_from,
        };
        let fresh_transaction = self.mode == crate::config::PoolMode::Transaction
            && (self.txn_status == TransactionStatus::Idle
                || (self.deferred_begin.is_some() && self.begin_read_only));
        (read_from != ReadFrom::Primary && fresh_transaction && safe).then_some(read_from)
    }

    /// DDL on sharded tables: the statements for each shard. A CREATE TABLE
    /// of a declared table becomes its hash-partitioned layout there.
    fn ddl_statements(
        &self,
        sql: &str,
        analysis: &router::Analysis,
        map: &ShardMap,
        shards: &[ShardId],
    ) -> Decision {
        let created = analysis.targets.first().and_then(|t| {
            let table = map.tables.get(&t.table)?;
            let group = map.groups.get(&table.group)?;
            Some((table, group))
        });
        let mut statements = Vec::with_capacity(shards.len());
        for &shard in shards {
            let text = match created {
                Some((table, group)) => {
                    match router::ddl::create_on_shard(sql, table, group, shard) {
                        Ok(parts) => parts.join(";\n"),
                        Err(e) if e.0 == "not a CREATE TABLE statement" => sql.to_owned(),
                        Err(e) => return Decision::Refuse(e.0),
                    }
                }
                None => sql.to_owned(),
            };
            statements.push((shard, text));
        }
        Decision::Broadcast(statements)
    }

    pub(super) async fn on_query_routed(
        &mut self,
        frame: &Frame,
        map: &Arc<ShardMap>,
    ) -> Result<()> {
        let text = frontend::query_text(frame.body())?;
        // A simple Query ends the unnamed statement, on the server as here.
        self.unnamed = None;
        self.statement_writes = true; // until the analysis says otherwise
        if !self.pending.is_empty() && self.server.is_some() {
            self.settle().await?;
        }
        let identity = match self.cached_query_by_text(text, map) {
            ControlFlow::Break(()) => return Ok(()),
            ControlFlow::Continue(identity) => identity,
        };
        let Ok(sql) = std::str::from_utf8(text) else {
            // Not analysed: it may write anything.
            self.cache_writes.everything();
            return self.run_query_on(ShardMap::HOME, None, frame, map).await;
        };
        if let Some(applied) = self.apply_proxy_setting(sql) {
            return match applied {
                Ok(()) => {
                    rows::encode_command_complete(&mut self.cout, b"SET");
                    self.ready_for_query(self.txn_status);
                    Ok(())
                }
                Err(why) => self.fail(Error::Refused(why), frontend::QUERY).await,
            };
        }
        if !self.server_in_transaction() {
            match (txn_word(sql), self.txn_status, &self.deferred_begin) {
                (TxnWord::Begin, TransactionStatus::Idle, _) if router::parses(sql) => {
                    self.deferred_begin = Some(frame.clone().into_bytes());
                    self.begin_read_only = router::begin_read_only(sql);
                    self.txn_status = TransactionStatus::InTransaction;
                    self.publish_in_transaction(true);
                    rows::encode_command_complete(&mut self.cout, b"BEGIN");
                    self.ready_for_query(self.txn_status);
                    return Ok(());
                }
                (word @ (TxnWord::Commit | TxnWord::Rollback), _, Some(_)) => {
                    // Nothing ran: ending the transaction needs no server.
                    self.deferred_begin = None;
                    self.txn_status = TransactionStatus::Idle;
                    self.publish_in_transaction(false);
                    let tag: &[u8] = if word == TxnWord::Commit {
                        b"COMMIT"
                    } else {
                        b"ROLLBACK"
                    };
                    rows::encode_command_complete(&mut self.cout, tag);
                    self.ready_for_query(self.txn_status);
                    return Ok(());
                }
                _ => {}
            }
        }
        let (shards, job) = match self.decide(sql, map, router::Params::default()) {
            Decision::Run(shard, read) => {
                let read = match self.cached(b'Q', text, identity, shard, map) {
                    CacheStep::Hit => return Ok(()),
                    CacheStep::Fill => None,
                    CacheStep::Bypass => read,
                };
                self.run_query_on(shard, read, frame, map).await?;
                if self.fill.is_some() && !self.on_primary() {
                    self.fill = None;
                }
                return Ok(());
            }
            Decision::Refuse(why) => return self.fail(Error::Refused(why), frontend::QUERY).await,
            multi => match multi_job(multi, sql, map) {
                Ok(job) => job,
                Err(e) => return self.fail(e, frontend::QUERY).await,
            },
        };
        if let Err(e) = self.check_multi_allowed() {
            return self.fail(e, frontend::QUERY).await;
        }
        let result = match &job {
            MultiJob::CopyIn(analysis) => self.copy_in_split(sql, analysis, map).await,
            job => {
                let req = Request {
                    bind: None,
                    param_types: &[],
                    describe: true,
                    execute: true,
                };
                self.run_multi(&shards, job, &req, map).await
            }
        };
        self.note_multi_writes(&job, &shards);
        self.after_multi(result)
    }

    /// Multi-shard writes (split INSERT and COPY, DDL) committed on each of
    /// their shards by now, or failed there: either way this session's reads
    /// must not miss them on a replica.
    fn note_multi_writes(&mut self, job: &MultiJob, shards: &[ShardId]) {
        // Committed (multi-shard work runs outside transactions) and about
        // to be acknowledged, by either protocol.
        self.apply_cache_writes();
        if matches!(job, MultiJob::Scatter(..)) {
            return;
        }
        let now = tokio::time::Instant::now();
        for &shard in shards {
            self.last_writes
                .insert(shard, WriteMark::CommittedBefore(now));
        }
    }

    async fn run_query_on(
        &mut self,
        shard: ShardId,
        read: Option<ReadFrom>,
        frame: &Frame,
        map: &ShardMap,
    ) -> Result<()> {
        if let Err(e) = self.attach(shard, map, read).await {
            return self.fail(e, frontend::QUERY).await;
        }
        self.arm_retry(read, shard, frame, true);
        self.start_deferred_transaction();
        let effects = self.effects_of(frontend::query_text(frame.body())?);
        self.forward(frame, Entry::with_effects(Expect::Ready, effects));
        Ok(())
    }

    /// Statements on several shards run only outside transactions, on a
    /// session with nothing else in flight.
    fn check_multi_allowed(&mut self) -> Result<()> {
        if self.txn_status != TransactionStatus::Idle {
            let on = self
                .server_shard
                .map_or_else(|| "its first shard".to_owned(), |s| format!("shard {s}"));
            return Err(Error::Refused(format!(
                "this statement needs several shards, but a transaction runs on one shard ({on}); \
                 run it outside the transaction block"
            )));
        }
        if self.server.is_some() {
            if !self.pending.is_idle() {
                return Err(Error::Refused(
                    "a statement that needs several shards must be the only one in its \
                     extended-protocol batch: send a Sync before it"
                        .into(),
                ));
            }
            self.release_server();
        }
        Ok(())
    }

    /// Answers a point read from the cache, or prepares to fill the cache
    /// with its reply (from the primary: a replica may not have the latest
    /// write yet). `text` is the request of protocol `kind` (`Q` or `E`,
    /// see [`ResultCache::identity`]); a hit is answered locally, with
    /// ReadyForQuery.
    /// `identity` is the request's cache key when the caller has it already.
    fn cached(
        &mut self,
        kind: u8,
        text: &[u8],
        identity: Option<Vec<u8>>,
        shard: ShardId,
        map: &ShardMap,
    ) -> CacheStep {
        let Some(point) = self.point_read.take() else {
            return CacheStep::Bypass;
        };
        let Some(cache) = &self.shared.cache else {
            return CacheStep::Bypass;
        };
        if !self.cache_quiet() || !cache.serves(&point.table, shard, &self.shared.backends, map) {
            return CacheStep::Bypass;
        }
        let identity = identity.unwrap_or_else(|| self.cache_identity(kind, text));
        if let Some(reply) = cache.store.get(&identity) {
            self.cout.extend_from_slice(&reply);
            self.note_cache_hit(shard.0);
            self.ready_for_query(TransactionStatus::Idle);
            return CacheStep::Hit;
        }
        self.fill = Some(Box::new(Fill {
            identity,
            ticket: cache.store.ticket(&point.table, &point.key),
            origin: Origin {
                table: point.table.as_str().into(),
                shard: shard.0,
            },
            reply: Vec::new(),
            complete: false,
        }));
        CacheStep::Fill
    }

    /// The cache key of request `text` of protocol `kind` in this session.
    fn cache_identity(&self, kind: u8, text: &[u8]) -> Vec<u8> {
        ResultCache::identity(
            kind,
            &self.database,
            &self.user.name,
            params_hash(&self.params),
            text,
        )
    }

    /// Whether the session is where a cached reply may answer: between
    /// transactions with nothing in flight, in transaction pooling. (Session
    /// pooling keeps whatever state the client makes on its connection:
    /// temporary tables, set_config, settings made inside functions, which
    /// the cache key cannot hold; no cache there.)
    fn cache_quiet(&self) -> bool {
        self.mode == PoolMode::Transaction
            && self.txn_status == TransactionStatus::Idle
            && self.deferred_begin.is_none()
            && self.pending.is_empty()
            && self.retry.is_none()
            && !self.skipping_to_sync
            && !self.server_in_transaction()
    }

    /// A simple Query answered from the cache by its text alone, before any
    /// analysis or routing: the text was a point read when it was filled
    /// (the same text analyses the same way), and the entry knows its table
    /// and shard for the serving check. Not with `SET shardline.shard`,
    /// which could route the text elsewhere. Not answered: the key, if it
    /// was computed, for the full path to reuse.
    fn cached_query_by_text(
        &mut self,
        text: &[u8],
        map: &ShardMap,
    ) -> ControlFlow<(), Option<Vec<u8>>> {
        let Some(cache) = &self.shared.cache else {
            return ControlFlow::Continue(None);
        };
        if !cache.is_caching() || self.forced_shard.is_some() || !self.cache_quiet() {
            return ControlFlow::Continue(None);
        }
        let identity = self.cache_identity(b'Q', text);
        let Some((reply, origin)) = cache.store.peek(&identity) else {
            return ControlFlow::Continue(Some(identity));
        };
        if !cache.serves(
            &origin.table,
            ShardId(origin.shard),
            &self.shared.backends,
            map,
        ) {
            return ControlFlow::Continue(Some(identity));
        }
        cache.store.count_hit();
        self.cout.extend_from_slice(&reply);
        self.note_cache_hit(origin.shard);
        self.ready_for_query(TransactionStatus::Idle);
        ControlFlow::Break(())
    }

    /// The extended-protocol form of [`Session::cached`]: a Bind of
    /// the unnamed portal followed, already in the client's buffer, by an
    /// optional Describe of that portal, an Execute of all its rows and a
    /// Sync. A hit answers the four messages and consumes the other three.
    fn cached_bind(
        &mut self,
        bind: &Bind<'_>,
        definition: &[u8],
        shard: ShardId,
        map: &ShardMap,
    ) -> CacheStep {
        if !bind.portal.is_empty() {
            self.point_read = None;
            return CacheStep::Bypass;
        }
        let Some((batch_len, describe)) = execute_batch(&self.cbuf) else {
            self.point_read = None;
            return CacheStep::Bypass;
        };
        let mut text = Vec::with_capacity(1 + definition.len() + bind.rest.len() + 5);
        text.push(u8::from(describe));
        text.extend_from_slice(&(definition.len() as u32).to_le_bytes());
        text.extend_from_slice(definition);
        text.extend_from_slice(bind.rest);
        let step = self.cached(b'E', &text, None, shard, map);
        if matches!(step, CacheStep::Hit) {
            self.cbuf.advance(batch_len);
        }
        step
    }

    /// Whether the attached server connection is to a primary.
    fn on_primary(&self) -> bool {
        self.server_hold
            .as_ref()
            .is_some_and(|hold| hold.node().in_recovery() == Some(false))
    }

    /// A simple Query that ran on several shards: ReadyForQuery, or the error.
    fn after_multi(&mut self, result: Result<bool>) -> Result<()> {
        self.apply_cache_writes();
        match result {
            Ok(_) => {
                self.ready_for_query(self.txn_status);
                Ok(())
            }
            Err(e) => self.report(e, frontend::QUERY),
        }
    }

    /// One connection per shard, with the session's parameters applied.
    pub(super) async fn checkout_all(
        &mut self,
        shards: &[ShardId],
        map: &ShardMap,
    ) -> Result<Vec<ShardConn>> {
        let max = self.shared.config.proxy.message_bytes_max;
        let mut conns = Vec::with_capacity(shards.len());
        for &shard in shards {
            let pool = self.pool_for(shard, map)?;
            let who = Borrower {
                client: Some(self.registration.info()),
                in_transaction: false,
            };
            let mut conn = pool.checkout(who).await?;
            let sql = crate::params::sync_sql(&self.params, &conn.params);
            if !sql.is_empty() {
                if let Some(message) = conn.run_discarding(&sql, max).await? {
                    tracing::warn!(%message, "replaying session parameters failed");
                }
            }
            conn.params = self.params.clone();
            conns.push(ShardConn::new(shard, conn));
        }
        Ok(conns)
    }

    /// Checks out one connection per shard and runs `job` on them; `true`
    /// if the client was sent an error.
    async fn run_multi(
        &mut self,
        shards: &[ShardId],
        job: &MultiJob,
        req: &Request<'_>,
        map: &ShardMap,
    ) -> Result<bool> {
        let max = self.shared.config.proxy.message_bytes_max;
        let mut conns = self.checkout_all(shards, map).await?;
        let flush_bytes = self.shared.config.proxy.buffer_bytes_max as usize;
        let mut sink = Sink {
            client: &mut self.client,
            counters: &self.registration.info().counters,
            out: &mut self.cout,
            flush_bytes,
            errored: false,
            error_code: None,
        };
        match job {
            MultiJob::Scatter(plan, table) => {
                scatter::gather(&mut conns, plan, table, req, &mut sink, max).await?
            }
            MultiJob::Broadcast(statements) => {
                let texts: Vec<String> = statements.iter().map(|(_, t)| t.clone()).collect();
                scatter::broadcast(&mut conns, &texts, &mut sink, max).await?
            }
            MultiJob::Insert(pieces) => {
                scatter::insert_split(&mut conns, pieces, req, &mut sink, max).await?
            }
            MultiJob::CopyIn(_) => return Err(Error::Refused("COPY runs on its own path".into())),
        }
        let (errored, code) = (sink.errored, sink.error_code);
        self.note_multi(code.as_ref().map(|c| &c[..]));
        Ok(errored)
    }

    async fn on_bind_routed(&mut self, frame: &Frame, map: &Arc<ShardMap>) -> Result<()> {
        let bind = Bind::decode(frame.body())?;
        self.statement_writes = true; // until the analysis says otherwise
        let statement = if bind.statement.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.statements.get(bind.statement)
        };
        let Some(statement) = statement else {
            // Unknown to us: the server reports it, wherever it runs.
            if let Err(e) = self.attach_current(map).await {
                return self.fail(e, frontend::BIND).await;
            }
            return self.on_bind(frame);
        };
        let definition = statement.definition.clone();
        let Ok(sql) = std::str::from_utf8(definition_sql(&definition)) else {
            self.cache_writes.everything();
            return self.bind_on(ShardMap::HOME, None, frame, &bind, map).await;
        };
        if bind.portal.is_empty() && self.bind_locally(sql) {
            return Ok(());
        }
        if bind.portal.is_empty() {
            // Drivers that run everything as Parse/Bind/Execute (JDBC,
            // tokio-postgres `execute`) set the proxy's own settings too.
            match self.apply_proxy_setting(sql) {
                Some(Ok(())) => {
                    self.local_portal = Some("SET");
                    self.pending
                        .push(Entry::Local(LocalReply::BindComplete), &mut self.cout);
                    return Ok(());
                }
                Some(Err(why)) => return self.fail(Error::Refused(why), frontend::BIND).await,
                None => {}
            }
        }
        let params = BindParams::decode(bind.rest)?;
        let route_params = router::Params {
            values: &params.values,
            formats: &params.formats,
        };
        let (shards, job) = match self.decide(sql, map, route_params) {
            Decision::Run(shard, read) => {
                let read = match self.cached_bind(&bind, &definition, shard, map) {
                    CacheStep::Hit => return Ok(()),
                    CacheStep::Fill => None,
                    CacheStep::Bypass => read,
                };
                self.bind_on(shard, read, frame, &bind, map).await?;
                if self.fill.is_some() && !self.on_primary() {
                    self.fill = None;
                }
                return Ok(());
            }
            Decision::Refuse(why) => return self.fail(Error::Refused(why), frontend::BIND).await,
            multi => match multi_job(multi, sql, map) {
                Ok(job) => job,
                Err(e) => return self.fail(e, frontend::BIND).await,
            },
        };
        if matches!(job, MultiJob::Broadcast(_)) && !params.values.is_empty() {
            let e = Error::Refused("DDL on a sharded table cannot take parameters".into());
            return self.fail(e, frontend::BIND).await;
        }
        if let Err(e) = self.check_multi_allowed() {
            return self.fail(e, frontend::BIND).await;
        }
        self.start_multi_batch(job, shards, definition, frame)
    }

    async fn bind_on(
        &mut self,
        shard: ShardId,
        read: Option<ReadFrom>,
        frame: &Frame,
        bind: &Bind<'_>,
        map: &ShardMap,
    ) -> Result<()> {
        if let Err(e) = self.attach(shard, map, read).await {
            return self.fail(e, frontend::BIND).await;
        }
        self.arm_retry(read, shard, frame, false);
        self.start_deferred_transaction();
        if bind.statement.is_empty() {
            self.send_unnamed();
        }
        self.on_bind(frame)
    }

    /// Keeps a read that runs on a replica, with nothing else in flight and
    /// outside a transaction, so that it can be sent elsewhere if the
    /// replica fails before its rows reach the client. `complete`: the
    /// frame is the whole request (a simple Query); else (a Bind) the
    /// messages up to its Sync join it as they come.
    pub(super) fn arm_retry(
        &mut self,
        read: Option<ReadFrom>,
        shard: ShardId,
        frame: &Frame,
        complete: bool,
    ) {
        let on_replica = self
            .server_hold
            .as_ref()
            .is_some_and(|h| h.node().in_recovery() == Some(true));
        // Everything before it answered, the server not skipping to a Sync
        // after an error, and nothing open that a new connection lacks
        // (named statements and the held unnamed one are prepared again).
        let alone = (self.pending.is_idle() || self.pending.can_sync_early())
            && self.deferred_begin.is_none()
            && self.txn_status == TransactionStatus::Idle;
        if read.is_some() && on_replica && alone {
            self.retry = Some(Retry {
                frames: vec![frame.clone()],
                complete,
                shard,
                attempts: self.retry_attempts,
            });
        }
    }

    /// BEGIN, and COMMIT/ROLLBACK of a transaction no server has seen yet,
    /// bound through the extended protocol: answered here like their simple
    /// Query forms, the portal's Describe and Execute too. `true`: answered.
    fn bind_locally(&mut self, sql: &str) -> bool {
        if self.server_in_transaction() {
            return false;
        }
        let tag = match (txn_word(sql), self.txn_status, &self.deferred_begin) {
            (TxnWord::Begin, TransactionStatus::Idle, _) if router::parses(sql) => {
                self.begin_read_only = router::begin_read_only(sql);
                let mut query = bytes::BytesMut::new();
                frontend::encode_query(&mut query, sql.as_bytes());
                self.deferred_begin = Some(query.freeze());
                self.txn_status = TransactionStatus::InTransaction;
                self.publish_in_transaction(true);
                "BEGIN"
            }
            (word @ (TxnWord::Commit | TxnWord::Rollback), _, Some(_)) => {
                self.deferred_begin = None;
                self.txn_status = TransactionStatus::Idle;
                self.publish_in_transaction(false);
                if word == TxnWord::Commit {
                    "COMMIT"
                } else {
                    "ROLLBACK"
                }
            }
            _ => return false,
        };
        self.local_portal = Some(tag);
        self.pending
            .push(Entry::Local(LocalReply::BindComplete), &mut self.cout);
        true
    }

    /// Describe, Execute and Close of a portal answered by [`Self::bind_locally`].
    fn on_local_portal(&mut self, frame: &Frame) -> Result<bool> {
        let Some(tag) = self.local_portal else {
            return Ok(false);
        };
        let reply = match frame.tag() {
            frontend::DESCRIBE => {
                let target = Target::decode(frame.body())?;
                if target.kind != frontend::TARGET_PORTAL || !target.name.is_empty() {
                    return Ok(false);
                }
                LocalReply::NoData
            }
            frontend::EXECUTE => {
                if frame.body().first() != Some(&0) {
                    return Ok(false); // a named portal
                }
                LocalReply::Complete(tag)
            }
            frontend::CLOSE => {
                let target = Target::decode(frame.body())?;
                if target.kind != frontend::TARGET_PORTAL || !target.name.is_empty() {
                    return Ok(false);
                }
                self.local_portal = None;
                LocalReply::CloseComplete
            }
            frontend::SYNC | frontend::BIND | frontend::QUERY => {
                self.local_portal = None;
                return Ok(false);
            }
            _ => return Ok(false),
        };
        self.pending.push(Entry::Local(reply), &mut self.cout);
        Ok(true)
    }

    fn start_multi_batch(
        &mut self,
        job: MultiJob,
        shards: Vec<ShardId>,
        definition: Bytes,
        bind: &Frame,
    ) -> Result<()> {
        self.multi_batch = Some(Box::new(MultiBatch {
            job,
            shards,
            definition,
            bind: bind.clone(),
            describe: false,
            execute: false,
            closes: 0,
        }));
        Ok(())
    }

    /// A frame while a multi-shard statement is being collected. `true`:
    /// consumed. `false`: the batch ran; the frame is for the usual path.
    pub(super) async fn on_multi_batch_frame(&mut self, frame: &Frame) -> Result<bool> {
        let batch = self.multi_batch.as_mut().expect("checked by the caller");
        let reads = matches!(batch.job, MultiJob::Scatter(..));
        match frame.tag() {
            frontend::DESCRIBE => {
                let target = Target::decode(frame.body())?;
                if target.kind == frontend::TARGET_PORTAL {
                    batch.describe = true;
                    return Ok(true);
                }
            }
            frontend::EXECUTE => {
                let body = frame.body();
                let max_rows = body
                    .iter()
                    .position(|&b| b == 0)
                    .and_then(|end| body.get(end + 1..end + 5))
                    .map_or(0, |b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                if max_rows > 0 && reads {
                    self.multi_batch = None;
                    let e = Error::Refused(
                        "fetching a statement that runs on several shards in pieces (Execute \
                         with a row limit) is not supported"
                            .into(),
                    );
                    return self.report(e, frontend::EXECUTE).map(|()| true);
                }
                batch.execute = true;
                if matches!(batch.job, MultiJob::CopyIn(_)) {
                    // The client waits for CopyInResponse before its Sync.
                    if self.run_multi_batch().await? {
                        self.skipping_to_sync = true;
                    }
                }
                return Ok(true);
            }
            frontend::CLOSE => {
                let target = Target::decode(frame.body())?;
                if target.kind == frontend::TARGET_PORTAL {
                    batch.closes += 1;
                    return Ok(true);
                }
            }
            frontend::FLUSH => {
                // A reader may wait for its rows on a Flush; writes wait for
                // the Sync that would commit them.
                if reads && batch.execute && self.run_multi_batch().await? {
                    self.skipping_to_sync = true;
                }
                return Ok(true);
            }
            frontend::TERMINATE => {
                // No Sync: PostgreSQL would roll the batch back.
                self.multi_batch = None;
                return Ok(false);
            }
            _ => {}
        }
        let errored = self.run_multi_batch().await?;
        if frame.tag() == frontend::SYNC {
            self.skipping_to_sync = false;
            self.ready_for_query(self.txn_status);
            return Ok(true);
        }
        if errored {
            // Like the server after an error: skip to the Sync.
            self.skipping_to_sync = true;
            return Ok(true);
        }
        Ok(false)
    }

    /// Runs the collected batch; `true` if the client was sent an error.
    async fn run_multi_batch(&mut self) -> Result<bool> {
        let batch = self.multi_batch.take().expect("checked by the caller");
        let map = match self.routing_map() {
            Some(map) => map,
            None => Arc::new(ShardMap::default()),
        };
        let bind = Bind::decode(batch.bind.body())?;
        let params = BindParams::decode(bind.rest)?;
        let param_types = rows::parse_param_types(&batch.definition)?;
        let req = Request {
            bind: Some(&params),
            param_types: &param_types,
            describe: batch.describe,
            execute: batch.execute,
        };
        rows::encode_empty(&mut self.cout, backend::BIND_COMPLETE);
        let result = match &batch.job {
            MultiJob::CopyIn(analysis) => {
                let sql = String::from_utf8_lossy(definition_sql(&batch.definition)).into_owned();
                self.copy_in_split(&sql, analysis, &map).await
            }
            MultiJob::Scatter(..) => self.run_multi(&batch.shards, &batch.job, &req, &map).await,
            job => {
                // Writes: no rows to describe, and nothing runs unless executed.
                if batch.describe {
                    rows::encode_empty(&mut self.cout, backend::NO_DATA);
                }
                if batch.execute {
                    self.run_multi(&batch.shards, job, &req, &map).await
                } else {
                    Ok(false)
                }
            }
        };
        self.note_multi_writes(&batch.job, &batch.shards);
        match result {
            Ok(false) => {
                for _ in 0..batch.closes {
                    rows::encode_empty(&mut self.cout, backend::CLOSE_COMPLETE);
                }
                Ok(false)
            }
            Ok(true) => Ok(true),
            Err(e) => self.report(e, frontend::EXECUTE).map(|()| true),
        }
    }

    /// A frame in a transaction aborted by a refusal. `true`: handled.
    /// Like PostgreSQL, only ending the transaction (or rolling back to a
    /// savepoint) is accepted; Parse, Close, Flush and Sync go the usual way.
    async fn on_aborted_frame(&mut self, frame: &Frame) -> Result<bool> {
        // Owned: ending the transaction below needs `self` mutably.
        let sql: Vec<u8> = match frame.tag() {
            frontend::QUERY => frontend::query_text(frame.body())?.to_vec(),
            frontend::BIND => {
                let bind = Bind::decode(frame.body())?;
                let statement = if bind.statement.is_empty() {
                    self.unnamed.as_ref()
                } else {
                    self.statements.get(bind.statement)
                };
                match statement {
                    Some(s) => definition_sql(&s.definition).to_vec(),
                    None => Vec::new(),
                }
            }
            // PostgreSQL parses only transaction control in an aborted transaction.
            frontend::PARSE => Parse::decode(frame.body())?.query.to_vec(),
            frontend::DESCRIBE | frontend::EXECUTE | frontend::FUNCTION_CALL => {
                let e = Error::TransactionAborted;
                return self.fail(e, frame.tag()).await.map(|()| true);
            }
            _ => return Ok(false),
        };
        if self.server.is_some() && !self.pending.is_empty() {
            // Replies still owed go out before anything this answers.
            self.settle().await?;
        }
        let word = std::str::from_utf8(&sql).map_or(TxnWord::Other, txn_word);
        match (word, frame.tag()) {
            (TxnWord::Commit | TxnWord::Rollback, frontend::QUERY) => {
                self.end_aborted();
                rows::encode_command_complete(&mut self.cout, b"ROLLBACK");
                self.ready_for_query(self.txn_status);
                Ok(true)
            }
            (TxnWord::Commit | TxnWord::Rollback, frontend::BIND) => {
                // Bound COMMIT or ROLLBACK: end the transaction here, then run
                // the client's portal as a ROLLBACK with nothing to roll back,
                // so it gets the tag PostgreSQL gives a failed COMMIT. The
                // client's statement itself stays as it was prepared.
                self.end_aborted();
                let Some(map) = self.routing_map() else {
                    return Ok(false);
                };
                if let Err(e) = self.attach(ShardMap::HOME, &map, None).await {
                    return self.fail(e, frontend::BIND).await.map(|()| true);
                }
                let bind = Bind::decode(frame.body())?;
                frontend::encode_parse(&mut self.sout, b"", b"ROLLBACK\0\0\0");
                self.push_injected(Expect::ParseComplete);
                self.unnamed_sent_on = None;
                self.pending.note_open();
                frontend::encode_bind(&mut self.sout, bind.portal, b"", bind.rest);
                self.pending
                    .push(Entry::forwarded(Expect::BindComplete), &mut self.cout);
                self.bound_effects = None;
                Ok(true)
            }
            (TxnWord::Commit | TxnWord::Rollback | TxnWord::RollbackTo, frontend::PARSE) => {
                Ok(false)
            }
            (TxnWord::RollbackTo, _) if self.server.is_some() => {
                // The server's transaction never saw the refused statement.
                self.aborted_locally = false;
                self.txn_status = TransactionStatus::InTransaction;
                Ok(false)
            }
            _ => {
                let e = Error::TransactionAborted;
                self.fail(e, frame.tag()).await.map(|()| true)
            }
        }
    }

    /// Ends a locally aborted transaction: dropping the server connection
    /// makes PostgreSQL roll back whatever ran before the refusal.
    fn end_aborted(&mut self) {
        self.drop_server();
        self.deferred_begin = None;
        self.aborted_locally = false;
        self.txn_status = TransactionStatus::Idle;
        self.publish_in_transaction(false);
        self.txn_effects.clear();
    }
}

/// The shards and the job of a decision to run on several shards.
fn multi_job(decision: Decision, sql: &str, map: &ShardMap) -> Result<(Vec<ShardId>, MultiJob)> {
    Ok(match decision {
        Decision::Scatter(shards, table) => {
            let plan = router::scatter::plan(sql).map_err(|r| Error::Refused(r.0))?;
            (shards, MultiJob::Scatter(plan, table))
        }
        Decision::Broadcast(statements) => {
            let shards = statements.iter().map(|(s, _)| *s).collect();
            (shards, MultiJob::Broadcast(statements))
        }
        Decision::SplitInsert(pieces) => {
            let shards = pieces.iter().map(|p| p.shard).collect();
            (shards, MultiJob::Insert(pieces))
        }
        Decision::CopyIn(analysis) => (
            map.shards.keys().copied().collect(),
            MultiJob::CopyIn(analysis),
        ),
        Decision::Run(..) | Decision::Refuse(_) => {
            return Err(Error::Refused("not a statement for several shards".into()))
        }
    })
}

fn kind_name(kind: StatementKind) -> &'static str {
    match kind {
        StatementKind::Select => "SELECT",
        StatementKind::Insert => "INSERT",
        StatementKind::Update => "UPDATE",
        StatementKind::Delete => "DELETE",
        StatementKind::Copy { .. } => "COPY",
        StatementKind::Ddl => "DDL statement",
        StatementKind::Transaction => "transaction statement",
        StatementKind::Other => "statement",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_words() {
        assert_eq!(txn_word("BEGIN"), TxnWord::Begin);
        assert_eq!(
            txn_word(" begin isolation level serializable; "),
            TxnWord::Begin
        );
        assert_eq!(txn_word("START TRANSACTION"), TxnWord::Begin);
        assert_eq!(txn_word("commit"), TxnWord::Commit);
        assert_eq!(txn_word("END WORK"), TxnWord::Commit);
        assert_eq!(txn_word("COMMIT AND CHAIN"), TxnWord::Other);
        assert_eq!(txn_word("ROLLBACK"), TxnWord::Rollback);
        assert_eq!(txn_word("rollback to savepoint a"), TxnWord::RollbackTo);
        assert_eq!(txn_word("ROLLBACK PREPARED 'x'"), TxnWord::Other);
        assert_eq!(txn_word("BEGIN; SELECT 1"), TxnWord::Other);
        assert_eq!(txn_word("SELECT 1"), TxnWord::Other);
    }

    #[test]
    fn shard_settings() {
        assert_eq!(
            shard_setting("SET shardline.shard = 2"),
            Some(Ok(Some(ShardId(2))))
        );
        assert_eq!(
            shard_setting("set shardline.shard to '1';"),
            Some(Ok(Some(ShardId(1))))
        );
        assert_eq!(
            shard_setting("SET SESSION shardline.shard = 3"),
            Some(Ok(Some(ShardId(3))))
        );
        assert_eq!(shard_setting("RESET shardline.shard"), Some(Ok(None)));
        assert_eq!(
            read_from_setting("set shardline.read_from = 'Replica';"),
            Some(Ok(Some(ReadFrom::Replica)))
        );
        assert_eq!(
            read_from_setting("RESET shardline.read_from"),
            Some(Ok(None))
        );
        assert!(matches!(
            read_from_setting("SET shardline.read_from = x"),
            Some(Err(_))
        ));
        assert_eq!(read_from_setting("SET shardline.shard = 1"), None);
        assert_eq!(
            shard_setting("SET shardline.shard TO DEFAULT"),
            Some(Ok(None))
        );
        assert!(matches!(
            shard_setting("SET shardline.shard = x"),
            Some(Err(_))
        ));
        assert_eq!(shard_setting("SET search_path = a"), None);
    }
}
