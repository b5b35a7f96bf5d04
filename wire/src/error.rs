//! Errors found while decoding PostgreSQL protocol bytes.
//!
//! Every variant is a protocol violation by the peer; the proxy maps them all to
//! SQLSTATE 08P01 (protocol_violation) and closes the connection.

/// A protocol violation found in the peer's bytes.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// The length field is below the minimum of 4 (it counts itself).
    #[error("invalid message length {len}")]
    InvalidLength { len: i64 },
    /// The length field exceeds the configured maximum.
    #[error("message of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    /// A message's body does not match its declared layout.
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
    /// A startup packet asked for a protocol this server does not speak.
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
