//! A running `postgres` server process: start it, wait until it accepts connections, stop it.
//!
//! Readiness comes from the server itself (the status line of `postmaster.pid`), not from a
//! sleep or a connection loop; stopping is a fast shutdown with a SIGKILL fallback. Also
//! stops servers left behind by a killed earlier run of `shardline dev`.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::server_user::ServerUser;

/// How long a server may take to become ready (crash recovery of a dev database included).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast shutdown may take before we SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Polling interval while waiting for the server to change state.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// How much of the server log to quote in errors.
const LOG_TAIL_BYTES: u64 = 4096;

/// Line 8 of `postmaster.pid` once the server accepts connections (`PM_STATUS_READY` in
/// PostgreSQL's `src/include/utils/pidfile.h`, padded with spaces there).
const PM_STATUS_READY: &str = "ready";

/// What to start.
pub(crate) struct PostmasterSpec<'a> {
    pub(crate) bindir: &'a Path,
    pub(crate) user: ServerUser,
    pub(crate) data_dir: &'a Path,
    pub(crate) socket_dir: &'a Path,
    pub(crate) log_path: &'a Path,
    pub(crate) port: u16,
    /// `-c name=value` settings, applied in order (a later one wins).
    pub(crate) settings: &'a [(String, String)],
}

/// Why a start failed; `port_in_use` says retrying on another port may help.
#[derive(Debug)]
pub(crate) struct StartFailure {
    pub(crate) port_in_use: bool,
    pub(crate) error: anyhow::Error,
}

impl From<anyhow::Error> for StartFailure {
    fn from(error: anyhow::Error) -> Self {
        Self {
            port_in_use: false,
            error,
        }
    }
}

/// A server we started and have not yet stopped.
#[derive(Debug)]
pub(crate) struct Postmaster {
    child: Child,
}

impl Postmaster {
    /// Spawns the server and blocks until it is ready (or failed, or timed out).
    pub(crate) fn start(spec: &PostmasterSpec<'_>) -> Result<Self, StartFailure> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.log_path)
            .with_context(|| format!("opening {}", spec.log_path.display()))?;
        spec.user.chown(spec.log_path)?;
        let log_offset = log
            .metadata()
            .with_context(|| format!("stat {}", spec.log_path.display()))?
            .len();
        let log_for_stderr = log
            .try_clone()
            .with_context(|| format!("duplicating the handle of {}", spec.log_path.display()))?;

        let postgres = spec.bindir.join("postgres");
        let mut command = spec.user.command(&postgres);
        command
            .arg("-D")
            .arg(spec.data_dir)
            .arg("-p")
            .arg(spec.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                spec.socket_dir.display()
            ));
        for (name, value) in spec.settings {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        command
            .env("LC_ALL", "C")
            .current_dir(spec.data_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr);
        let child = command
            .spawn()
            .with_context(|| format!("spawning {}", postgres.display()))?;
        let mut postmaster = Self { child };
        tracing::debug!(pid = postmaster.child.id(), port = spec.port, data_dir = %spec.data_dir.display(), "postgres spawned");

        match postmaster.wait_ready(spec.data_dir) {
            Ok(()) => Ok(postmaster),
            Err(error) => {
                postmaster.stop();
                let new_log = read_from(spec.log_path, log_offset);
                Err(StartFailure {
                    port_in_use: new_log.contains("Address already in use"),
                    error: error.context(format!(
                        "starting PostgreSQL on 127.0.0.1:{} with data dir {}; server log {} \
                         ends with:\n{}",
                        spec.port,
                        spec.data_dir.display(),
                        spec.log_path.display(),
                        log_tail(spec.log_path)
                    )),
                })
            }
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&mut self, data_dir: &Path) -> anyhow::Result<()> {
        let pid_file = data_dir.join("postmaster.pid");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("checking on postgres")? {
                return Err(anyhow!("postgres exited during startup with {status}"));
            }
            if pid_file_says_ready(&pid_file, self.child.id()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "postgres was not ready after {READY_TIMEOUT:?} ({} never said {PM_STATUS_READY:?})",
                    pid_file.display()
                ));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Fast shutdown (SIGINT: abort transactions, disconnect clients, checkpoint), then
    /// SIGKILL if that takes over [`STOP_TIMEOUT`]. Reaps the process either way.
    pub(crate) fn stop(&mut self) {
        let pid = self.child.id();
        match self.child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) => {}
            Err(err) => tracing::warn!(pid, %err, "checking on postgres"),
        }
        if let Err(errno) = kill(raw_pid(pid), Signal::SIGINT) {
            tracing::warn!(pid, %errno, "sending SIGINT to postgres");
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    tracing::debug!(pid, %status, "postgres stopped");
                    return;
                }
                Ok(None) => thread::sleep(POLL_INTERVAL),
                Err(err) => {
                    tracing::warn!(pid, %err, "checking on postgres");
                    break;
                }
            }
        }
        tracing::warn!(pid, "postgres did not stop after SIGINT; sending SIGKILL");
        if let Err(err) = self.child.kill() {
            tracing::warn!(pid, %err, "sending SIGKILL to postgres");
        }
        if let Err(err) = self.child.wait() {
            tracing::warn!(pid, %err, "reaping postgres");
        }
    }
}

/// Stops a server that an earlier, killed process left running on `data_dir`, so that a new
/// one can start there. Does nothing if `postmaster.pid` is missing or names a dead process.
pub(crate) fn stop_stale(data_dir: &Path) -> anyhow::Result<()> {
    let pid_file = data_dir.join("postmaster.pid");
    let text = match fs::read_to_string(&pid_file) {
        Ok(text) => text,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("reading {}", pid_file.display())),
    };
    let Some(pid) = pid_file_pid(&text) else {
        // Unparseable: postgres itself will judge the lock file.
        return Ok(());
    };
    match liveness(pid) {
        Liveness::Gone => return Ok(()),
        // postgres refuses to start while the lock file names any existing process, and
        // zombies or reused pids exist; neither is a server, so the lock file is stale.
        Liveness::Zombie => return remove_if_present(&pid_file),
        Liveness::Running if !is_postgres(pid) => return remove_if_present(&pid_file),
        Liveness::Running => {}
    }

    tracing::info!(%pid, data_dir = %data_dir.display(), "stopping a PostgreSQL left running by an earlier run");
    kill(pid, Signal::SIGINT).with_context(|| format!("sending SIGINT to postgres {pid}"))?;
    if !wait_dead(pid, READY_TIMEOUT) {
        tracing::warn!(%pid, "stale postgres did not stop after SIGINT; sending SIGKILL");
        match kill(pid, Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(errno) => return Err(anyhow!("sending SIGKILL to postgres {pid}: {errno}")),
        }
        if !wait_dead(pid, STOP_TIMEOUT) {
            return Err(anyhow!(
                "stale postgres {pid} on {} survived SIGKILL",
                data_dir.display()
            ));
        }
    }
    // A fast shutdown removes the lock file; a killed server (or one now a zombie) leaves it.
    remove_if_present(&pid_file)
}

/// The postmaster's pid from the first line of `postmaster.pid`. Only positive pids: `kill`
/// on 0 or a negative pid would signal whole process groups.
pub(crate) fn pid_file_pid(text: &str) -> Option<Pid> {
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    (pid > 0).then(|| Pid::from_raw(pid))
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {
            tracing::info!(file = %path.display(), "removed a stale lock file");
            Ok(())
        }
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", path.display())),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Liveness {
    Running,
    /// Exited but not reaped by its parent: holds no resources, yet still answers `kill 0`.
    Zombie,
    Gone,
}

fn liveness(pid: Pid) -> Liveness {
    match kill(pid, None) {
        Ok(()) | Err(Errno::EPERM) if process_state(pid) == Some('Z') => Liveness::Zombie,
        Ok(()) | Err(Errno::EPERM) => Liveness::Running,
        Err(_) => Liveness::Gone,
    }
}

/// Whether `pid` is a running process. Zombies (exited, not yet reaped by their parent) count
/// as dead: they hold no resources a new server needs.
pub(crate) fn is_alive(pid: Pid) -> bool {
    liveness(pid) == Liveness::Running
}

fn wait_dead(pid: Pid, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// The state letter from `/proc/<pid>/stat` (Linux); `None` where there is no procfs.
fn process_state(pid: Pid) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": comm may contain spaces and parentheses, so split at the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

/// Whether `pid` runs the `postgres` executable; `true` where there is no procfs to ask.
fn is_postgres(pid: Pid) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => comm.trim() == "postgres",
        Err(_) => !Path::new("/proc/self").exists(),
    }
}

/// Whether `postmaster.pid` names `pid` and says the server is ready.
fn pid_file_says_ready(pid_file: &Path, pid: u32) -> bool {
    // The server rewrites the file in place, so a read may see it half-written; that just
    // reads as "not ready yet".
    let Ok(text) = fs::read_to_string(pid_file) else {
        return false;
    };
    let mut lines = text.lines();
    let names_pid = lines.next().map(str::trim) == Some(pid.to_string().as_str());
    names_pid && lines.nth(6).map(str::trim) == Some(PM_STATUS_READY)
}

fn raw_pid(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("Linux pids fit in i32 (pid_max <= 2^22)"))
}

/// The log from byte `offset` on (lossy), or an empty string if unreadable.
fn read_from(path: &Path, offset: u64) -> String {
    let mut text = Vec::new();
    let read = File::open(path).and_then(|mut file| {
        file.seek(SeekFrom::Start(offset))?;
        file.read_to_end(&mut text)
    });
    match read {
        Ok(_) => String::from_utf8_lossy(&text).into_owned(),
        Err(_) => String::new(),
    }
}

/// The last few KiB of the server log, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    let len = fs::metadata(path).map(|meta| meta.len()).unwrap_or(0);
    let tail = read_from(path, len.saturating_sub(LOG_TAIL_BYTES));
    if tail.trim().is_empty() {
        return "(empty)".to_owned();
    }
    tail
}

/// Where a cluster keeps its server log.
pub(crate) fn log_path_in(dir: &Path) -> PathBuf {
    dir.join("postgres.log")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ready_status_from_pid_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pid_file = dir.path().join("postmaster.pid");
        let file = |pid: &str, status: &str| {
            format!("{pid}\n/data\n1700000000\n5432\n/tmp\n127.0.0.1\n  5432001   0\n{status}\n")
        };
        let cases = [
            (file("42", "ready   "), 42, true),
            (file("42", "starting"), 42, false),
            (file("42", "ready   "), 43, false),
            ("42\n/data\n".to_owned(), 42, false),
            (String::new(), 42, false),
        ];
        for (text, pid, expected) in cases {
            fs::write(&pid_file, &text).expect("write pid file");
            assert_eq!(
                pid_file_says_ready(&pid_file, pid),
                expected,
                "{text:?} pid {pid}"
            );
        }
        fs::remove_file(&pid_file).expect("remove");
        assert!(!pid_file_says_ready(&pid_file, 42));
    }

    #[test]
    fn reads_only_positive_pids() {
        let cases = [
            ("123\n/data\n", Some(123)),
            (" 7 \n", Some(7)),
            ("0\n", None),
            ("-1\n", None),
            ("abc\n", None),
            ("", None),
        ];
        for (text, expected) in cases {
            assert_eq!(pid_file_pid(text), expected.map(Pid::from_raw), "{text:?}");
        }
    }

    #[test]
    fn own_process_is_alive_and_not_postgres() {
        let me = Pid::this();
        assert!(is_alive(me));
        assert!(
            matches!(process_state(me), Some('R' | 'S')),
            "{:?}",
            process_state(me)
        );
        assert!(!is_postgres(me));
    }
}
