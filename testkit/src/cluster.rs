//! `Cluster`: one running PostgreSQL server, throwaway (tests) or persistent (`shardline dev`).
//!
//! End-to-end tests need real servers that start fast, never collide on ports or
//! directories, and disappear even when a test panics. A throwaway cluster is a copy of the
//! shared template in a fresh temp dir; dropping it stops the server and deletes the dir.
//! A persistent cluster lives in a caller-chosen directory that survives the drop. A replica
//! is a `pg_basebackup` of a running cluster that streams its WAL; either kind too.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

use crate::basebackup::Basebackup;
use crate::bindir::{find_bindir, major_version, server_tool};
use crate::cluster_builder::ClusterBuilder;
use crate::initdb::Initdb;
use crate::password_encryption::PasswordEncryption;
use crate::postmaster::{log_path_in, stop_stale, Postmaster, PostmasterSpec, StartFailure};
use crate::replica_builder::{Primary, ReplicaBuilder};
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

/// How long `pg_ctl promote` may take to end recovery.
const PROMOTE_TIMEOUT_S: u32 = 30;

/// A replica's password file for its connection to the primary, in its data dir.
const PASSFILE_NAME: &str = "shardline.pgpass";

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

/// Settings of every replica, after those it inherits from its primary: reconnect to a
/// restarted primary within moments, not the default 5 s.
const REPLICA_SETTINGS: &[(&str, &str)] = &[("wal_retrieve_retry_interval", "200ms")];

/// `pg_hba.conf` of the persistent cluster: first match wins. Database `all` does not match
/// replication connections, hence their own lines (for `pg_basebackup` and replicas).
const PERSISTENT_PG_HBA: &str = "\
# Written by shardline testkit; first match wins.
# TYPE  DATABASE     USER  ADDRESS       METHOD
local   all          all                 trust
local   replication  all                 trust
host    all          all   127.0.0.1/32  scram-sha-256
host    replication  all   127.0.0.1/32  scram-sha-256
";

/// What [`PERSISTENT_PG_HBA`] was before replicas; dev dirs made then are upgraded on open.
const PERSISTENT_PG_HBA_V1: &str = "\
# Written by shardline testkit; first match wins.
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 trust
host    all       all   127.0.0.1/32  scram-sha-256
";

/// One running PostgreSQL server on `127.0.0.1`: a primary, or a streaming replica of one.
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
    bindir: PathBuf,
    user: ServerUser,
    /// Settings on top of the throwaway or persistent defaults; a replica's start with its
    /// primary's and end with its `primary_conninfo`.
    extra_settings: Vec<(String, String)>,
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
    /// Replication connections (for [`Cluster::replica`]) use `scram-sha-256`.
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

    /// A builder for a streaming replica of this (running) server: throwaway with
    /// [`ReplicaBuilder::start`], persistent with [`ReplicaBuilder::open_or_init`].
    ///
    /// The replica inherits this server's extra settings, superuser and password, and
    /// retries a lost connection to it every 200 ms (`wal_retrieve_retry_interval`).
    pub fn replica(&self) -> ReplicaBuilder {
        let mut settings = self.extra_settings.clone();
        settings.extend(
            REPLICA_SETTINGS
                .iter()
                .map(|&(name, value)| (name.to_owned(), value.to_owned())),
        );
        ReplicaBuilder::new(
            Primary {
                port: self.port,
                superuser: self.superuser.clone(),
                password: self.password.clone(),
                bindir: self.bindir.clone(),
                user: self.user,
            },
            settings,
        )
    }

    pub(crate) fn start_throwaway(extra_settings: &[(String, String)]) -> anyhow::Result<Cluster> {
        let started = Instant::now();
        let bindir = find_bindir()?;
        let user = ServerUser::current()?;
        let major = major_version(&bindir)?;
        let root = scratch_root();
        sweep_leftovers(&root);
        let template = ensure_template(&root, &bindir, &major, user)?;

        let temp_dir = throwaway_dir(&root, user)?;
        let data_dir = temp_dir.path().join("data");
        copy_dir(&template, &data_dir)?;
        let mut cluster = Cluster {
            port: 0,
            socket_dir: temp_dir.path().to_owned(),
            log_path: log_path_in(temp_dir.path()),
            data_dir,
            superuser: SUPERUSER.to_owned(),
            password: SUPERUSER_PASSWORD.to_owned(),
            bindir,
            user,
            extra_settings: extra_settings.to_vec(),
            postmaster: None,
            temp_dir: Some(temp_dir),
        };
        cluster.start_on_free_port()?;
        tracing::debug!(port = cluster.port, elapsed = ?started.elapsed(), data_dir = %cluster.data_dir.display(), "throwaway cluster ready");
        Ok(cluster)
    }

    pub(crate) fn start_throwaway_replica(
        primary: &Primary,
        mut extra_settings: Vec<(String, String)>,
    ) -> anyhow::Result<Cluster> {
        let started = Instant::now();
        let root = scratch_root();
        sweep_leftovers(&root);
        let temp_dir = throwaway_dir(&root, primary.user)?;
        let data_dir = temp_dir.path().join("data");
        Basebackup {
            bindir: &primary.bindir,
            user: primary.user,
            primary_port: primary.port,
            superuser: &primary.superuser,
            password: &primary.password,
            data_dir: &data_dir,
            no_sync: true,
        }
        .run()?;
        let passfile = data_dir.join(PASSFILE_NAME);
        primary.write_passfile(&passfile)?;
        extra_settings.push(primary.conninfo_setting(&passfile));

        let mut cluster = Cluster {
            port: 0,
            socket_dir: temp_dir.path().to_owned(),
            log_path: log_path_in(temp_dir.path()),
            data_dir,
            superuser: primary.superuser.clone(),
            password: primary.password.clone(),
            bindir: primary.bindir.clone(),
            user: primary.user,
            extra_settings,
            postmaster: None,
            temp_dir: Some(temp_dir),
        };
        cluster.start_on_free_port()?;
        tracing::debug!(port = cluster.port, primary_port = primary.port, elapsed = ?started.elapsed(), "throwaway replica ready");
        Ok(cluster)
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
        upgrade_pg_hba(&dir)?;
        stop_stale(&dir)?;
        Cluster {
            port,
            socket_dir: dir.clone(),
            log_path: log_path_in(&dir),
            data_dir: dir,
            superuser: superuser.to_owned(),
            password: password.to_owned(),
            bindir,
            user,
            extra_settings: extra_settings.to_vec(),
            postmaster: None,
            temp_dir: None,
        }
        .started()
    }

    /// Starts a cluster put together by the caller (a persistent one: no
    /// temporary directory) and hands it back running.
    fn started(mut self) -> anyhow::Result<Cluster> {
        self.start_postmaster().map_err(|failure| failure.error)?;
        Ok(self)
    }

    pub(crate) fn open_persistent_replica(
        primary: &Primary,
        mut extra_settings: Vec<(String, String)>,
        dir: &Path,
        port: u16,
    ) -> anyhow::Result<Cluster> {
        let dir = absolute_in_existing_parent(dir)?;
        if !dir.join("PG_VERSION").is_file() {
            basebackup_via_staging(primary, &dir)?;
        }
        stop_stale(&dir)?;
        // Rewritten on every open: the password is the primary's of today.
        let passfile = dir.join(PASSFILE_NAME);
        primary.write_passfile(&passfile)?;
        extra_settings.push(primary.conninfo_setting(&passfile));

        Cluster {
            port,
            socket_dir: dir.clone(),
            log_path: log_path_in(&dir),
            data_dir: dir,
            superuser: primary.superuser.clone(),
            password: primary.password.clone(),
            bindir: primary.bindir.clone(),
            user: primary.user,
            extra_settings,
            postmaster: None,
            temp_dir: None,
        }
        .started()
    }

    /// Starts the server on `self.port`, blocking until it accepts connections.
    fn start_postmaster(&mut self) -> Result<(), StartFailure> {
        let defaults = if self.temp_dir.is_some() {
            THROWAWAY_SETTINGS
        } else {
            PERSISTENT_SETTINGS
        };
        let settings = with_defaults(defaults, &self.extra_settings);
        let spec = PostmasterSpec {
            bindir: &self.bindir,
            user: self.user,
            data_dir: &self.data_dir,
            socket_dir: &self.socket_dir,
            log_path: &self.log_path,
            port: self.port,
            settings: &settings,
        };
        self.postmaster = Some(Postmaster::start(&spec)?);
        Ok(())
    }

    /// Starts the server on a free port, on another one if the port is taken before the
    /// server binds it.
    fn start_on_free_port(&mut self) -> anyhow::Result<()> {
        let mut attempt = 1;
        loop {
            self.port = try_free_port().context("finding a free port")?;
            match self.start_postmaster() {
                Ok(()) => return Ok(()),
                Err(failure) if failure.port_in_use && attempt < PORT_ATTEMPTS => {
                    tracing::debug!(
                        port = self.port,
                        attempt,
                        "port taken before postgres bound it; retrying"
                    );
                    attempt += 1;
                }
                Err(failure) => return Err(failure.error),
            }
        }
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

    /// Stops the server (if running) and starts it again on the same data dir, port and
    /// settings; blocks until it accepts connections. A replica resumes following its
    /// primary.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.start_postmaster().map_err(|failure| failure.error)
    }

    /// Promotes a replica to a primary (`pg_ctl promote -w`): blocks until it has left
    /// recovery and accepts writes. An error on a server that is not a replica.
    pub fn promote(&self) -> anyhow::Result<()> {
        if self.postmaster.is_none() {
            bail!(
                "cannot promote the server on port {}: it is stopped",
                self.port
            );
        }
        let pg_ctl = server_tool(&self.bindir, "pg_ctl")?;
        // pg_ctl refuses to run as root, like postgres.
        let output = self
            .user
            .command(&pg_ctl)
            .args(["promote", "-w", "-t"])
            .arg(PROMOTE_TIMEOUT_S.to_string())
            .arg("-D")
            .arg(&self.data_dir)
            .env("LC_ALL", "C")
            .current_dir(&self.data_dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", pg_ctl.display()))?;
        if !output.status.success() {
            bail!(
                "{} promote -D {} failed with {}:\n{}{}",
                pg_ctl.display(),
                self.data_dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
            );
        }
        Ok(())
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

/// A fresh throwaway cluster dir in `root`, handed to the server user.
fn throwaway_dir(root: &Path, user: ServerUser) -> anyhow::Result<TempDir> {
    let temp_dir = tempfile::Builder::new()
        .prefix(CLUSTER_DIR_PREFIX)
        .tempdir_in(root)
        .with_context(|| format!("creating a cluster dir in {}", root.display()))?;
    user.chown(temp_dir.path())?;
    Ok(temp_dir)
}

/// `dir` made absolute through its parent, which is created if missing; `dir` itself may
/// not exist yet. postgres changes into the data dir, so relative paths would resolve wrongly.
fn absolute_in_existing_parent(dir: &Path) -> anyhow::Result<PathBuf> {
    let name = dir
        .file_name()
        .with_context(|| format!("{} names no directory", dir.display()))?;
    let parent = match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let parent = parent
        .canonicalize()
        .with_context(|| format!("resolving {}", parent.display()))?;
    Ok(parent.join(name))
}

/// `pg_basebackup`s `primary` into `<dir>.basebackup`, then renames that to `dir`, so that
/// `dir` holds a cluster only once the copy is complete.
fn basebackup_via_staging(primary: &Primary, dir: &Path) -> anyhow::Result<()> {
    let mut staging = dir.as_os_str().to_owned();
    staging.push(".basebackup");
    let staging = PathBuf::from(staging);
    // Left by a run killed mid-copy.
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .with_context(|| format!("removing the unfinished copy {}", staging.display()))?;
    }
    // Made here, not by pg_basebackup: as root, the server user may not write the parent.
    fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    primary.user.chown(&staging)?;
    fs::set_permissions(&staging, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 700 {}", staging.display()))?;

    tracing::info!(dir = %dir.display(), primary_port = primary.port, "creating a PostgreSQL replica with pg_basebackup");
    let copied = Basebackup {
        bindir: &primary.bindir,
        user: primary.user,
        primary_port: primary.port,
        superuser: &primary.superuser,
        password: &primary.password,
        data_dir: &staging,
        no_sync: false,
    }
    .run()
    .and_then(|()| {
        fs::rename(&staging, dir)
            .with_context(|| format!("renaming {} to {}", staging.display(), dir.display()))
    });
    if copied.is_err() {
        if let Err(err) = fs::remove_dir_all(&staging) {
            tracing::warn!(dir = %staging.display(), %err, "removing the unfinished copy");
        }
    }
    copied
}

/// Replaces a `pg_hba.conf` written by an older testkit (without replication lines) with
/// today's; leaves any other (e.g. hand-edited) file alone.
fn upgrade_pg_hba(data_dir: &Path) -> anyhow::Result<()> {
    let hba = data_dir.join("pg_hba.conf");
    let text = fs::read_to_string(&hba).with_context(|| format!("reading {}", hba.display()))?;
    if text != PERSISTENT_PG_HBA_V1 {
        return Ok(());
    }
    tracing::info!(file = %hba.display(), "allowing replication connections");
    // Truncating keeps the file's owner and mode.
    fs::write(&hba, PERSISTENT_PG_HBA).with_context(|| format!("writing {}", hba.display()))
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
    fn upgrades_only_the_old_testkit_pg_hba() {
        let dir = tempfile::tempdir().expect("temp dir");
        let hba = dir.path().join("pg_hba.conf");
        let edited = format!("{PERSISTENT_PG_HBA_V1}host all all 10.0.0.0/8 scram-sha-256\n");
        let cases = [
            (PERSISTENT_PG_HBA_V1, PERSISTENT_PG_HBA),
            (PERSISTENT_PG_HBA, PERSISTENT_PG_HBA),
            (edited.as_str(), edited.as_str()),
        ];
        for (before, after) in cases {
            fs::write(&hba, before).expect("write pg_hba.conf");
            upgrade_pg_hba(dir.path()).expect("upgrade");
            assert_eq!(fs::read_to_string(&hba).expect("read"), after, "{before:?}");
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
