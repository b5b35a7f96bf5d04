//! `shardline`: the command line. Parses arguments and calls into the crates.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

mod admin;
mod dev;
mod meta;

#[derive(Parser)]
#[command(
    name = "shardline",
    version,
    about = "A sharded data layer for PostgreSQL"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a TOML config file.
    Proxy {
        #[arg(long)]
        config: PathBuf,
        /// Metadata node addresses (host:port, comma-separated) to follow;
        /// overrides the config file's `[metadata] endpoints`.
        #[arg(long, value_delimiter = ',')]
        meta: Vec<String>,
    },
    /// Run a local PostgreSQL and a proxy in front of it, for development.
    Dev(dev::DevArgs),
    /// Run a node of the metadata (Raft) group.
    Meta(meta::MetaArgs),
    /// Inspect and change the shard map.
    Admin(admin::AdminArgs),
    /// Load-test targets (by default the dev cluster's PostgreSQL and proxy)
    /// and compare them.
    Bench(benches::BenchArgs),
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The error and its causes on one line, as a user needs them; a
            // backtrace (RUST_BACKTRACE) tells a user nothing. Panics still
            // print theirs.
            eprintln!("shardline: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    match cli.command {
        Command::Proxy { config, meta } => {
            let mut config = proxy::Config::load(&config)
                .with_context(|| format!("loading {}", config.display()))?;
            if !meta.is_empty() {
                config.set_metadata_endpoints(meta);
            }
            // The proxy's sessions run on its own workers (`proxy::workers`):
            // this thread keeps the accept loop and the background tasks.
            runtime(true)?.block_on(run_proxy(config))
        }
        Command::Dev(args) => runtime(false)?.block_on(dev::run(args)),
        Command::Meta(args) => runtime(false)?.block_on(meta::run(args)),
        Command::Bench(args) => runtime(false)?.block_on(benches::main(args)).map(drop),
        Command::Admin(args) => match runtime(true)?.block_on(admin::run(args)) {
            Ok(()) => Ok(()),
            Err(e) => match admin::explain(&e) {
                Some(message) => {
                    eprintln!("shardline admin: {message}");
                    std::process::exit(1);
                }
                None => Err(e),
            },
        },
    }
}

/// The async runtime: one thread per core, or with `one_thread` only the
/// current one. (The proxy runs its sessions on workers of its own, each a
/// single thread: `proxy::workers`.)
fn runtime(one_thread: bool) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if one_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn run_proxy(config: proxy::Config) -> anyhow::Result<()> {
    let listen = config.proxy.listen;
    let proxy = proxy::Proxy::bind(config)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(addr = %proxy.local_addr()?, "shardline proxy listening");
    tokio::spawn(reload_on_sighup(proxy.handle()));
    proxy.run(shutdown_signal()).await;
    Ok(())
}

/// SIGHUP reloads the config file, as `RELOAD` on the admin console does.
async fn reload_on_sighup(proxy: proxy::ProxyHandle) {
    let hangup = tokio::signal::unix::SignalKind::hangup();
    let Ok(mut signals) = tokio::signal::unix::signal(hangup) else {
        tracing::warn!("cannot handle SIGHUP; use RELOAD on the admin console");
        return;
    };
    while signals.recv().await.is_some() {
        match proxy.reload().await {
            Ok(r) if !r.needs_restart.is_empty() => tracing::warn!(
                applied = ?r.applied,
                needs_restart = ?r.needs_restart,
                "SIGHUP: config reloaded; some changes need a restart"
            ),
            Ok(r) => tracing::info!(applied = ?r.applied, "SIGHUP: config reloaded"),
            Err(e) => tracing::warn!(error = %e, "SIGHUP: config not reloaded"),
        }
    }
}

/// Completes on Ctrl-C or SIGTERM (the proxy then shuts down gracefully,
/// as on `SHUTDOWN`).
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler succeeds in a normal process");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
