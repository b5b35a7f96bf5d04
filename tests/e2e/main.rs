//! End-to-end tests: real PostgreSQL clusters (testkit) behind an in-process
//! proxy, driven by tokio-postgres, raw protocol bytes, psql and pgbench.

mod admin_console;
mod auth;
mod bench;
mod cache;
mod harness;
mod meta_cli;
mod metadata;
mod metrics;
mod pooling;
mod protocol;
mod raw;
mod replica_env;
mod replica_regressions;
mod replicas;
mod robustness;
mod routing;
mod routing_protocol;
mod sharded_env;
mod sharding;
mod tools;
