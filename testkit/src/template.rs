//! The shared template data directory that throwaway clusters are copied from.
//!
//! `initdb` takes about a second; copying its result takes a tenth of that. Test processes
//! run concurrently (cargo-nextest runs each test as its own process), so the template is
//! created once per machine: under a file lock so only one process runs initdb, into a
//! staging dir that is renamed into place so nobody ever sees a half-made template.

use std::fs::{self, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use nix::fcntl::{Flock, FlockArg};

use crate::initdb::Initdb;
use crate::scratch_root::TEMPLATE_PREFIX;
use crate::server_user::ServerUser;

/// Bump when the template's contents change (flags, pg_hba) so old templates are not reused.
const TEMPLATE_FORMAT: u32 = 2;

/// Superuser name and password of every throwaway cluster.
pub(crate) const SUPERUSER: &str = "postgres";
pub(crate) const SUPERUSER_PASSWORD: &str = "postgres";

/// Role names with their own `pg_hba.conf` line, for testing those authentication methods.
pub const MD5_USER: &str = "md5_user";
pub const TRUST_USER: &str = "trust_user";

/// First match wins, so the per-role lines come before the generic host line. Database
/// `all` does not match replication connections (`pg_basebackup`, replicas): they have their
/// own line.
const PG_HBA: &str = "\
# Written by shardline testkit; first match wins.
# TYPE  DATABASE     USER        ADDRESS       METHOD
local   all          all                       trust
host    all          md5_user    127.0.0.1/32  md5
host    all          trust_user  127.0.0.1/32  trust
host    all          all         127.0.0.1/32  scram-sha-256
host    replication  all         127.0.0.1/32  scram-sha-256
";

/// Returns the template data directory under `root`, creating it if no process has yet.
pub(crate) fn ensure_template(
    root: &Path,
    bindir: &Path,
    major_version: &str,
    user: ServerUser,
) -> anyhow::Result<PathBuf> {
    let name = format!(
        "{TEMPLATE_PREFIX}{major_version}-v{TEMPLATE_FORMAT}-u{}",
        user.uid()
    );
    let template = root.join(&name);
    // The template only ever appears by an atomic rename, so existing means complete.
    if template.is_dir() {
        return Ok(template);
    }

    let lock_path = root.join(format!("{name}.lock"));
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    // Root and the postgres user may both run tests on one machine; both must open the lock.
    user.chown(&lock_path)?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow!("locking {}: {errno}", lock_path.display()))?;
    if template.is_dir() {
        return Ok(template);
    }

    let staging = tempfile::Builder::new()
        .prefix(&format!("{name}.staging-"))
        .tempdir_in(root)
        .with_context(|| format!("creating a staging dir in {}", root.display()))?;
    user.chown(staging.path())?;
    let data = staging.path().join("data");
    tracing::info!(template = %template.display(), "creating the PostgreSQL template with initdb");
    Initdb {
        bindir,
        user,
        data_dir: &data,
        superuser: SUPERUSER,
        password: SUPERUSER_PASSWORD,
        no_sync: true,
        pg_hba: PG_HBA,
    }
    .run()?;

    match fs::rename(&data, &template) {
        Ok(()) => Ok(template),
        // Another process that did not honour the lock won the race: use its template;
        // ours is deleted with the staging dir.
        Err(err)
            if template.is_dir()
                && matches!(
                    err.kind(),
                    ErrorKind::AlreadyExists | ErrorKind::DirectoryNotEmpty
                ) =>
        {
            Ok(template)
        }
        Err(err) => bail!(
            "renaming {} to {}: {err}",
            data.display(),
            template.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;
    use crate::bindir::{find_bindir, major_version};

    /// Concurrent first use: every caller gets the same complete template, built once.
    #[test]
    fn concurrent_callers_share_one_template() {
        let root = tempfile::tempdir().expect("temp dir");
        let user = ServerUser::current().expect("server user");
        // The server user must be able to create the staging dir's contents.
        user.chown(root.path()).expect("chown root");
        let bindir = find_bindir().expect("PostgreSQL installed");
        let major = major_version(&bindir).expect("version");

        let callers = 3;
        let barrier = Arc::new(Barrier::new(callers));
        let handles: Vec<_> = (0..callers)
            .map(|_| {
                let barrier = Arc::clone(&barrier);
                let root = root.path().to_owned();
                let bindir = bindir.clone();
                let major = major.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    ensure_template(&root, &bindir, &major, user)
                })
            })
            .collect();
        let templates: Vec<PathBuf> = handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .expect("caller thread did not panic")
                    .expect("template created")
            })
            .collect();

        assert!(
            templates.iter().all(|t| *t == templates[0]),
            "{templates:?}"
        );
        assert!(templates[0].join("PG_VERSION").is_file());
        let hba = fs::read_to_string(templates[0].join("pg_hba.conf")).expect("pg_hba.conf");
        assert_eq!(hba, PG_HBA);
        // Only the template and its lock file are left: no staging dirs.
        let mut left: Vec<String> = fs::read_dir(root.path())
            .expect("read root")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        left.sort();
        let name = templates[0]
            .file_name()
            .expect("template has a name")
            .to_string_lossy()
            .into_owned();
        assert_eq!(left, vec![name.clone(), format!("{name}.lock")]);
    }
}
