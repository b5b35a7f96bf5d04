//! Where throwaway clusters and their shared template live.
//!
//! Copying the template creates ~1000 small files; on a disk filesystem under build load that
//! took 1–1.5 s per cluster here, on tmpfs 0.1 s. So clusters go to `/dev/shm` when it is a
//! roomy tmpfs, else to the temp dir. Docker's default 64 MiB `/dev/shm` fails the size check
//! (PostgreSQL also puts its dynamic shared memory there).
//!
//! A test process killed by a signal (Ctrl-C, a nextest timeout) never runs `Drop`, so its
//! cluster dirs stay behind, in RAM when on tmpfs; [`sweep_leftovers`] removes them later.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, SystemTime};

use nix::sys::statvfs::statvfs;
use nix::unistd::{access, AccessFlags};

use crate::postmaster::{is_alive, pid_file_pid};

/// Name prefix of throwaway cluster dirs; the template's name extends it.
pub(crate) const CLUSTER_DIR_PREFIX: &str = "shardline-testkit-";
pub(crate) const TEMPLATE_PREFIX: &str = "shardline-testkit-template-";

/// Dirs younger than this are left alone even without a server: another process may be
/// between creating one and starting its server.
const LEFTOVER_AGE_MIN: Duration = Duration::from_secs(15 * 60);

/// Environment variable that overrides the directory for throwaway clusters.
pub const SCRATCH_DIR_ENV: &str = "SHARDLINE_TESTKIT_DIR";

/// A memory filesystem on Linux; only used when it has this much room.
const SHM_DIR: &str = "/dev/shm";
const SHM_FREE_BYTES_MIN: u64 = 2 << 30;

/// `$SHARDLINE_TESTKIT_DIR`, else `/dev/shm` if writable with 2 GiB free, else the temp dir.
///
/// The server user must be able to traverse it; `/dev/shm` and `/tmp` are world-searchable.
pub(crate) fn scratch_root() -> PathBuf {
    if let Some(dir) = env::var_os(SCRATCH_DIR_ENV).filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir);
    }
    let shm = Path::new(SHM_DIR);
    if roomy_and_writable(shm) {
        return shm.to_owned();
    }
    env::temp_dir()
}

fn roomy_and_writable(dir: &Path) -> bool {
    let Ok(stats) = statvfs(dir) else {
        return false;
    };
    // Both are u64 on 64-bit Linux but narrower elsewhere; the casts keep those compiling.
    #[allow(clippy::unnecessary_cast)]
    let free_bytes = (stats.blocks_available() as u64).saturating_mul(stats.fragment_size() as u64);
    free_bytes >= SHM_FREE_BYTES_MIN && access(dir, AccessFlags::W_OK | AccessFlags::X_OK).is_ok()
}

/// Once per process: deletes throwaway cluster dirs in `root` whose server is gone and that
/// are older than [`LEFTOVER_AGE_MIN`]. Best effort; a dir with a live server stays (its test
/// may just be long), as does a server orphaned by SIGKILL (we only stop servers we started).
pub(crate) fn sweep_leftovers(root: &Path) {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| sweep(root));
}

fn sweep(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if !name.starts_with(CLUSTER_DIR_PREFIX) || name.starts_with(TEMPLATE_PREFIX) {
            continue;
        }
        let path = entry.path();
        if is_leftover(&path) {
            match fs::remove_dir_all(&path) {
                Ok(()) => tracing::info!(dir = %path.display(), "removed a leftover cluster dir"),
                Err(err) => {
                    tracing::debug!(dir = %path.display(), %err, "could not remove a leftover cluster dir");
                }
            }
        }
    }
}

fn is_leftover(dir: &Path) -> bool {
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return false;
    };
    let old_enough = meta
        .modified()
        .ok()
        .and_then(|modified| SystemTime::now().duration_since(modified).ok())
        .is_some_and(|age| age >= LEFTOVER_AGE_MIN);
    if !meta.is_dir() || !old_enough {
        return false;
    }
    let server_alive = fs::read_to_string(dir.join("data").join("postmaster.pid"))
        .ok()
        .and_then(|text| pid_file_pid(&text))
        .is_some_and(is_alive);
    !server_alive
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    fn make_dir(root: &Path, name: &str, age: Duration) -> PathBuf {
        let dir = root.join(name);
        fs::create_dir_all(dir.join("data")).expect("mkdir");
        let modified = SystemTime::now() - age;
        File::open(&dir)
            .and_then(|dir| dir.set_modified(modified))
            .expect("set mtime");
        dir
    }

    #[test]
    fn sweeps_only_old_dirs_without_a_live_server() {
        let root = tempfile::tempdir().expect("temp dir");
        let old = LEFTOVER_AGE_MIN + Duration::from_secs(60);
        let leftover = make_dir(root.path(), "shardline-testkit-dead01", old);
        let young = make_dir(root.path(), "shardline-testkit-young1", Duration::ZERO);
        let live = make_dir(root.path(), "shardline-testkit-live01", old);
        // Written after set_modified, so it would refresh the mtime; set it old again.
        fs::write(
            live.join("data/postmaster.pid"),
            format!("{}\n", std::process::id()),
        )
        .expect("pid file");
        File::open(&live)
            .and_then(|dir| dir.set_modified(SystemTime::now() - old))
            .expect("set mtime");
        let template = make_dir(root.path(), "shardline-testkit-template-15-v1-u0", old);
        let unrelated = make_dir(root.path(), "something-else", old);

        sweep(root.path());

        assert!(!leftover.exists(), "old dir without a server is removed");
        for kept in [young, live, template, unrelated] {
            assert!(kept.exists(), "{} must be kept", kept.display());
        }
    }
}
