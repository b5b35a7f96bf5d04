//! Errors of the router crate.
//!
//! Parsing is advisory for the proxy: when PostgreSQL's grammar rejects a text the
//! server will reject it too and report the error itself, so callers mostly use
//! these errors to decide to do nothing, and for logs.

/// Why a statement text could not be analysed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// PostgreSQL's grammar (via pg_query) rejected the text, or the text holds a NUL byte.
    #[error("statement text does not parse: {0}")]
    Parse(#[from] pg_query::Error),
    /// The parser reported a statement span that is not a slice of the input text;
    /// a broken invariant of pg_query, reported instead of panicking on client data.
    #[error("parser reported statement span {location}+{len} outside the {text_len}-byte text")]
    StatementSpan {
        location: i32,
        len: i32,
        text_len: usize,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
