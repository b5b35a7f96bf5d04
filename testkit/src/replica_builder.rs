//! Options for starting a streaming replica of a running [`Cluster`]: extra settings, and
//! whether the replica is throwaway (tests) or persistent (`shardline dev`).
//!
//! Replica routing is tested against real replicas, some lagging on purpose
//! (`recovery_min_apply_delay`), and `shardline dev` keeps its replicas across runs like its
//! shards. The builder owns what it needs of the primary, so it can move to another thread.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::cluster::Cluster;
use crate::server_user::ServerUser;

/// Builds a streaming replica of a running [`Cluster`]; from [`Cluster::replica`].
#[derive(Clone)]
#[must_use = "a builder does nothing until `start` or `open_or_init`"]
pub struct ReplicaBuilder {
    primary: Primary,
    /// The primary's extra settings first: a hot standby refuses to start with a lower
    /// `max_connections` (and a few others) than its primary.
    settings: Vec<(String, String)>,
}

/// What a replica needs to know about its primary.
#[derive(Clone)]
pub(crate) struct Primary {
    pub(crate) port: u16,
    pub(crate) superuser: String,
    pub(crate) password: String,
    pub(crate) bindir: PathBuf,
    pub(crate) user: ServerUser,
}

impl ReplicaBuilder {
    pub(crate) fn new(primary: Primary, settings: Vec<(String, String)>) -> Self {
        Self { primary, settings }
    }

    /// Adds `-c name=value` to the replica's command line, after the settings it inherits
    /// from the primary (a later call wins), e.g. `recovery_min_apply_delay` = `500ms`.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Starts a throwaway replica: `pg_basebackup` of the primary into a fresh dir beside the
    /// other throwaway clusters, on a free port, serving reads (`hot_standby`) once it has
    /// replayed the copy. Logs in with the primary's superuser and password.
    ///
    /// Dropping it stops the server and deletes the dir, like [`Cluster::start`]'s.
    pub fn start(self) -> anyhow::Result<Cluster> {
        Cluster::start_throwaway_replica(&self.primary, self.settings)
    }

    /// Opens the persistent replica in `dir` for `shardline dev` on `port`: if `dir` holds no
    /// cluster yet, `pg_basebackup`s the primary into it first (through a staging dir beside
    /// it, so an interrupted copy is never mistaken for a replica). Either way the replica
    /// follows the primary on the port it has now. Stops a server an earlier, killed run left
    /// on `dir`.
    ///
    /// Dropping the replica stops the server but keeps `dir`.
    pub fn open_or_init(self, dir: &Path, port: u16) -> anyhow::Result<Cluster> {
        Cluster::open_persistent_replica(&self.primary, self.settings, dir, port)
    }
}

impl fmt::Debug for ReplicaBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No password: Debug output ends up in test logs.
        f.debug_struct("ReplicaBuilder")
            .field("primary_port", &self.primary.port)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Primary {
    /// The `primary_conninfo` setting that follows this primary, reading the password from
    /// `passfile`. Passed on the command line, it overrides what `pg_basebackup -R` wrote to
    /// `postgresql.auto.conf`, so a replica follows a primary that moved to another port;
    /// the password stays off the command line, where `ps` would show it.
    pub(crate) fn conninfo_setting(&self, passfile: &Path) -> (String, String) {
        let conninfo = format!(
            "host=127.0.0.1 port={} user={} passfile={}",
            self.port,
            quote_conninfo(&self.superuser),
            quote_conninfo(&passfile.to_string_lossy())
        );
        ("primary_conninfo".to_owned(), conninfo)
    }

    /// Writes the password file (`~/.pgpass` format) that [`Primary::conninfo_setting`]
    /// names, readable by the server user only (libpq ignores a file others may read).
    pub(crate) fn write_passfile(&self, passfile: &Path) -> anyhow::Result<()> {
        // Any host, port and database: the primary's port changes between dev runs.
        let line = format!(
            "*:*:*:{}:{}\n",
            escape_passfile(&self.superuser),
            escape_passfile(&self.password)
        );
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(passfile)
            .with_context(|| format!("creating {}", passfile.display()))?;
        file.write_all(line.as_bytes())
            .with_context(|| format!("writing {}", passfile.display()))?;
        self.user.chown(passfile)
    }
}

/// A libpq connection-string value: `it's` → `'it\'s'`.
fn quote_conninfo(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A `~/.pgpass` field: `:` and `\` are backslash-escaped.
fn escape_passfile(field: &str) -> String {
    field.replace('\\', "\\\\").replace(':', "\\:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_connection_values() {
        let cases = [
            ("postgres", "'postgres'", "postgres"),
            ("it's", "'it\\'s'", "it's"),
            ("back\\slash", "'back\\\\slash'", "back\\\\slash"),
            ("a:b c", "'a:b c'", "a\\:b c"),
            ("", "''", ""),
        ];
        for (input, conninfo, passfile) in cases {
            assert_eq!(quote_conninfo(input), conninfo, "{input:?}");
            assert_eq!(escape_passfile(input), passfile, "{input:?}");
        }
    }
}
