//! The targets of a `shardline dev` cluster, read from the files it keeps in
//! its directory: `shardline.toml` (rewritten on every start: the proxy's
//! port, the user and password, the home shard's port) and `meta.addr` (the
//! metadata group), so `shardline bench` with no `--target` compares the
//! dev proxy with its first shard's PostgreSQL.
//!
//! The direct target uses the shard's `postgres` database, not the proxy's
//! (`app`): with the bench table sharded, `app` on shard 0 holds only the
//! partitions it owns, while the baseline needs the whole table.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::config::Target;

/// What `shardline dev` wrote, as far as the bench needs it.
#[derive(Deserialize)]
struct DevConfig {
    proxy: ProxySection,
    users: Vec<User>,
    databases: Vec<Database>,
}

#[derive(Deserialize)]
struct ProxySection {
    listen: String,
}

#[derive(Deserialize)]
struct User {
    name: String,
    password: Option<String>,
}

#[derive(Deserialize)]
struct Database {
    name: String,
    host: Option<String>,
    port: u16,
}

/// The dev cluster's targets (`postgres`, then `shardline`) and its
/// metadata group's address, if it has one.
pub struct DevCluster {
    pub targets: Vec<Target>,
    pub meta: Vec<String>,
}

/// Reads the dev cluster in `dir`.
pub fn discover(dir: &Path) -> anyhow::Result<DevCluster> {
    let path = dir.join("shardline.toml");
    if !path.exists() {
        bail!(
            "no dev cluster in {} ({} is missing): start one with `shardline dev` \
             in another terminal, or name targets with --target NAME=URL",
            dir.display(),
            path.display()
        );
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let config: DevConfig =
        toml::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))?;
    let user = config
        .users
        .first()
        .with_context(|| format!("{} has no [[users]]", path.display()))?;
    let password = user.password.as_deref().unwrap_or("");
    let db = config
        .databases
        .first()
        .with_context(|| format!("{} has no [[databases]]", path.display()))?;
    let host = db.host.as_deref().unwrap_or("127.0.0.1");
    let meta = match std::fs::read_to_string(dir.join("meta.addr")) {
        Ok(addr) if !addr.trim().is_empty() => vec![addr.trim().to_owned()],
        _ => Vec::new(),
    };
    Ok(DevCluster {
        targets: vec![
            Target {
                name: "postgres".into(),
                url: format!(
                    "postgres://{}:{password}@{host}:{}/postgres",
                    user.name, db.port
                ),
            },
            Target {
                name: "shardline".into(),
                url: format!(
                    "postgres://{}:{password}@{}/{}",
                    user.name, config.proxy.listen, db.name
                ),
            },
        ],
        meta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_dev_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(
            format!("{:#}", discover(dir.path()).err().expect("no cluster"))
                .contains("start one with `shardline dev`")
        );
        std::fs::write(
            dir.path().join("shardline.toml"),
            "[proxy]\nlisten = \"127.0.0.1:6432\"\npool_mode = \"transaction\"\npool_size = 20\n\n\
             [[users]]\nname = \"shardline\"\npassword = \"pw\"\nadmin = true\n\n\
             [[databases]]\nname = \"app\"\nhost = \"127.0.0.1\"\nport = 5555\n\n\
             [metadata]\nendpoints = [\"127.0.0.1:7000\"]\n",
        )
        .expect("write");
        std::fs::write(dir.path().join("meta.addr"), "127.0.0.1:7000").expect("write");
        let dev = discover(dir.path()).expect("a cluster");
        let urls: Vec<(&str, &str)> = dev
            .targets
            .iter()
            .map(|t| (t.name.as_str(), t.url.as_str()))
            .collect();
        assert_eq!(
            urls,
            [
                (
                    "postgres",
                    "postgres://shardline:pw@127.0.0.1:5555/postgres"
                ),
                ("shardline", "postgres://shardline:pw@127.0.0.1:6432/app"),
            ]
        );
        assert_eq!(dev.meta, ["127.0.0.1:7000"]);
    }
}
