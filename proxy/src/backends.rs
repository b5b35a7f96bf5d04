//! Backends: what this proxy knows about every server of the shard map (role,
//! health, replication lag, load) and the choice of server for a statement.
//!
//! One monitor task per server keeps a connection of its own and asks, every
//! `health_interval`, whether the server is in recovery and how far its WAL
//! is (`pg_current_wal_insert_lsn()` on a primary: past every commit record,
//! asynchronous commits not yet written too; `pg_last_wal_replay_lsn()` on a
//! replica). A failed probe, or a failure a session reports, opens the
//! server's circuit breaker: it gets no new work for a backoff that doubles
//! while it stays down; then one request (or probe) may try again, and a
//! success closes it. A monitor that cannot log in (a configuration problem,
//! not a down server) leaves the breaker alone.
//!
//! Lag in time comes from the primary's own history: each shard keeps the
//! primary's recent (time, LSN) samples, and a replica that has replayed up
//! to LSN `L` is as far behind as the oldest sample beyond `L` is old. The
//! same samples give read-your-writes without a round trip: a primary LSN
//! sampled after a commit was acknowledged is at or past that commit, so a
//! replica that has replayed that far shows the write.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use router::{ShardId, ShardMap};
use tokio::time::Instant;

use crate::config::{ReadFrom, ReplicaConfig, Role};
use crate::error::Error;
use crate::server::{ServerConn, ServerTarget};

/// Primary LSN samples kept per shard: a few seconds at the default interval.
const SAMPLES_MAX: usize = 256;

/// One server of a shard.
pub struct Node {
    pub addr: String,
    pub shard: ShardId,
    /// Listed as the shard's primary in the map (as opposed to a replica).
    pub map_primary: bool,
    state: Mutex<NodeState>,
    /// Server connections sessions hold on it right now.
    outstanding: AtomicU32,
}

/// What the last probes said about a node.
#[derive(Clone, Debug, Default)]
pub struct NodeState {
    /// `pg_is_in_recovery()`; `None` until a probe succeeds.
    pub in_recovery: Option<bool>,
    /// Current WAL position (primary) or replayed position (replica).
    pub lsn: u64,
    /// When the probe that read `lsn` was sent.
    pub sampled_at: Option<Instant>,
    /// Open breaker: no new work before this instant (and until a probe succeeds).
    pub open_until: Option<Instant>,
    pub backoff: Duration,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

impl NodeState {
    /// "down" (breaker open), "up" (a probe answered), or "unknown" (none yet).
    pub fn health(&self) -> &'static str {
        match (self.open_until.is_some(), self.sampled_at) {
            (true, _) => "down",
            (false, Some(_)) => "up",
            (false, None) => "unknown",
        }
    }
}

impl Node {
    /// A copy of what the probes said (allocates: for reports, not routing).
    pub fn state(&self) -> NodeState {
        self.read(NodeState::clone)
    }

    /// Looks at the state without copying it.
    fn read<T>(&self, f: impl FnOnce(&NodeState) -> T) -> T {
        f(&self.state.lock().expect("lock poisoned"))
    }

    /// Why this node takes no work: its last error.
    fn unavailable(&self) -> Unavailable {
        let reason = self.read(|s| s.last_error.clone());
        Unavailable {
            shard: self.shard,
            reason: reason.unwrap_or_else(|| "it failed recently".to_owned()),
        }
    }

    /// `pg_is_in_recovery()` as last probed.
    pub fn in_recovery(&self) -> Option<bool> {
        self.read(|s| s.in_recovery)
    }

    /// "primary" or "replica": as the server last said, else as the map says.
    pub fn role_name(&self) -> &'static str {
        match self.in_recovery() {
            Some(true) => "replica",
            Some(false) => "primary",
            None if self.map_primary => "primary",
            None => "replica",
        }
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Whether the breaker lets new work through: closed, or half open (its
    /// backoff has passed, so one request may try; a failure opens it again
    /// for twice as long, a success closes it).
    fn is_closed(state: &NodeState) -> bool {
        !matches!(state.open_until, Some(until) if Instant::now() < until)
    }

    /// A session's request on this node worked: a half-open breaker closes.
    pub fn report_success(&self) {
        let mut s = self.state.lock().expect("lock poisoned");
        if s.open_until.is_some_and(|until| Instant::now() >= until) {
            tracing::info!(shard = %self.shard, addr = %self.addr, "server back in rotation");
            s.open_until = None;
            s.consecutive_failures = 0;
            s.last_error = None;
        }
    }

    /// A session (or a probe) failed on this node: take it out of rotation.
    pub fn report_failure(&self, reason: &str, settings: &ReplicaConfig) {
        let mut s = self.state.lock().expect("lock poisoned");
        s.consecutive_failures += 1;
        s.backoff = if s.open_until.is_none() {
            settings.breaker_backoff_min
        } else {
            (s.backoff * 2).min(settings.breaker_backoff_max)
        };
        s.open_until = Some(Instant::now() + s.backoff);
        if s.last_error.as_deref() != Some(reason) {
            tracing::warn!(shard = %self.shard, addr = %self.addr, %reason, "server taken out of rotation");
        }
        s.last_error = Some(reason.to_owned());
    }

    fn record_probe(&self, in_recovery: bool, lsn: u64, sent: Instant) {
        let mut s = self.state.lock().expect("lock poisoned");
        if s.open_until.is_some() {
            tracing::info!(shard = %self.shard, addr = %self.addr, "server back in rotation");
        }
        s.in_recovery = Some(in_recovery);
        s.lsn = lsn;
        s.sampled_at = Some(sent);
        s.open_until = None;
        s.consecutive_failures = 0;
        s.last_error = None;
    }

    /// Counts a server connection a session holds until the guard drops.
    pub fn hold(self: &Arc<Self>) -> Hold {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Hold(self.clone())
    }
}

/// One outstanding request on a node.
pub struct Hold(Arc<Node>);

impl Hold {
    pub fn node(&self) -> &Arc<Node> {
        &self.0
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The servers of one shard, as of one map.
pub struct ShardNodes {
    pub id: ShardId,
    /// The map's primary first, then its replicas.
    pub nodes: Vec<Arc<Node>>,
    /// (probe send time, LSN) of whichever node answered as a primary.
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl ShardNodes {
    fn push_sample(&self, at: Instant, lsn: u64) {
        let mut samples = self.samples.lock().expect("lock poisoned");
        if samples.len() == SAMPLES_MAX {
            samples.pop_front();
        }
        samples.push_back((at, lsn));
    }

    /// The primary's latest sampled LSN.
    #[cfg(test)]
    fn primary_lsn(&self) -> Option<u64> {
        self.samples
            .lock()
            .expect("lock poisoned")
            .back()
            .map(|s| s.1)
    }

    /// How far a replica that replayed to `lsn` (as read at `at`) is behind:
    /// bytes behind the primary's latest sample, and the age (at `at`) of the
    /// oldest primary sample it has not replayed yet.
    pub fn lag_of(&self, lsn: u64, at: Instant) -> (u64, Duration) {
        let samples = self.samples.lock().expect("lock poisoned");
        let latest = samples.back().map_or(lsn, |s| s.1);
        let bytes = latest.saturating_sub(lsn);
        let time = samples
            .iter()
            .find(|(_, primary)| *primary > lsn)
            .map_or(Duration::ZERO, |(t, _)| at.saturating_duration_since(*t));
        (bytes, time)
    }

    /// [`ShardNodes::lag_of`] a node in state `s`, when it is a replica
    /// that has been probed; a primary lags by nothing.
    pub fn lag(&self, s: &NodeState) -> Option<(u64, Duration)> {
        match (s.in_recovery, s.sampled_at) {
            (Some(true), Some(at)) => Some(self.lag_of(s.lsn, at)),
            (Some(false), _) => Some((0, Duration::ZERO)),
            _ => None,
        }
    }

    /// The LSN of the first primary sample sent after `after`: at or past
    /// every commit acknowledged before `after`.
    pub fn primary_lsn_after(&self, after: Instant) -> Option<u64> {
        let samples = self.samples.lock().expect("lock poisoned");
        samples.iter().find(|(t, _)| *t > after).map(|s| s.1)
    }

    /// How far behind the primary a reader of its WAL that has applied
    /// everything up to `lsn` is, at `at`: the age of the oldest primary
    /// sample past `lsn` (zero when there is none). `None` before the first
    /// sample: nothing is known yet.
    pub fn stream_lag(&self, lsn: u64, at: Instant) -> Option<Duration> {
        let samples = self.samples.lock().expect("lock poisoned");
        samples.back()?;
        // Samples only move forward, so the first one past `lsn` is found
        // by bisection (this runs on every cache lookup).
        let first_past = samples.partition_point(|(_, primary)| *primary <= lsn);
        Some(
            samples
                .get(first_past)
                .map_or(Duration::ZERO, |(t, _)| at.saturating_duration_since(*t)),
        )
    }

    pub fn has_replicas(&self) -> bool {
        self.nodes.len() > 1
    }
}

/// Why a shard cannot take a statement right now.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub shard: ShardId,
    pub reason: String,
}

/// Every server of every shard, and the policy for choosing among them.
pub struct Backends {
    pub settings: ReplicaConfig,
    shards: RwLock<HashMap<ShardId, Arc<ShardNodes>>>,
    /// How monitors log in; `None` without a database to log in to.
    probe_target: Option<ServerTarget>,
    round_robin: AtomicU32,
}

impl Backends {
    pub fn new(settings: ReplicaConfig, probe_target: Option<ServerTarget>) -> Backends {
        Backends {
            settings,
            shards: RwLock::default(),
            probe_target,
            round_robin: AtomicU32::new(0),
        }
    }

    /// The servers of `shard`, following `map` (monitors start for servers
    /// the map added; those it dropped are forgotten and their monitors stop).
    pub fn shard(&self, shard: ShardId, map: &ShardMap) -> Option<Arc<ShardNodes>> {
        let s = map.shards.get(&shard)?;
        let current = self
            .shards
            .read()
            .expect("lock poisoned")
            .get(&shard)
            .cloned();
        if let Some(nodes) = &current {
            let same = nodes.nodes.len() == 1 + s.replicas.len()
                && nodes.nodes[0].addr == s.primary
                && nodes.nodes[1..]
                    .iter()
                    .zip(&s.replicas)
                    .all(|(n, r)| n.addr == *r);
            if same {
                return current;
            }
        }
        let make = |addr: &str, map_primary: bool| {
            // Keep what is known about a server that stays in the shard.
            let state = current
                .as_ref()
                .and_then(|c| c.nodes.iter().find(|n| n.addr == addr))
                .map(|n| n.state())
                .unwrap_or_default();
            Arc::new(Node {
                addr: addr.to_owned(),
                shard,
                map_primary,
                state: Mutex::new(state),
                outstanding: AtomicU32::new(0),
            })
        };
        let mut nodes = vec![make(&s.primary, true)];
        nodes.extend(s.replicas.iter().map(|r| make(r, false)));
        let shard_nodes = Arc::new(ShardNodes {
            id: shard,
            nodes,
            samples: Mutex::default(),
        });
        self.shards
            .write()
            .expect("lock poisoned")
            .insert(shard, shard_nodes.clone());
        if shard_nodes.has_replicas() || self.settings.role == Role::Auto {
            for node in &shard_nodes.nodes {
                self.spawn_monitor(&shard_nodes, node);
            }
        }
        Some(shard_nodes)
    }

    /// Every shard known, for `admin shards`.
    pub fn all(&self) -> Vec<Arc<ShardNodes>> {
        let mut all: Vec<_> = self
            .shards
            .read()
            .expect("lock poisoned")
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|s| s.id);
        all
    }

    /// The server that takes writes: the map's primary, or with `role =
    /// "auto"` whichever server answers that it is not in recovery (a
    /// promoted replica) when the map's primary is down or in recovery.
    pub fn primary(&self, nodes: &ShardNodes) -> Result<Arc<Node>, Unavailable> {
        let map_primary = &nodes.nodes[0];
        let (in_recovery, closed) = map_primary.read(|s| (s.in_recovery, Node::is_closed(s)));
        if self.settings.role == Role::Auto {
            // A replica that left recovery was promoted: it takes the writes,
            // also after the old primary comes back. Two servers that both
            // accept writes get none: whichever got them, the other would
            // not have them.
            let promoted: Vec<&Arc<Node>> = nodes.nodes[1..]
                .iter()
                .filter(|n| n.in_recovery() == Some(false))
                .collect();
            match promoted.as_slice() {
                [] => {}
                [one] if in_recovery != Some(false) || !closed => {
                    return match one.read(Node::is_closed) {
                        true => Ok((*one).clone()),
                        false => Err(one.unavailable()),
                    };
                }
                _ => {
                    return Err(Unavailable {
                        shard: nodes.id,
                        reason: "more than one of its servers accepts writes (a promoted replica \
                                 and the old primary?); update the shard's addresses in the map"
                            .to_owned(),
                    })
                }
            }
        }
        if !closed {
            return Err(map_primary.unavailable());
        }
        Ok(map_primary.clone())
    }

    /// A replica for a read, or `None` (use the primary): healthy, in
    /// recovery, within `max_replica_lag` (unless `read_from = replica`), and
    /// replayed to `min_lsn`; the one with the fewest outstanding requests.
    pub fn replica(
        &self,
        nodes: &ShardNodes,
        read_from: ReadFrom,
        min_lsn: Option<u64>,
    ) -> Option<Arc<Node>> {
        if read_from == ReadFrom::Primary || !nodes.has_replicas() {
            return None;
        }
        let stale_after = self.settings.health_interval * 5 + Duration::from_millis(500);
        let now = Instant::now();
        let start = self.round_robin.fetch_add(1, Ordering::Relaxed) as usize;
        let count = nodes.nodes.len();
        (0..count)
            .map(|i| &nodes.nodes[(start + i) % count])
            .filter(|node| {
                let (in_recovery, lsn, sampled_at, closed) =
                    node.read(|s| (s.in_recovery, s.lsn, s.sampled_at, Node::is_closed(s)));
                let Some(at) = sampled_at else { return false };
                if in_recovery != Some(true)
                    || !closed
                    || now.saturating_duration_since(at) > stale_after
                {
                    return false;
                }
                if min_lsn.is_some_and(|min| lsn < min) {
                    return false;
                }
                if read_from == ReadFrom::Replica {
                    return true;
                }
                let (bytes, time) = nodes.lag_of(lsn, at);
                bytes <= self.settings.max_replica_lag_bytes
                    && time <= self.settings.max_replica_lag
            })
            .min_by_key(|node| node.outstanding())
            .cloned()
    }

    fn spawn_monitor(&self, shard: &Arc<ShardNodes>, node: &Arc<Node>) {
        let Some(target) = self.probe_target.clone() else {
            return;
        };
        let Some((host, port)) = node
            .addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
        else {
            return;
        };
        let target = ServerTarget {
            host,
            port,
            ..target
        };
        let shard = Arc::downgrade(shard);
        let node = Arc::downgrade(node);
        let settings = self.settings.clone();
        tokio::spawn(monitor(shard, node, target, settings));
    }
}

/// Probes one node until the map drops it.
async fn monitor(
    shard: Weak<ShardNodes>,
    node: Weak<Node>,
    target: ServerTarget,
    settings: ReplicaConfig,
) {
    let mut conn: Option<ServerConn> = None;
    let mut cannot_log_in: Option<String> = None;
    let mut tick = tokio::time::interval(settings.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(shard), Some(node)) = (shard.upgrade(), node.upgrade()) else {
            return;
        };
        let open_until = node.state.lock().expect("lock poisoned").open_until;
        if let Some(until) = open_until {
            if conn.is_none() && Instant::now() < until {
                continue; // backing off
            }
        }
        let sent = Instant::now();
        match probe(&mut conn, &target, settings.health_interval).await {
            Ok((in_recovery, lsn)) => {
                node.record_probe(in_recovery, lsn, sent);
                if !in_recovery {
                    shard.push_sample(sent, lsn);
                }
            }
            Err(ProbeError::Down(reason)) => {
                conn = None;
                node.report_failure(&reason, &settings);
            }
            Err(ProbeError::CannotLogIn(reason)) => {
                conn = None;
                if cannot_log_in.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(shard = %node.shard, addr = %node.addr, %reason,
                        "the health monitor cannot log in; this server's health and lag are unknown");
                    cannot_log_in = Some(reason);
                }
            }
        }
    }
}

const PROBE_SQL: &str = "SELECT pg_is_in_recovery()::text || ' ' || \
     (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END)::text \
     || ' ' || current_setting('wal_block_size') \
     || ' ' || (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size')";

/// Sizes of WAL page headers (`SizeOfXLogShortPHD`, `SizeOfXLogLongPHD`).
const SHORT_PAGE_HEADER: u64 = 24;
const LONG_PAGE_HEADER: u64 = 40;

/// The end of the last WAL record before a primary's insert position. They
/// differ only when the position is just past a page header (the last
/// record ended at the page boundary, or a segment was switched): a
/// replica reports the boundary as replayed then, never the header's end.
fn record_end(insert: u64, block_size: u64, segment_size: u64) -> u64 {
    if segment_size > 0 && insert % segment_size == LONG_PAGE_HEADER {
        insert - LONG_PAGE_HEADER
    } else if block_size > 0 && insert % block_size == SHORT_PAGE_HEADER {
        insert - SHORT_PAGE_HEADER
    } else {
        insert
    }
}

/// One probe on the monitor's own connection (made first if needed).
/// Why a probe failed.
enum ProbeError {
    /// The server is down or not answering: out of rotation.
    Down(String),
    /// The monitor's own login is refused (credentials, database name): a
    /// configuration problem that says nothing about the server's health.
    CannotLogIn(String),
}

async fn probe(
    conn: &mut Option<ServerConn>,
    target: &ServerTarget,
    interval: Duration,
) -> Result<(bool, u64), ProbeError> {
    if conn.is_none() {
        *conn = Some(ServerConn::connect(target, 0).await.map_err(|e| {
            let reason = e.to_string();
            match e {
                Error::ServerAuth(_) => ProbeError::CannotLogIn(reason),
                _ if reason.contains("does not exist") => ProbeError::CannotLogIn(reason),
                _ => ProbeError::Down(reason),
            }
        })?);
    }
    let c = conn.as_mut().expect("connected above");
    // A server that does not answer a probe as long as it may take to
    // connect (and at least a few intervals) counts as down.
    let limit = target.connect_timeout.max(interval * 20);
    let answer = tokio::time::timeout(limit, c.query_value(PROBE_SQL, target.message_bytes_max))
        .await
        .map_err(|_| ProbeError::Down(format!("no answer to a health probe within {limit:?}")))?
        .map_err(|e| ProbeError::Down(e.to_string()))?
        .ok_or_else(|| ProbeError::Down("the health probe returned no row".into()))?;
    let unexpected = || ProbeError::Down(format!("unexpected health probe answer {answer:?}"));
    let fields: Vec<&str> = answer.split(' ').collect();
    let [recovery, lsn, block, segment] = fields.as_slice() else {
        return Err(unexpected());
    };
    // A replica that has not replayed anything yet reports NULL: position 0.
    let lsn = parse_lsn(lsn).unwrap_or(0);
    let in_recovery = *recovery == "true";
    if in_recovery {
        return Ok((true, lsn));
    }
    let block = block.parse().map_err(|_| unexpected())?;
    let segment = segment.parse().map_err(|_| unexpected())?;
    Ok((false, record_end(lsn, block, segment)))
}

pub use cache::pgoutput::parse_lsn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_parses() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("junk"), None);
    }

    #[test]
    fn an_insert_position_past_a_page_header_is_the_boundary() {
        let (block, segment) = (8192, 16 << 20);
        // Just after a segment switch (long header) or a page boundary (short).
        assert_eq!(record_end(0x3000028, block, segment), 0x3000000);
        assert_eq!(record_end(0x3002018, block, segment), 0x3002000);
        // Anywhere else, and 40 bytes into a page that is no segment start.
        assert_eq!(record_end(0x3002028, block, segment), 0x3002028);
        assert_eq!(record_end(0x943B090, block, segment), 0x943B090);
    }

    #[tokio::test]
    async fn lag_comes_from_the_primary_history() {
        let shard = ShardNodes {
            id: ShardId(0),
            nodes: vec![],
            samples: Mutex::default(),
        };
        let t0 = Instant::now();
        for i in 0..10u64 {
            shard.push_sample(t0 + Duration::from_millis(100 * i), 1000 * i);
        }
        let at = t0 + Duration::from_millis(1000);
        // Replayed everything: no lag.
        assert_eq!(shard.lag_of(9000, at), (0, Duration::ZERO));
        // Missing what the primary had at 500ms (5000) and later.
        assert_eq!(shard.lag_of(4500, at), (4500, Duration::from_millis(500)));
        assert_eq!(
            shard.primary_lsn_after(t0 + Duration::from_millis(250)),
            Some(3000)
        );
        assert_eq!(shard.primary_lsn_after(t0 + Duration::from_secs(5)), None);
        assert_eq!(shard.primary_lsn(), Some(9000));
    }
}
