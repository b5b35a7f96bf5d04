//! ResultCache: the proxy's side of the point-read cache.
//!
//! Sessions look point reads of cache-enabled sharded tables up in a
//! [`Store`] and fill it from the shard's primary; they collect what their
//! writes touch ([`Invalidations`]) and apply it when the write's
//! transaction ends, before the client sees the reply. Writes that do not go
//! through this proxy (another proxy, `psql` on the shard, triggers) come in
//! through a change feed per shard primary: logical decoding of its WAL
//! ([`crate::changes`]), each changed key invalidated at its commit.
//!
//! Unsharded tables (on the home shard) are cached by a unique column the
//! configuration names (`[cache.keys]`): statements are analysed a second
//! time against a map that treats those tables as keyed by that column
//! ([`ResultCache::keyed_map`]), which gives their point reads and the keys
//! their writes touch the same way as a shard key's.
//!
//! The cache serves a shard only while that feed is connected, has caught
//! up with the table's publication, and has applied every commit older than
//! `max_stream_lag` (measured against the primary's WAL positions sampled by
//! the health monitors). When the feed (re)connects, every cached table is
//! invalidated: writes made while it was away were never seen.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use cache::pgoutput::Value;
use cache::store::{Origin, Settings, Stats, Store, Ticket};
use router::hash::KeyValue;
use router::key_param::{decode_key, FORMAT_TEXT};
use router::{Analysis, AnalysisCache, KeySource, ShardId, ShardMap, StatementKind, Table};
use twox_hash::XxHash3_64;

use crate::backends::Backends;
use crate::changes::{self, ChangeKind, FeedEvent, RowChange};
use crate::config::CacheConfig;
use crate::follower::MapFollower;
use crate::server::ServerTarget;

/// Key invalidations a session collects before they collapse into
/// invalidating the whole tables.
const KEYS_MAX: usize = 1000;
/// How often a feed tries again to publish enabled tables it could not.
const PUBLISH_RETRY: Duration = Duration::from_secs(1);
/// How often a feed reads again which writes reach other tables
/// (triggers, rules, cascading foreign keys), besides after DDL.
const REACH_REFRESH: Duration = Duration::from_secs(5);

pub struct ResultCache {
    pub store: Store,
    config: CacheConfig,
    /// Enabled tables (map names), and a version bumped on every change.
    tables: RwLock<BTreeSet<String>>,
    tables_version: AtomicU64,
    /// Some table is enabled: sessions look nothing up otherwise.
    caching: AtomicBool,
    /// Change feeds by the address of the shard primary they follow.
    feeds: Mutex<HashMap<String, Arc<Feed>>>,
    follower: Arc<MapFollower>,
    /// How feeds log in (the address is set per server).
    target: Option<ServerTarget>,
    /// The map with the `[cache.keys]` tables added as keyed tables, for the
    /// current epoch; `None` until first needed.
    keyed: Mutex<Option<Arc<ShardMap>>>,
    /// Analyses against the keyed map.
    keyed_analyses: AnalysisCache,
    /// The `[cache.keys]` tables the last map seen by
    /// [`ResultCache::ensure_feeds`] shards.
    keyed_sharded: Mutex<BTreeSet<String>>,
    /// What a write to a table (by lower-case name) may change besides the
    /// rows its statement names, from every feed's server catalog.
    reach: RwLock<HashMap<String, Reaches>>,
    /// Bumped by DDL through this proxy: feeds read the reach again.
    reach_version: AtomicU64,
}

/// See [`ResultCache::reach`].
#[derive(Clone, Debug, Default)]
struct Reaches {
    /// Triggers or rules: anything.
    anything: bool,
    /// Tables changed by cascading foreign keys (lower-case names).
    tables: BTreeSet<String>,
}

/// Texts whose analysis against the keyed map is kept.
const KEYED_ANALYSES_MAX: usize = 4096;

/// One shard primary's change feed, as sessions see it.
pub struct Feed {
    pub addr: String,
    connected: AtomicBool,
    /// Every change up to here has been applied.
    position: AtomicU64,
    /// Published tables, with the WAL position from which the feed sees
    /// their changes.
    published: RwLock<HashMap<String, u64>>,
    info: Mutex<FeedInfo>,
}

/// What `SHOW CACHE` tells about a feed.
#[derive(Clone, Debug, Default)]
pub struct FeedInfo {
    pub commits: u64,
    pub last_error: Option<String>,
    /// Tables that cannot be published here, and why.
    pub left_out: Vec<changes::LeftOut>,
    /// Writes that reach other tables on this server.
    pub reach: Vec<changes::Reach>,
}

/// What a session's writes invalidate, applied when their transaction ends.
#[derive(Debug, Default)]
pub struct Invalidations {
    keys: Vec<(String, Vec<u8>)>,
    tables: BTreeSet<String>,
    /// Every cached table: the write's effects are not known.
    all: bool,
}

impl Invalidations {
    /// The write's effects are not known: every cached table.
    pub fn everything(&mut self) {
        self.all = true;
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.tables.is_empty() && self.keys.is_empty()
    }
}

/// A point read the cache may answer: the table and its key.
#[derive(Clone, Debug)]
pub struct PointRead {
    pub table: String,
    pub key: Vec<u8>,
}

/// A miss being filled from the primary.
pub struct Fill {
    pub identity: Vec<u8>,
    pub ticket: Ticket,
    pub origin: Origin,
    /// The reply so far.
    pub reply: Vec<u8>,
    /// Its CommandComplete arrived.
    pub complete: bool,
}

impl ResultCache {
    pub fn new(
        config: CacheConfig,
        follower: Arc<MapFollower>,
        target: Option<ServerTarget>,
    ) -> ResultCache {
        let store = Store::new(&Settings {
            max_bytes: config.max_bytes,
            entry_bytes_max: config.entry_bytes_max,
            ttl: config.ttl,
            tti: config.tti,
        });
        let tables: BTreeSet<String> = config
            .tables
            .iter()
            .chain(config.keys.keys())
            .cloned()
            .collect();
        ResultCache {
            store,
            caching: AtomicBool::new(!tables.is_empty()),
            tables: RwLock::new(tables),
            tables_version: AtomicU64::new(0),
            config,
            feeds: Mutex::default(),
            follower,
            target,
            keyed: Mutex::default(),
            keyed_analyses: AnalysisCache::new(KEYED_ANALYSES_MAX),
            keyed_sharded: Mutex::default(),
            reach: RwLock::default(),
            reach_version: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    pub fn tables(&self) -> Vec<String> {
        self.tables
            .read()
            .expect("lock poisoned")
            .iter()
            .cloned()
            .collect()
    }

    /// Caches `table`'s point reads from now on (once the feeds publish it).
    pub fn enable(&self, table: &str) {
        let mut tables = self.tables.write().expect("lock poisoned");
        if tables.insert(table.to_owned()) {
            self.caching.store(true, Ordering::Release);
            self.tables_version.fetch_add(1, Ordering::AcqRel);
        }
    }

    pub fn disable(&self, table: &str) {
        let mut tables = self.tables.write().expect("lock poisoned");
        if tables.remove(table) {
            self.caching.store(!tables.is_empty(), Ordering::Release);
            self.store.invalidate_table(table);
            self.tables_version.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Whether any table is cached (a load, for the per-statement path).
    pub fn is_caching(&self) -> bool {
        self.caching.load(Ordering::Acquire)
    }

    fn enabled(&self, table: &str) -> bool {
        self.tables.read().expect("lock poisoned").contains(table)
    }

    pub fn feeds(&self) -> Vec<Arc<Feed>> {
        let mut feeds: Vec<_> = self
            .feeds
            .lock()
            .expect("lock poisoned")
            .values()
            .cloned()
            .collect();
        feeds.sort_by(|a, b| a.addr.cmp(&b.addr));
        feeds
    }

    pub fn stats(&self) -> Stats {
        self.store.stats()
    }

    /// Starts a change feed for every shard primary of `map` that has none.
    /// Also drops the entries of a `[cache.keys]` table that `map` shards
    /// and the last one did not, or the other way round: they were keyed by
    /// the other column, which writes no longer invalidate.
    pub fn ensure_feeds(self: &Arc<Self>, map: &ShardMap) {
        if !self.config.keys.is_empty() {
            let sharded: BTreeSet<String> = (self.config.keys.keys())
                .filter(|t| map.tables.contains_key(*t))
                .cloned()
                .collect();
            let mut last = self.keyed_sharded.lock().expect("lock poisoned");
            for table in last.symmetric_difference(&sharded) {
                self.store.invalidate_table(table);
            }
            *last = sharded;
        }
        if self.tables.read().expect("lock poisoned").is_empty() {
            return;
        }
        let Some(target) = &self.target else {
            return;
        };
        let mut feeds = self.feeds.lock().expect("lock poisoned");
        for shard in map.shards.values() {
            if feeds.contains_key(&shard.primary) {
                continue;
            }
            let Some((host, port)) = shard
                .primary
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
            else {
                continue;
            };
            let feed = Arc::new(Feed {
                addr: shard.primary.clone(),
                connected: AtomicBool::new(false),
                position: AtomicU64::new(0),
                published: RwLock::default(),
                info: Mutex::default(),
            });
            feeds.insert(shard.primary.clone(), feed.clone());
            let target = ServerTarget {
                host,
                port,
                ..target.clone()
            };
            tokio::spawn(run_feed(Arc::downgrade(self), feed, target));
        }
    }

    /// `map` with the `[cache.keys]` tables it does not shard added as
    /// tables keyed by their configured column; `None` without such tables.
    /// Only for analysis and for the WAL's changes, never for routing.
    pub fn keyed_map(&self, map: &ShardMap) -> Option<Arc<ShardMap>> {
        if self.config.keys.is_empty() {
            return None;
        }
        let mut keyed = self.keyed.lock().expect("lock poisoned");
        if let Some(k) = keyed.as_ref().filter(|k| k.epoch == map.epoch) {
            return Some(k.clone());
        }
        let mut m = map.clone();
        for (name, key) in &self.config.keys {
            m.tables.entry(name.clone()).or_insert_with(|| Table {
                name: name.clone(),
                key: key.column.clone(),
                key_type: key.key_type,
                group: String::new(),
            });
        }
        let m = Arc::new(m);
        *keyed = Some(m.clone());
        Some(m)
    }

    /// Whether tables are cached by a `[cache.keys]` column (statements must
    /// then be routed, to be looked at, even by a map that shards nothing).
    pub fn has_keys(&self) -> bool {
        !self.config.keys.is_empty()
    }

    /// Whether `table` is one of `[cache.keys]` that `map` does not shard.
    fn keyed_unsharded(&self, table: &str, map: &ShardMap) -> bool {
        self.config.keys.contains_key(table) && !map.tables.contains_key(table)
    }

    /// The point read `analysis` of `sql` describes, if its table is cached
    /// and its key is known (from the text or from `params`): by the shard
    /// key, or for a statement on no sharded table, by a `[cache.keys]`
    /// column.
    pub fn point_read(
        &self,
        analysis: &Analysis,
        sql: &str,
        map: &ShardMap,
        params: router::Params<'_>,
    ) -> Option<PointRead> {
        if analysis.point_read {
            return self.point_of(analysis, map, params);
        }
        if !analysis.targets.is_empty() || analysis.kind != StatementKind::Select {
            return None;
        }
        let keyed = self.keyed_map(map)?;
        let analysis = self.keyed_analyses.get_or_analyse(sql, &keyed);
        let table = &analysis.targets.first()?.table;
        if !analysis.point_read || !self.keyed_unsharded(table, map) {
            return None;
        }
        self.point_of(&analysis, &keyed, params)
    }

    fn point_of(
        &self,
        analysis: &Analysis,
        map: &ShardMap,
        params: router::Params<'_>,
    ) -> Option<PointRead> {
        let target = analysis.targets.first()?;
        if !self.enabled(&target.table) {
            return None;
        }
        let key = match target.keys.as_deref()? {
            [source] => resolve_key(source, map, &target.table, params)?,
            _ => return None,
        };
        Some(PointRead {
            table: target.table.clone(),
            key,
        })
    }

    /// Whether the cache may serve `table` on the shard whose primary is at
    /// `addr`: its feed is connected and caught up.
    pub fn serves(&self, table: &str, shard: ShardId, backends: &Backends, map: &ShardMap) -> bool {
        let Some(addr) = map.shards.get(&shard).map(|s| s.primary.as_str()) else {
            return false;
        };
        let Some(feed) = self.feeds.lock().expect("lock poisoned").get(addr).cloned() else {
            return false;
        };
        if !feed.connected.load(Ordering::Acquire) {
            return false;
        }
        let position = feed.position.load(Ordering::Acquire);
        let published = feed
            .published
            .read()
            .expect("lock poisoned")
            .get(table)
            .copied();
        if !published.is_some_and(|from| position >= from) {
            return false;
        }
        let Some(nodes) = backends.shard(shard, map) else {
            return false;
        };
        nodes
            .stream_lag(position, tokio::time::Instant::now())
            .is_some_and(|lag| lag <= self.config.max_stream_lag)
    }

    /// Notes what a statement that may write invalidates when it commits.
    pub fn note_write(
        &self,
        analysis: &Analysis,
        sql: &str,
        map: &ShardMap,
        params: router::Params<'_>,
        into: &mut Invalidations,
    ) {
        let tables = self.tables.read().expect("lock poisoned");
        if tables.is_empty() || into.all {
            return;
        }
        if analysis.kind == StatementKind::Ddl {
            // It may create a trigger, a rule or a foreign key.
            self.reach_version.fetch_add(1, Ordering::AcqRel);
        }
        if writes_unknown(analysis, sql) {
            into.all = true;
            return;
        }
        let lower = sql.to_ascii_lowercase();
        // A write to a table with triggers or rules, or referenced by a
        // cascading foreign key, changes rows the statement does not name.
        // (Any text naming the table counts: a superset is safe.)
        for (table, reaches) in self.reach.read().expect("lock poisoned").iter() {
            if !lower.contains(table.as_str()) {
                continue;
            }
            if reaches.anything {
                into.all = true;
                return;
            }
            for cached in tables.iter() {
                if reaches.tables.contains(&unqualified(cached)) {
                    into.tables.insert(cached.clone());
                }
            }
        }
        // A write naming one of a cached table's partitions (`accounts_p003`)
        // is no write to a sharded table for the analysis.
        for table in tables.iter() {
            if lower.contains(&format!("{}_p", table.to_ascii_lowercase())) {
                into.tables.insert(table.clone());
            }
        }
        Self::note_targets(&analysis.targets, &tables, map, params, into);
        let Some(keyed) = self.keyed_map(map) else {
            return;
        };
        let analysis = self.keyed_analyses.get_or_analyse(sql, &keyed);
        let tables: BTreeSet<String> = tables
            .iter()
            .filter(|t| self.keyed_unsharded(t, map))
            .cloned()
            .collect();
        if analysis.refusal.is_some() {
            // A key that does not convert, or a text not analysed: what it
            // touches is not known.
            into.tables.extend(tables);
            return;
        }
        Self::note_targets(&analysis.targets, &tables, &keyed, params, into);
    }

    /// Notes the keys (or whole tables) that `targets` write in `tables`.
    fn note_targets(
        targets: &[router::TableTarget],
        tables: &BTreeSet<String>,
        map: &ShardMap,
        params: router::Params<'_>,
        into: &mut Invalidations,
    ) {
        for target in targets {
            if !target.writes || !tables.contains(&target.table) {
                continue;
            }
            let keys = match &target.keys {
                Some(keys) if !target.updates_key => keys
                    .iter()
                    .map(|source| resolve_key(source, map, &target.table, params))
                    .collect::<Option<Vec<_>>>(),
                _ => None,
            };
            match keys {
                Some(keys) if into.keys.len() + keys.len() <= KEYS_MAX => {
                    for key in keys {
                        into.keys.push((target.table.clone(), key));
                    }
                }
                _ => {
                    into.tables.insert(target.table.clone());
                }
            }
        }
    }

    /// Applies (and clears) what a finished transaction's writes invalidate.
    pub fn apply(&self, invalidations: &mut Invalidations) {
        if invalidations.all {
            for table in self.tables() {
                self.store.invalidate_table(&table);
            }
        }
        for table in &invalidations.tables {
            self.store.invalidate_table(table);
        }
        for (table, key) in &invalidations.keys {
            self.store.invalidate_key(table, key);
        }
        *invalidations = Invalidations::default();
    }

    /// A committed change seen in the WAL.
    fn apply_change(&self, change: &RowChange, map: &ShardMap) {
        let relation = &change.relation;
        let name = if map.tables.contains_key(&relation.name) {
            relation.name.clone()
        } else {
            format!("{}.{}", relation.schema, relation.name)
        };
        if !self.enabled(&name) {
            return;
        }
        let Some(table) = map.tables.get(&name) else {
            self.store.invalidate_table(&name);
            return;
        };
        let key_column = relation.columns.iter().position(|c| c.name == table.key);
        let key_of = |tuple: &[Value]| -> Option<Vec<u8>> {
            let bytes = tuple.get(key_column?)?;
            match bytes {
                Value::Text(text) => decode_key(table.key_type, FORMAT_TEXT, text)
                    .ok()
                    .map(|k| key_bytes(&k)),
                _ => None,
            }
        };
        let tuples: Vec<&[Value]> = match &change.kind {
            ChangeKind::Insert { new } => vec![new],
            ChangeKind::Update { old, new } => {
                let mut t: Vec<&[Value]> = vec![new];
                if let Some(old) = old {
                    t.push(old);
                }
                t
            }
            ChangeKind::Delete { old } => vec![old],
            ChangeKind::Truncate => {
                self.store.invalidate_table(&name);
                return;
            }
        };
        for tuple in tuples {
            match key_of(tuple) {
                Some(key) => self.store.invalidate_key(&name, &key),
                None => self.store.invalidate_table(&name),
            }
        }
    }

    /// The cache key of a request: its protocol (`Q` for a simple Query,
    /// `E` for Bind/Execute), who asks, with which session settings, and
    /// the request (the query text; or the statement, the Bind parameters
    /// with their formats and the result formats).
    pub fn identity(
        kind: u8,
        database: &str,
        user: &str,
        params_hash: u64,
        text: &[u8],
    ) -> Vec<u8> {
        let mut id = Vec::with_capacity(database.len() + user.len() + text.len() + 12);
        id.push(kind);
        id.extend_from_slice(database.as_bytes());
        id.push(0);
        id.extend_from_slice(user.as_bytes());
        id.push(0);
        id.extend_from_slice(&params_hash.to_le_bytes());
        id.extend_from_slice(text);
        id
    }
}

/// The lower-case table name without its schema.
fn unqualified(name: &str) -> String {
    let name = name.rsplit('.').next().unwrap_or(name);
    name.trim_matches('"').to_lowercase()
}

/// A hash of the session's parameters (search_path, DateStyle, ... change
/// what a query returns).
pub fn params_hash(params: &crate::server::ParamState) -> u64 {
    let mut hasher = XxHash3_64::default();
    params.hash(&mut hasher);
    hasher.finish()
}

/// Whether a statement that may write can touch tables its analysis does
/// not show: it calls functions that are not built-ins, runs a procedure or
/// a prepared statement, or holds several statements.
fn writes_unknown(analysis: &Analysis, sql: &str) -> bool {
    if matches!(analysis.replica, router::ReplicaSafety::IfReadOnly(_)) {
        return true;
    }
    if several_statements(sql) {
        return true;
    }
    if analysis.kind != StatementKind::Other {
        return false;
    }
    let first = sql
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    !matches!(
        first.as_str(),
        "SET" | "RESET" | "SHOW" | "DISCARD" | "DEALLOCATE" | "LISTEN" | "UNLISTEN" | "PREPARE"
    )
}

/// Whether `sql` may hold more than one statement (a `;` before its end;
/// also inside a literal, which only makes callers more careful).
pub fn several_statements(sql: &str) -> bool {
    sql.trim().trim_end_matches(';').contains(';')
}

fn resolve_key(
    source: &KeySource,
    map: &ShardMap,
    table: &str,
    params: router::Params<'_>,
) -> Option<Vec<u8>> {
    match source {
        KeySource::Const(value) => Some(key_bytes(value)),
        KeySource::Param(n) => {
            let (bytes, format) = params.get(*n).ok()?;
            let key_type = map.tables.get(table)?.key_type;
            decode_key(key_type, format, bytes?)
                .ok()
                .map(|k| key_bytes(&k))
        }
        KeySource::ParamArray(_) => None,
    }
}

/// A key in one form whatever its integer width or source (query text,
/// Bind parameter, WAL text).
pub fn key_bytes(key: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(17);
    match key {
        KeyValue::Int2(v) => int_key(&mut out, i64::from(*v)),
        KeyValue::Int4(v) => int_key(&mut out, i64::from(*v)),
        KeyValue::Int8(v) => int_key(&mut out, *v),
        KeyValue::Text(text) => {
            out.push(b't');
            out.extend_from_slice(text);
        }
        KeyValue::Uuid(uuid) => {
            out.push(b'u');
            out.extend_from_slice(uuid);
        }
    }
    out
}

fn int_key(out: &mut Vec<u8>, v: i64) {
    out.push(b'i');
    out.extend_from_slice(&v.to_le_bytes());
}

impl Feed {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub fn position(&self) -> u64 {
        self.position.load(Ordering::Acquire)
    }

    pub fn published(&self) -> Vec<String> {
        let mut tables: Vec<_> = self
            .published
            .read()
            .expect("lock poisoned")
            .keys()
            .cloned()
            .collect();
        tables.sort();
        tables
    }

    pub fn info(&self) -> FeedInfo {
        self.info.lock().expect("lock poisoned").clone()
    }

    fn fail(&self, e: &crate::Error) {
        self.connected.store(false, Ordering::Release);
        self.info.lock().expect("lock poisoned").last_error = Some(e.to_string());
    }
}

/// Follows one shard primary for as long as the cache exists: publishes the
/// enabled tables, streams their changes, reconnects with backoff.
async fn run_feed(cache: Weak<ResultCache>, feed: Arc<Feed>, target: ServerTarget) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(c) = cache.upgrade() else { return };
        let interval = c.config.status_interval;
        drop(c);
        let result = tokio::select! {
            r = follow_once(&cache, &feed, &target, interval) => r,
            r = publish_changes(&cache, &feed, &target) => r,
        };
        let Err(e) = result else { return };
        tracing::warn!(server = %feed.addr, error = %e, "cache change feed lost; the cache bypasses this shard until it is back");
        feed.fail(&e);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Publishes the enabled tables, then streams until the connection fails.
/// `Ok` only when the cache is gone.
async fn follow_once(
    cache: &Weak<ResultCache>,
    feed: &Arc<Feed>,
    target: &ServerTarget,
    interval: Duration,
) -> crate::Result<()> {
    publish(cache, feed, target).await?;
    let slot = format!(
        "shardline_cache_{}_{}",
        std::process::id(),
        rand::random::<u32>()
    );
    changes::follow(target, &slot, interval, |event| {
        let Some(cache) = cache.upgrade() else { return };
        match event {
            FeedEvent::Started { lsn } => {
                // Writes made while no feed listened were never seen.
                for table in cache.tables() {
                    cache.store.invalidate_table(&table);
                }
                feed.position.fetch_max(lsn, Ordering::AcqRel);
                feed.connected.store(true, Ordering::Release);
                tracing::info!(server = %feed.addr, "cache change feed streaming");
            }
            FeedEvent::Commit { end_lsn, changes } => {
                let map = cache.follower.map();
                let map = cache.keyed_map(&map).unwrap_or(map);
                for change in changes {
                    cache.apply_change(change, &map);
                }
                feed.info.lock().expect("lock poisoned").commits += 1;
                feed.position.fetch_max(end_lsn, Ordering::AcqRel);
            }
            FeedEvent::Position { lsn } => {
                feed.position.fetch_max(lsn, Ordering::AcqRel);
            }
        }
    })
    .await
}

/// Publishes the enabled tables again whenever they change. Never `Ok`
/// while the cache exists.
async fn publish_changes(
    cache: &Weak<ResultCache>,
    feed: &Arc<Feed>,
    target: &ServerTarget,
) -> crate::Result<()> {
    let mut seen = cache
        .upgrade()
        .map(|c| c.tables_version.load(Ordering::Acquire));
    let mut last = tokio::time::Instant::now();
    let mut reach_seen = None;
    let mut reach_read = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(c) = cache.upgrade() else {
            return Ok(());
        };
        let version = c.tables_version.load(Ordering::Acquire);
        let reach_version = c.reach_version.load(Ordering::Acquire);
        drop(c);
        if reach_seen != Some(reach_version) || reach_read.elapsed() >= REACH_REFRESH {
            read_reach(cache, feed, target).await?;
            reach_seen = Some(reach_version);
            reach_read = tokio::time::Instant::now();
        }
        // A table left out may be created (or given a key) later.
        let retry = !feed.info.lock().expect("lock poisoned").left_out.is_empty()
            && last.elapsed() >= PUBLISH_RETRY;
        if seen != Some(version) || retry {
            publish(cache, feed, target).await?;
            seen = Some(version);
            last = tokio::time::Instant::now();
        }
    }
}

async fn publish(
    cache: &Weak<ResultCache>,
    feed: &Arc<Feed>,
    target: &ServerTarget,
) -> crate::Result<()> {
    let Some(c) = cache.upgrade() else {
        return Ok(());
    };
    // A `[cache.keys]` table lives on the home shard only.
    let map = c.follower.map();
    let home = map.shards.get(&ShardMap::HOME).map(|s| s.primary.as_str());
    let mut tables = c.tables();
    tables.retain(|t| !c.keyed_unsharded(t, &map) || home == Some(feed.addr.as_str()));
    let keys = c.config.keys.clone();
    drop(c);
    let state = changes::ensure_publication_keyed(target, &tables, &keys).await?;
    read_reach(cache, feed, target).await?;
    let mut published = feed.published.write().expect("lock poisoned");
    for table in &state.published {
        published.entry(table.clone()).or_insert(state.lsn);
    }
    published.retain(|t, _| tables.contains(t));
    drop(published);
    feed.info.lock().expect("lock poisoned").left_out = state.left_out.clone();
    Ok(())
}

/// Reads which writes reach other tables on `feed`'s server, and merges
/// every feed's answer into the cache's.
async fn read_reach(
    cache: &Weak<ResultCache>,
    feed: &Arc<Feed>,
    target: &ServerTarget,
) -> crate::Result<()> {
    let reach = changes::write_reach(target).await?;
    feed.info.lock().expect("lock poisoned").reach = reach;
    let Some(c) = cache.upgrade() else {
        return Ok(());
    };
    let mut merged: HashMap<String, Reaches> = HashMap::new();
    for feed in c.feeds() {
        for r in feed.info().reach {
            let entry = merged.entry(r.table.to_lowercase()).or_default();
            match r.changes {
                Some(table) => {
                    entry.tables.insert(table.to_lowercase());
                }
                None => entry.anything = true,
            }
        }
    }
    *c.reach.write().expect("lock poisoned") = merged;
    Ok(())
}
