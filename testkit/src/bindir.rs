//! Finding the PostgreSQL server binaries (`postgres`, `initdb`, and the tools that go with
//! them) and their major version.
//!
//! Tests and `shardline dev` run a real server, so they need its binaries; distributions put
//! them in different places (Debian hides them in `/usr/lib/postgresql/<major>/bin`), hence
//! the search order below and an error that says where we looked.

use std::env;
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context};

/// Environment variable that overrides the search with an explicit directory.
pub const BINDIR_ENV: &str = "SHARDLINE_PG_BINDIR";

/// Debian's and Ubuntu's versioned install root: `<root>/<major>/bin`.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// The directory holding `postgres` and `initdb`.
///
/// Searched in order: `$SHARDLINE_PG_BINDIR` (an error if set but wrong, it was asked for
/// explicitly), each `PATH` entry holding both binaries, `pg_config --bindir`, then
/// `/usr/lib/postgresql/*/bin` with the highest major version first.
pub fn find_bindir() -> anyhow::Result<PathBuf> {
    let mut searched = Vec::new();

    match env::var_os(BINDIR_ENV) {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if has_server_binaries(&dir) {
                return Ok(dir);
            }
            bail!(
                "${BINDIR_ENV} is {}, but that directory does not hold executable `postgres` \
                 and `initdb`",
                dir.display()
            );
        }
        _ => searched.push(format!("${BINDIR_ENV} (unset)")),
    }

    let path = env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = env::split_paths(&path).find(|dir| has_server_binaries(dir)) {
        return Ok(dir);
    }
    searched.push(format!("PATH ({})", path.to_string_lossy()));

    match pg_config_bindir() {
        Some(dir) if has_server_binaries(&dir) => return Ok(dir),
        Some(dir) => searched.push(format!(
            "`pg_config --bindir` ({} has no `postgres`/`initdb`; only the client package is \
             installed?)",
            dir.display()
        )),
        None => searched.push("`pg_config --bindir` (no pg_config)".to_owned()),
    }

    if let Some(dir) = debian_bindirs()
        .into_iter()
        .find(|dir| has_server_binaries(dir))
    {
        return Ok(dir);
    }
    searched.push(format!("{DEBIAN_ROOT}/*/bin (none)"));

    Err(anyhow!(
        "no PostgreSQL server binaries (`postgres` and `initdb`) found; searched: {}. \
         Install the server (e.g. `apt-get install postgresql`) or set {BINDIR_ENV} to the \
         directory holding `postgres` and `initdb`",
        searched.join(", ")
    ))
}

/// The PostgreSQL program `name` (e.g. `pg_basebackup`, `pg_ctl`) that belongs to the server
/// in `bindir`: there, or beside the file `bindir/postgres` links to (a `PATH` dir may hold
/// links to only some of the programs, and another version's tools may refuse this server).
pub(crate) fn server_tool(bindir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let beside = bindir.join(name);
    if is_executable(&beside) {
        return Ok(beside);
    }
    let postgres = bindir.join("postgres");
    let linked = postgres
        .canonicalize()
        .ok()
        .and_then(|real| Some(real.parent()?.join(name)))
        .filter(|tool| is_executable(tool));
    linked.ok_or_else(|| {
        anyhow!(
            "no `{name}` in {} nor beside the file {} links to; install the PostgreSQL \
             client programs of the server's version (e.g. `apt-get install postgresql-client`)",
            bindir.display(),
            postgres.display()
        )
    })
}

/// The major version of the server in `bindir`, e.g. `"15"`, from `postgres --version`.
///
/// `postgres --version` is answered before the server's refuse-to-run-as-root check, so this
/// works for any user.
pub(crate) fn major_version(bindir: &Path) -> anyhow::Result<String> {
    let postgres = bindir.join("postgres");
    let output = Command::new(&postgres)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", postgres.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "{} --version failed with {}: {}{}",
            postgres.display(),
            output.status,
            text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_major_version(&text).with_context(|| {
        format!(
            "unexpected `{} --version` output: {text:?}",
            postgres.display()
        )
    })
}

/// `"postgres (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"` → `"15"`.
fn parse_major_version(version_output: &str) -> Option<String> {
    let version = version_output.split_whitespace().nth(2)?;
    let major: String = version.chars().take_while(char::is_ascii_digit).collect();
    (!major.is_empty()).then_some(major)
}

fn has_server_binaries(dir: &Path) -> bool {
    is_executable(&dir.join("postgres")) && is_executable(&dir.join("initdb"))
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn pg_config_bindir() -> Option<PathBuf> {
    let output = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !output.status.success() {
        return None;
    }
    let dir = String::from_utf8(output.stdout).ok()?;
    let dir = dir.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// `/usr/lib/postgresql/<major>/bin`, highest major first (numerically: 16 before 9.6).
fn debian_bindirs() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(DEBIAN_ROOT) else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter_map(|path| {
            let version = version_key(path.file_name()?)?;
            Some((version, path.join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

/// `"9.6"` → `[9, 6]`; `None` for names that are not versions.
fn version_key(name: &OsStr) -> Option<Vec<u32>> {
    name.to_str()?
        .split('.')
        .map(|part| part.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_major_version() {
        let cases = [
            (
                "postgres (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)\n",
                Some("15"),
            ),
            ("postgres (PostgreSQL) 17.0\n", Some("17")),
            ("postgres (PostgreSQL) 16beta1\n", Some("16")),
            ("postgres (PostgreSQL) 9.6.24\n", Some("9")),
            ("garbage", None),
            ("", None),
        ];
        for (input, expected) in cases {
            assert_eq!(
                parse_major_version(input).as_deref(),
                expected,
                "input {input:?}"
            );
        }
    }

    #[test]
    fn orders_versions_numerically() {
        let mut keys: Vec<Vec<u32>> = ["9.6", "16", "15", "10"]
            .iter()
            .filter_map(|name| version_key(OsStr::new(name)))
            .collect();
        keys.sort_by(|a, b| b.cmp(a));
        assert_eq!(keys, vec![vec![16], vec![15], vec![10], vec![9, 6]]);
        assert_eq!(version_key(OsStr::new("extension")), None);
    }

    #[test]
    fn finds_installed_server() {
        let bindir = find_bindir().expect("this machine has PostgreSQL installed");
        assert!(has_server_binaries(&bindir), "{}", bindir.display());
        for tool in ["pg_basebackup", "pg_ctl"] {
            let path = server_tool(&bindir, tool).expect("installed with the server");
            assert!(is_executable(&path), "{}", path.display());
        }
        assert!(server_tool(&bindir, "no_such_tool").is_err());
        let major = major_version(&bindir).expect("postgres --version works");
        assert!(major.parse::<u32>().is_ok(), "major version {major:?}");
    }
}
