//! Settings: the config as flat `key = value` rows, for the console's `SHOW
//! CONFIG` and for `RELOAD`, which compares two configs row by row.
//!
//! Each row says whether `RELOAD` applies it to the running proxy
//! (`changeable`). Passwords are never shown: a row stands for each one
//! with its value hidden, and only `RELOAD`'s comparison looks at it.

use std::time::Duration;

use crate::config::{
    AdminConfig, AuthMethod, CacheConfig, Config, PoolMode, ProxyConfig, ReadFrom, ReplicaConfig,
    Role,
};

/// What `SHOW CONFIG` shows instead of a password.
const HIDDEN: &str = "********";

/// One setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// `section.name`, `databases.<name>.field` or `users.<name>.field`.
    pub key: String,
    /// As shown; `None` for unset.
    pub value: Option<String>,
    pub default: Option<String>,
    /// `RELOAD` applies it live.
    pub changeable: bool,
    /// What `RELOAD` compares: the value, or for a password the secret
    /// itself (never shown).
    compared: Option<String>,
}

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn mode(m: PoolMode) -> &'static str {
    match m {
        PoolMode::Transaction => "transaction",
        PoolMode::Session => "session",
    }
}

fn auth(a: AuthMethod) -> &'static str {
    match a {
        AuthMethod::ScramSha256 => "scram-sha-256",
        AuthMethod::Md5 => "md5",
        AuthMethod::Trust => "trust",
    }
}

struct Rows(Vec<Setting>);

impl Rows {
    fn push(&mut self, key: String, value: Option<String>, default: Option<String>, live: bool) {
        self.0.push(Setting {
            key,
            compared: value.clone(),
            value,
            default,
            changeable: live,
        });
    }

    fn set(&mut self, key: &str, value: String, default: String, live: bool) {
        self.push(key.to_owned(), Some(value), Some(default), live);
    }

    fn secret(&mut self, key: String, secret: Option<&str>) {
        self.0.push(Setting {
            key,
            value: secret.map(|_| HIDDEN.to_owned()),
            default: None,
            changeable: false,
            compared: secret.map(str::to_owned),
        });
    }
}

/// Every setting of `config`, in file order (sections, then each user and
/// database by name).
pub fn settings(config: &Config) -> Vec<Setting> {
    let mut rows = Rows(Vec::new());
    proxy(&mut rows, &config.proxy);
    admin(&mut rows, &config.admin);
    replicas(&mut rows, &config.replicas);
    cache(&mut rows, &config.cache);
    for slo in &config.slo {
        let key = |what: &str| format!("slo.{}.{what}", slo.database);
        let latency = slo.latency.map(|l| l.to_string());
        rows.push(key("latency"), latency, None, false);
        let errors = slo.errors.map(|e| format!("< {}%", e * 100.0));
        rows.push(key("errors"), errors, None, false);
    }
    let endpoints = config.metadata.as_ref().map(|m| m.endpoints.join(","));
    rows.push("metadata.endpoints".into(), endpoints, None, false);
    if let Some(m) = &config.metadata {
        rows.set(
            "metadata.lease_ttl",
            duration(m.lease_ttl),
            "10s".into(),
            false,
        );
        rows.push("metadata.proxy_id".into(), m.proxy_id.clone(), None, false);
    }
    let mut users: Vec<_> = config.users.iter().collect();
    users.sort_by(|a, b| a.name.cmp(&b.name));
    for u in users {
        let key = |field: &str| format!("users.{}.{field}", u.name);
        rows.set(
            &key("auth"),
            auth(u.auth).into(),
            "scram-sha-256".into(),
            false,
        );
        rows.set(&key("admin"), u.admin.to_string(), "false".into(), false);
        rows.secret(key("password"), u.password.as_deref());
    }
    let mut databases: Vec<_> = config.databases.iter().collect();
    databases.sort_by(|a, b| a.name.cmp(&b.name));
    for d in databases {
        let key = |field: &str| format!("databases.{}.{field}", d.name);
        rows.set(&key("host"), d.host.clone(), "127.0.0.1".into(), false);
        rows.set(&key("port"), d.port.to_string(), "5432".into(), false);
        rows.push(key("dbname"), d.dbname.clone(), Some(d.name.clone()), false);
        rows.push(key("server_user"), d.server_user.clone(), None, false);
        rows.secret(key("server_password"), d.server_password.as_deref());
        let pool_size = d.pool_size.map(|n| n.to_string());
        let inherited = Some(config.proxy.pool_size.to_string());
        rows.push(key("pool_size"), pool_size, inherited, true);
        let pool_mode = d.pool_mode.map(|m| mode(m).to_owned());
        let inherited = Some(mode(config.proxy.pool_mode).to_owned());
        rows.push(key("pool_mode"), pool_mode, inherited, false);
        rows.set(
            &key("read_your_writes"),
            d.read_your_writes.to_string(),
            "true".into(),
            false,
        );
    }
    rows.0
}

fn proxy(rows: &mut Rows, p: &ProxyConfig) {
    let d = ProxyConfig::default();
    rows.set(
        "proxy.listen",
        p.listen.to_string(),
        d.listen.to_string(),
        false,
    );
    let n = |v: u32| v.to_string();
    rows.set(
        "proxy.listen_backlog",
        n(p.listen_backlog),
        n(d.listen_backlog),
        false,
    );
    rows.set(
        "proxy.worker_threads",
        n(p.worker_threads),
        n(d.worker_threads),
        false,
    );
    // Read on every request from the startup config: a restart applies it.
    rows.push(
        "proxy.log_min_duration".into(),
        p.log_min_duration.map(duration),
        None,
        false,
    );
    rows.set(
        "proxy.pool_mode",
        mode(p.pool_mode).into(),
        mode(d.pool_mode).into(),
        false,
    );
    rows.set("proxy.pool_size", n(p.pool_size), n(d.pool_size), true);
    let max = n(p.max_client_connections);
    rows.set(
        "proxy.max_client_connections",
        max,
        n(d.max_client_connections),
        true,
    );
    for (key, value, default) in [
        (
            "proxy.checkout_timeout",
            p.checkout_timeout,
            d.checkout_timeout,
        ),
        (
            "proxy.connect_timeout",
            p.connect_timeout,
            d.connect_timeout,
        ),
        (
            "proxy.client_login_timeout",
            p.client_login_timeout,
            d.client_login_timeout,
        ),
        (
            "proxy.server_lifetime",
            p.server_lifetime,
            d.server_lifetime,
        ),
        (
            "proxy.shutdown_timeout",
            p.shutdown_timeout,
            d.shutdown_timeout,
        ),
        ("proxy.pause_timeout", p.pause_timeout, d.pause_timeout),
        (
            "proxy.server_idle_timeout",
            p.server_idle_timeout,
            d.server_idle_timeout,
        ),
    ] {
        rows.set(key, duration(value), duration(default), true);
    }
    for (key, value, default) in [
        (
            "proxy.message_bytes_max",
            p.message_bytes_max,
            d.message_bytes_max,
        ),
        (
            "proxy.buffer_bytes_max",
            p.buffer_bytes_max,
            d.buffer_bytes_max,
        ),
        (
            "proxy.server_prepared_statements_max",
            p.server_prepared_statements_max,
            d.server_prepared_statements_max,
        ),
        (
            "proxy.client_prepared_statements_max",
            p.client_prepared_statements_max,
            d.client_prepared_statements_max,
        ),
    ] {
        rows.set(key, n(value), n(default), false);
    }
}

fn admin(rows: &mut Rows, a: &AdminConfig) {
    let d = AdminConfig::default();
    let listen = |l: Option<std::net::SocketAddr>| l.map_or("off".to_owned(), |a| a.to_string());
    rows.set("admin.listen", listen(a.listen), listen(d.listen), false);
    let max = a.connections_max.to_string();
    rows.set(
        "admin.connections_max",
        max,
        d.connections_max.to_string(),
        false,
    );
    let period = duration(a.stats_period);
    rows.set("admin.stats_period", period, duration(d.stats_period), true);
}

fn replicas(rows: &mut Rows, r: &ReplicaConfig) {
    let d = ReplicaConfig::default();
    let read_from = |r: ReadFrom| match r {
        ReadFrom::Primary => "primary",
        ReadFrom::Replica => "replica",
        ReadFrom::Any => "any",
    };
    let role = |r: Role| match r {
        Role::Auto => "auto",
        Role::Map => "map",
    };
    rows.set(
        "replicas.read_from",
        read_from(r.read_from).into(),
        read_from(d.read_from).into(),
        false,
    );
    rows.set(
        "replicas.role",
        role(r.role).into(),
        role(d.role).into(),
        false,
    );
    for (key, value, default) in [
        (
            "replicas.max_replica_lag",
            r.max_replica_lag,
            d.max_replica_lag,
        ),
        (
            "replicas.health_interval",
            r.health_interval,
            d.health_interval,
        ),
        (
            "replicas.breaker_backoff_min",
            r.breaker_backoff_min,
            d.breaker_backoff_min,
        ),
        (
            "replicas.breaker_backoff_max",
            r.breaker_backoff_max,
            d.breaker_backoff_max,
        ),
    ] {
        rows.set(key, duration(value), duration(default), false);
    }
    let bytes = r.max_replica_lag_bytes.to_string();
    rows.set(
        "replicas.max_replica_lag_bytes",
        bytes,
        d.max_replica_lag_bytes.to_string(),
        false,
    );
    rows.set(
        "replicas.safe_functions",
        r.safe_functions.join(","),
        String::new(),
        false,
    );
}

fn cache(rows: &mut Rows, c: &CacheConfig) {
    let d = CacheConfig::default();
    rows.set("cache.tables", c.tables.join(","), String::new(), false);
    let keys: Vec<String> = (c.keys.iter())
        .map(|(table, k)| format!("{table}({})", k.column))
        .collect();
    rows.set("cache.keys", keys.join(","), String::new(), false);
    rows.set(
        "cache.max_bytes",
        c.max_bytes.to_string(),
        d.max_bytes.to_string(),
        false,
    );
    let entry = c.entry_bytes_max.to_string();
    rows.set(
        "cache.entry_bytes_max",
        entry,
        d.entry_bytes_max.to_string(),
        false,
    );
    rows.set("cache.ttl", duration(c.ttl), duration(d.ttl), false);
    rows.push("cache.tti".into(), c.tti.map(duration), None, false);
    for (key, value, default) in [
        ("cache.max_stream_lag", c.max_stream_lag, d.max_stream_lag),
        (
            "cache.status_interval",
            c.status_interval,
            d.status_interval,
        ),
    ] {
        rows.set(key, duration(value), duration(default), false);
    }
}

/// A difference between two configs, by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub changeable: bool,
}

/// The keys whose values differ between `old` and `new` (added and removed
/// keys included), in `new`'s order then `old`'s.
pub fn changes(old: &Config, new: &Config) -> Vec<Change> {
    let old = settings(old);
    let new = settings(new);
    let find = |rows: &[Setting], key: &str| rows.iter().position(|s| s.key == key);
    let mut changes = Vec::new();
    for s in &new {
        match find(&old, &s.key) {
            Some(i) if old[i].compared == s.compared => {}
            Some(i) => changes.push(Change {
                key: s.key.clone(),
                changeable: s.changeable && old[i].changeable,
            }),
            // A new user or database needs a restart.
            None => changes.push(Change {
                key: s.key.clone(),
                changeable: false,
            }),
        }
    }
    for s in &old {
        if find(&new, &s.key).is_none() {
            changes.push(Change {
                key: s.key.clone(),
                changeable: false,
            });
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[proxy]\npool_size = 4\n[[users]]\nname = \"app\"\npassword = \"secret\"\n\
                        [[databases]]\nname = \"db\"\n";

    #[test]
    fn passwords_are_hidden() {
        let c = Config::parse(BASE).unwrap();
        let rows = settings(&c);
        let password = rows.iter().find(|s| s.key == "users.app.password").unwrap();
        assert_eq!(password.value.as_deref(), Some(HIDDEN));
        assert!(rows.iter().all(|s| s.value.as_deref() != Some("secret")));
        let pool = rows.iter().find(|s| s.key == "proxy.pool_size").unwrap();
        assert_eq!(
            (pool.value.as_deref(), pool.default.as_deref()),
            (Some("4"), Some("20"))
        );
        assert!(pool.changeable);
    }

    #[test]
    fn changes_are_found_and_classified() {
        let old = Config::parse(BASE).unwrap();
        let new = Config::parse(
            &BASE
                .replace(
                    "pool_size = 4",
                    "pool_size = 8\nlisten = \"127.0.0.1:7000\"",
                )
                .replace("\"secret\"", "\"other\""),
        )
        .unwrap();
        let found = changes(&old, &new);
        let keys: Vec<(&str, bool)> = found
            .iter()
            .map(|c| (c.key.as_str(), c.changeable))
            .collect();
        assert_eq!(
            keys,
            [
                ("proxy.listen", false),
                ("proxy.pool_size", true),
                ("users.app.password", false)
            ]
        );
        assert!(changes(&old, &old).is_empty());
    }
}
