//! `shardline`: the command line. Parses arguments and calls into the crates.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

mod dev;

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
    },
    /// Run a local PostgreSQL and a proxy in front of it, for development.
    Dev(dev::DevArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Proxy { config } => run_proxy(config).await,
            Command::Dev(args) => dev::run(args).await,
        }
    })
}

async fn run_proxy(path: PathBuf) -> anyhow::Result<()> {
    let config =
        proxy::Config::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let listen = config.proxy.listen;
    let proxy = proxy::Proxy::bind(config)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(addr = %proxy.local_addr()?, "shardline proxy listening");
    proxy.run(shutdown_signal()).await;
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler succeeds in a normal process");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
