//! Shared: what every session of one proxy process uses.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::Arc;

use crate::cancel::CancelRegistry;
use crate::config::{Config, DatabaseConfig, User};
use crate::pool::{Pool, PoolSettings, Pools};
use crate::server::ServerTarget;

pub struct Shared {
    pub config: Arc<Config>,
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
    pub stats: crate::statement_stats::StatementStats,
    /// Per-process secret that makes SCRAM exchanges for unknown users look real.
    pub mock_nonce: [u8; 32],
    clients: AtomicU32,
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
        let stats = crate::statement_stats::StatementStats::new(
            config.slo.iter().cloned().map(crate::slo::SloWindow::new),
        );
        Shared {
            stats,
            cache,
            backends,
            config,
            users,
            pools: Pools::default(),
            cancels: CancelRegistry::default(),
            effects_cache: router::EffectsCache::new(10_000),
            analyses: router::AnalysisCache::new(10_000),
            follower,
            mock_nonce: rand::random(),
            clients: AtomicU32::new(0),
            next_process_id: AtomicI32::new(1),
        }
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
            .get_or_create(&database.name, &user.name, addr.unwrap_or(""), || {
                let p = &self.config.proxy;
                let target = server_target(&self.config, database, user, addr);
                let settings = PoolSettings {
                    size: database.pool_size.unwrap_or(p.pool_size),
                    mode: database.pool_mode.unwrap_or(p.pool_mode),
                    checkout_timeout: p.checkout_timeout,
                    idle_timeout: p.server_idle_timeout,
                    lifetime: p.server_lifetime,
                    prepared_max: p.server_prepared_statements_max,
                };
                Pool::new(database.name.clone(), target, settings)
            })
    }

    /// Takes a client slot; `None` when `max_client_connections` are in use.
    pub fn admit_client(self: &Arc<Self>) -> Option<ClientSlot> {
        let max = self.config.proxy.max_client_connections;
        let admitted = self
            .clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        admitted.then(|| ClientSlot(self.clone()))
    }

    pub fn client_count(&self) -> u32 {
        self.clients.load(Ordering::Acquire)
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
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}
