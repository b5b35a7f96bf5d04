//! Reload: re-reads the config file the proxy started with and applies
//! what can change while it runs (`RELOAD` on the console, SIGHUP).
//!
//! Applied live: pool sizes (`[proxy] pool_size` and each database's),
//! `max_client_connections` and the timeouts (`checkout_timeout`,
//! `connect_timeout`, `client_login_timeout`, `server_lifetime`,
//! `server_idle_timeout`, `shutdown_timeout`, `pause_timeout`,
//! `[admin] stats_period`); see
//! [`crate::settings`] for which key is which. Nothing is dropped: a
//! smaller pool closes its surplus connections as they come back. Other
//! changes are reported and left for a restart. A file that does not load
//! changes nothing.

use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::settings::changes;
use crate::shared::Shared;

/// What a reload did.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Keys applied live.
    pub applied: Vec<String>,
    /// Keys that changed in the file but need a restart; still in force
    /// with their old values.
    pub needs_restart: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the proxy was not started from a config file, so there is nothing to reload")]
    NoFile,
    #[error("{0}; nothing was changed")]
    Config(#[from] ConfigError),
}

/// Reads the config file again and applies what can change live.
pub async fn reload(shared: &Shared) -> Result<Reloaded, ReloadError> {
    let _one_at_a_time = shared.reloading.lock().await;
    let path = shared.config.path.clone().ok_or(ReloadError::NoFile)?;
    let mut new = tokio::task::spawn_blocking(move || Config::load(&path))
        .await
        .map_err(|e| ConfigError::Invalid(format!("reading the file failed: {e}")))??;
    let current = shared.effective();
    if current.metadata_from_flag {
        // `--meta` on the command line still wins over the file.
        new.metadata = current.metadata.clone();
        new.metadata_from_flag = true;
    }
    let found = changes(&current, &new);
    let mut next = (*current).clone();
    {
        let (p, n) = (&mut next.proxy, &new.proxy);
        p.pool_size = n.pool_size;
        p.max_client_connections = n.max_client_connections;
        p.checkout_timeout = n.checkout_timeout;
        p.connect_timeout = n.connect_timeout;
        p.client_login_timeout = n.client_login_timeout;
        p.server_lifetime = n.server_lifetime;
        p.server_idle_timeout = n.server_idle_timeout;
        p.shutdown_timeout = n.shutdown_timeout;
        p.pause_timeout = n.pause_timeout;
    }
    next.admin.stats_period = new.admin.stats_period;
    for database in &mut next.databases {
        if let Some(d) = new.databases.iter().find(|d| d.name == database.name) {
            database.pool_size = d.pool_size;
        }
    }
    let next = Arc::new(next);
    shared.set_effective(next.clone());
    for (_, pool) in shared.pools.all() {
        pool.apply(&Shared::live_settings(&next, &pool.database));
    }
    let (applied, needs_restart): (Vec<_>, Vec<_>) = found.into_iter().partition(|c| c.changeable);
    let reloaded = Reloaded {
        applied: applied.into_iter().map(|c| c.key).collect(),
        needs_restart: needs_restart.into_iter().map(|c| c.key).collect(),
    };
    tracing::info!(applied = ?reloaded.applied, needs_restart = ?reloaded.needs_restart, "config reloaded");
    Ok(reloaded)
}
