//! Clients: every connected client (sessions and admin consoles), for
//! `SHOW CLIENTS`, `SHOW POOLS`, `SHOW STATS` and `SHUTDOWN`.
//!
//! A client registers once at login and unregisters when it leaves (one
//! lock each time); in between its session publishes what the console
//! shows through its [`ClientInfo`]'s atomics. Only the session writes
//! them, so its counters are a load and a store with no read-modify-write
//! and no cache line shared with other sessions; readers sum them at
//! `SHOW STATS` time. A client that leaves adds its counters to its
//! database's retired totals under the same lock that removes it, so no
//! reader counts it twice or loses it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// A client's number in `SHOW CLIENTS` (and `link` in `SHOW SERVERS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub u64);

/// Values of [`ClientInfo::state`].
pub mod client_state {
    pub const IDLE: u8 = 0;
    /// Waiting for a server connection.
    pub const WAITING: u8 = 1;
}

/// What a session has done, for `SHOW STATS`. Written by the session only.
#[derive(Debug, Default)]
pub struct Counters {
    /// Transactions completed (a ReadyForQuery that ends one).
    pub xacts: AtomicU64,
    /// Queries completed (every ReadyForQuery from a server).
    pub queries: AtomicU64,
    /// Bytes read from the client.
    pub received: AtomicU64,
    /// Bytes written to the client.
    pub sent: AtomicU64,
    pub xact_us: AtomicU64,
    pub query_us: AtomicU64,
    /// Time spent waiting for a server connection.
    pub wait_us: AtomicU64,
}

/// Adds to a counter only its session writes: a load and a store.
#[inline]
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

impl Counters {
    #[inline]
    pub fn add_received(&self, n: usize) {
        bump(&self.received, n as u64);
    }

    #[inline]
    pub fn add_sent(&self, n: usize) {
        bump(&self.sent, n as u64);
    }

    /// A query ended after `query_us`; `xact_us` when it also ended a
    /// transaction.
    #[inline]
    pub fn add_query(&self, query_us: u64, xact_us: Option<u64>) {
        bump(&self.queries, 1);
        bump(&self.query_us, query_us);
        if let Some(xact_us) = xact_us {
            bump(&self.xacts, 1);
            bump(&self.xact_us, xact_us);
        }
    }

    pub fn add_wait_us(&self, us: u64) {
        bump(&self.wait_us, us);
    }
}

/// Sums of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub xacts: u64,
    pub queries: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_us: u64,
    pub query_us: u64,
    pub wait_us: u64,
}

impl Totals {
    pub fn add(&mut self, c: &Counters) {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.xacts += l(&c.xacts);
        self.queries += l(&c.queries);
        self.received += l(&c.received);
        self.sent += l(&c.sent);
        self.xact_us += l(&c.xact_us);
        self.query_us += l(&c.query_us);
        self.wait_us += l(&c.wait_us);
    }
}

/// One connected client.
#[derive(Debug)]
pub struct ClientInfo {
    pub id: ClientId,
    pub user: String,
    pub database: String,
    pub peer: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub connect_time: SystemTime,
    /// From the startup packet, then as the server reports it (a SET
    /// takes effect, a ROLLBACK undoes it).
    application_name: Mutex<String>,
    /// The socket, to wake an idle session at `SHUTDOWN`. Valid while the
    /// client is registered: the session unregisters before it closes it.
    fd: RawFd,
    /// [`client_state`].
    pub state: AtomicU8,
    /// Inside a transaction that holds no server connection yet (a BEGIN
    /// the proxy answered; sharded databases).
    pub in_transaction: AtomicBool,
    /// When its latest request arrived ([`crate::clock::Clock::now_us`]).
    pub request_us: AtomicU64,
    /// When it started waiting, while it waits.
    pub wait_start_us: AtomicU64,
    /// The pool it waits for, while it waits.
    pub waiting_pool: AtomicU32,
    /// The pool of its last server connection (its database's own pool
    /// until it has one).
    pub pool: AtomicU32,
    pub counters: Counters,
    /// Its read side was shut down at `SHUTDOWN`.
    interrupted: AtomicBool,
}

/// What a client is, at registration.
pub struct NewClient {
    pub user: String,
    pub database: String,
    pub peer: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub application_name: String,
    pub fd: RawFd,
    pub pool: u32,
    pub now_us: u64,
}

impl ClientInfo {
    pub fn application_name(&self) -> String {
        self.application_name.lock().expect("lock poisoned").clone()
    }

    pub fn set_application_name(&self, name: &str) {
        let mut current = self.application_name.lock().expect("lock poisoned");
        if *current != name {
            name.clone_into(&mut current);
        }
    }

    pub fn is_waiting(&self) -> bool {
        self.state.load(Ordering::Relaxed) == client_state::WAITING
    }
}

#[derive(Default)]
struct Inner {
    live: BTreeMap<ClientId, Arc<ClientInfo>>,
    /// Counters of clients that left, by database.
    retired: HashMap<String, Totals>,
}

/// Every connected client.
#[derive(Default)]
pub struct Clients {
    next_id: AtomicU64,
    inner: Mutex<Inner>,
}

impl Clients {
    pub fn register(self: &Arc<Self>, new: NewClient) -> Registration {
        let id = ClientId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        let info = Arc::new(ClientInfo {
            id,
            user: new.user,
            database: new.database,
            peer: new.peer,
            local: new.local,
            connect_time: SystemTime::now(),
            application_name: Mutex::new(new.application_name),
            fd: new.fd,
            state: AtomicU8::new(client_state::IDLE),
            in_transaction: AtomicBool::new(false),
            request_us: AtomicU64::new(new.now_us),
            wait_start_us: AtomicU64::new(0),
            waiting_pool: AtomicU32::new(0),
            pool: AtomicU32::new(new.pool),
            counters: Counters::default(),
            interrupted: AtomicBool::new(false),
        });
        let mut inner = self.inner.lock().expect("lock poisoned");
        inner.live.insert(id, info.clone());
        Registration {
            clients: self.clone(),
            info,
        }
    }

    /// Every connected client, by id.
    pub fn all(&self) -> Vec<Arc<ClientInfo>> {
        let inner = self.inner.lock().expect("lock poisoned");
        inner.live.values().cloned().collect()
    }

    pub fn count(&self) -> usize {
        self.inner.lock().expect("lock poisoned").live.len()
    }

    /// Counters by database: of the clients that left and of those here.
    pub fn totals(&self) -> HashMap<String, Totals> {
        let inner = self.inner.lock().expect("lock poisoned");
        let mut totals = inner.retired.clone();
        for client in inner.live.values() {
            // A name is cloned once per database, not once per client.
            match totals.get_mut(&client.database) {
                Some(t) => t.add(&client.counters),
                None => totals
                    .entry(client.database.clone())
                    .or_default()
                    .add(&client.counters),
            }
        }
        totals
    }

    /// Wakes every client that is idle outside a transaction (not holding
    /// a server connection, not waiting for one, not in a transaction):
    /// its session reads end of input, sees the proxy is stopping and says
    /// goodbye with SQLSTATE 57P01. `linked`: clients holding a server
    /// connection. Each client is woken once.
    pub fn interrupt_idle(&self, linked: &HashSet<ClientId>) {
        let inner = self.inner.lock().expect("lock poisoned");
        for client in inner.live.values() {
            let busy = linked.contains(&client.id)
                || client.is_waiting()
                || client.in_transaction.load(Ordering::Relaxed);
            if !busy && !client.interrupted.swap(true, Ordering::Relaxed) {
                // Under the lock: the session unregisters before it closes
                // the socket, so `fd` is still this client's.
                let _ = nix::sys::socket::shutdown(client.fd, nix::sys::socket::Shutdown::Read);
            }
        }
    }

    /// Shuts down both directions of every client's socket: the end of a
    /// shutdown that ran out of time.
    pub fn disconnect_all(&self) {
        let inner = self.inner.lock().expect("lock poisoned");
        for client in inner.live.values() {
            let _ = nix::sys::socket::shutdown(client.fd, nix::sys::socket::Shutdown::Both);
        }
    }
}

/// A registered client; dropping it unregisters the client. A session
/// holds it as its first field, so it goes before the socket closes.
pub struct Registration {
    clients: Arc<Clients>,
    info: Arc<ClientInfo>,
}

impl Registration {
    pub fn info(&self) -> &Arc<ClientInfo> {
        &self.info
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut inner = self.clients.inner.lock().expect("lock poisoned");
        inner.live.remove(&self.info.id);
        inner
            .retired
            .entry(self.info.database.clone())
            .or_default()
            .add(&self.info.counters);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_client(database: &str) -> NewClient {
        NewClient {
            user: "u".into(),
            database: database.into(),
            peer: None,
            local: None,
            application_name: String::new(),
            fd: -1,
            pool: 0,
            now_us: 0,
        }
    }

    #[test]
    fn totals_survive_the_client() {
        let clients = Arc::new(Clients::default());
        let a = clients.register(new_client("db"));
        let b = clients.register(new_client("db"));
        a.info().counters.add_query(10, Some(10));
        b.info().counters.add_query(5, None);
        b.info().counters.add_sent(100);
        assert_eq!(clients.totals()["db"].queries, 2);
        drop(a);
        let totals = clients.totals()["db"];
        assert_eq!((totals.queries, totals.xacts, totals.sent), (2, 1, 100));
        assert_eq!(clients.count(), 1);
        assert!(clients.all()[0].id > ClientId(1));
    }
}
