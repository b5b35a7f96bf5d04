//! Frontend (F) messages: what a client sends, and how the proxy rewrites them.
//!
//! Views borrow from a frame's body; encoders append to an output buffer, so
//! renaming a prepared statement costs no allocation. Layouts: PostgreSQL docs,
//! "Message Formats".

use bytes::{BufMut, BytesMut};

use crate::error::Result;
use crate::read::Reader;

pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const CLOSE: u8 = b'C';
pub const SYNC: u8 = b'S';
pub const FLUSH: u8 = b'H';
pub const TERMINATE: u8 = b'X';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const FUNCTION_CALL: u8 = b'F';
/// PasswordMessage, SASLInitialResponse and SASLResponse share this tag.
pub const PASSWORD: u8 = b'p';

/// Describe and Close target: a prepared statement or a portal.
pub const TARGET_STATEMENT: u8 = b'S';
pub const TARGET_PORTAL: u8 = b'P';

/// Query (F): the SQL text, without its NUL.
pub fn query_text(body: &[u8]) -> Result<&[u8]> {
    Reader::new(body, "Query").cstr()
}

/// Parse (F).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    /// Everything after the name: query, NUL, parameter count and types.
    /// Two Parse messages with equal `definition` prepare the same statement.
    pub definition: &'a [u8],
}

impl<'a> Parse<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(body, "Parse");
        let name = r.cstr()?;
        let definition = r.rest();
        let query = r.cstr()?;
        let count = r.i16()?;
        r.take(4 * count.max(0) as usize)?;
        Ok(Parse {
            name,
            query,
            definition,
        })
    }
}

/// Bind (F): only the names are decoded; the rest is forwarded as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    /// Formats, parameters and result formats.
    pub rest: &'a [u8],
}

impl<'a> Bind<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(body, "Bind");
        let portal = r.cstr()?;
        let statement = r.cstr()?;
        Ok(Bind {
            portal,
            statement,
            rest: r.rest(),
        })
    }
}

/// Describe (F) or Close (F): a target kind and a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    pub kind: u8,
    pub name: &'a [u8],
}

impl<'a> Target<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(body, "Describe/Close");
        let kind = r.u8()?;
        let name = r.cstr()?;
        if !r.is_empty() || (kind != TARGET_STATEMENT && kind != TARGET_PORTAL) {
            return Err(crate::Error::Malformed {
                what: "Describe/Close",
            });
        }
        Ok(Target { kind, name })
    }
}

/// SASLInitialResponse (F): mechanism and the client-first message.
pub fn sasl_initial_response(body: &[u8]) -> Result<(&[u8], &[u8])> {
    let mut r = Reader::new(body, "SASLInitialResponse");
    let mechanism = r.cstr()?;
    let len = r.i32()?;
    let data = if len < 0 {
        &[][..]
    } else {
        r.take(len as usize)?
    };
    Ok((mechanism, data))
}

/// PasswordMessage (F): the password or md5 response, without its NUL.
pub fn password(body: &[u8]) -> Result<&[u8]> {
    Reader::new(body, "PasswordMessage").cstr()
}

fn put_header(out: &mut BytesMut, tag: u8, body_len: usize) {
    out.put_u8(tag);
    out.put_i32(body_len as i32 + 4);
}

fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    out.put_slice(s);
    out.put_u8(0);
}

/// Parse (F) with a new statement name.
pub fn encode_parse(out: &mut BytesMut, name: &[u8], definition: &[u8]) {
    put_header(out, PARSE, name.len() + 1 + definition.len());
    put_cstr(out, name);
    out.put_slice(definition);
}

/// Bind (F) with a new statement name.
pub fn encode_bind(out: &mut BytesMut, portal: &[u8], statement: &[u8], rest: &[u8]) {
    put_header(out, BIND, portal.len() + statement.len() + 2 + rest.len());
    put_cstr(out, portal);
    put_cstr(out, statement);
    out.put_slice(rest);
}

/// Describe (F) or Close (F), chosen by `tag`.
pub fn encode_target(out: &mut BytesMut, tag: u8, kind: u8, name: &[u8]) {
    put_header(out, tag, 1 + name.len() + 1);
    out.put_u8(kind);
    put_cstr(out, name);
}

/// Query (F).
pub fn encode_query(out: &mut BytesMut, sql: &[u8]) {
    put_header(out, QUERY, sql.len() + 1);
    put_cstr(out, sql);
}

/// Sync (F).
pub fn encode_sync(out: &mut BytesMut) {
    put_header(out, SYNC, 0);
}

/// Flush (F).
pub fn encode_flush(out: &mut BytesMut) {
    put_header(out, FLUSH, 0);
}

/// Terminate (F).
pub fn encode_terminate(out: &mut BytesMut) {
    put_header(out, TERMINATE, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Frame;

    #[test]
    fn rename_round_trips() {
        let mut out = BytesMut::new();
        encode_parse(&mut out, b"client_stmt", b"select $1\0\0\x01\0\0\0\x17");
        let frame = Frame::decode(&mut out, 1 << 20).unwrap().unwrap();
        let parse = Parse::decode(frame.body()).unwrap();
        assert_eq!(parse.name, b"client_stmt");
        assert_eq!(parse.query, b"select $1");

        let mut renamed = BytesMut::new();
        encode_parse(&mut renamed, b"sl_1", parse.definition);
        let renamed = Frame::decode(&mut renamed, 1 << 20).unwrap().unwrap();
        let again = Parse::decode(renamed.body()).unwrap();
        assert_eq!(
            (again.name, again.definition),
            (&b"sl_1"[..], parse.definition)
        );

        encode_bind(&mut out, b"", b"sl_1", b"\0\0\0\0\0\0");
        let bind = Frame::decode(&mut out, 1 << 20).unwrap().unwrap();
        let bind = Bind::decode(bind.body()).unwrap();
        assert_eq!(
            (bind.portal, bind.statement, bind.rest),
            (&b""[..], &b"sl_1"[..], &b"\0\0\0\0\0\0"[..])
        );

        encode_target(&mut out, DESCRIBE, TARGET_STATEMENT, b"sl_1");
        let d = Frame::decode(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!(
            Target::decode(d.body()).unwrap(),
            Target {
                kind: b'S',
                name: b"sl_1"
            }
        );
    }

    #[test]
    fn truncated_parse_is_malformed() {
        assert!(Parse::decode(b"name\0select 1\0\0\x02\0\0").is_err());
        assert!(Parse::decode(b"name").is_err());
        assert!(Target::decode(b"Xname\0").is_err());
    }
}
