//! Config: the proxy's TOML file.
//!
//! Unknown keys are rejected and every error names its line (toml's spans).
//! Durations are strings such as `"250ms"` or `"5s"`. Every pool, queue and
//! message size has a maximum with a default here.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use router::KeyType;
use serde::Deserialize;

use crate::auth::{ScramVerifier, StoredSecret};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default)]
    pub databases: Vec<DatabaseConfig>,
    /// The metadata group to follow; absent means no shard map (one server).
    #[serde(default)]
    pub metadata: Option<MetadataConfig>,
    #[serde(default)]
    pub replicas: ReplicaConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// Service-level objectives, per database (`SHOW SLO`, `/metrics`).
    #[serde(default)]
    pub slo: Vec<crate::slo::SloConfig>,
    /// The file this was read from, for `RELOAD` (none when parsed from text).
    #[serde(skip)]
    pub path: Option<std::path::PathBuf>,
    /// `[metadata] endpoints` came from the command line (`--meta`): a
    /// reload keeps them.
    #[serde(skip)]
    pub metadata_from_flag: bool,
}

/// The operators' HTTP listener: Prometheus `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `host:port`, or `"off"`. A port in use is logged, not fatal: the
    /// proxy serves its clients without metrics.
    #[serde(deserialize_with = "listen_or_off")]
    pub listen: Option<SocketAddr>,
    /// Scrapes served at once; more wait for their turn.
    pub connections_max: u32,
    /// The period of the `avg_*` columns of the console's `SHOW STATS`.
    #[serde(with = "humantime_serde")]
    pub stats_period: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9930))),
            connections_max: 16,
            stats_period: Duration::from_secs(60),
        }
    }
}

fn listen_or_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    if text == "off" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|e| {
        serde::de::Error::custom(format!("\"{text}\" is neither host:port nor \"off\": {e}"))
    })
}

/// The result cache for point reads of sharded tables, and of unsharded
/// tables by a unique column named here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Sharded tables whose point reads (`WHERE key = ...`) are cached; more
    /// can be enabled at run time from the admin console (`CACHE ENABLE t`).
    pub tables: Vec<String>,
    /// Unsharded tables (on the home shard) cached by a unique column:
    /// `settings = { column = "id", type = "int8" }`. Listed tables are
    /// cached from the start; `CACHE DISABLE` and `ENABLE` apply to them too.
    pub keys: BTreeMap<String, CacheKey>,
    /// Total bytes of cached replies (with their keys and bookkeeping).
    pub max_bytes: u64,
    /// Replies larger than this are not cached.
    pub entry_bytes_max: usize,
    /// A safety net: entries are dropped this long after they were filled.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Entries not read for this long are dropped (none when absent).
    #[serde(with = "humantime_serde")]
    pub tti: Option<Duration>,
    /// The cache serves a shard only while its WAL change feed is connected
    /// and has applied every commit older than this; otherwise reads bypass it.
    #[serde(with = "humantime_serde")]
    pub max_stream_lag: Duration,
    /// How often the change feed asks the server how far it has sent.
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
}

/// The unique column by which an unsharded table's point reads are cached.
/// It must be in the table's replica identity (its primary key, say), or the
/// WAL would not show a changed row's old value.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheKey {
    pub column: String,
    /// The column's type, as a shard key's: int2, int4, int8, text or uuid.
    #[serde(rename = "type", deserialize_with = "key_type")]
    pub key_type: KeyType,
}

fn key_type<'de, D: serde::Deserializer<'de>>(d: D) -> Result<KeyType, D::Error> {
    let name = String::deserialize(d)?;
    name.parse().map_err(serde::de::Error::custom)
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            tables: Vec::new(),
            keys: BTreeMap::new(),
            max_bytes: 64 << 20,
            entry_bytes_max: 64 << 10,
            ttl: Duration::from_secs(60),
            tti: None,
            max_stream_lag: Duration::from_secs(1),
            status_interval: Duration::from_millis(100),
        }
    }
}

/// Read routing to the shard map's streaming replicas.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaConfig {
    /// Where reads go by default; a session may change it with
    /// `SET shardline.read_from`.
    pub read_from: ReadFrom,
    /// `auto`: the server that says it is not in recovery takes writes (a
    /// promoted replica is followed without a restart); `map`: always the
    /// map's primary.
    pub role: Role,
    /// Replicas further behind than this (in time or in WAL bytes) get no reads.
    #[serde(with = "humantime_serde")]
    pub max_replica_lag: Duration,
    pub max_replica_lag_bytes: u64,
    /// How often every server is probed for role, health and WAL position.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// A failed server is probed again after this, then twice as long each
    /// time it is still down, up to `breaker_backoff_max`.
    #[serde(with = "humantime_serde")]
    pub breaker_backoff_min: Duration,
    #[serde(with = "humantime_serde")]
    pub breaker_backoff_max: Duration,
    /// User-defined functions that only read, so statements calling them may
    /// run on a replica (names as called, `name` or `schema.name`).
    pub safe_functions: Vec<String>,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            read_from: ReadFrom::Any,
            role: Role::Auto,
            max_replica_lag: Duration::from_secs(1),
            max_replica_lag_bytes: 16 << 20,
            health_interval: Duration::from_millis(50),
            breaker_backoff_min: Duration::from_millis(100),
            breaker_backoff_max: Duration::from_secs(5),
            safe_functions: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadFrom {
    /// Reads never leave the primary.
    Primary,
    /// Reads go to a replica whatever its lag (read-your-writes still holds),
    /// to the primary only when no replica is up.
    Replica,
    /// Reads go to a caught-up replica, else to the primary.
    Any,
}

impl ReadFrom {
    pub fn parse(s: &str) -> Option<ReadFrom> {
        match s.to_ascii_lowercase().as_str() {
            "primary" => Some(ReadFrom::Primary),
            "replica" => Some(ReadFrom::Replica),
            "any" => Some(ReadFrom::Any),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Auto,
    Map,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataConfig {
    /// Metadata node addresses (`host:port`); any one of them is enough.
    pub endpoints: Vec<String>,
    /// How long a lease lasts without renewal; renewed every third of it.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// This proxy's id in the registry; defaults to `<listen address>-<pid>`.
    #[serde(default)]
    pub proxy_id: Option<String>,
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// The server connection returns to the pool at ReadyForQuery idle.
    Transaction,
    /// The server connection stays with the client until it disconnects.
    Session,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// Accept queue length (capped by the kernel's somaxconn).
    pub listen_backlog: u32,
    pub pool_mode: PoolMode,
    /// Server connections per (database, user) unless the database says otherwise.
    pub pool_size: u32,
    pub max_client_connections: u32,
    /// How long a client waits for a server connection before SQLSTATE 53300.
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    /// TCP connect plus login to a server.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time a client has to finish startup and authentication.
    #[serde(with = "humantime_serde")]
    pub client_login_timeout: Duration,
    /// Idle server connections are closed after this long.
    #[serde(with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    /// Server connections are closed (when idle) after this long.
    #[serde(with = "humantime_serde")]
    pub server_lifetime: Duration,
    /// Largest message buffered whole, from a client or a server. DataRow and
    /// CopyData are streamed through in pieces and may be larger.
    pub message_bytes_max: u32,
    /// Bytes queued towards one peer before the proxy stops reading the other.
    pub buffer_bytes_max: u32,
    /// Prepared statements kept per server connection (oldest closed first).
    pub server_prepared_statements_max: u32,
    /// Named prepared statements one client may hold.
    pub client_prepared_statements_max: u32,
    /// Workers serving clients, each a thread with its own event loop
    /// (`workers.rs`); 0 means one per two CPUs (at least one), 1 a single
    /// thread for everything.
    pub worker_threads: u32,
    /// Requests that take at least this long are logged at INFO with their
    /// route and duration (not their SQL, which is logged at DEBUG only).
    /// Absent: no slow-statement log.
    #[serde(with = "humantime_serde")]
    pub log_min_duration: Option<Duration>,
    /// `SHUTDOWN` (and SIGTERM) wait this long for open transactions to
    /// finish; clients still connected then are disconnected.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// `PAUSE` waits this long for every server connection to come back;
    /// past it the pause is undone and the command fails.
    #[serde(with = "humantime_serde")]
    pub pause_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 6432)),
            listen_backlog: 1024,
            pool_mode: PoolMode::Transaction,
            pool_size: 20,
            max_client_connections: 10_000,
            checkout_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            client_login_timeout: Duration::from_secs(15),
            server_idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            message_bytes_max: 256 << 20,
            buffer_bytes_max: 256 << 10,
            server_prepared_statements_max: 1000,
            client_prepared_statements_max: 10_000,
            worker_threads: 0,
            log_min_duration: None,
            shutdown_timeout: Duration::from_secs(30),
            pause_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    Md5,
    Trust,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plain text, `md5<hex>` or a `SCRAM-SHA-256$...` verifier.
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub auth: AuthMethod,
    /// May connect to the admin console (database `shardline`).
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The name clients connect to.
    pub name: String,
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Database name on the server; defaults to `name`.
    #[serde(default)]
    pub dbname: Option<String>,
    /// Server login; defaults to the client's user name and password.
    #[serde(default)]
    pub server_user: Option<String>,
    #[serde(default)]
    pub server_password: Option<String>,
    #[serde(default)]
    pub pool_size: Option<u32>,
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
    /// After a session commits a write, its reads go only to replicas that
    /// have replayed it.
    #[serde(default = "yes")]
    pub read_your_writes: bool,
}

fn yes() -> bool {
    true
}

fn default_host() -> String {
    "127.0.0.1".into()
}

fn default_port() -> u16 {
    5432
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Where and what, never the offending line itself: it may hold a
    /// password (a misspelt `server_pasword = ...`), and RELOAD's errors
    /// reach the admin console and the logs.
    #[error("line {line}, column {column}: {message}")]
    Parse {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Config::parse(&text)?;
        config.path = Some(path.to_owned());
        Ok(config)
    }

    /// Follows the metadata group at `endpoints` (the `--meta` flag).
    pub fn set_metadata_endpoints(&mut self, endpoints: Vec<String>) {
        self.metadata_from_flag = true;
        match &mut self.metadata {
            Some(m) => m.endpoints = endpoints,
            None => {
                self.metadata = Some(MetadataConfig {
                    endpoints,
                    lease_ttl: default_lease_ttl(),
                    proxy_id: None,
                })
            }
        }
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |span| span.start.min(text.len()));
            let before = &text[..at];
            ConfigError::Parse {
                line: before.matches('\n').count() + 1,
                column: before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1,
                message: e.message().trim().to_owned(),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |s: String| Err(ConfigError::Invalid(s));
        let p = &self.proxy;
        if p.pool_size == 0 || p.max_client_connections == 0 {
            return invalid("pool_size and max_client_connections must be at least 1".into());
        }
        if p.message_bytes_max < 1024 || p.buffer_bytes_max < 8192 {
            return invalid(
                "message_bytes_max must be >= 1024 and buffer_bytes_max >= 8192".into(),
            );
        }
        if p.checkout_timeout.is_zero() || p.connect_timeout.is_zero() {
            return invalid("checkout_timeout and connect_timeout must be positive".into());
        }
        if p.server_lifetime.is_zero() || p.server_idle_timeout.is_zero() {
            // Zero would close every connection as it comes back: no pooling.
            return invalid("server_lifetime and server_idle_timeout must be positive".into());
        }
        if self.admin.stats_period < Duration::from_secs(1) {
            return invalid("admin.stats_period must be at least 1s".into());
        }
        let r = &self.replicas;
        if r.health_interval < Duration::from_millis(5)
            || r.breaker_backoff_min.is_zero()
            || r.breaker_backoff_max < r.breaker_backoff_min
        {
            return invalid(
                "replicas.health_interval must be at least 5ms and breaker_backoff_max at least \
                 breaker_backoff_min (which must be positive)"
                    .into(),
            );
        }
        if let Some(m) = &self.metadata {
            if m.endpoints.is_empty() {
                return invalid("metadata.endpoints needs at least one address".into());
            }
            if m.lease_ttl < Duration::from_millis(300) {
                return invalid("metadata.lease_ttl must be at least 300ms".into());
            }
        }
        let mut seen = HashMap::new();
        for user in &self.users {
            if seen.insert(user.name.as_str(), ()).is_some() {
                return invalid(format!("user \"{}\" is listed twice", user.name));
            }
            let secret = user.password.as_deref().map(StoredSecret::parse);
            match (user.auth, &secret) {
                (AuthMethod::Trust, _) => {}
                (_, None) => {
                    return invalid(format!("user \"{}\" needs a password for {:?} auth", user.name, user.auth))
                }
                (AuthMethod::Md5, Some(StoredSecret::Scram(_))) => {
                    return invalid(format!(
                        "user \"{}\": md5 auth needs a plain or md5 password, not a SCRAM verifier",
                        user.name
                    ))
                }
                (AuthMethod::ScramSha256, Some(StoredSecret::Md5(_))) => {
                    return invalid(format!(
                        "user \"{}\": scram-sha-256 auth needs a plain password or a SCRAM verifier, not md5",
                        user.name
                    ))
                }
                _ => {}
            }
        }
        let mut seen = HashMap::new();
        for db in &self.databases {
            if seen.insert(db.name.as_str(), ()).is_some() {
                return invalid(format!("database \"{}\" is listed twice", db.name));
            }
            if db.pool_size == Some(0) {
                return invalid(format!(
                    "database \"{}\": pool_size must be at least 1",
                    db.name
                ));
            }
        }
        let mut seen = HashMap::new();
        for slo in &self.slo {
            if !self.databases.iter().any(|d| d.name == slo.database) {
                return invalid(format!(
                    "slo for database \"{}\": no such database is configured",
                    slo.database
                ));
            }
            if seen.insert(slo.database.as_str(), ()).is_some() {
                return invalid(format!(
                    "slo for database \"{}\" is listed twice",
                    slo.database
                ));
            }
            if slo.latency.is_none() && slo.errors.is_none() {
                return invalid(format!(
                    "slo for database \"{}\" sets neither latency (\"p99 < 5ms\") nor errors (\"< 0.1%\")",
                    slo.database
                ));
            }
        }
        Ok(())
    }
}

/// A user ready for authentication: secrets parsed once at load, SCRAM
/// verifiers derived from plain passwords once (the derivation is slow on purpose).
#[derive(Debug)]
pub struct User {
    pub name: String,
    pub auth: AuthMethod,
    pub secret: Option<StoredSecret>,
    pub scram: Option<ScramVerifier>,
    /// The plain password, when configured, for logging in to servers as this user.
    pub plain_password: Option<String>,
    pub admin: bool,
}

impl User {
    pub fn from_config(c: &UserConfig) -> User {
        let secret = c.password.as_deref().map(StoredSecret::parse);
        let scram = match (&secret, c.auth) {
            (Some(StoredSecret::Scram(v)), _) => Some(v.clone()),
            (Some(StoredSecret::Plain(p)), AuthMethod::ScramSha256) => {
                Some(ScramVerifier::from_password(p))
            }
            _ => None,
        };
        let plain_password = match &secret {
            Some(StoredSecret::Plain(p)) => Some(p.clone()),
            _ => None,
        };
        User {
            name: c.name.clone(),
            auth: c.auth,
            secret,
            scram,
            plain_password,
            admin: c.admin,
        }
    }
}

pub type SharedConfig = Arc<Config>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        let err = Config::parse("[proxy]\npool_size = 3\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("bogus"), "{err}");
        // The offending line is not quoted: it may hold a password.
        let err = Config::parse("[[databases]]\nname = \"db\"\nserver_pasword = \"hunter2\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("line 3, column 1: "), "{err}");
        assert!(err.contains("server_pasword"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn defaults_and_durations() {
        let c = Config::parse(
            "[proxy]\ncheckout_timeout = \"250ms\"\n[[users]]\nname = \"a\"\npassword = \"p\"\n\
             [[databases]]\nname = \"db\"\nport = 5433\n",
        )
        .unwrap();
        assert_eq!(c.proxy.checkout_timeout, Duration::from_millis(250));
        assert_eq!(c.proxy.listen.port(), 6432);
        assert_eq!(c.users[0].auth, AuthMethod::ScramSha256);
        assert_eq!(c.databases[0].port, 5433);
    }

    #[test]
    fn cache_keys_name_a_column_and_a_key_type() {
        let c = Config::parse(
            "[cache.keys]\nplans = { column = \"code\", type = \"varchar\" }\n\
             ids = { column = \"id\", type = \"bigint\" }\n",
        )
        .unwrap();
        assert_eq!(c.cache.keys["plans"].column, "code");
        assert_eq!(c.cache.keys["plans"].key_type, KeyType::Text);
        assert_eq!(c.cache.keys["ids"].key_type, KeyType::Int8);
        let e = Config::parse("[cache.keys]\nplans = { column = \"code\", type = \"float8\" }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsupported shard key type \"float8\""), "{e}");
        assert!(Config::parse("[cache.keys]\nplans = { column = \"code\" }\n").is_err());
    }

    #[test]
    fn inconsistent_users_are_rejected() {
        let verifier = postgres_protocol::password::scram_sha_256(b"pw");
        for text in [
            "[[users]]\nname = \"a\"\n".to_owned(),
            format!("[[users]]\nname = \"a\"\nauth = \"md5\"\npassword = \"{verifier}\"\n"),
            "[[users]]\nname = \"a\"\npassword = \"md5aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n".to_owned(),
            "[[users]]\nname = \"a\"\npassword = \"x\"\n[[users]]\nname = \"a\"\npassword = \"y\"\n".to_owned(),
        ] {
            assert!(Config::parse(&text).is_err(), "{text}");
        }
    }
}
