//! Harness: one PostgreSQL cluster and one proxy in front of it per test.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::{Cluster, PasswordEncryption};
use tokio::sync::oneshot;
use tokio_postgres::{Client, NoTls};

/// Plain-text password of the `app` user (SCRAM towards the proxy).
pub const APP_PASSWORD: &str = "app-secret";

pub struct Env {
    pub pg: Cluster,
    pub addr: SocketAddr,
    /// The metrics listener, when the config has an `[admin]` section.
    pub metrics: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
}

pub struct Options {
    pub pool_size: u32,
    pub pool_mode: &'static str,
    /// Session workers. The default, 2, is more than a 2-CPU machine's
    /// own default of one, so the tests also cover sessions on different
    /// threads sharing a pool.
    pub worker_threads: u32,
    /// Extra lines for the `[proxy]` section.
    pub proxy_extra: String,
}

impl Options {
    /// The `[proxy]` section of a test config: any port, these pool and
    /// worker settings.
    pub fn proxy_section(&self) -> String {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\npool_size = {}\npool_mode = \"{}\"\nworker_threads = {}\n{}\n",
            self.pool_size, self.pool_mode, self.worker_threads, self.proxy_extra
        )
    }
}

/// A PostgreSQL client tool (`psql`, `pgbench`) with `PGPASSWORD` set to
/// the `app` user's password.
pub fn tool(name: &str) -> Command {
    // The server's bindir has the client tools too, unless only server binaries were linked there.
    let bindir = testkit::find_bindir().expect("PostgreSQL binaries");
    let path = bindir.join(name);
    let mut cmd = Command::new(if path.exists() { path } else { name.into() });
    cmd.env("PGPASSWORD", APP_PASSWORD).env_remove("PGSERVICE");
    cmd
}

/// Starts an in-process proxy with `config`; it runs until the sender is
/// dropped or used.
pub async fn start_proxy(config: &str) -> (SocketAddr, oneshot::Sender<()>) {
    let (addr, _, stop) = start_proxy_with_metrics(config).await;
    (addr, stop)
}

/// [`start_proxy`], also giving the metrics listener's address. Without an
/// `[admin]` section in `config` there is none (tests running side by side
/// would all want the default port).
pub async fn start_proxy_with_metrics(
    config: &str,
) -> (SocketAddr, Option<SocketAddr>, oneshot::Sender<()>) {
    let mut parsed = proxy::Config::parse(config).expect("test config is valid");
    if !config.contains("[admin]") {
        parsed.admin.listen = None;
    }
    let proxy = proxy::Proxy::bind(parsed).await.expect("bind");
    let addr = proxy.local_addr().expect("addr");
    let metrics = proxy.metrics_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(proxy.run(async {
        let _ = stopped.await;
    }));
    (addr, metrics, stop)
}

/// A tokio-postgres client through the proxy at `addr`.
pub async fn connect(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
) -> Result<Client, tokio_postgres::Error> {
    let url = format!(
        "postgres://{user}:{password}@127.0.0.1:{}/{db}",
        addr.port()
    );
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

impl Default for Options {
    fn default() -> Self {
        Options {
            pool_size: 4,
            pool_mode: "transaction",
            worker_threads: 2,
            proxy_extra: String::new(),
        }
    }
}

impl Env {
    pub async fn start() -> Env {
        Env::with(Options::default()).await
    }

    pub async fn with(options: Options) -> Env {
        let pg = tokio::task::spawn_blocking(|| {
            Cluster::builder().setting("max_connections", "100").start()
        })
        .await
        .expect("join")
        .expect("PostgreSQL starts");
        pg.create_role("md5_user", "md5-pass", PasswordEncryption::Md5)
            .await
            .expect("md5 role");
        pg.create_role("trust_user", "unused", PasswordEncryption::Scram)
            .await
            .expect("trust role");
        pg.create_role("scram_user", "scram-pass", PasswordEncryption::Scram)
            .await
            .expect("scram role");
        let verifier = postgres_protocol::password::scram_sha_256(b"verifier-pass");
        let md5_stored = postgres_protocol::password::md5(b"md5-client-pass", "md5_client_stored");
        let config = format!(
            r#"
{proxy}
[[users]]
name = "app"
password = "{APP_PASSWORD}"

[[users]]
name = "app_verifier"
password = "{verifier}"
auth = "scram-sha-256"

[[users]]
name = "md5_client"
password = "md5-client-pass"
auth = "md5"

[[users]]
name = "md5_client_stored"
password = "{md5_stored}"
auth = "md5"

[[users]]
name = "trusted"
auth = "trust"

[[databases]]
name = "db"
port = {port}
dbname = "postgres"
server_user = "postgres"
server_password = "postgres"

[[databases]]
name = "db_md5"
port = {port}
dbname = "postgres"
server_user = "md5_user"
server_password = "md5-pass"

[[databases]]
name = "db_trust"
port = {port}
dbname = "postgres"
server_user = "trust_user"

[[databases]]
name = "db_scram"
port = {port}
dbname = "postgres"
server_user = "scram_user"
server_password = "scram-pass"
"#,
            proxy = options.proxy_section(),
            port = pg.port(),
        );
        let (addr, metrics, stop) = start_proxy_with_metrics(&config).await;
        Env {
            pg,
            addr,
            metrics,
            stop: Some(stop),
        }
    }

    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{db}",
            self.addr.port()
        )
    }

    /// A tokio-postgres client through the proxy as `app` on `db`.
    pub async fn client(&self) -> Client {
        self.connect_as("app", APP_PASSWORD, "db")
            .await
            .expect("connect through the proxy")
    }

    pub async fn connect_as(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        connect(self.addr, user, password, db).await
    }

    /// A direct superuser connection to PostgreSQL, bypassing the proxy.
    pub async fn direct(&self) -> Client {
        self.pg.connect().await.expect("direct connection")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The SQLSTATE of a tokio-postgres error, or a description of why there is none.
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map_or_else(|| format!("no SQLSTATE: {e}"), |c| c.code().to_owned())
}
