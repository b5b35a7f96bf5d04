//! Options for starting a [`Cluster`]: extra server settings on top of the defaults.
//!
//! Most tests want the defaults (`Cluster::start()`); a few need more connections or
//! different planner or logging settings, and `shardline dev` needs a persistent cluster.

use std::path::Path;

use crate::cluster::Cluster;

/// Builds a [`Cluster`]; from [`Cluster::builder`].
#[derive(Debug, Clone, Default)]
#[must_use = "a builder does nothing until `start` or `open_or_init`"]
pub struct ClusterBuilder {
    settings: Vec<(String, String)>,
}

impl ClusterBuilder {
    /// Adds `-c name=value` to the server's command line; it overrides the default of the
    /// same name (e.g. `max_connections`, `shared_buffers`), and a later call wins.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Starts a throwaway cluster; see [`Cluster::start`].
    pub fn start(self) -> anyhow::Result<Cluster> {
        Cluster::start_throwaway(&self.settings)
    }

    /// Opens (initialising if needed) a persistent cluster; see [`Cluster::open_or_init`].
    pub fn open_or_init(
        self,
        dir: &Path,
        port: u16,
        superuser: &str,
        password: &str,
    ) -> anyhow::Result<Cluster> {
        Cluster::open_persistent(&self.settings, dir, port, superuser, password)
    }
}
