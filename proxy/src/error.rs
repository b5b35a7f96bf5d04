//! Error: everything that can go wrong in a client session, and the one place
//! that turns it into an ErrorResponse with the right SQLSTATE.
//!
//! Client-facing text never names server hosts, internal ids or passwords.
//! PostgreSQL's own errors never pass through here: they are forwarded as the
//! server sent them.

use std::time::Duration;

/// Who is at fault; also the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The client sent something wrong (protocol, auth, unknown database).
    Client,
    /// A server misbehaved or went away.
    Server,
    /// Capacity: pool exhausted, too many clients.
    Unavailable,
    /// A bug or an impossible state in the proxy itself.
    Internal,
}

impl Kind {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Client => "client",
            Kind::Server => "server",
            Kind::Unavailable => "unavailable",
            Kind::Internal => "internal",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid frontend message: {0}")]
    Protocol(#[from] wire::Error),
    #[error("incomplete message from client")]
    Truncated,
    #[error("unexpected message type 0x{0:02x} from the client")]
    UnexpectedMessage(u8),
    #[error("password authentication failed for user \"{user}\"")]
    AuthFailed { user: String },
    #[error("{0}")]
    AuthProtocol(String),
    #[error("database \"{0}\" does not exist")]
    UnknownDatabase(String),
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error(
        "permission denied: user \"{0}\" may not use the admin console (set admin = true for it)"
    )]
    NotAdmin(String),
    #[error("sorry, too many clients already (max_client_connections = {max})")]
    TooManyClients { max: u32 },
    #[error(
        "connection pool exhausted: no server connection for database \"{database}\" became free \
         within {waited:?} (pool_size = {pool_size}); raise pool_size or checkout_timeout, or \
         shorten transactions"
    )]
    PoolExhausted {
        database: String,
        waited: Duration,
        pool_size: u32,
    },
    #[error(
        "canceling statement: database \"{database}\" is paused (PAUSE on the admin console) and \
         was not resumed within {waited:?}"
    )]
    Paused { database: String, waited: Duration },
    #[error("could not connect to the server for database \"{database}\": {reason}")]
    ServerUnavailable { database: String, reason: String },
    #[error(
        "shard {shard}'s {role} is unavailable ({reason}); {consequence} until it is back, retry later"
    )]
    ShardUnavailable {
        shard: router::ShardId,
        role: &'static str,
        reason: String,
        consequence: &'static str,
    },
    #[error("server connection lost: {0}")]
    ServerIo(std::io::Error),
    #[error("server sent an invalid message: {0}")]
    ServerProtocol(String),
    #[error("server login failed: {0}")]
    ServerAuth(String),
    #[error("client connection lost: {0}")]
    ClientIo(std::io::Error),
    #[error("{0}")]
    Unsupported(String),
    /// A statement Shardline cannot run correctly across shards; the
    /// session carries on.
    #[error("{0}")]
    Refused(String),
    /// A COPY row the proxy cannot route (its key does not read as the key type).
    #[error("{0}")]
    CopyData(String),
    #[error("current transaction is aborted, commands ignored until end of transaction block")]
    TransactionAborted,
    #[error("the proxy is shutting down")]
    ShuttingDown,
    #[error(
        "this proxy's shard map lease has expired, so it starts no work on sharded table \"{table}\" \
         until it is current again; retry the transaction (through another proxy, or in a moment)"
    )]
    MapNotCurrent { table: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn kind(&self) -> Kind {
        match self {
            Error::Protocol(_)
            | Error::Truncated
            | Error::UnexpectedMessage(_)
            | Error::AuthFailed { .. }
            | Error::AuthProtocol(_)
            | Error::UnknownDatabase(_)
            | Error::NoUser
            | Error::NotAdmin(_)
            | Error::ClientIo(_)
            | Error::Unsupported(_)
            | Error::Refused(_)
            | Error::CopyData(_)
            | Error::TransactionAborted => Kind::Client,
            Error::ServerUnavailable { .. }
            | Error::ShardUnavailable { .. }
            | Error::ServerIo(_)
            | Error::ServerProtocol(_)
            | Error::ServerAuth(_) => Kind::Server,
            Error::TooManyClients { .. }
            | Error::PoolExhausted { .. }
            | Error::Paused { .. }
            | Error::ShuttingDown
            | Error::MapNotCurrent { .. } => Kind::Unavailable,
        }
    }

    /// Whether retrying the same statement later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind(), Kind::Unavailable | Kind::Server)
    }

    /// The SQLSTATE the client sees (PostgreSQL's errcodes.txt).
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Error::Protocol(_)
            | Error::Truncated
            | Error::UnexpectedMessage(_)
            | Error::AuthProtocol(_) => "08P01",
            Error::AuthFailed { .. } => "28P01",
            Error::NoUser => "28000",
            Error::NotAdmin(_) => "42501",
            Error::UnknownDatabase(_) => "3D000",
            Error::TooManyClients { .. } | Error::PoolExhausted { .. } => "53300",
            Error::Paused { .. } => "57014",
            Error::ServerUnavailable { .. } | Error::ServerIo(_) => "08006",
            Error::ShardUnavailable { .. } => "57P03",
            Error::ServerProtocol(_) => "08P01",
            Error::ServerAuth(_) => "08004",
            Error::ClientIo(_) => "08006",
            Error::Unsupported(_) | Error::Refused(_) => "0A000",
            Error::TransactionAborted => "25P02",
            Error::CopyData(_) => "22P04",
            Error::ShuttingDown => "57P01",
            // Retryable by the usual transaction-retry logic of drivers and ORMs.
            Error::MapNotCurrent { .. } => "40001",
        }
    }

    /// Whether the session must end after reporting this error.
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            Error::PoolExhausted { .. }
                | Error::Paused { .. }
                | Error::ServerUnavailable { .. }
                | Error::ShardUnavailable { .. }
                | Error::MapNotCurrent { .. }
                | Error::Refused(_)
                | Error::CopyData(_)
                | Error::TransactionAborted
        )
    }

    /// Appends the ErrorResponse for this error to `out`.
    pub fn encode(&self, out: &mut bytes::BytesMut) {
        let severity = if self.is_fatal() { "FATAL" } else { "ERROR" };
        wire::backend::encode_error(
            out,
            wire::backend::ERROR_RESPONSE,
            severity,
            self.sqlstate(),
            &self.to_string(),
        );
    }
}
