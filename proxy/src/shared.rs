//! Shared: what every session of one proxy process uses.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::cancel::CancelRegistry;
use crate::clients::Clients;
use crate::clock::Clock;
use crate::config::{Config, DatabaseConfig, User};
use crate::pool::{LiveSettings, Pool, PoolSettings, Pools};
use crate::server::ServerTarget;

/// What the admin console has asked of the pools: `PAUSE` (all, or some
/// databases) and `SHUTDOWN`. Pools made later start in this state.
#[derive(Debug, Default)]
pub struct Control {
    pub paused_all: bool,
    pub paused: BTreeSet<String>,
    pub closing: bool,
    /// Counts PAUSE and RESUME commands, so that a PAUSE undoing itself
    /// (timed out, or its console gone) never undoes a later command's state.
    pub generation: u64,
}

impl Control {
    pub fn is_paused(&self, database: &str) -> bool {
        self.paused_all || self.paused.contains(database)
    }
}

pub struct Shared {
    /// The config the proxy started with. What `RELOAD` may change is read
    /// from [`Shared::effective`] instead.
    pub config: Arc<Config>,
    /// The config in force: `config` with what `RELOAD` applied.
    effective: RwLock<Arc<Config>>,
    pub users: HashMap<String, Arc<User>>,
    pub pools: Pools,
    pub cancels: CancelRegistry,
    pub effects_cache: router::EffectsCache,
    /// Statement analyses for routing, by text and map epoch.
    pub analyses: router::AnalysisCache,
    /// The shard map and lease, when a metadata group is configured.
    pub follower: Option<Arc<crate::follower::MapFollower>>,
    /// Role, health and lag of every server in the shard map.
    pub backends: crate::backends::Backends,
    /// The point-read cache (with a shard map only).
    pub cache: Option<Arc<crate::result_cache::ResultCache>>,
    /// Request latency by route, errors by SQLSTATE class, SLO windows.
    pub statements: crate::statement_stats::StatementStats,
    /// Per-process secret that makes SCRAM exchanges for unknown users look real.
    pub mock_nonce: [u8; 32],
    /// The clock sessions time their statistics by.
    pub clock: Clock,
    /// Every connected client.
    pub clients: Arc<Clients>,
    /// `SHOW STATS` averages.
    pub stats: crate::stats::StatsWindow,
    pub control: Mutex<Control>,
    /// `SHUTDOWN` (or SIGTERM) began: no new client is accepted.
    stopping: AtomicBool,
    /// Wakes the accept loop at `SHUTDOWN`.
    pub stop_requested: tokio::sync::Notify,
    /// Serializes `RELOAD`s.
    pub reloading: tokio::sync::Mutex<()>,
    client_slots: AtomicU32,
    next_process_id: AtomicI32,
}

impl Shared {
    pub fn new(config: Arc<Config>, follower: Option<Arc<crate::follower::MapFollower>>) -> Shared {
        let users = config
            .users
            .iter()
            .map(|u| (u.name.clone(), Arc::new(User::from_config(u))))
            .collect();
        let probe = probe_target(&config, &users);
        let backends = crate::backends::Backends::new(config.replicas.clone(), probe.clone());
        let cache = follower.as_ref().map(|follower| {
            Arc::new(crate::result_cache::ResultCache::new(
                config.cache.clone(),
                follower.clone(),
                probe,
            ))
        });
        let statements = crate::statement_stats::StatementStats::new(
            config.slo.iter().cloned().map(crate::slo::SloWindow::new),
        );
        Shared {
            statements,
            cache,
            backends,
            effective: RwLock::new(config.clone()),
            config,
            users,
            pools: Pools::default(),
            cancels: CancelRegistry::default(),
            effects_cache: router::EffectsCache::new(10_000),
            analyses: router::AnalysisCache::new(10_000),
            follower,
            mock_nonce: rand::random(),
            clock: Clock::start(),
            clients: Arc::default(),
            stats: crate::stats::StatsWindow::default(),
            control: Mutex::default(),
            stopping: AtomicBool::new(false),
            stop_requested: tokio::sync::Notify::new(),
            reloading: tokio::sync::Mutex::new(()),
            client_slots: AtomicU32::new(0),
            next_process_id: AtomicI32::new(1),
        }
    }

    /// The config in force (the startup one with what `RELOAD` applied).
    pub fn effective(&self) -> Arc<Config> {
        self.effective.read().expect("lock poisoned").clone()
    }

    pub fn set_effective(&self, config: Arc<Config>) {
        *self.effective.write().expect("lock poisoned") = config;
    }

    /// The live settings of `database`'s pools under `config`.
    pub fn live_settings(config: &Config, database: &str) -> LiveSettings {
        let p = &config.proxy;
        let size = (config.databases.iter())
            .find(|d| d.name == database)
            .and_then(|d| d.pool_size)
            .unwrap_or(p.pool_size);
        LiveSettings {
            size,
            checkout_timeout: p.checkout_timeout,
            connect_timeout: p.connect_timeout,
            lifetime: p.server_lifetime,
            idle_timeout: p.server_idle_timeout,
        }
    }

    /// `SHUTDOWN` began.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Starts a graceful shutdown (once): the accept loop stops, and
    /// checkouts outside a transaction are refused.
    pub fn begin_shutdown(&self) -> bool {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.control.lock().expect("lock poisoned").closing = true;
        for (_, pool) in self.pools.all() {
            pool.set_closing();
        }
        // A permit, in case the accept loop is not waiting yet.
        self.stop_requested.notify_one();
        true
    }

    pub fn database(&self, name: &str) -> Option<&DatabaseConfig> {
        self.config.databases.iter().find(|d| d.name == name)
    }

    /// The pool for a client of `database` logged in as `user`.
    pub fn pool(&self, database: &DatabaseConfig, user: &User) -> Arc<Pool> {
        self.pool_at(database, user, None)
    }

    /// The pool for `database` and `user` on the server at `addr`
    /// (`host:port`, a shard's primary from the shard map), or on the
    /// database's configured server when `addr` is `None`.
    pub fn pool_at(&self, database: &DatabaseConfig, user: &User, addr: Option<&str>) -> Arc<Pool> {
        self.pools
            .get_or_create(&database.name, &user.name, addr.unwrap_or(""), |id| {
                let p = &self.config.proxy;
                let target = server_target(&self.config, database, user, addr);
                let settings = PoolSettings {
                    live: Shared::live_settings(&self.effective(), &database.name),
                    mode: database.pool_mode.unwrap_or(p.pool_mode),
                    prepared_max: p.server_prepared_statements_max,
                };
                let names = (database.name.clone(), user.name.clone());
                let pool = Pool::new(id, names, target, settings, self.clock);
                let control = self.control.lock().expect("lock poisoned");
                if control.is_paused(&database.name) {
                    pool.set_paused(true);
                }
                if control.closing {
                    pool.set_closing();
                }
                pool
            })
    }

    /// Takes a client slot; `None` when `max_client_connections` are in use.
    pub fn admit_client(self: &Arc<Self>) -> Option<ClientSlot> {
        let max = self.effective().proxy.max_client_connections;
        let admitted = self
            .client_slots
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        admitted.then(|| ClientSlot(self.clone()))
    }

    pub fn client_count(&self) -> u32 {
        self.client_slots.load(Ordering::Acquire)
    }

    /// A process id for BackendKeyData: the proxy's own, never a server's.
    pub fn next_process_id(&self) -> i32 {
        self.next_process_id
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(if n == i32::MAX { 1 } else { n + 1 })
            })
            .expect("closure always returns Some")
    }
}

/// Where and as whom `user`'s connections for `database` log in: at `addr`
/// (`host:port`) or at the database's configured server.
fn server_target(
    config: &Config,
    database: &DatabaseConfig,
    user: &User,
    addr: Option<&str>,
) -> ServerTarget {
    let (host, port) = addr
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
        .unwrap_or_else(|| (database.host.clone(), database.port));
    ServerTarget {
        host,
        port,
        database: database
            .dbname
            .clone()
            .unwrap_or_else(|| database.name.clone()),
        user: database
            .server_user
            .clone()
            .unwrap_or_else(|| user.name.clone()),
        password: database
            .server_password
            .clone()
            .or_else(|| user.plain_password.clone()),
        connect_timeout: config.proxy.connect_timeout,
        message_bytes_max: config.proxy.message_bytes_max,
    }
}

/// How the health monitors log in: as the first database's server user, or
/// else as the first user whose password is known (the address is set per
/// server).
fn probe_target(config: &Config, users: &HashMap<String, Arc<User>>) -> Option<ServerTarget> {
    let database = config.databases.first()?;
    let user = match &database.server_user {
        // The server login is the database's own; the user only fills gaps.
        Some(name) => Arc::new(User::from_config(&crate::config::UserConfig {
            name: name.clone(),
            password: None,
            auth: crate::config::AuthMethod::Trust,
            admin: false,
        })),
        None => config
            .users
            .iter()
            .filter_map(|u| users.get(&u.name))
            .find(|u| u.plain_password.is_some())?
            .clone(),
    };
    Some(server_target(config, database, &user, None))
}

/// A counted client connection; the count drops with it.
pub struct ClientSlot(Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.client_slots.fetch_sub(1, Ordering::AcqRel);
    }
}
