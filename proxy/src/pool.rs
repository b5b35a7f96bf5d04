//! Pools: one bb8 pool of ServerConn per (database, user, server), created
//! on first use, behind a gate that the admin console can resize, pause
//! and close.
//!
//! Checkout never turns into a round trip: validity is a non-blocking peek at
//! the socket, and a connection whose protocol state is unknown is marked
//! `broken`, so bb8 drops it instead of handing it out again.
//!
//! bb8 fixes a pool's size, timeouts and lifetime when it is built, and
//! `RELOAD` must change them without dropping anyone. So bb8 is built
//! without a size limit, retries or lifetime, and the [`PoolCore`] in front
//! of it holds the live settings: its gate lends at most `limit`
//! connections at once (counting checkouts in progress), which also bounds
//! what bb8 opens (it connects only for a checkout that finds nothing idle,
//! never more than the checkouts in flight); a connection that comes back
//! while the pool holds more than `limit`, or older than the lifetime, is
//! closed. The gate is one compare-and-swap at checkout and one subtraction
//! at return; pausing and closing are a flag it reads in the same place.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::clients::{client_state, ClientInfo};
use crate::clock::Clock;
use crate::config::PoolMode;
use crate::error::{Error, Result};
use crate::server::{server_state, ParamState, ServerConn, ServerInfo, ServerParams, ServerTarget};
use crate::workers::StripedCounter;

/// bb8's own checkout timeout: longer than any `checkout_timeout`, which the
/// gate applies itself (bb8 cannot change its own after it is built).
const BB8_GET_TIMEOUT: Duration = Duration::from_secs(86_400);

/// Server connection ids, unique in the process.
static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

/// A pool's number in `SHOW POOLS` and in its clients' state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PoolId(pub u32);

/// Values of [`PoolCore`]'s `blocked` flags.
mod blocked {
    /// `PAUSE`: checkouts wait.
    pub const PAUSED: u8 = 1;
    /// `SHUTDOWN`: checkouts outside a transaction are refused.
    pub const CLOSING: u8 = 2;
}

/// Idle connections, from the top of the stack, looked at for one of the
/// borrower's own worker before the top one is taken from another.
const HOME_SCAN_MAX: usize = 16;

/// The live part of a pool: limits and timeouts `RELOAD` changes, the gate,
/// and the pool's server connections. One per pool for the life of the
/// process (leaked, so that a checkout and its return reach it through a
/// plain reference, without a reference count to bump).
pub struct PoolCore {
    pub id: PoolId,
    /// Connections lent or being checked out.
    lent: AtomicU32,
    /// Checkouts waiting at the gate (for the wakeup protocol).
    gate_waiters: AtomicU32,
    notify: Notify,
    /// A gate waiter was told a slot came free and has not looked yet.
    /// Releases meanwhile wake nobody else: under load an arriving checkout
    /// takes most freed slots first, and each extra waiter woken would
    /// only find the slot gone and wait again (a task poll, a waker, and
    /// across workers a futex wake, for nothing). Whoever takes the
    /// notification clears this and passes the wakeup on if a slot is
    /// still free (see [`PoolCore::pass_wakeup`]).
    woken: AtomicBool,
    /// Most connections lent at once: the live `pool_size`.
    limit: AtomicU32,
    blocked: AtomicU8,
    checkout_timeout_us: AtomicU64,
    connect_timeout_us: AtomicU64,
    lifetime_us: AtomicU64,
    /// Server connections open (registered).
    open: AtomicU32,
    /// Server connections logging in.
    logging_in: AtomicU32,
    /// Clients waiting for a connection (at the gate or for bb8): `cl_waiting`.
    waiting: AtomicU32,
    /// Checkouts that had to wait and got a connection, that timed out,
    /// and the time they waited (bb8 sees neither the gate nor its timeout).
    waited: AtomicU64,
    timed_out: AtomicU64,
    wait_us: AtomicU64,
    servers: Mutex<BTreeMap<u64, Arc<ServerInfo>>>,
    clock: Clock,
    /// Idle connections, most recently returned last: the checkout fast
    /// path. A connection here is checked out of bb8 (bb8 only opens
    /// connections and closes those given back broken), so a checkout and
    /// a return are a lock, a push and a pop instead of a pass through
    /// bb8's queue, statistics and clock. Bounded by the connections open.
    warm: Mutex<Vec<Warm>>,
    /// Checkouts served from `warm` (bb8 counts only its own).
    warm_hits: StripedCounter,
    /// `server_idle_timeout`, for connections in `warm`.
    idle_timeout_us: AtomicU64,
}

/// An idle connection in [`PoolCore::warm`], and since when it is idle.
struct Warm {
    conn: bb8::PooledConnection<'static, ServerManager>,
    since_us: u64,
    /// `conn.home`, without a pointer to follow.
    home: u32,
}

/// The settings `RELOAD` may change in a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveSettings {
    pub size: u32,
    pub checkout_timeout: Duration,
    pub connect_timeout: Duration,
    pub lifetime: Duration,
    pub idle_timeout: Duration,
}

impl PoolCore {
    fn apply(&self, s: &LiveSettings) {
        let us = |d: Duration| d.as_micros().min(u64::MAX as u128) as u64;
        self.checkout_timeout_us
            .store(us(s.checkout_timeout), Ordering::Relaxed);
        self.connect_timeout_us
            .store(us(s.connect_timeout), Ordering::Relaxed);
        self.lifetime_us.store(us(s.lifetime), Ordering::Relaxed);
        self.idle_timeout_us
            .store(us(s.idle_timeout), Ordering::Relaxed);
        let old = self.limit.swap(s.size, Ordering::SeqCst);
        if s.size > old {
            // Waiters may fit now.
            self.notify.notify_waiters();
        }
    }

    fn checkout_timeout(&self) -> Duration {
        Duration::from_micros(self.checkout_timeout_us.load(Ordering::Relaxed))
    }

    /// Takes a slot if the pool is neither paused nor closing and has room.
    #[inline]
    fn try_enter(&self) -> bool {
        if self.blocked.load(Ordering::Relaxed) != 0 || !self.try_take() {
            return false;
        }
        // PAUSE sets the flag, then counts the slots taken; this takes a
        // slot, then looks at the flag again (both SeqCst), so one of the
        // two sees the other: PAUSE never answers while a checkout that
        // missed the flag goes through.
        if self.blocked.load(Ordering::SeqCst) != 0 {
            self.leave();
            return false;
        }
        true
    }

    fn try_take(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        self.lent
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives a slot back; a waiter, if any, tries for it.
    #[inline]
    fn leave(&self) {
        self.lent.fetch_sub(1, Ordering::SeqCst);
        // SeqCst on both sides: a waiter counts itself before it looks at
        // `lent`, and this looks at the waiters after `lent` dropped, so
        // one of the two sees the other.
        if self.gate_waiters.load(Ordering::SeqCst) > 0 {
            self.wake_waiter();
        }
    }

    /// Wakes one gate waiter unless one is woken already. The notification
    /// is never lost: tokio hands a `notify_one` that reached a waiter
    /// dropped unpolled to the next waiter, or keeps it as a permit for
    /// the next `enable`, and whoever takes it calls [`PoolCore::woke`].
    fn wake_waiter(&self) {
        if !self.woken.swap(true, Ordering::SeqCst) {
            self.notify.notify_one();
        }
    }

    /// A waiter took a notification: the next release may wake another.
    /// (Cleared before the waiter looks at `lent`, SeqCst: a release that
    /// saw the flag set dropped `lent` before, so the waiter sees its slot.)
    fn woke(&self) {
        self.woken.store(false, Ordering::SeqCst);
    }

    /// After a waiter that was woken took a slot (or gave up): if a slot is
    /// still free and others wait, one of them is woken for it, since the
    /// releases that freed it may have woken nobody.
    fn pass_wakeup(&self) {
        if self.gate_waiters.load(Ordering::SeqCst) > 1
            && self.lent.load(Ordering::SeqCst) < self.limit.load(Ordering::SeqCst)
        {
            self.wake_waiter();
        }
    }

    fn set_blocked(&self, flag: u8, on: bool) {
        if on {
            self.blocked.fetch_or(flag, Ordering::SeqCst);
        } else {
            self.blocked.fetch_and(!flag, Ordering::SeqCst);
        }
        self.notify.notify_waiters();
    }
}

/// A lent slot at the gate, given back when dropped (after the connection:
/// see [`Pooled`]).
struct Slot(&'static PoolCore);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// A server connection lent to a session. Dropping it returns the
/// connection to bb8 first and then the slot to the gate, so a waiter the
/// gate lets in finds the connection idle instead of opening another.
pub struct Pooled {
    /// Always `Some` until dropped (taken there to go back to `warm`).
    conn: Option<bb8::PooledConnection<'static, ServerManager>>,
    slot: Slot,
}

impl std::ops::Deref for Pooled {
    type Target = Box<ServerConn>;

    #[inline]
    fn deref(&self) -> &Box<ServerConn> {
        self.conn.as_ref().expect("taken only in drop")
    }
}

impl std::ops::DerefMut for Pooled {
    #[inline]
    fn deref_mut(&mut self) -> &mut Box<ServerConn> {
        self.conn.as_mut().expect("taken only in drop")
    }
}

impl Pooled {
    /// Gives the connection back, `now_us` being `Clock::now_us` read
    /// just now (dropping it reads the clock itself).
    pub fn release(mut self, now_us: u64) {
        self.give_back(Some(now_us));
    }

    fn give_back(&mut self, now_us: Option<u64>) {
        let core = self.slot.0;
        let Some(mut pooled) = self.conn.take() else {
            return;
        };
        let conn: &mut ServerConn = &mut pooled;
        conn.info.state.store(server_state::IDLE, Ordering::Relaxed);
        conn.info.link.store(0, Ordering::Relaxed);
        if conn.broken {
            return; // to bb8, which closes it
        }
        // Plain loads of values that change only at RELOAD and when a
        // connection opens or closes.
        let now = now_us.unwrap_or_else(|| core.clock.now_us());
        let surplus = core.open.load(Ordering::Relaxed) > core.limit.load(Ordering::Relaxed);
        let age = now.saturating_sub(conn.info.connected_us);
        conn.retire = surplus || age >= core.lifetime_us.load(Ordering::Relaxed);
        if !conn.retire {
            // Before the slot goes back (the field drops after this), so
            // a checkout the gate lets in finds it.
            let warm = Warm {
                home: conn.home,
                conn: pooled,
                since_us: now,
            };
            core.warm.lock().expect("lock poisoned").push(warm);
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.give_back(None);
    }
}

impl PoolCore {
    /// The most recently returned idle connection that is still usable,
    /// preferably one this worker used last (see [`crate::workers`]).
    /// Connections found closed, out of step or idle past
    /// `server_idle_timeout` go back to bb8 marked broken, which closes them.
    #[inline]
    fn take_warm(&self, now: u64) -> Option<bb8::PooledConnection<'static, ServerManager>> {
        let idle_timeout_us = self.idle_timeout_us.load(Ordering::Relaxed);
        let here = crate::workers::home();
        loop {
            let Warm {
                mut conn, since_us, ..
            } = {
                let mut warm = self.warm.lock().expect("lock poisoned");
                // Only near the top: the scan holds the lock, and a pool
                // may have hundreds of idle connections.
                let top = warm.len().saturating_sub(HOME_SCAN_MAX);
                match warm[top..].iter().rposition(|w| w.home == here) {
                    // Taken out of the middle, the stack stays oldest first.
                    Some(i) => warm.remove(top + i),
                    None => warm.pop()?,
                }
            };
            if now.saturating_sub(since_us) < idle_timeout_us && conn.is_idle_and_open() {
                conn.settle();
                self.warm_hits.add(1);
                return Some(conn);
            }
            conn.broken = true;
        }
    }

    /// Closes the connections idle past `server_idle_timeout` (the oldest
    /// are at the bottom of the stack). Returns how many.
    fn close_idle(&self) -> usize {
        let now = self.clock.now_us();
        let idle_timeout_us = self.idle_timeout_us.load(Ordering::Relaxed);
        let expired: Vec<Warm> = {
            let mut warm = self.warm.lock().expect("lock poisoned");
            let keep = warm
                .iter()
                .position(|w| now.saturating_sub(w.since_us) < idle_timeout_us)
                .unwrap_or(warm.len());
            warm.drain(..keep).collect()
        };
        let n = expired.len();
        for mut w in expired {
            w.conn.broken = true;
        }
        n
    }
}

/// Removes a server connection from its pool's list when it closes.
pub struct ServerRegistration {
    core: &'static PoolCore,
    id: u64,
}

impl Drop for ServerRegistration {
    fn drop(&mut self) {
        self.core
            .servers
            .lock()
            .expect("lock poisoned")
            .remove(&self.id);
        self.core.open.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct ServerManager {
    target: ServerTarget,
    prepared_max: u32,
    core: &'static PoolCore,
    /// Login parameters of the first connection made, reported to clients.
    login_params: Arc<Mutex<Option<ServerParams>>>,
    /// Bumped with the reason every time a connection attempt fails, so
    /// waiting clients learn the server is down instead of timing out.
    failures: watch::Sender<(u64, String)>,
    /// Connection attempts failed so far; bumped before `failures`, so a
    /// checkout can tell without a receiver of its own whether one failed.
    failed: Arc<AtomicU64>,
}

/// Counts a login in progress for `sv_login`, also when it is cancelled.
struct LoggingIn(&'static PoolCore);

impl Drop for LoggingIn {
    fn drop(&mut self) {
        self.0.logging_in.fetch_sub(1, Ordering::Relaxed);
    }
}

impl bb8::ManageConnection for ServerManager {
    /// Boxed so that handing a connection around (idle queue, checkout,
    /// session) moves a pointer, not the whole connection state.
    type Connection = Box<ServerConn>;
    type Error = Error;

    async fn connect(&self) -> Result<Box<ServerConn>> {
        let core = self.core;
        core.logging_in.fetch_add(1, Ordering::Relaxed);
        let logging_in = LoggingIn(core);
        let mut target = self.target.clone();
        target.connect_timeout =
            Duration::from_micros(core.connect_timeout_us.load(Ordering::Relaxed));
        let connected = ServerConn::connect(&target, self.prepared_max).await;
        drop(logging_in);
        match connected {
            Ok(mut conn) => {
                tracing::debug!(database = %self.target.database, "new server connection");
                let mut params = self.login_params.lock().expect("lock poisoned");
                if params.is_none() {
                    *params = Some(conn.login_params.clone());
                }
                drop(params);
                let id = NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed);
                let info = Arc::new(ServerInfo::new(
                    id,
                    conn.info.cancel_key,
                    conn.info.local,
                    core.clock.now_us(),
                ));
                core.servers
                    .lock()
                    .expect("lock poisoned")
                    .insert(id, info.clone());
                core.open.fetch_add(1, Ordering::Relaxed);
                conn.info = info;
                conn.registration = Some(ServerRegistration { core, id });
                Ok(Box::new(conn))
            }
            Err(e) => {
                tracing::warn!(database = %self.target.database, error = %e, "server connection failed");
                self.failed.fetch_add(1, Ordering::SeqCst);
                self.failures.send_modify(|(n, reason)| {
                    *n += 1;
                    *reason = e.to_string();
                });
                Err(e)
            }
        }
    }

    async fn is_valid(&self, conn: &mut Box<ServerConn>) -> Result<()> {
        if conn.is_idle_and_open() {
            Ok(())
        } else {
            tracing::debug!(database = %self.target.database, "dropping a server connection that is closed or out of step");
            conn.broken = true;
            Err(Error::ServerIo(std::io::ErrorKind::ConnectionReset.into()))
        }
    }

    fn has_broken(&self, conn: &mut Box<ServerConn>) -> bool {
        conn.broken || conn.retire
    }
}

/// Who checks a connection out, for `SHOW CLIENTS`, `SHOW POOLS` and
/// `SHUTDOWN`.
#[derive(Clone, Copy)]
pub struct Borrower<'a> {
    /// The client (none for the login's first connection).
    pub client: Option<&'a ClientInfo>,
    /// The client is inside a transaction: while the proxy shuts down, it
    /// still gets a connection to finish it.
    pub in_transaction: bool,
}

/// One pool and what sessions need to know about it.
pub struct Pool {
    pub database: String,
    pub user: String,
    /// The server (`host:port`) it connects to, and as whom.
    pub addr: String,
    pub server_user: String,
    pub mode: PoolMode,
    core: &'static PoolCore,
    pool: bb8::Pool<ServerManager>,
    login_params: Arc<Mutex<Option<ServerParams>>>,
    failures: watch::Receiver<(u64, String)>,
    failed: Arc<AtomicU64>,
    /// The session parameters the last client logged in with.
    last_params: Mutex<ParamState>,
}

pub struct PoolSettings {
    pub live: LiveSettings,
    pub mode: PoolMode,
    pub prepared_max: u32,
}

/// A pool's checkouts so far, for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Checkouts {
    /// Got a connection at once.
    pub direct: u64,
    /// Got one after waiting (the pool was full, paused, or connecting).
    pub waited: u64,
    /// Gave up at `checkout_timeout` (SQLSTATE 53300, or 57014 if paused).
    pub timed_out: u64,
    pub wait: Duration,
}

/// A pool's figures for `SHOW POOLS` and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct PoolFigures {
    pub size: u32,
    pub active: u32,
    pub idle: u32,
    pub logging_in: u32,
    pub waiting: u32,
    pub paused: bool,
}

impl Pool {
    pub fn new(
        id: PoolId,
        (database, user): (String, String),
        target: ServerTarget,
        settings: PoolSettings,
        clock: Clock,
    ) -> Pool {
        let core: &'static PoolCore = Box::leak(Box::new(PoolCore {
            id,
            lent: AtomicU32::new(0),
            gate_waiters: AtomicU32::new(0),
            notify: Notify::new(),
            woken: AtomicBool::new(false),
            limit: AtomicU32::new(0),
            blocked: AtomicU8::new(0),
            checkout_timeout_us: AtomicU64::new(0),
            connect_timeout_us: AtomicU64::new(0),
            lifetime_us: AtomicU64::new(0),
            open: AtomicU32::new(0),
            logging_in: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            waited: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            wait_us: AtomicU64::new(0),
            servers: Mutex::default(),
            clock,
            warm: Mutex::default(),
            warm_hits: StripedCounter::default(),
            idle_timeout_us: AtomicU64::new(0),
        }));
        core.apply(&settings.live);
        let addr = format!("{}:{}", target.host, target.port);
        let server_user = target.user.clone();
        let login_params = Arc::new(Mutex::new(None));
        let (failures_tx, failures) = watch::channel((0, String::new()));
        let failed = Arc::new(AtomicU64::new(0));
        let manager = ServerManager {
            target,
            prepared_max: settings.prepared_max,
            core,
            login_params: login_params.clone(),
            failures: failures_tx,
            failed: failed.clone(),
        };
        let pool = bb8::Pool::builder()
            // The gate limits the pool (bb8's size cannot change).
            .max_size(u32::MAX)
            .min_idle(None)
            .test_on_check_out(true)
            .connection_timeout(BB8_GET_TIMEOUT)
            // A failed attempt fails the checkouts waiting (through
            // `failures`); the next checkout tries again.
            .retry_connection(false)
            // Idle connections wait in `warm`, which `close_idle` times out.
            .idle_timeout(None)
            // Lifetime is checked at return, against the live setting.
            .max_lifetime(None)
            .queue_strategy(bb8::QueueStrategy::Lifo)
            .build_unchecked(manager);
        Pool {
            database,
            user,
            addr,
            server_user,
            mode: settings.mode,
            core,
            pool,
            login_params,
            failures,
            failed,
            last_params: Mutex::default(),
        }
    }

    pub fn id(&self) -> PoolId {
        self.core.id
    }

    /// The live pool size.
    pub fn size(&self) -> u32 {
        self.core.limit.load(Ordering::Relaxed)
    }

    /// Applies settings from `RELOAD`. A smaller size takes effect as
    /// connections come back: the surplus is closed then.
    pub fn apply(&self, live: &LiveSettings) {
        self.core.apply(live);
    }

    pub fn set_paused(&self, paused: bool) {
        self.core.set_blocked(blocked::PAUSED, paused);
    }

    /// While closing, checkouts outside a transaction fail with
    /// [`Error::ShuttingDown`].
    pub fn set_closing(&self) {
        self.core.set_blocked(blocked::CLOSING, true);
    }

    /// Connections lent or being checked out; a paused pool is drained when
    /// this is 0.
    pub fn in_use(&self) -> u32 {
        self.core.lent.load(Ordering::SeqCst)
    }

    /// Waits for a server connection up to the checkout timeout. Fails early
    /// if a connection attempt fails while waiting. Cancel-safe.
    pub async fn checkout(&self, who: Borrower<'_>) -> Result<Pooled> {
        let slot = match self.take_now(who, self.core.clock.now_us()) {
            Ok(conn) => return Ok(conn),
            Err(None) => return self.checkout_slow(who).await,
            Err(Some(slot)) => slot,
        };
        let failed = self.failed.load(Ordering::SeqCst);
        let mut get = pin!(self.pool.get_owned());
        // Usually a connection is idle and the first poll hands it over.
        let first = std::future::poll_fn(|cx| Poll::Ready(get.as_mut().poll(cx))).await;
        if let Poll::Ready(got) = first {
            return Ok(self.lend(self.checked_out(got)?, slot, who));
        }
        let waiting = Waiting::start(self.core, who);
        let deadline = tokio::time::Instant::now() + self.core.checkout_timeout();
        let got = self.wait_for_bb8(get, failed, deadline).await;
        waiting.finish(got.as_ref().map(drop));
        Ok(self.lend(got?, slot, who))
    }

    /// A connection without waiting, if the gate has room and one is idle
    /// (the usual case); `now_us` is `Clock::now_us` read just now.
    /// `None`: [`Pool::checkout`] would wait.
    #[inline]
    pub fn try_checkout(&self, who: Borrower<'_>, now_us: u64) -> Option<Pooled> {
        self.take_now(who, now_us).ok()
    }

    /// A slot and an idle connection. `Err(Some(slot))`: a slot, but bb8
    /// must open a connection; `Err(None)`: the gate is full or shut.
    #[inline]
    fn take_now(&self, who: Borrower<'_>, now: u64) -> std::result::Result<Pooled, Option<Slot>> {
        if !self.core.try_enter() {
            return Err(None);
        }
        let slot = Slot(self.core);
        match self.core.take_warm(now) {
            Some(conn) => Ok(self.lend_at(conn, slot, who, now)),
            None => Err(Some(slot)),
        }
    }

    /// A checkout that waits at the gate (the pool is full, paused or
    /// closing), then for bb8.
    async fn checkout_slow(&self, who: Borrower<'_>) -> Result<Pooled> {
        let core = self.core;
        let timeout = core.checkout_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        let waiting = Waiting::start(core, who);
        let at_gate = AtGate::new(core);
        let entered = self.wait_at_gate(who, deadline, timeout).await;
        drop(at_gate);
        if let Err(e) = entered {
            waiting.finish(Err(&e));
            return Err(e);
        }
        let slot = Slot(core);
        let now = core.clock.now_us();
        if let Some(conn) = core.take_warm(now) {
            return Ok(self.lend_at(conn, slot, who, now));
        }
        let failed = self.failed.load(Ordering::SeqCst);
        let get = pin!(self.pool.get_owned());
        let got = self.wait_for_bb8(get, failed, deadline).await;
        waiting.finish(got.as_ref().map(drop));
        Ok(self.lend(got?, slot, who))
    }

    async fn wait_at_gate(
        &self,
        who: Borrower<'_>,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<()> {
        let core = self.core;
        // One timer for the whole wait: a waiter woken for a slot that an
        // arriving checkout took first waits again without re-arming it.
        let mut expired = pin!(tokio::time::sleep_until(deadline));
        // Whether this waiter took a notification (see `PoolCore::woken`).
        let mut woke = false;
        loop {
            let notified = core.notify.notified();
            let mut notified = pin!(notified);
            // Registered before looking, so a wakeup in between is not lost.
            // `true`: a wakeup kept for the next waiter was taken.
            if notified.as_mut().enable() {
                core.woke();
                woke = true;
            }
            let flags = core.blocked.load(Ordering::SeqCst);
            if flags & blocked::CLOSING != 0 && !who.in_transaction {
                if woke {
                    core.pass_wakeup();
                }
                return Err(Error::ShuttingDown);
            }
            let paused = flags & blocked::PAUSED != 0;
            if !paused && core.try_take() {
                // As in `try_enter`: a PAUSE that began meanwhile wins.
                if core.blocked.load(Ordering::SeqCst) & blocked::PAUSED == 0 {
                    if woke {
                        core.pass_wakeup();
                    }
                    return Ok(());
                }
                core.leave();
                continue;
            }
            let timed_out = tokio::select! {
                biased;
                () = notified => false,
                () = expired.as_mut() => true,
            };
            if timed_out {
                return Err(if paused {
                    Error::Paused {
                        database: self.database.clone(),
                        waited: timeout,
                    }
                } else {
                    self.exhausted(timeout)
                });
            }
            core.woke();
            woke = true;
        }
    }

    /// Waits for bb8 to hand over a connection (it is opening one), up to
    /// `deadline`, or until a connection attempt fails.
    async fn wait_for_bb8<F>(
        &self,
        get: std::pin::Pin<&mut F>,
        failed: u64,
        deadline: tokio::time::Instant,
    ) -> Result<bb8::PooledConnection<'static, ServerManager>>
    where
        F: Future<
            Output = std::result::Result<
                bb8::PooledConnection<'static, ServerManager>,
                bb8::RunError<Error>,
            >,
        >,
    {
        let mut failures = self.failures.clone();
        failures.mark_unchanged();
        // An attempt that failed before `mark_unchanged` is not news to
        // `failures`; the counter, bumped first, tells.
        if self.failed.load(Ordering::SeqCst) != failed {
            return Err(self.unavailable(&failures));
        }
        let waited = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                biased;
                got = get => self.checked_out(got),
                _ = failures.changed() => Err(self.unavailable(&failures)),
            }
        });
        match waited.await {
            Ok(got) => got,
            Err(_) => Err(self.exhausted(self.core.checkout_timeout())),
        }
    }

    /// Marks the connection lent to `who`.
    #[inline]
    fn lend(
        &self,
        conn: bb8::PooledConnection<'static, ServerManager>,
        slot: Slot,
        who: Borrower<'_>,
    ) -> Pooled {
        self.lend_at(conn, slot, who, self.core.clock.now_us())
    }

    #[inline]
    fn lend_at(
        &self,
        conn: bb8::PooledConnection<'static, ServerManager>,
        slot: Slot,
        who: Borrower<'_>,
        now: u64,
    ) -> Pooled {
        let info = &conn.info;
        info.state.store(server_state::ACTIVE, Ordering::Relaxed);
        info.request_us.store(now, Ordering::Relaxed);
        if let Some(client) = who.client {
            info.link.store(client.id.0, Ordering::Relaxed);
            client.pool.store(self.core.id.0, Ordering::Relaxed);
        }
        Pooled {
            conn: Some(conn),
            slot,
        }
    }

    fn checked_out(
        &self,
        got: std::result::Result<
            bb8::PooledConnection<'static, ServerManager>,
            bb8::RunError<Error>,
        >,
    ) -> Result<bb8::PooledConnection<'static, ServerManager>> {
        let mut conn = got.map_err(|e| match e {
            bb8::RunError::User(e) => e,
            bb8::RunError::TimedOut => self.exhausted(self.core.checkout_timeout()),
        })?;
        // Opened by a task of whichever worker asked bb8 first.
        conn.settle();
        Ok(conn)
    }

    fn exhausted(&self, waited: Duration) -> Error {
        Error::PoolExhausted {
            database: self.database.clone(),
            waited,
            pool_size: self.size(),
        }
    }

    fn unavailable(&self, failures: &watch::Receiver<(u64, String)>) -> Error {
        let reason = failures.borrow().1.clone();
        Error::ServerUnavailable {
            database: self.database.clone(),
            reason,
        }
    }

    /// The server's login ParameterStatus values, connecting once if no
    /// connection has been made yet.
    pub async fn login_params(&self) -> Result<ServerParams> {
        if let Some(params) = self.login_params.lock().expect("lock poisoned").clone() {
            return Ok(params);
        }
        let who = Borrower {
            client: None,
            in_transaction: false,
        };
        let conn = self.checkout(who).await?;
        Ok(conn.login_params.clone())
    }

    /// `params`, or an equal map another client logged in with: clients of
    /// one application usually log in alike, and sharing their map makes the
    /// parameter comparison on every checkout a pointer comparison.
    pub fn intern_params(&self, params: ParamState) -> ParamState {
        let mut last = self.last_params.lock().expect("lock poisoned");
        if *last != params {
            *last = params;
        }
        last.clone()
    }

    pub fn state(&self) -> bb8::State {
        self.pool.state()
    }

    /// Its server connections, by id.
    pub fn servers(&self) -> Vec<Arc<ServerInfo>> {
        let servers = self.core.servers.lock().expect("lock poisoned");
        servers.values().cloned().collect()
    }

    /// Connections handed out so far: from the idle stack, or by bb8
    /// (which counts every checkout that passed the gate, and never times
    /// out itself).
    pub fn assignments(&self) -> u64 {
        let s = self.pool.state().statistics;
        s.get_direct + s.get_waited + self.core.warm_hits.get()
    }

    /// Closes the idle connections past `server_idle_timeout`; returns how many.
    pub fn close_idle(&self) -> usize {
        self.core.close_idle()
    }

    pub fn checkouts(&self) -> Checkouts {
        let waited = self.core.waited.load(Ordering::Relaxed);
        Checkouts {
            direct: self.assignments().saturating_sub(waited),
            waited,
            timed_out: self.core.timed_out.load(Ordering::Relaxed),
            wait: Duration::from_micros(self.core.wait_us.load(Ordering::Relaxed)),
        }
    }

    pub fn figures(&self) -> PoolFigures {
        let servers = self.servers();
        let active = servers.iter().filter(|s| s.is_active()).count() as u32;
        PoolFigures {
            size: self.size(),
            active,
            idle: servers.len() as u32 - active,
            logging_in: self.core.logging_in.load(Ordering::Relaxed),
            waiting: self.core.waiting.load(Ordering::Relaxed),
            paused: self.core.blocked.load(Ordering::Relaxed) & blocked::PAUSED != 0,
        }
    }
}

impl Drop for Pool {
    /// The idle connections go back to bb8, which closes them as it goes
    /// (the core, leaked, would otherwise keep them open).
    fn drop(&mut self) {
        let warm = std::mem::take(&mut *self.core.warm.lock().expect("lock poisoned"));
        drop(warm);
    }
}

/// A checkout waiting at the gate, counted for [`PoolCore::leave`]'s
/// wakeups until dropped (cancel-safe).
struct AtGate(&'static PoolCore);

impl AtGate {
    fn new(core: &'static PoolCore) -> AtGate {
        core.gate_waiters.fetch_add(1, Ordering::SeqCst);
        AtGate(core)
    }
}

impl Drop for AtGate {
    fn drop(&mut self) {
        self.0.gate_waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A client waiting for a connection: counted in `cl_waiting`, its state
/// `waiting` and its wait timed, until dropped (cancel-safe).
struct Waiting<'a> {
    core: &'static PoolCore,
    client: Option<&'a ClientInfo>,
    started_us: u64,
}

impl<'a> Waiting<'a> {
    fn start(core: &'static PoolCore, who: Borrower<'a>) -> Waiting<'a> {
        core.waiting.fetch_add(1, Ordering::Relaxed);
        let started_us = core.clock.now_us();
        if let Some(client) = who.client {
            client.wait_start_us.store(started_us, Ordering::Relaxed);
            client.waiting_pool.store(core.id.0, Ordering::Relaxed);
            client.state.store(client_state::WAITING, Ordering::Relaxed);
        }
        Waiting {
            core,
            client: who.client,
            started_us,
        }
    }
}

impl Waiting<'_> {
    /// Counts how the wait ended, for `/metrics`.
    fn finish(self, outcome: std::result::Result<(), &Error>) {
        let counter = match outcome {
            Ok(()) => &self.core.waited,
            Err(Error::PoolExhausted { .. } | Error::Paused { .. }) => &self.core.timed_out,
            Err(_) => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let core = self.core;
        core.waiting.fetch_sub(1, Ordering::Relaxed);
        let waited = core.clock.now_us().saturating_sub(self.started_us);
        core.wait_us.fetch_add(waited, Ordering::Relaxed);
        if let Some(client) = self.client {
            client.state.store(client_state::IDLE, Ordering::Relaxed);
            client.counters.add_wait_us(waited);
        }
    }
}

/// The key of a pool: (client database, client user, server address); the
/// address is empty for the database's configured server.
pub type PoolKey = (String, String, String);

/// All pools, by (client database, client user, server address).
#[derive(Default)]
pub struct Pools {
    pools: RwLock<HashMap<PoolKey, Arc<Pool>>>,
    next_id: AtomicU32,
}

impl Pools {
    pub fn get_or_create(
        &self,
        database: &str,
        user: &str,
        addr: &str,
        make: impl FnOnce(PoolId) -> Pool,
    ) -> Arc<Pool> {
        let key = (database.to_owned(), user.to_owned(), addr.to_owned());
        if let Some(pool) = self.pools.read().expect("lock poisoned").get(&key) {
            return pool.clone();
        }
        // Made under the write lock: `PAUSE` and `SHUTDOWN` set their state
        // before they walk the pools, so a pool made meanwhile sees it.
        self.pools
            .write()
            .expect("lock poisoned")
            .entry(key)
            .or_insert_with(|| {
                let id = PoolId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
                Arc::new(make(id))
            })
            .clone()
    }

    /// Closes, in every pool, the idle connections past `server_idle_timeout`.
    pub fn close_idle(&self) -> usize {
        let pools: Vec<Arc<Pool>> = self
            .pools
            .read()
            .expect("lock poisoned")
            .values()
            .cloned()
            .collect();
        pools.iter().map(|p| p.close_idle()).sum()
    }

    /// Every pool with its (database, user, server address) key, sorted.
    pub fn all(&self) -> Vec<(PoolKey, Arc<Pool>)> {
        let mut all: Vec<_> = (self.pools.read().expect("lock poisoned").iter())
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of `size` that never connects: only its gate is used.
    fn gate_only(size: u32) -> Pool {
        let target = ServerTarget {
            host: "127.0.0.1".into(),
            port: 9,
            database: "db".into(),
            user: "user".into(),
            password: None,
            connect_timeout: Duration::from_secs(1),
            message_bytes_max: 1 << 20,
        };
        let settings = PoolSettings {
            live: LiveSettings {
                size,
                checkout_timeout: Duration::from_secs(2),
                connect_timeout: Duration::from_secs(1),
                lifetime: Duration::from_secs(3600),
                idle_timeout: Duration::from_secs(600),
            },
            mode: PoolMode::Transaction,
            prepared_max: 100,
        };
        Pool::new(
            PoolId(1),
            ("db".into(), "user".into()),
            target,
            settings,
            Clock::start(),
        )
    }

    /// Slots given back together, before any waiter runs, let every waiter
    /// in: the one woken passes the wakeup on while slots stay free.
    #[tokio::test(flavor = "current_thread")]
    async fn slots_freed_together_reach_every_waiter() {
        let pool: &'static Pool = Box::leak(Box::new(gate_only(3)));
        let core = pool.core;
        for _ in 0..3 {
            assert!(core.try_enter());
        }
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                tokio::spawn(async move {
                    let _at_gate = AtGate::new(pool.core);
                    let who = Borrower {
                        client: None,
                        in_transaction: false,
                    };
                    let timeout = pool.core.checkout_timeout();
                    let deadline = tokio::time::Instant::now() + timeout;
                    pool.wait_at_gate(who, deadline, timeout).await
                })
            })
            .collect();
        // Every waiter is asleep at the gate.
        while core.gate_waiters.load(Ordering::SeqCst) < 3 {
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;
        // One thread, no await in between: no waiter runs until all three
        // slots are back.
        for _ in 0..3 {
            core.leave();
        }
        for waiter in waiters {
            waiter.await.unwrap().expect("every waiter gets a slot");
        }
        assert_eq!(core.lent.load(Ordering::SeqCst), 3);
    }
}
