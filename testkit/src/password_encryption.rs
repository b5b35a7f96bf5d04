//! How a role's password is stored, which decides the authentication a server can offer.
//!
//! A role stored as MD5 can log in with `md5` (or `password`) authentication; one stored as
//! SCRAM only with `scram-sha-256`. The proxy must handle both, so tests create both.

/// The `password_encryption` setting used when a role's password is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PasswordEncryption {
    /// SCRAM-SHA-256, PostgreSQL's default since 14.
    Scram,
    /// Legacy MD5; still accepted by PostgreSQL 15 (deprecated in 18).
    Md5,
}

impl PasswordEncryption {
    /// The value for `SET password_encryption = ...`.
    pub fn setting(self) -> &'static str {
        match self {
            Self::Scram => "scram-sha-256",
            Self::Md5 => "md5",
        }
    }
}
