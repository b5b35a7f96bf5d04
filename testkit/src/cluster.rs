//! `Cluster`: one running PostgreSQL server, throwaway (tests) or persistent (`shardline dev`).
//!
//! End-to-end tests need real servers that start fast, never collide on ports or
//! directories, and disappear even when a test panics. A throwaway cluster is a copy of the
//! shared template in a fresh temp dir; dropping it stops the server and deletes the dir.
//! A persistent cluster lives in a caller-chosen directory that survives the drop.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

use crate::bindir::{find_bindir, major_version};
use crate::cluster_builder::ClusterBuilder;
use crate::initdb::Initdb;
use crate::password_encryption::PasswordEncryption;
use crate::postmaster::{log_path_in, stop_stale, Postmaster, PostmasterSpec};
use crate::scratch_root::{scratch_root, sweep_leftovers, CLUSTER_DIR_PREFIX};
use crate::server_user::ServerUser;
use crate::template::{ensure_template, SUPERUSER, SUPERUSER_PASSWORD};
use crate::try_free_port;

/// Servers listen here only.
const HOST: &str = "127.0.0.1";

/// Tries before giving up when the chosen free port is taken before the server binds it.
const PORT_ATTEMPTS: u32 = 3;

/// How long a client connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings for throwaway clusters: durability off (the data dies with the test anyway).
const THROWAWAY_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "200"),
    ("shared_buffers", "32MB"),
];

/// Settings for the persistent dev cluster: no `fsync=off` or `full_page_writes=off`, which
/// can corrupt a database on a crash; `synchronous_commit=off` only loses the last commits.
const PERSISTENT_SETTINGS: &[(&str, &str)] = &[
    ("synchronous_commit", "off"),
    ("max_connections", "200"),
    ("shared_buffers", "32MB"),
];

/// `pg_hba.conf` of the persistent cluster: first match wins.
const PERSISTENT_PG_HBA: &str = "\
# Written by shardline testkit; first match wins.
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 trust
host    all       all   127.0.0.1/32  scram-sha-256
";

/// One running PostgreSQL server on `127.0.0.1`.
///
/// Dropping it stops the server (also while a panicking test unwinds); a throwaway cluster
/// also deletes its directory. Blocking: `start`, `stop` and `drop` wait for the server.
pub struct Cluster {
    port: u16,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    superuser: String,
    password: String,
    /// `None` once stopped.
    postmaster: Option<Postmaster>,
    /// The throwaway cluster's directory, deleted on drop; `None` for persistent clusters.
    temp_dir: Option<TempDir>,
}

impl Cluster {
    /// A builder, for servers with extra settings or a persistent directory.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// Starts a throwaway cluster: a copy of the shared template (initdb'd once per machine)
    /// in a fresh dir under `/dev/shm` (if roomy) or the temp dir, on a free port, with
    /// superuser `postgres`/`postgres`.
    ///
    /// Authentication over TCP: role [`crate::MD5_USER`] uses `md5`, role
    /// [`crate::TRUST_USER`] uses `trust`, everyone else `scram-sha-256`; Unix sockets trust.
    pub fn start() -> anyhow::Result<Cluster> {
        Self::builder().start()
    }

    /// Opens the persistent cluster in `dir` for `shardline dev`, running initdb there first
    /// if `dir/PG_VERSION` is missing (with `superuser`/`password`; those are also what
    /// [`Cluster::connect`] uses) and stopping a server an earlier, killed run left on `dir`.
    ///
    /// Dropping the cluster stops the server but keeps `dir`.
    pub fn open_or_init(
        dir: &Path,
        port: u16,
        superuser: &str,
        password: &str,
    ) -> anyhow::Result<Cluster> {
        Self::builder().open_or_init(dir, port, superuser, password)
    }

    pub(crate) fn start_throwaway(extra_settings: &[(String, String)]) -> anyhow::Result<Cluster> {
        let started = Instant::now();
        let bindir = find_bindir()?;
        let user = ServerUser::current()?;
        let major = major_version(&bindir)?;
        let root = scratch_root();
        sweep_leftovers(&root);
        let template = ensure_template(&root, &bindir, &major, user)?;

        let temp_dir = tempfile::Builder::new()
            .prefix(CLUSTER_DIR_PREFIX)
            .tempdir_in(&root)
            .with_context(|| format!("creating a cluster dir in {}", root.display()))?;
        user.chown(temp_dir.path())?;
        let data_dir = temp_dir.path().join("data");
        copy_dir(&template, &data_dir)?;
        let log_path = log_path_in(temp_dir.path());
        let settings = with_defaults(THROWAWAY_SETTINGS, extra_settings);

        let mut attempt = 1;
        loop {
            let port = try_free_port().context("finding a free port")?;
            let spec = PostmasterSpec {
                bindir: &bindir,
                user,
                data_dir: &data_dir,
                socket_dir: temp_dir.path(),
                log_path: &log_path,
                port,
                settings: &settings,
            };
            match Postmaster::start(&spec) {
                Ok(postmaster) => {
                    tracing::debug!(port, elapsed = ?started.elapsed(), data_dir = %data_dir.display(), "throwaway cluster ready");
                    return Ok(Cluster {
                        port,
                        socket_dir: temp_dir.path().to_owned(),
                        data_dir,
                        log_path,
                        superuser: SUPERUSER.to_owned(),
                        password: SUPERUSER_PASSWORD.to_owned(),
                        postmaster: Some(postmaster),
                        temp_dir: Some(temp_dir),
                    });
                }
                Err(failure) if failure.port_in_use && attempt < PORT_ATTEMPTS => {
                    tracing::debug!(
                        port,
                        attempt,
                        "port taken before postgres bound it; retrying"
                    );
                    attempt += 1;
                }
                Err(failure) => return Err(failure.error),
            }
        }
    }

    pub(crate) fn open_persistent(
        extra_settings: &[(String, String)],
        dir: &Path,
        port: u16,
        superuser: &str,
        password: &str,
    ) -> anyhow::Result<Cluster> {
        let bindir = find_bindir()?;
        let user = ServerUser::current()?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // postgres changes into the data dir, so relative paths would resolve wrongly.
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;

        if !dir.join("PG_VERSION").is_file() {
            user.chown(&dir)?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("chmod 700 {}", dir.display()))?;
            tracing::info!(dir = %dir.display(), "creating a PostgreSQL cluster with initdb");
            Initdb {
                bindir: &bindir,
                user,
                data_dir: &dir,
                superuser,
                password,
                no_sync: false,
                pg_hba: PERSISTENT_PG_HBA,
            }
            .run()?;
        }
        stop_stale(&dir)?;

        let log_path = log_path_in(&dir);
        let settings = with_defaults(PERSISTENT_SETTINGS, extra_settings);
        let spec = PostmasterSpec {
            bindir: &bindir,
            user,
            data_dir: &dir,
            socket_dir: &dir,
            log_path: &log_path,
            port,
            settings: &settings,
        };
        let postmaster = Postmaster::start(&spec).map_err(|failure| failure.error)?;
        Ok(Cluster {
            port,
            socket_dir: dir.clone(),
            data_dir: dir,
            log_path,
            superuser: superuser.to_owned(),
            password: password.to_owned(),
            postmaster: Some(postmaster),
            temp_dir: None,
        })
    }

    /// The TCP port on [`Cluster::host`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Always `"127.0.0.1"`: servers never listen elsewhere.
    pub fn host(&self) -> &'static str {
        HOST
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where the server's Unix socket (`.s.PGSQL.<port>`) lives.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The postmaster's pid; `None` once stopped.
    pub fn pid(&self) -> Option<u32> {
        self.postmaster.as_ref().map(Postmaster::pid)
    }

    /// The superuser that [`Cluster::connect`] logs in as.
    pub fn superuser(&self) -> &str {
        &self.superuser
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// `postgres://user:password@127.0.0.1:port/db`, each part percent-encoded.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{}:{}@{HOST}:{}/{}",
            percent_encode(user),
            percent_encode(password),
            self.port,
            percent_encode(db)
        )
    }

    /// Client settings for logging in to `db` as `user` over TCP.
    pub fn config(&self, user: &str, password: &str, db: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(HOST)
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(db)
            .connect_timeout(CONNECT_TIMEOUT);
        config
    }

    /// Connects as the superuser to database `postgres` over TCP. The connection runs on a
    /// spawned tokio task, so this needs a tokio runtime.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        self.connect_as(&self.superuser, &self.password, "postgres")
            .await
    }

    /// Connects as the superuser to database `db`.
    pub async fn connect_to(&self, db: &str) -> anyhow::Result<Client> {
        self.connect_as(&self.superuser, &self.password, db).await
    }

    /// Connects as `user` to `db` over TCP, without TLS. On failure the error downcasts to
    /// [`tokio_postgres::Error`] (e.g. to check the SQLSTATE of a failed login).
    pub async fn connect_as(&self, user: &str, password: &str, db: &str) -> anyhow::Result<Client> {
        let (client, connection) = self
            .config(user, password, db)
            .connect(NoTls)
            .await
            .with_context(|| format!("connecting to {db} as {user} on {HOST}:{}", self.port))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%err, "testkit client connection ended with an error");
            }
        });
        Ok(client)
    }

    /// Runs `sql` (one or more statements) as the superuser on a fresh connection.
    pub async fn execute(&self, sql: &str) -> anyhow::Result<()> {
        let client = self.connect().await?;
        client
            .batch_execute(sql)
            .await
            .with_context(|| format!("executing {sql:?} on port {}", self.port))
    }

    /// Creates a superuser role `name` that logs in with `password`, stored as `encryption`.
    pub async fn create_role(
        &self,
        name: &str,
        password: &str,
        encryption: PasswordEncryption,
    ) -> anyhow::Result<()> {
        // One session, so the SET applies to the CREATE ROLE.
        let sql = format!(
            "SET password_encryption = '{}'; CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}",
            encryption.setting(),
            quote_ident(name),
            quote_literal(password)
        );
        let client = self.connect().await?;
        client
            .batch_execute(&sql)
            .await
            .with_context(|| format!("creating role {name:?} on port {}", self.port))
    }

    /// Stops the server: fast shutdown, SIGKILL after 10 s. Idempotent; blocks until the
    /// process has exited. Keeps the directory (drop deletes a throwaway one).
    pub fn stop(&mut self) {
        if let Some(mut postmaster) = self.postmaster.take() {
            postmaster.stop();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        if let Some(temp_dir) = self.temp_dir.take() {
            let path = temp_dir.path().to_owned();
            if let Err(err) = temp_dir.close() {
                tracing::warn!(dir = %path.display(), %err, "removing the cluster dir");
            }
        }
    }
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No password: Debug output ends up in test logs.
        f.debug_struct("Cluster")
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .field("superuser", &self.superuser)
            .field("pid", &self.pid())
            .field("throwaway", &self.temp_dir.is_some())
            .finish_non_exhaustive()
    }
}

/// `defaults` then `extra`: postgres applies `-c` options in order, so `extra` wins.
fn with_defaults(defaults: &[(&str, &str)], extra: &[(String, String)]) -> Vec<(String, String)> {
    defaults
        .iter()
        .map(|&(name, value)| (name.to_owned(), value.to_owned()))
        .chain(extra.iter().cloned())
        .collect()
}

/// `cp -a`: keeps modes and ownership (the server user's) and reflinks where the filesystem can.
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    let output = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .context("running cp")?;
    if !output.status.success() {
        bail!(
            "cp -a {} {} failed with {}: {}",
            from.display(),
            to.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// `name` as an SQL identifier: `a"b` → `"a""b"`.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as an SQL string literal (`standard_conforming_strings` is on): `it's` → `'it''s'`.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_sql() {
        let cases = [
            ("plain", "\"plain\"", "'plain'"),
            ("it's", "\"it's\"", "'it''s'"),
            ("a\"b", "\"a\"\"b\"", "'a\"b'"),
            ("back\\slash", "\"back\\slash\"", "'back\\slash'"),
            ("", "\"\"", "''"),
        ];
        for (input, ident, literal) in cases {
            assert_eq!(quote_ident(input), ident, "{input:?}");
            assert_eq!(quote_literal(input), literal, "{input:?}");
        }
    }

    #[test]
    fn percent_encodes_url_parts() {
        let cases = [
            ("postgres", "postgres"),
            ("p@ss:w/rd", "p%40ss%3Aw%2Frd"),
            ("a b%", "a%20b%25"),
            ("ü", "%C3%BC"),
            ("A-z_0.9~", "A-z_0.9~"),
        ];
        for (input, expected) in cases {
            assert_eq!(percent_encode(input), expected, "{input:?}");
        }
    }

    #[test]
    fn extra_settings_come_after_defaults() {
        let extra = [("max_connections".to_owned(), "600".to_owned())];
        let settings = with_defaults(&[("max_connections", "200"), ("fsync", "off")], &extra);
        let names: Vec<(&str, &str)> = settings
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("max_connections", "200"),
                ("fsync", "off"),
                ("max_connections", "600")
            ]
        );
    }
}
