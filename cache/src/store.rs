//! `Store`: encoded replies to point reads, by statement identity, never
//! served once a write to their row or table has been acknowledged.
//!
//! Invalidation does not search for entries. Every (table, key) and every
//! table hashes to a slot holding a generation number; an entry remembers
//! the generations of its two slots as they were *before* its query was sent
//! (its [`Ticket`]), and is served only while both are unchanged. A write
//! bumps its key's slot (or its table's slot), which makes every entry of
//! that key (or table) unservable at once, in O(1). The same check makes a
//! fill that raced a write harmless: a result read before the write carries
//! a ticket from before the bump, so it is refused at insert, and if the
//! bump lands between that check and the insert, at every lookup after.
//! Two keys sharing a slot only cost each other spurious misses.
//!
//! Entries live in a moka cache bounded by bytes (replies weigh their size),
//! with a time-to-live as a safety net and an optional time-to-idle.

use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moka::notification::RemovalCause;
use twox_hash::XxHash3_64;

/// Key slots: 64 Ki generations (512 KiB), so that unrelated hot keys rarely
/// invalidate each other.
const KEY_SLOTS: usize = 1 << 16;
/// Table slots.
const TABLE_SLOTS: usize = 1 << 10;
/// What an entry costs beyond its identity and reply (moka's node, the
/// `Entry`, the `Arc`s), counted in its weight so `max_bytes` bounds memory.
const ENTRY_OVERHEAD: usize = 160;
/// Maintenance passes a flush runs at most to free what it dropped.
const FLUSH_PASSES_MAX: usize = 1000;

/// Bounds of a [`Store`].
#[derive(Clone, Debug)]
pub struct Settings {
    /// Total weight of all entries (identity + reply + overhead).
    pub max_bytes: u64,
    /// Replies larger than this are not cached.
    pub entry_bytes_max: usize,
    /// An entry is dropped this long after its fill, whatever happens.
    pub ttl: Duration,
    /// An entry is dropped when not read for this long.
    pub tti: Option<Duration>,
}

/// The generations a fill is checked against, taken before its query is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    table_slot: u32,
    key_slot: u32,
    table_gen: u64,
    key_gen: u64,
}

struct Entry {
    reply: Bytes,
    ticket: Ticket,
    origin: Origin,
}

/// Where a reply came from: its table and the shard that answered, so that
/// a lookup by identity alone can check the shard is still served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub table: Arc<str>,
    pub shard: u32,
}

/// Counters since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub hits: u64,
    pub misses: u64,
    /// Replies stored.
    pub fills: u64,
    /// Replies not stored because a write to their key or table was
    /// acknowledged while they were read.
    pub fills_stale: u64,
    /// Replies not stored because they exceed `entry_bytes_max`.
    pub fills_too_large: u64,
    /// Entries dropped to stay under `max_bytes`.
    pub evictions: u64,
    /// Entries dropped at their TTL or TTI.
    pub expirations: u64,
    /// Writes that invalidated one key, and whole tables.
    pub key_invalidations: u64,
    pub table_invalidations: u64,
    /// Entries and their total weight right now.
    pub entries: u64,
    pub bytes: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    fills: AtomicU64,
    fills_stale: AtomicU64,
    fills_too_large: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
    key_invalidations: AtomicU64,
    table_invalidations: AtomicU64,
}

type Hasher = BuildHasherDefault<XxHash3_64>;

pub struct Store {
    entries: moka::sync::Cache<Vec<u8>, Arc<Entry>, Hasher>,
    key_gens: Box<[AtomicU64]>,
    table_gens: Box<[AtomicU64]>,
    entry_bytes_max: usize,
    counters: Arc<Counters>,
}

impl Store {
    pub fn new(settings: &Settings) -> Store {
        let counters = Arc::new(Counters::default());
        let listener = {
            let counters = counters.clone();
            move |_key: Arc<Vec<u8>>, _entry: Arc<Entry>, cause: RemovalCause| {
                let counter = match cause {
                    RemovalCause::Size => &counters.evictions,
                    RemovalCause::Expired => &counters.expirations,
                    RemovalCause::Explicit | RemovalCause::Replaced => return,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        };
        let mut builder = moka::sync::Cache::builder()
            .max_capacity(settings.max_bytes)
            .weigher(|identity: &Vec<u8>, entry: &Arc<Entry>| {
                let weight = identity.len() + entry.reply.len() + ENTRY_OVERHEAD;
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            .time_to_live(settings.ttl)
            .eviction_listener(listener);
        if let Some(tti) = settings.tti {
            builder = builder.time_to_idle(tti);
        }
        Store {
            entries: builder.build_with_hasher(Hasher::default()),
            key_gens: (0..KEY_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            table_gens: (0..TABLE_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            entry_bytes_max: settings.entry_bytes_max,
            counters,
        }
    }

    /// The ticket for a read of `key` (canonical bytes) in `table`. Take it
    /// before the query goes to the server.
    pub fn ticket(&self, table: &str, key: &[u8]) -> Ticket {
        let table_slot = table_slot(table);
        let key_slot = key_slot(table, key);
        Ticket {
            table_slot,
            key_slot,
            // Acquire pairs with the bump's release: a reply read after
            // seeing a generation reflects every write acknowledged before it.
            table_gen: self.table_gens[table_slot as usize].load(Ordering::Acquire),
            key_gen: self.key_gens[key_slot as usize].load(Ordering::Acquire),
        }
    }

    fn current(&self, ticket: &Ticket) -> bool {
        self.table_gens[ticket.table_slot as usize].load(Ordering::Acquire) == ticket.table_gen
            && self.key_gens[ticket.key_slot as usize].load(Ordering::Acquire) == ticket.key_gen
    }

    /// The reply stored for `identity`, if no write has touched its row or
    /// table since it was read.
    pub fn get(&self, identity: &[u8]) -> Option<Bytes> {
        match self.entries.get(identity) {
            Some(entry) if self.current(&entry.ticket) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                Some(entry.reply.clone())
            }
            Some(_) => {
                self.entries.invalidate(identity);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            None => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// The reply stored for `identity` and where it came from, if no write
    /// has touched its row or table since it was read; counts nothing (the
    /// caller may still decide not to serve it, then [`Store::count_hit`]).
    pub fn peek(&self, identity: &[u8]) -> Option<(Bytes, Origin)> {
        let entry = self.entries.get(identity)?;
        self.current(&entry.ticket)
            .then(|| (entry.reply.clone(), entry.origin.clone()))
    }

    /// Counts a hit served from [`Store::peek`].
    pub fn count_hit(&self) {
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Stores `reply` for `identity`, read under `ticket`; `false` when it is
    /// too large or a write was acknowledged since the ticket was taken.
    pub fn insert(&self, identity: &[u8], reply: Bytes, ticket: Ticket, origin: Origin) -> bool {
        if reply.len() > self.entry_bytes_max {
            self.counters
                .fills_too_large
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if !self.current(&ticket) {
            self.counters.fills_stale.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.entries.insert(
            identity.into(),
            Arc::new(Entry {
                reply,
                ticket,
                origin,
            }),
        );
        self.counters.fills.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// A write to `key` of `table` was committed: none of that row's
    /// entries is served from now on.
    pub fn invalidate_key(&self, table: &str, key: &[u8]) {
        self.key_gens[key_slot(table, key) as usize].fetch_add(1, Ordering::AcqRel);
        self.counters
            .key_invalidations
            .fetch_add(1, Ordering::Relaxed);
    }

    /// A write to `table` whose rows are not known was committed (or its
    /// definition changed): none of its entries is served from now on.
    pub fn invalidate_table(&self, table: &str) {
        self.table_gens[table_slot(table) as usize].fetch_add(1, Ordering::AcqRel);
        self.counters
            .table_invalidations
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Drops every entry: none is served from now on. moka removes them in
    /// batches as its maintenance runs, so this runs it until they are gone
    /// (a bounded number of times: readers and writers may add more meanwhile).
    pub fn flush(&self) {
        for generation in self.table_gens.iter() {
            generation.fetch_add(1, Ordering::AcqRel);
        }
        self.entries.invalidate_all();
        for _ in 0..FLUSH_PASSES_MAX {
            self.entries.run_pending_tasks();
            if self.entries.entry_count() == 0 {
                break;
            }
        }
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Stats {
            hits: load(&c.hits),
            misses: load(&c.misses),
            fills: load(&c.fills),
            fills_stale: load(&c.fills_stale),
            fills_too_large: load(&c.fills_too_large),
            evictions: load(&c.evictions),
            expirations: load(&c.expirations),
            key_invalidations: load(&c.key_invalidations),
            table_invalidations: load(&c.table_invalidations),
            entries: self.entries.entry_count(),
            bytes: self.entries.weighted_size(),
        }
    }

    /// Applies moka's pending evictions now (they are otherwise amortised
    /// over later reads and writes), so `stats` is exact.
    pub fn run_pending_tasks(&self) {
        self.entries.run_pending_tasks();
    }
}

fn table_slot(table: &str) -> u32 {
    (XxHash3_64::oneshot(table.as_bytes()) as usize % TABLE_SLOTS) as u32
}

fn key_slot(table: &str, key: &[u8]) -> u32 {
    let mut bytes = Vec::with_capacity(table.len() + 1 + key.len());
    bytes.extend_from_slice(table.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(key);
    (XxHash3_64::oneshot(&bytes) as usize % KEY_SLOTS) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max_bytes: u64) -> Store {
        Store::new(&Settings {
            max_bytes,
            entry_bytes_max: 4096,
            ttl: Duration::from_secs(60),
            tti: None,
        })
    }

    fn origin() -> Origin {
        Origin {
            table: "t".into(),
            shard: 0,
        }
    }

    fn reply(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    #[test]
    fn serves_a_fill_until_its_key_is_written() {
        let s = store(1 << 20);
        let t = s.ticket("accounts", b"1");
        assert!(s.insert(b"q1", reply("row 1"), t, origin()));
        assert_eq!(s.get(b"q1"), Some(reply("row 1")));
        s.invalidate_key("accounts", b"2");
        assert_eq!(s.get(b"q1"), Some(reply("row 1")), "another key");
        s.invalidate_key("accounts", b"1");
        assert_eq!(s.get(b"q1"), None);
        let stats = s.stats();
        assert_eq!((stats.hits, stats.misses, stats.fills), (2, 1, 1));
    }

    #[test]
    fn peek_gives_the_origin_and_counts_nothing() {
        let s = store(1 << 20);
        let from = Origin {
            table: "accounts".into(),
            shard: 3,
        };
        assert!(s.insert(b"q", reply("r"), s.ticket("accounts", b"1"), from.clone()));
        assert_eq!(s.peek(b"q"), Some((reply("r"), from)));
        assert_eq!((s.stats().hits, s.stats().misses), (0, 0));
        s.invalidate_key("accounts", b"1");
        assert_eq!(s.peek(b"q"), None);
    }

    #[test]
    fn a_table_invalidation_drops_every_key_of_the_table_only() {
        let s = store(1 << 20);
        assert!(s.insert(b"a", reply("a"), s.ticket("accounts", b"1"), origin()));
        assert!(s.insert(b"b", reply("b"), s.ticket("accounts", b"2"), origin()));
        assert!(s.insert(b"c", reply("c"), s.ticket("orders", b"1"), origin()));
        s.invalidate_table("accounts");
        assert_eq!(s.get(b"a"), None);
        assert_eq!(s.get(b"b"), None);
        assert_eq!(s.get(b"c"), Some(reply("c")));
    }

    #[test]
    fn a_fill_read_before_a_write_is_refused() {
        let s = store(1 << 20);
        let before = s.ticket("accounts", b"7");
        s.invalidate_key("accounts", b"7");
        assert!(!s.insert(b"q", reply("old"), before, origin()));
        assert_eq!(s.get(b"q"), None);
        assert_eq!(s.stats().fills_stale, 1);
        // A table-wide write counts as well.
        let before = s.ticket("accounts", b"7");
        s.invalidate_table("accounts");
        assert!(!s.insert(b"q", reply("old"), before, origin()));
    }

    #[test]
    fn a_fill_that_lands_after_the_write_is_never_served() {
        // The insert's own check passed, then the write was acknowledged,
        // then the insert happened: the entry is there but not servable.
        let s = store(1 << 20);
        let before = s.ticket("accounts", b"7");
        s.entries.insert(
            b"q".to_vec(),
            Arc::new(Entry {
                reply: reply("old"),
                ticket: before,
                origin: origin(),
            }),
        );
        s.invalidate_key("accounts", b"7");
        assert_eq!(s.get(b"q"), None);
    }

    #[test]
    fn large_replies_are_not_stored() {
        let s = store(1 << 20);
        let big = Bytes::from(vec![b'x'; 5000]);
        assert!(!s.insert(b"q", big, s.ticket("t", b"1"), origin()));
        assert_eq!(s.stats().fills_too_large, 1);
    }

    #[test]
    fn the_total_weight_stays_under_max_bytes() {
        let max = 64 * 1024;
        let s = store(max);
        for i in 0..2000u32 {
            let key = i.to_le_bytes();
            let identity = format!("SELECT * FROM t WHERE id = {i}");
            s.insert(
                identity.as_bytes(),
                Bytes::from(vec![0; 1000]),
                s.ticket("t", &key),
                origin(),
            );
        }
        s.run_pending_tasks();
        let stats = s.stats();
        assert!(
            stats.bytes <= max,
            "{} bytes stored, max {max}",
            stats.bytes
        );
        assert!(stats.evictions > 0, "{stats:?}");
        assert!(stats.entries > 10, "{stats:?}");
    }

    #[test]
    fn flush_drops_everything() {
        let s = store(64 << 20);
        for i in 0..50_000u32 {
            let key = i.to_le_bytes();
            assert!(s.insert(&key, reply("a"), s.ticket("t", &key), origin()));
        }
        s.flush();
        assert_eq!(s.get(&7u32.to_le_bytes()), None);
        let stats = s.stats();
        assert_eq!(
            (stats.entries, stats.bytes),
            (0, 0),
            "memory kept after a flush"
        );
    }
}
