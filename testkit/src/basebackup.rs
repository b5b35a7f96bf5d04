//! Running `pg_basebackup` to copy a running primary into a new streaming replica's data dir.
//!
//! A replica starts as a physical copy of its primary: `-X stream` copies the WAL written
//! during the copy too, so the result is consistent on its own, and `-R` writes
//! `standby.signal`, so the copy starts in recovery and follows the primary.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;
use std::process::Stdio;

use anyhow::{bail, Context};

use crate::bindir::server_tool;
use crate::postmaster::log_path_in;
use crate::server_user::ServerUser;

/// One `pg_basebackup` run.
pub(crate) struct Basebackup<'a> {
    pub(crate) bindir: &'a Path,
    pub(crate) user: ServerUser,
    pub(crate) primary_port: u16,
    /// A superuser of the primary (replication connections need superuser or REPLICATION).
    pub(crate) superuser: &'a str,
    pub(crate) password: &'a str,
    /// Must not exist, or be empty and owned by `user`; its parent must be traversable by
    /// `user`.
    pub(crate) data_dir: &'a Path,
    /// Skip fsyncing the copy: right for throwaway clusters, wrong for a dev database.
    pub(crate) no_sync: bool,
}

impl Basebackup<'_> {
    pub(crate) fn run(&self) -> anyhow::Result<()> {
        let pg_basebackup = server_tool(self.bindir, "pg_basebackup")?;
        let mut command = self.user.command(&pg_basebackup);
        command
            .args(["-h", "127.0.0.1"])
            .arg("-p")
            .arg(self.primary_port.to_string())
            .arg("-U")
            .arg(self.superuser)
            .arg("-D")
            .arg(self.data_dir)
            .args(["-R", "-X", "stream"])
            // An immediate checkpoint: the default spreads it over minutes.
            .args(["-c", "fast"])
            // Never prompt: the password comes from the environment.
            .arg("-w")
            .env("PGPASSWORD", self.password)
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        // The server user may not be able to enter our working directory.
        if let Some(parent) = self.data_dir.parent() {
            command.current_dir(parent);
        }
        if self.no_sync {
            command.arg("--no-sync");
        }
        let output = command
            .output()
            .with_context(|| format!("running {}", pg_basebackup.display()))?;
        if !output.status.success() {
            bail!(
                "{} -p {} -D {} failed with {}:\n{}{}",
                pg_basebackup.display(),
                self.primary_port,
                self.data_dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
            );
        }

        // A persistent primary logs into its data dir, so the copy holds the primary's log;
        // the replica's own log would continue it.
        let copied_log = log_path_in(self.data_dir);
        match fs::remove_file(&copied_log) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(()),
            Err(err) => Err(err).with_context(|| format!("removing {}", copied_log.display())),
        }
    }
}
