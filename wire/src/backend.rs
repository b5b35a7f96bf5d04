//! Backend (B) messages: what a server sends, and what the proxy answers
//! clients in the server's place.
//!
//! Layouts: PostgreSQL docs, "Message Formats". Encoders append to an output
//! buffer; decoders borrow from a frame body and never panic.

use bytes::{BufMut, BytesMut};

use crate::error::{Error, Result};
use crate::read::Reader;

pub const AUTHENTICATION: u8 = b'R';
pub const PARAMETER_STATUS: u8 = b'S';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NOTIFICATION_RESPONSE: u8 = b'A';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const DATA_ROW: u8 = b'D';
pub const NO_DATA: u8 = b'n';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';

/// Transaction status in ReadyForQuery (B).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransactionStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TransactionStatus {
    pub fn decode(body: &[u8]) -> Result<Self> {
        match body {
            [b'I'] => Ok(TransactionStatus::Idle),
            [b'T'] => Ok(TransactionStatus::InTransaction),
            [b'E'] => Ok(TransactionStatus::Failed),
            _ => Err(Error::Malformed {
                what: "ReadyForQuery",
            }),
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InTransaction => b'T',
            TransactionStatus::Failed => b'E',
        }
    }
}

/// Authentication request (B) subtypes the proxy handles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication<'a> {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<&'a [u8]>,
    },
    SaslContinue {
        data: &'a [u8],
    },
    SaslFinal {
        data: &'a [u8],
    },
    /// Kerberos, GSS, SSPI: not supported towards servers.
    Other(i32),
}

impl<'a> Authentication<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(body, "Authentication");
        Ok(match r.i32()? {
            0 => Authentication::Ok,
            3 => Authentication::CleartextPassword,
            5 => {
                let s = r.take(4)?;
                Authentication::Md5Password {
                    salt: [s[0], s[1], s[2], s[3]],
                }
            }
            10 => {
                let mut mechanisms = Vec::new();
                loop {
                    let m = r.cstr()?;
                    if m.is_empty() {
                        break;
                    }
                    mechanisms.push(m);
                }
                Authentication::Sasl { mechanisms }
            }
            11 => Authentication::SaslContinue { data: r.rest() },
            12 => Authentication::SaslFinal { data: r.rest() },
            other => Authentication::Other(other),
        })
    }
}

/// ParameterStatus (B): name and value.
pub fn parameter_status(body: &[u8]) -> Result<(&[u8], &[u8])> {
    let mut r = Reader::new(body, "ParameterStatus");
    Ok((r.cstr()?, r.cstr()?))
}

/// BackendKeyData (B): process id and secret key.
pub fn backend_key_data(body: &[u8]) -> Result<(i32, i32)> {
    let mut r = Reader::new(body, "BackendKeyData");
    Ok((r.i32()?, r.i32()?))
}

/// The fields of an ErrorResponse or NoticeResponse (B) the proxy looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    pub severity: &'a [u8],
    pub code: &'a [u8],
    pub message: &'a [u8],
}

impl<'a> ErrorFields<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(body, "ErrorResponse");
        let mut fields = ErrorFields::default();
        loop {
            let kind = r.u8()?;
            if kind == 0 {
                break;
            }
            let value = r.cstr()?;
            match kind {
                b'V' => fields.severity = value,
                b'S' if fields.severity.is_empty() => fields.severity = value,
                b'C' => fields.code = value,
                b'M' => fields.message = value,
                _ => {}
            }
        }
        Ok(fields)
    }
}

/// CommandComplete (B): the command tag, without its NUL.
pub fn command_tag(body: &[u8]) -> Result<&[u8]> {
    Reader::new(body, "CommandComplete").cstr()
}

fn put_header(out: &mut BytesMut, tag: u8, body_len: usize) {
    out.put_u8(tag);
    out.put_i32(body_len as i32 + 4);
}

fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    out.put_slice(s);
    out.put_u8(0);
}

pub fn encode_authentication_ok(out: &mut BytesMut) {
    put_header(out, AUTHENTICATION, 4);
    out.put_i32(0);
}

pub fn encode_authentication_md5(out: &mut BytesMut, salt: [u8; 4]) {
    put_header(out, AUTHENTICATION, 8);
    out.put_i32(5);
    out.put_slice(&salt);
}

pub fn encode_authentication_sasl(out: &mut BytesMut, mechanism: &[u8]) {
    put_header(out, AUTHENTICATION, 4 + mechanism.len() + 2);
    out.put_i32(10);
    put_cstr(out, mechanism);
    out.put_u8(0);
}

pub fn encode_authentication_sasl_continue(out: &mut BytesMut, data: &[u8]) {
    put_header(out, AUTHENTICATION, 4 + data.len());
    out.put_i32(11);
    out.put_slice(data);
}

pub fn encode_authentication_sasl_final(out: &mut BytesMut, data: &[u8]) {
    put_header(out, AUTHENTICATION, 4 + data.len());
    out.put_i32(12);
    out.put_slice(data);
}

pub fn encode_parameter_status(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    put_header(out, PARAMETER_STATUS, name.len() + value.len() + 2);
    put_cstr(out, name);
    put_cstr(out, value);
}

pub fn encode_backend_key_data(out: &mut BytesMut, process_id: i32, secret_key: i32) {
    put_header(out, BACKEND_KEY_DATA, 8);
    out.put_i32(process_id);
    out.put_i32(secret_key);
}

pub fn encode_ready_for_query(out: &mut BytesMut, status: TransactionStatus) {
    put_header(out, READY_FOR_QUERY, 1);
    out.put_u8(status.byte());
}

pub fn encode_parse_complete(out: &mut BytesMut) {
    put_header(out, PARSE_COMPLETE, 0);
}

pub fn encode_close_complete(out: &mut BytesMut) {
    put_header(out, CLOSE_COMPLETE, 0);
}

/// NegotiateProtocolVersion (B): newest minor version supported and the
/// protocol options (`_pq_.*`) not recognised.
pub fn encode_negotiate_protocol_version(out: &mut BytesMut, minor: i32, unrecognised: &[&[u8]]) {
    let names: usize = unrecognised.iter().map(|n| n.len() + 1).sum();
    put_header(out, NEGOTIATE_PROTOCOL_VERSION, 8 + names);
    out.put_i32(minor);
    out.put_i32(unrecognised.len() as i32);
    for name in unrecognised {
        put_cstr(out, name);
    }
}

/// ErrorResponse (B) or NoticeResponse (B), chosen by `tag`, with the fields
/// PostgreSQL always sends: severity (localized and not), code, message.
pub fn encode_error(out: &mut BytesMut, tag: u8, severity: &str, code: &str, message: &str) {
    let len = 4 * 2 + severity.len() * 2 + code.len() + message.len() + 1;
    put_header(out, tag, len);
    for (kind, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        out.put_u8(kind);
        put_cstr(out, value.as_bytes());
    }
    out.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Frame;

    #[test]
    fn error_round_trips() {
        let mut out = BytesMut::new();
        encode_error(
            &mut out,
            ERROR_RESPONSE,
            "FATAL",
            "28P01",
            "password authentication failed for user \"a\"",
        );
        let frame = Frame::decode(&mut out, 1024).unwrap().unwrap();
        assert!(out.is_empty());
        let fields = ErrorFields::decode(frame.body()).unwrap();
        assert_eq!(fields.severity, b"FATAL");
        assert_eq!(fields.code, b"28P01");
        assert_eq!(
            fields.message,
            b"password authentication failed for user \"a\""
        );
    }

    #[test]
    fn authentication_requests_decode() {
        let mut out = BytesMut::new();
        encode_authentication_sasl(&mut out, b"SCRAM-SHA-256");
        encode_authentication_md5(&mut out, [1, 2, 3, 4]);
        let sasl = Frame::decode(&mut out, 1024).unwrap().unwrap();
        let md5 = Frame::decode(&mut out, 1024).unwrap().unwrap();
        assert_eq!(
            Authentication::decode(sasl.body()).unwrap(),
            Authentication::Sasl {
                mechanisms: vec![b"SCRAM-SHA-256"]
            }
        );
        assert_eq!(
            Authentication::decode(md5.body()).unwrap(),
            Authentication::Md5Password { salt: [1, 2, 3, 4] }
        );
    }
}
