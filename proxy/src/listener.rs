//! Proxy: the listening socket, the accept loop and client login.
//!
//! Login speaks to the client exactly as PostgreSQL 15 does: SSL and GSS
//! encryption requests are declined with `N`, CancelRequests are forwarded,
//! then authentication (SCRAM-SHA-256, md5 or trust, per configured user),
//! then AuthenticationOk, ParameterStatus, BackendKeyData and ReadyForQuery.
//! Unknown users go through the same exchange as known ones and fail the same
//! way, so the reply does not reveal which users exist.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use wire::backend::{self, TransactionStatus};
use wire::{frontend, Frame, StartupRequest};

use crate::auth::{self, ScramServer};
use crate::cold::cold;
use crate::config::{AuthMethod, Config, User};
use crate::error::{Error, Result};
use crate::params;
use crate::session::{Login, Session};
use crate::shared::Shared;
use crate::workers::Workers;

/// Largest authentication message accepted (PostgreSQL: PG_MAX_AUTH_TOKEN_LENGTH is 65535).
const AUTH_MESSAGE_BYTES_MAX: u32 = 65_535;

pub struct Proxy {
    listener: TcpListener,
    shared: Arc<Shared>,
    /// The operators' HTTP listener, when configured and bound.
    metrics: Option<std::net::TcpListener>,
    /// Where sessions run.
    workers: Workers,
}

impl Proxy {
    pub async fn bind(config: Config) -> std::io::Result<Proxy> {
        let addr = config.proxy.listen;
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        // A deep accept queue: a storm of connections must not lose SYNs (each
        // lost one costs its client a one-second retransmit).
        let listener = socket.listen(config.proxy.listen_backlog)?;
        // Before the follower, which would outlive a failed bind (workers
        // stop when dropped).
        let workers = Workers::start(config.proxy.worker_threads)?;
        let follower = config.metadata.as_ref().map(|m| {
            let addr = listener.local_addr().map_or(addr, |a| a);
            crate::follower::MapFollower::start(m, addr.to_string())
        });
        // Metrics are for operators: a port in use must not keep clients out.
        let metrics = config
            .admin
            .listen
            .and_then(|addr| match crate::metrics::bind(addr) {
                Ok(listener) => Some(listener),
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "cannot listen for metrics; serving without");
                    None
                }
            });
        let shared = Arc::new(Shared::new(Arc::new(config), follower));
        if shared.follower.is_some() {
            tokio::spawn(watch_servers(Arc::downgrade(&shared)));
        }
        tokio::spawn(crate::stats::sample(Arc::downgrade(&shared)));
        tokio::spawn(close_idle_servers(Arc::downgrade(&shared)));
        Ok(Proxy {
            listener,
            shared,
            metrics,
            workers,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref()?.local_addr().ok()
    }

    /// What reloads the config from outside (SIGHUP).
    pub fn handle(&self) -> ProxyHandle {
        ProxyHandle {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// Accepts clients until `shutdown` completes or the admin console says
    /// `SHUTDOWN`, then shuts down gracefully: no new client is accepted
    /// (the listening socket closes), open transactions may finish, clients
    /// idle outside a transaction are told SQLSTATE 57P01 and disconnected.
    /// Returns once every client has gone, or at `shutdown_timeout`, when
    /// the rest are disconnected.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Proxy {
            listener,
            shared,
            metrics,
            workers,
        } = self;
        let metrics = metrics.map(|listener| {
            let max = shared.config.admin.connections_max;
            let shared = Arc::downgrade(&shared);
            tokio::spawn(crate::metrics::serve(listener, shared, max))
        });
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = shared.stop_requested.notified() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let shared = shared.clone();
                        let span = tracing::debug_span!(
                            "session",
                            client = %peer,
                            database = tracing::field::Empty,
                            user = tracing::field::Empty,
                        );
                        // DEBUG: an enabled span costs an enter and an exit
                        // per poll, about 600 instructions per transaction,
                        // and even a disabled one about 100: without DEBUG
                        // the session runs bare.
                        if span.is_disabled() {
                            workers.serve(stream, move |stream| handle(shared, stream, peer));
                        } else {
                            workers.serve(stream, move |stream| {
                                tracing::Instrument::instrument(handle(shared, stream, peer), span)
                            });
                        }
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                },
            }
        }
        drop(listener);
        shared.begin_shutdown();
        drain(&shared).await;
        if let Some(metrics) = metrics {
            metrics.abort();
        }
        drop(workers);
    }
}

/// Reloads a running proxy's config (see [`crate::reload`]).
#[derive(Clone)]
pub struct ProxyHandle {
    shared: std::sync::Weak<Shared>,
}

impl ProxyHandle {
    pub async fn reload(&self) -> std::result::Result<crate::reload::Reloaded, String> {
        let shared = self.shared.upgrade().ok_or("the proxy has stopped")?;
        crate::reload::reload(&shared)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Waits for the clients to leave, waking those idle outside a transaction
/// (their sessions then say goodbye with 57P01), up to `shutdown_timeout`.
async fn drain(shared: &Shared) {
    let timeout = shared.effective().proxy.shutdown_timeout;
    tracing::info!(?timeout, "shutting down: waiting for open transactions");
    let step = std::time::Duration::from_millis(10);
    let deadline = tokio::time::Instant::now() + timeout;
    // Logins in progress hold a client slot too.
    while shared.client_count() > 0 {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                clients = shared.client_count(),
                "shutdown_timeout passed: disconnecting the clients still connected"
            );
            shared.clients.disconnect_all();
            // A moment for their sessions to see it.
            let until = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
            while shared.client_count() > 0 && tokio::time::Instant::now() < until {
                tokio::time::sleep(step).await;
            }
            break;
        }
        let linked = (shared.pools.all().iter())
            .flat_map(|(_, pool)| pool.servers())
            .filter(|s| s.is_active())
            .map(|s| crate::clients::ClientId(s.link.load(std::sync::atomic::Ordering::Relaxed)))
            .collect();
        shared.clients.interrupt_idle(&linked);
        tokio::time::sleep(step).await;
    }
    tracing::info!("shut down");
}

async fn handle(shared: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let timeout = shared.effective().proxy.client_login_timeout;
    let failed = |e: Error| {
        (!matches!(e, Error::ClientIo(_))).then(|| {
            tracing::info!(%peer, error = %e, "client login failed");
            let mut out = BytesMut::new();
            e.encode(&mut out);
            out
        })
    };
    let login = match cold(tokio::time::timeout(timeout, login(&shared, &mut stream))).await {
        Ok(Ok(Some(LoggedIn::Client(login)))) => login,
        Ok(Ok(Some(LoggedIn::Admin {
            _slot,
            user,
            application_name,
            buf,
            out,
        }))) => {
            let served = cold(crate::admin::serve(
                &shared,
                &mut stream,
                &user,
                &application_name,
                buf,
                out,
            ));
            if let Err(e) = served.await {
                if let Some(out) = failed(e) {
                    let _ = stream.write_all(&out).await;
                }
            }
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            if let Some(out) = failed(e) {
                let _ = stream.write_all(&out).await;
            }
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "client login timed out");
            return;
        }
    };
    let (slot, (process_id, secret_key), cbuf, pool, startup_params, names) = login;
    let (database, user, application_name) = names;
    let registration = {
        use std::os::fd::AsRawFd;
        shared.clients.register(crate::clients::NewClient {
            user: user.name.clone(),
            database: database.clone(),
            peer: Some(peer),
            local: stream.local_addr().ok(),
            application_name,
            fd: stream.as_raw_fd(),
            pool: pool.id().0,
            now_us: shared.clock.now_us(),
        })
    };
    // Only now: a cancel is forwarded to the servers linked to this client.
    (shared.cancels).register(process_id, secret_key, registration.info().id);
    let span = tracing::Span::current();
    span.record("database", database.as_str());
    span.record("user", user.name.as_str());
    let session = Session::new(
        shared.clone(),
        Login {
            registration,
            client: stream,
            cbuf,
            pool,
            startup_params,
            database,
            user,
        },
    );
    if let Err(e) = session.run().await {
        match e {
            Error::ClientIo(_) => tracing::debug!(%peer, error = %e, "client connection lost"),
            e => tracing::info!(%peer, error = %e, "session ended with an error"),
        }
    }
    shared.cancels.unregister(process_id);
    drop(slot);
}

/// Closes the pools' server connections idle past `server_idle_timeout`
/// (bb8's reaper does not see them: see [`crate::pool::PoolCore`]); stops
/// with the proxy. Checks a tenth as often as the timeout, so a connection
/// is closed at most 10% late, and at least every second, so a timeout
/// `RELOAD` shortens holds from then on.
async fn close_idle_servers(shared: std::sync::Weak<Shared>) {
    loop {
        let every = match shared.upgrade() {
            Some(shared) => (shared.effective().proxy.server_idle_timeout / 10)
                .clamp(Duration::from_millis(100), Duration::from_secs(1)),
            None => return,
        };
        tokio::time::sleep(every).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let closed = shared.pools.close_idle();
        if closed > 0 {
            tracing::debug!(closed, "closed idle server connections");
        }
    }
}

/// Starts monitoring the servers of every shard as soon as the map names
/// them (not at their first statement), so the first read already knows
/// which replicas are up; stops with the proxy.
async fn watch_servers(shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(follower) = &shared.follower else {
            return;
        };
        let map = follower.map();
        for &id in map.shards.keys() {
            shared.backends.shard(id, &map);
        }
        if let Some(cache) = &shared.cache {
            cache.ensure_feeds(&map);
        }
    }
}

/// A login that succeeded: a client of a database, or of the admin console
/// (served after the login timeout, which must not cut a console session).
enum LoggedIn {
    Client(ClientLogin),
    Admin {
        _slot: crate::shared::ClientSlot,
        user: String,
        application_name: String,
        buf: BytesMut,
        out: BytesMut,
    },
}

type ClientLogin = (
    crate::shared::ClientSlot,
    // the BackendKeyData the client got: process id, secret key
    (i32, i32),
    BytesMut,
    Arc<crate::pool::Pool>,
    crate::server::ParamState,
    // database, user, application_name
    (String, Arc<User>, String),
);

async fn read_more(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<()> {
    buf.reserve(1024);
    match stream.read_buf(buf).await {
        Ok(0) if buf.is_empty() => Err(Error::ClientIo(std::io::ErrorKind::UnexpectedEof.into())),
        Ok(0) => Err(Error::Truncated),
        Ok(_) => Ok(()),
        Err(e) => Err(Error::ClientIo(e)),
    }
}

async fn read_frame(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Frame> {
    loop {
        if let Some(frame) = Frame::decode(buf, AUTH_MESSAGE_BYTES_MAX)? {
            return Ok(frame);
        }
        read_more(stream, buf).await?;
    }
}

async fn write(stream: &mut TcpStream, out: &mut BytesMut) -> Result<()> {
    stream.write_all(out).await.map_err(Error::ClientIo)?;
    out.clear();
    Ok(())
}

/// Runs startup and authentication. `Ok(None)` for connections that end
/// without a session (cancel requests).
async fn login(shared: &Arc<Shared>, stream: &mut TcpStream) -> Result<Option<LoggedIn>> {
    let mut buf = BytesMut::with_capacity(1024);
    let startup = loop {
        match StartupRequest::decode(&mut buf)? {
            None => read_more(stream, &mut buf).await?,
            Some(StartupRequest::SslRequest | StartupRequest::GssEncRequest) => {
                stream.write_all(b"N").await.map_err(Error::ClientIo)?;
            }
            Some(StartupRequest::Cancel {
                process_id,
                secret_key,
            }) => {
                crate::cancel::cancel(shared, process_id, secret_key).await;
                return Ok(None);
            }
            Some(StartupRequest::Startup(startup)) => break startup,
        }
    };
    if shared.is_stopping() {
        return Err(Error::ShuttingDown);
    }
    let slot = shared.admit_client().ok_or_else(|| Error::TooManyClients {
        max: shared.effective().proxy.max_client_connections,
    })?;
    let mut out = BytesMut::with_capacity(1024);

    // Newer clients may ask for protocol 3.x or `_pq_` options: offer 3.0, none.
    let options: Vec<&[u8]> = startup
        .params
        .iter()
        .filter(|(n, _)| n.starts_with("_pq_."))
        .map(|(n, _)| n.as_bytes())
        .collect();
    if startup.minor_version > 0 || !options.is_empty() {
        backend::encode_negotiate_protocol_version(&mut out, 0, &options);
    }
    if let Some(r) = startup.param("replication") {
        if !matches!(r, "false" | "off" | "no" | "0") {
            return Err(Error::Unsupported(
                "replication connections are not supported by Shardline".into(),
            ));
        }
    }

    let user_name = startup
        .param("user")
        .filter(|u| !u.is_empty())
        .ok_or(Error::NoUser)?
        .to_owned();
    let database_name = startup
        .param("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user_name)
        .to_owned();
    let user = shared.users.get(&user_name).cloned();
    authenticate(
        stream,
        &mut buf,
        &mut out,
        user.as_deref(),
        &user_name,
        &shared.mock_nonce,
    )
    .await?;
    let user = user.expect("authentication fails for unknown users");
    if database_name == crate::admin::DATABASE {
        if !user.admin {
            return Err(Error::NotAdmin(user_name));
        }
        let application_name = startup.param("application_name").unwrap_or_default();
        return Ok(Some(LoggedIn::Admin {
            _slot: slot,
            user: user_name,
            application_name: application_name.to_owned(),
            buf,
            out,
        }));
    }
    let database = shared
        .database(&database_name)
        .ok_or_else(|| Error::UnknownDatabase(database_name.clone()))?;
    let pool = shared.pool(database, &user);
    let server_params = pool.login_params().await?;
    let startup_params = pool.intern_params(params::from_startup(&startup.params, &server_params));

    backend::encode_authentication_ok(&mut out);
    for (name, value) in server_params.iter() {
        // The client sees its own startup values for parameters it set
        // (they are replayed on every server connection it gets), under
        // the name PostgreSQL gives an encoding.
        let value = match startup
            .params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            Some((_, v)) if name == "client_encoding" => params::canonical_encoding(v),
            Some((_, v)) => v.clone(),
            None => value.clone(),
        };
        backend::encode_parameter_status(&mut out, name.as_bytes(), value.as_bytes());
    }
    let process_id = shared.next_process_id();
    let secret_key = rand::random::<i32>();
    backend::encode_backend_key_data(&mut out, process_id, secret_key);
    backend::encode_ready_for_query(&mut out, TransactionStatus::Idle);
    write(stream, &mut out).await?;
    Ok(Some(LoggedIn::Client((
        slot,
        (process_id, secret_key),
        buf,
        pool,
        startup_params,
        (
            database.name.clone(),
            user,
            startup
                .param("application_name")
                .unwrap_or_default()
                .to_owned(),
        ),
    ))))
}

async fn authenticate(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    out: &mut BytesMut,
    user: Option<&User>,
    user_name: &str,
    mock_nonce: &[u8],
) -> Result<()> {
    let failed = || Error::AuthFailed {
        user: user_name.to_owned(),
    };
    let method = user.map_or(AuthMethod::ScramSha256, |u| u.auth);
    match method {
        AuthMethod::Trust => Ok(()),
        AuthMethod::Md5 => {
            let salt = auth::md5_salt();
            backend::encode_authentication_md5(out, salt);
            write(stream, out).await?;
            let frame = expect_password(stream, buf).await?;
            let response = frontend::password(frame.body())?;
            let secret = user.and_then(|u| u.secret.as_ref());
            match secret {
                Some(secret) if auth::md5_check(secret, user_name, salt, response) => Ok(()),
                _ => Err(failed()),
            }
        }
        AuthMethod::ScramSha256 => {
            // Unknown users get a mock exchange: it looks the same and fails.
            let mut scram = match user.and_then(|u| u.scram.clone()) {
                Some(verifier) => ScramServer::new(verifier),
                None => ScramServer::mock(user_name, mock_nonce),
            };
            backend::encode_authentication_sasl(out, auth::SCRAM_SHA_256.as_bytes());
            write(stream, out).await?;
            let frame = expect_password(stream, buf).await?;
            let (mechanism, data) = frontend::sasl_initial_response(frame.body())?;
            if mechanism != auth::SCRAM_SHA_256.as_bytes() {
                return Err(Error::AuthProtocol(
                    "client selected an invalid SASL authentication mechanism".into(),
                ));
            }
            let server_first = scram
                .client_first(data)
                .map_err(|e| scram_error(e, user_name))?;
            backend::encode_authentication_sasl_continue(out, &server_first);
            write(stream, out).await?;
            let frame = expect_password(stream, buf).await?;
            let server_final = scram
                .client_final(frame.body())
                .map_err(|e| scram_error(e, user_name))?;
            if user.is_none() {
                return Err(failed());
            }
            backend::encode_authentication_sasl_final(out, &server_final);
            Ok(())
        }
    }
}

fn scram_error(e: auth::AuthError, user_name: &str) -> Error {
    match e {
        auth::AuthError::WrongPassword => Error::AuthFailed {
            user: user_name.to_owned(),
        },
        other => Error::AuthProtocol(other.to_string()),
    }
}

async fn expect_password(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Frame> {
    let frame = read_frame(stream, buf).await?;
    if frame.tag() != frontend::PASSWORD {
        return Err(Error::AuthProtocol(format!(
            "expected password response, got message type {}",
            frame.tag()
        )));
    }
    Ok(frame)
}
