//! Pools: one bb8 pool of ServerConn per (database, user), created on first use.
//!
//! Checkout never turns into a round trip: validity is a non-blocking peek at
//! the socket, and a connection whose protocol state is unknown is marked
//! `broken`, so bb8 drops it instead of handing it out again.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::PoolMode;
use crate::error::{Error, Result};
use crate::server::{ParamState, ServerConn, ServerParams, ServerTarget};

pub type Pooled = bb8::PooledConnection<'static, ServerManager>;

pub struct ServerManager {
    target: ServerTarget,
    prepared_max: u32,
    /// Login parameters of the first connection made, reported to clients.
    login_params: Arc<Mutex<Option<ServerParams>>>,
    /// Bumped with the reason every time a connection attempt fails, so
    /// waiting clients learn the server is down instead of timing out.
    failures: watch::Sender<(u64, String)>,
    /// Connection attempts failed so far; bumped before `failures`, so a
    /// checkout can tell without a receiver of its own whether one failed.
    failed: Arc<AtomicU64>,
}

impl bb8::ManageConnection for ServerManager {
    /// Boxed so that handing a connection around (idle queue, checkout,
    /// session) moves a pointer, not the whole connection state.
    type Connection = Box<ServerConn>;
    type Error = Error;

    async fn connect(&self) -> Result<Box<ServerConn>> {
        match ServerConn::connect(&self.target, self.prepared_max).await {
            Ok(conn) => {
                tracing::debug!(database = %self.target.database, "new server connection");
                let mut params = self.login_params.lock().expect("lock poisoned");
                if params.is_none() {
                    *params = Some(conn.login_params.clone());
                }
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
        conn.broken
    }
}

/// One pool and what sessions need to know about it.
pub struct Pool {
    pub database: String,
    pub mode: PoolMode,
    pub size: u32,
    checkout_timeout: Duration,
    pool: bb8::Pool<ServerManager>,
    login_params: Arc<Mutex<Option<ServerParams>>>,
    failures: watch::Receiver<(u64, String)>,
    failed: Arc<AtomicU64>,
    /// The session parameters the last client logged in with.
    last_params: Mutex<ParamState>,
}

pub struct PoolSettings {
    pub size: u32,
    pub mode: PoolMode,
    pub checkout_timeout: Duration,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
    pub prepared_max: u32,
}

impl Pool {
    pub fn new(database: String, target: ServerTarget, settings: PoolSettings) -> Pool {
        let login_params = Arc::new(Mutex::new(None));
        let (failures_tx, failures) = watch::channel((0, String::new()));
        let failed = Arc::new(AtomicU64::new(0));
        let manager = ServerManager {
            target,
            prepared_max: settings.prepared_max,
            login_params: login_params.clone(),
            failures: failures_tx,
            failed: failed.clone(),
        };
        let pool = bb8::Pool::builder()
            .max_size(settings.size)
            .min_idle(None)
            .test_on_check_out(true)
            .connection_timeout(settings.checkout_timeout)
            .idle_timeout(Some(settings.idle_timeout))
            .max_lifetime(Some(settings.lifetime))
            .queue_strategy(bb8::QueueStrategy::Lifo)
            .build_unchecked(manager);
        Pool {
            database,
            mode: settings.mode,
            size: settings.size,
            checkout_timeout: settings.checkout_timeout,
            pool,
            login_params,
            failures,
            failed,
            last_params: Mutex::default(),
        }
    }

    /// Waits for a server connection up to the checkout timeout. Fails early
    /// if a connection attempt fails while waiting. Cancel-safe.
    pub async fn checkout(&self) -> Result<Pooled> {
        let failed = self.failed.load(Ordering::SeqCst);
        let mut get = pin!(self.pool.get_owned());
        // Usually a connection is idle and the first poll hands it over:
        // only a checkout that has to wait watches for failed attempts.
        let first = std::future::poll_fn(|cx| Poll::Ready(get.as_mut().poll(cx))).await;
        if let Poll::Ready(got) = first {
            return self.checked_out(got);
        }
        let mut failures = self.failures.clone();
        failures.mark_unchanged();
        // An attempt that failed before `mark_unchanged` is not news to
        // `failures`; the counter, bumped first, tells.
        if self.failed.load(Ordering::SeqCst) != failed {
            return Err(self.unavailable(&failures));
        }
        tokio::select! {
            biased;
            got = get => self.checked_out(got),
            _ = failures.changed() => Err(self.unavailable(&failures)),
        }
    }

    fn checked_out(
        &self,
        got: std::result::Result<Pooled, bb8::RunError<Error>>,
    ) -> Result<Pooled> {
        got.map_err(|e| match e {
            bb8::RunError::User(e) => e,
            // bb8 gives up exactly when the checkout timeout has passed.
            bb8::RunError::TimedOut => Error::PoolExhausted {
                database: self.database.clone(),
                waited: self.checkout_timeout,
                pool_size: self.size,
            },
        })
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
        let conn = self.checkout().await?;
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
}

/// All pools, by (client database, client user, server address); the
/// address is empty for the database's configured server.
#[derive(Default)]
pub struct Pools {
    pools: RwLock<HashMap<(String, String, String), Arc<Pool>>>,
}

impl Pools {
    pub fn get_or_create(
        &self,
        database: &str,
        user: &str,
        addr: &str,
        make: impl FnOnce() -> Pool,
    ) -> Arc<Pool> {
        let key = (database.to_owned(), user.to_owned(), addr.to_owned());
        if let Some(pool) = self.pools.read().expect("lock poisoned").get(&key) {
            return pool.clone();
        }
        self.pools
            .write()
            .expect("lock poisoned")
            .entry(key)
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }

    /// Every pool with its (database, user, server address) key, sorted.
    pub fn all(&self) -> Vec<((String, String, String), Arc<Pool>)> {
        let mut all: Vec<_> = (self.pools.read().expect("lock poisoned").iter())
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}
