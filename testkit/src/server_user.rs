//! The OS user that runs `initdb` and `postgres`.
//!
//! Both refuse to run as root. Under root (CI containers, dev VMs) we drop to the `postgres`
//! OS user for those two programs and hand it the directories they write; otherwise they run
//! as ourselves and ownership needs no changes.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, Context};
use nix::unistd::{geteuid, Gid, Uid, User};

/// Name of the OS user we switch to when running as root.
const SERVER_OS_USER: &str = "postgres";

/// Who the server runs as: ourselves, or (when we are root) the `postgres` OS user.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServerUser {
    /// `Some` when we are root and must switch to another user.
    switch_to: Option<(Uid, Gid)>,
}

impl ServerUser {
    /// The user for this process: `postgres` if we are root, else ourselves.
    pub(crate) fn current() -> anyhow::Result<Self> {
        if !geteuid().is_root() {
            return Ok(Self { switch_to: None });
        }
        let user = User::from_name(SERVER_OS_USER)
            .with_context(|| format!("looking up the `{SERVER_OS_USER}` OS user"))?
            .ok_or_else(|| {
                anyhow!(
                    "running as root, but PostgreSQL refuses to run as root and there is no \
                     `{SERVER_OS_USER}` OS user to run it as; install the server package \
                     (`apt-get install postgresql` creates the user) or run as non-root"
                )
            })?;
        Ok(Self {
            switch_to: Some((user.uid, user.gid)),
        })
    }

    /// The uid that owns server files; part of the shared template's name so that runs as
    /// different users never share (and fail to read) one template.
    pub(crate) fn uid(&self) -> u32 {
        match self.switch_to {
            Some((uid, _)) => uid.as_raw(),
            None => geteuid().as_raw(),
        }
    }

    /// Whether we switch users, i.e. whether permission problems may come from that.
    pub(crate) fn is_switching(&self) -> bool {
        self.switch_to.is_some()
    }

    /// A command that runs `program` as this user.
    pub(crate) fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        if let Some((uid, gid)) = self.switch_to {
            // std clears supplementary groups when root sets a uid without explicit groups.
            command.uid(uid.as_raw()).gid(gid.as_raw());
        }
        command
    }

    /// Hands `path` (not recursive) to this user; a no-op when we do not switch users.
    pub(crate) fn chown(&self, path: &Path) -> anyhow::Result<()> {
        if let Some((uid, gid)) = self.switch_to {
            std::os::unix::fs::chown(path, Some(uid.as_raw()), Some(gid.as_raw()))
                .with_context(|| format!("chown {} to {SERVER_OS_USER}", path.display()))?;
        }
        Ok(())
    }
}
