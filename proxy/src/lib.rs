//! The client-facing PostgreSQL endpoint: sessions, authentication, server
//! pools and transaction pooling.
//!
//! [`Proxy`] accepts clients; each runs a [`session::Session`] that borrows a
//! server connection from a [`pool::Pool`] per transaction (or per session)
//! and forwards frames between the two.

pub mod admin;
pub mod auth;
pub mod backends;
pub mod buffers;
pub mod cancel;
pub mod changes;
pub mod clients;
pub mod clock;
mod cold;
pub mod config;
pub mod error;
pub mod follower;
mod listener;
pub mod metrics;
pub mod params;
pub mod pending;
pub mod pool;
mod quote;
pub mod reload;
pub mod result_cache;
pub mod scatter;
pub mod server;
pub mod session;
pub mod settings;
pub mod shared;
pub mod slo;
pub mod statement_stats;
pub mod stats;
pub mod workers;

pub use config::Config;
pub use error::{Error, Result};
pub use listener::{Proxy, ProxyHandle};
