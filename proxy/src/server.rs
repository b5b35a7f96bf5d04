//! ServerConn: one authenticated connection to a PostgreSQL server, and what
//! the proxy knows about its session state.
//!
//! Connections are raw sockets, not tokio-postgres clients: the proxy forwards
//! client frames unchanged, so it only needs to log in and then track enough
//! state (prepared statements, session parameters, protocol position) to hand
//! the connection from one client to the next safely.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::backend::{self, Authentication};
use wire::Frame;

use crate::error::{Error, Result};

/// Where and as whom a pool logs in.
#[derive(Debug, Clone)]
pub struct ServerTarget {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: Option<String>,
    pub connect_timeout: Duration,
    pub message_bytes_max: u32,
}

/// What a client needs to cancel a query running on a server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelKey {
    pub addr: SocketAddr,
    pub process_id: i32,
    pub secret_key: i32,
}

/// The ParameterStatus values a server reported at login.
pub type ServerParams = Arc<Vec<(String, String)>>;

/// Session parameters set on a connection beyond its login defaults:
/// GUC name -> the statement that set it.
///
/// Shared and copied on write: a connection synced to a client's parameters
/// holds the client's own map, and clients that logged in with the same
/// parameters share one (see [`crate::pool::Pool::intern_params`]), so the
/// comparison on every checkout is usually a pointer comparison. Ordered, so
/// that the rest are one linear walk with no hashing.
pub type ParamState = Arc<BTreeMap<String, Arc<str>>>;

/// What the admin console shows of one server connection (`SHOW
/// SERVERS`). The pool writes the atomics at checkout and return, with
/// relaxed stores: nothing on the statement path waits for a reader.
#[derive(Debug)]
pub struct ServerInfo {
    /// Unique in the process (0 for connections no pool owns).
    pub id: u64,
    /// The server's BackendKeyData (and address): what a client's
    /// CancelRequest is forwarded with while the client holds it.
    pub cancel_key: CancelKey,
    pub local: Option<SocketAddr>,
    pub connect_time: SystemTime,
    /// [`crate::clock::Clock::now_us`] when it logged in.
    pub connected_us: u64,
    /// [`server_state`]: lent to a client or idle in its pool.
    pub state: AtomicU8,
    /// The client holding it (a [`crate::clients::ClientId`]), 0 for none.
    pub link: AtomicU64,
    /// When it was last lent ([`crate::clock::Clock::now_us`]).
    pub request_us: AtomicU64,
}

/// Values of [`ServerInfo::state`].
pub mod server_state {
    pub const IDLE: u8 = 0;
    pub const ACTIVE: u8 = 1;
}

impl ServerInfo {
    pub fn new(
        id: u64,
        cancel_key: CancelKey,
        local: Option<SocketAddr>,
        connected_us: u64,
    ) -> Self {
        ServerInfo {
            id,
            cancel_key,
            local,
            connect_time: SystemTime::now(),
            connected_us,
            state: AtomicU8::new(server_state::IDLE),
            link: AtomicU64::new(0),
            request_us: AtomicU64::new(connected_us),
        }
    }

    pub fn is_active(&self) -> bool {
        self.state.load(Ordering::Relaxed) == server_state::ACTIVE
    }
}

/// `repr(C)`, in this order: what every transaction touches (the socket,
/// its buffer, the parameters compared at checkout, the `SHOW SERVERS`
/// entry, the flags) comes first, in two cache lines.
#[repr(C)]
pub struct ServerConn {
    pub stream: TcpStream,
    /// Read buffer; frames are split off it.
    pub buf: BytesMut,
    /// Session parameters as applied on this connection.
    pub params: ParamState,
    /// What `SHOW SERVERS` shows of it.
    pub info: Arc<ServerInfo>,
    /// The worker whose reactor `stream` is registered with (see
    /// [`crate::workers`]).
    pub home: u32,
    /// Set when the protocol state is unknown; the pool then drops the connection.
    pub broken: bool,
    /// Set when the connection is fine but no longer wanted (its pool
    /// shrank, or it outlived `server_lifetime`): the pool closes it too.
    pub retire: bool,
    pub login_params: ServerParams,
    /// Content hashes of the statements prepared here under `sl_<hash>` names.
    pub prepared: PreparedSet,
    /// Its entry in its pool's list of servers, removed when it closes.
    pub registration: Option<crate::pool::ServerRegistration>,
}

impl ServerConn {
    /// Connects and logs in. Cancel-safe: dropping the future drops the socket.
    pub async fn connect(target: &ServerTarget, prepared_max: u32) -> Result<ServerConn> {
        Self::connect_with(target, prepared_max, &[]).await
    }

    /// [`ServerConn::connect`] with `extra` startup parameters after user and
    /// database, e.g. `("replication", "database")`. Cancel-safe.
    pub async fn connect_with(
        target: &ServerTarget,
        prepared_max: u32,
        extra: &[(&str, &str)],
    ) -> Result<ServerConn> {
        let unavailable = |reason: String| Error::ServerUnavailable {
            database: target.database.clone(),
            reason,
        };
        let login = async {
            let stream = TcpStream::connect((target.host.as_str(), target.port))
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            stream.set_nodelay(true).map_err(Error::ServerIo)?;
            let addr = stream.peer_addr().map_err(Error::ServerIo)?;
            Self::login(stream, addr, target, prepared_max, extra).await
        };
        match tokio::time::timeout(target.connect_timeout, login).await {
            Ok(result) => result,
            Err(_) => Err(unavailable(format!(
                "timed out after {:?}",
                target.connect_timeout
            ))),
        }
    }

    async fn login(
        mut stream: TcpStream,
        addr: SocketAddr,
        target: &ServerTarget,
        prepared_max: u32,
        extra: &[(&str, &str)],
    ) -> Result<ServerConn> {
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", target.user.as_str()),
                ("database", target.database.as_str()),
            ]
            .into_iter()
            .chain(extra.iter().copied()),
            &mut out,
        )
        .map_err(|e| Error::ServerProtocol(e.to_string()))?;
        stream.write_all(&out).await.map_err(Error::ServerIo)?;
        out.clear();

        let mut buf = BytesMut::with_capacity(crate::buffers::BUFFER_BYTES);
        let mut scram: Option<ScramSha256> = None;
        let mut params = Vec::new();
        let mut key = None;
        loop {
            let frame = read_frame(&mut stream, &mut buf, target.message_bytes_max).await?;
            match frame.tag() {
                backend::AUTHENTICATION => {
                    let password = || {
                        target.password.as_deref().ok_or_else(|| {
                            Error::ServerAuth(format!(
                                "the server asks for a password for user \"{}\" and none is configured",
                                target.user
                            ))
                        })
                    };
                    match Authentication::decode(frame.body())? {
                        Authentication::Ok => continue,
                        Authentication::CleartextPassword => {
                            frontend::password_message(password()?.as_bytes(), &mut out)
                                .map_err(|e| Error::ServerProtocol(e.to_string()))?;
                        }
                        Authentication::Md5Password { salt } => {
                            let hash = postgres_protocol::authentication::md5_hash(
                                target.user.as_bytes(),
                                password()?.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut out)
                                .map_err(|e| Error::ServerProtocol(e.to_string()))?;
                        }
                        Authentication::Sasl { mechanisms } => {
                            if !mechanisms.iter().any(|m| *m == b"SCRAM-SHA-256") {
                                return Err(Error::ServerAuth(
                                    "the server offers no SASL mechanism the proxy supports".into(),
                                ));
                            }
                            let client = ScramSha256::new(
                                password()?.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(
                                "SCRAM-SHA-256",
                                client.message(),
                                &mut out,
                            )
                            .map_err(|e| Error::ServerProtocol(e.to_string()))?;
                            scram = Some(client);
                        }
                        Authentication::SaslContinue { data } => {
                            let client = scram.as_mut().ok_or_else(|| {
                                Error::ServerProtocol("unexpected SASLContinue".into())
                            })?;
                            client
                                .update(data)
                                .map_err(|e| Error::ServerAuth(e.to_string()))?;
                            frontend::sasl_response(client.message(), &mut out)
                                .map_err(|e| Error::ServerProtocol(e.to_string()))?;
                        }
                        Authentication::SaslFinal { data } => {
                            let client = scram.as_mut().ok_or_else(|| {
                                Error::ServerProtocol("unexpected SASLFinal".into())
                            })?;
                            client
                                .finish(data)
                                .map_err(|e| Error::ServerAuth(e.to_string()))?;
                            continue;
                        }
                        Authentication::Other(code) => {
                            return Err(Error::ServerAuth(format!(
                                "unsupported authentication request {code} from the server"
                            )))
                        }
                    }
                    stream.write_all(&out).await.map_err(Error::ServerIo)?;
                    out.clear();
                }
                backend::PARAMETER_STATUS => {
                    let (name, value) = backend::parameter_status(frame.body())?;
                    params.push((
                        String::from_utf8_lossy(name).into_owned(),
                        String::from_utf8_lossy(value).into_owned(),
                    ));
                }
                backend::BACKEND_KEY_DATA => key = Some(backend::backend_key_data(frame.body())?),
                backend::ERROR_RESPONSE => {
                    let fields = backend::ErrorFields::decode(frame.body())?;
                    let message = String::from_utf8_lossy(fields.message).into_owned();
                    return Err(match fields.code {
                        b"28P01" | b"28000" => Error::ServerAuth(message),
                        _ => Error::ServerUnavailable {
                            database: target.database.clone(),
                            reason: message,
                        },
                    });
                }
                backend::NOTICE_RESPONSE | backend::NEGOTIATE_PROTOCOL_VERSION => {}
                backend::READY_FOR_QUERY => break,
                other => {
                    return Err(Error::ServerProtocol(format!(
                        "unexpected message 0x{other:02x} during login"
                    )))
                }
            }
        }
        let (process_id, secret_key) = key.unwrap_or((0, 0));
        let cancel_key = CancelKey {
            addr,
            process_id,
            secret_key,
        };
        let local = stream.local_addr().ok();
        Ok(ServerConn {
            stream,
            buf: crate::buffers::unshared(&buf),
            login_params: Arc::new(params),
            params: ParamState::default(),
            prepared: PreparedSet::new(prepared_max as usize),
            broken: false,
            retire: false,
            info: Arc::new(ServerInfo::new(0, cancel_key, local, 0)),
            registration: None,
            home: crate::workers::home(),
        })
    }

    /// Registers the socket with this thread's reactor, if another worker's
    /// has it: a connection borrowed on another worker than the one that
    /// last used it moves there, so that its wakeups stay on the thread
    /// that polls it. Costs a `dup`, an `epoll_ctl` on each side and a
    /// `close`, once per move, and the first write waits for the new
    /// reactor to report the socket writable. Only for a connection nobody
    /// is polling. If it cannot move (out of file descriptors), it stays
    /// where it is: still usable, each wakeup then crossing threads.
    pub fn settle(&mut self) {
        let here = crate::workers::home();
        if self.home == here {
            return;
        }
        // The duplicate shares the socket (and its non-blocking flag); the
        // old descriptor leaves the old reactor when the old stream drops.
        let moved = std::os::fd::AsFd::as_fd(&self.stream)
            .try_clone_to_owned()
            .and_then(|fd| TcpStream::from_std(std::net::TcpStream::from(fd)));
        match moved {
            Ok(stream) => {
                self.stream = stream;
                self.home = here;
            }
            Err(e) => tracing::debug!(error = %e, "server connection stays on its worker"),
        }
    }

    /// Whether an idle connection is still usable: not closed, and nothing
    /// pending (an idle server only talks to say it is going away). Costs no
    /// system call unless the event loop has seen the socket become readable
    /// since the last read drained it, which is exactly when something arrived.
    pub fn is_idle_and_open(&self) -> bool {
        if self.broken || !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Runs `sql` (simple protocol) on an idle connection and returns the
    /// first column of its first row as text (`None` for no row or NULL).
    pub async fn query_value(
        &mut self,
        sql: &str,
        message_bytes_max: u32,
    ) -> Result<Option<String>> {
        match self.run(sql, message_bytes_max).await? {
            (_, Some(message)) => Err(Error::ServerProtocol(message)),
            (value, None) => Ok(value),
        }
    }

    /// Runs `sql` (simple protocol) on an idle connection and discards the
    /// replies. Returns the first error message, if any. Marks the connection
    /// broken on IO or protocol errors.
    pub async fn run_discarding(
        &mut self,
        sql: &str,
        message_bytes_max: u32,
    ) -> Result<Option<String>> {
        self.run(sql, message_bytes_max)
            .await
            .map(|(_, error)| error)
    }

    /// Runs `sql` (simple protocol): the first column of the first row, and
    /// the first error message. Marks the connection broken on IO or
    /// protocol errors, or if it is left inside a transaction.
    async fn run(
        &mut self,
        sql: &str,
        message_bytes_max: u32,
    ) -> Result<(Option<String>, Option<String>)> {
        let result = self.run_inner(sql, message_bytes_max).await;
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    async fn run_inner(
        &mut self,
        sql: &str,
        message_bytes_max: u32,
    ) -> Result<(Option<String>, Option<String>)> {
        let mut out = BytesMut::new();
        wire::frontend::encode_query(&mut out, sql.as_bytes());
        self.stream.write_all(&out).await.map_err(Error::ServerIo)?;
        let (mut value, mut first_error) = (None, None);
        loop {
            let frame = read_frame(&mut self.stream, &mut self.buf, message_bytes_max).await?;
            match frame.tag() {
                backend::DATA_ROW if value.is_none() => {
                    let row = wire::rows::data_row(frame.body())?;
                    let first = row.first().copied().flatten();
                    value = Some(first.map(|v| String::from_utf8_lossy(v).into_owned()));
                }
                backend::ERROR_RESPONSE if first_error.is_none() => {
                    let fields = backend::ErrorFields::decode(frame.body())?;
                    first_error = Some(String::from_utf8_lossy(fields.message).into_owned());
                }
                backend::READY_FOR_QUERY => {
                    if backend::TransactionStatus::decode(frame.body())?
                        != backend::TransactionStatus::Idle
                    {
                        self.broken = true;
                    }
                    // Frames were split off it.
                    self.buf = crate::buffers::unshared(&self.buf);
                    return Ok((value.flatten(), first_error));
                }
                _ => {}
            }
        }
    }
}

/// Reads one whole frame. Cancel-safe: partial data stays in `buf`.
pub async fn read_frame(stream: &mut TcpStream, buf: &mut BytesMut, max: u32) -> Result<Frame> {
    loop {
        if let Some(frame) =
            Frame::decode(buf, max).map_err(|e| Error::ServerProtocol(e.to_string()))?
        {
            return Ok(frame);
        }
        buf.reserve(8192);
        let n = stream.read_buf(buf).await.map_err(Error::ServerIo)?;
        if n == 0 {
            return Err(Error::ServerIo(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// The statements prepared on one server connection, bounded: past the
/// maximum the oldest is closed to make room.
#[derive(Debug, Default)]
pub struct PreparedSet {
    names: HashSet<u64>,
    order: VecDeque<u64>,
    max: usize,
}

impl PreparedSet {
    pub fn new(max: usize) -> Self {
        PreparedSet {
            names: HashSet::new(),
            order: VecDeque::new(),
            max: max.max(1),
        }
    }

    pub fn contains(&self, hash: u64) -> bool {
        self.names.contains(&hash)
    }

    /// Records `hash`; returns the statement to close on the server, if the
    /// set was full.
    pub fn insert(&mut self, hash: u64) -> Option<u64> {
        if !self.names.insert(hash) {
            return None;
        }
        self.order.push_back(hash);
        if self.names.len() > self.max {
            let evicted = self.order.pop_front().expect("order holds every name");
            self.names.remove(&evicted);
            return Some(evicted);
        }
        None
    }

    pub fn remove(&mut self, hash: u64) {
        if self.names.remove(&hash) {
            self.order.retain(|h| *h != hash);
        }
    }

    pub fn clear(&mut self) {
        self.names.clear();
        self.order.clear();
    }
}

/// The server-side name of a statement: `sl_` and its content hash in hex.
pub fn statement_name(hash: u64) -> [u8; 19] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut name = *b"sl_0000000000000000";
    for i in 0..16 {
        name[3 + i] = HEX[((hash >> (60 - 4 * i)) & 0xf) as usize];
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_names_are_hex() {
        assert_eq!(
            &statement_name(0x0123_4567_89ab_cdef),
            b"sl_0123456789abcdef"
        );
    }

    #[test]
    fn prepared_set_evicts_oldest() {
        let mut set = PreparedSet::new(2);
        assert_eq!(set.insert(1), None);
        assert_eq!(set.insert(2), None);
        assert_eq!(set.insert(1), None);
        assert_eq!(set.insert(3), Some(1));
        assert!(!set.contains(1) && set.contains(2) && set.contains(3));
    }
}
