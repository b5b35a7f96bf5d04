//! Running `initdb` to create a data directory, and writing its `pg_hba.conf`.
//!
//! Shared by the test template and the persistent `shardline dev` cluster so that both get
//! the same encoding, locale and authentication defaults.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use anyhow::{bail, Context};

use crate::server_user::ServerUser;

/// One `initdb` run.
pub(crate) struct Initdb<'a> {
    pub(crate) bindir: &'a Path,
    pub(crate) user: ServerUser,
    /// Must not exist, or be empty and owned by `user`.
    pub(crate) data_dir: &'a Path,
    pub(crate) superuser: &'a str,
    pub(crate) password: &'a str,
    /// Skip fsyncing the new files: right for throwaway clusters, wrong for a dev database.
    pub(crate) no_sync: bool,
    /// Replaces the generated `pg_hba.conf` wholly (it is first-match, so appending would
    /// leave the generated lines in front of ours).
    pub(crate) pg_hba: &'a str,
}

impl Initdb<'_> {
    pub(crate) fn run(&self) -> anyhow::Result<()> {
        // initdb wants the password in a file; it must be readable by the server user and
        // must not be inside the (still empty) data directory.
        let scratch = tempfile::Builder::new()
            .prefix("shardline-testkit-initdb-")
            .tempdir()
            .context("creating a scratch dir for the initdb password file")?;
        self.user.chown(scratch.path())?;
        let pwfile = scratch.path().join("pwfile");
        fs::write(&pwfile, format!("{}\n", self.password))
            .with_context(|| format!("writing {}", pwfile.display()))?;
        self.user.chown(&pwfile)?;

        let initdb = self.bindir.join("initdb");
        let mut command = self.user.command(&initdb);
        command
            .arg("-D")
            .arg(self.data_dir)
            .arg("-U")
            .arg(self.superuser)
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .args(["-E", "UTF8", "--locale=C"])
            .env("LC_ALL", "C")
            // The server user may not be able to enter our working directory.
            .current_dir(scratch.path())
            .stdin(Stdio::null());
        if self.no_sync {
            command.arg("--no-sync");
        }
        let output = command
            .output()
            .with_context(|| format!("running {}", initdb.display()))?;
        if !output.status.success() {
            let hint = if self.user.is_switching() {
                "; as root, initdb runs as the `postgres` OS user, which must be able to \
                 traverse every parent directory"
            } else {
                ""
            };
            bail!(
                "{} -D {} failed with {}{hint}:\n{}{}",
                initdb.display(),
                self.data_dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
            );
        }

        let hba = self.data_dir.join("pg_hba.conf");
        fs::write(&hba, self.pg_hba).with_context(|| format!("writing {}", hba.display()))?;
        self.user.chown(&hba)?;
        fs::set_permissions(&hba, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod {}", hba.display()))?;
        Ok(())
    }
}
