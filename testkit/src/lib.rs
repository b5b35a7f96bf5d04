//! Real PostgreSQL clusters for tests and for `shardline dev`: initdb once, copy a template, start on free ports, stop on drop.
//!
//! End-to-end tests exercise the proxy against real servers, never mocks, so they need
//! servers that are cheap to start, isolated from each other (tests run concurrently, as
//! separate processes under cargo-nextest) and cleaned up even when a test panics.
//!
//! - [`Cluster::start`]: a throwaway server copied from a template data directory that is
//!   initdb'd once per machine (see `template.rs`), on a free 127.0.0.1 port, in
//!   `/dev/shm` when it is roomy, else the temp dir (override: [`SCRATCH_DIR_ENV`]).
//! - [`Cluster::open_or_init`]: a persistent server in a chosen directory, for `shardline dev`.
//! - [`Cluster::replica`]: a streaming replica of a running server (`pg_basebackup`),
//!   throwaway or persistent; [`Cluster::promote`] makes it a primary.
//! - [`find_bindir`]: where the `postgres` and `initdb` binaries are.
//!
//! When running as root, `initdb`, `pg_basebackup`, `pg_ctl` and `postgres` run as the
//! `postgres` OS user (the server programs refuse to run as root) and the directories they
//! use are handed to that user.

mod basebackup;
mod bindir;
mod cluster;
mod cluster_builder;
mod initdb;
mod password_encryption;
mod postmaster;
mod replica_builder;
mod scratch_root;
mod server_user;
mod template;

use std::net::{Ipv4Addr, TcpListener};

pub use bindir::{find_bindir, BINDIR_ENV};
pub use cluster::Cluster;
pub use cluster_builder::ClusterBuilder;
pub use password_encryption::PasswordEncryption;
pub use replica_builder::ReplicaBuilder;
pub use scratch_root::SCRATCH_DIR_ENV;
pub use template::{MD5_USER, TRUST_USER};

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// Another process may take it before the caller binds it; [`Cluster::start`] retries on
/// another port when that happens.
///
/// # Panics
/// If no socket can be bound on 127.0.0.1 at all (no loopback interface).
pub fn free_port() -> u16 {
    try_free_port().expect("binding 127.0.0.1:0 needs only a loopback interface")
}

pub(crate) fn try_free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}
