//! StartupRequest (F): the untagged first packet of a connection.
//!
//! See PostgreSQL docs, "Message Formats": StartupMessage, SSLRequest,
//! GSSENCRequest and CancelRequest all start with `len: i32, code: i32`.

use bytes::{Buf, BytesMut};

use crate::error::{Error, Result};
use crate::read::Reader;

/// PostgreSQL's own cap on a startup packet (MAX_STARTUP_PACKET_LENGTH).
pub const STARTUP_BYTES_MAX: usize = 10_000;

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;
const PROTOCOL_3: u16 = 3;

/// What a client asked for in its first packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupRequest {
    SslRequest,
    GssEncRequest,
    Cancel { process_id: i32, secret_key: i32 },
    Startup(Startup),
}

/// StartupMessage (F): protocol 3.x and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    pub minor_version: u16,
    /// `(name, value)` pairs in the order sent, including `user` and `database`.
    pub params: Vec<(String, String)>,
}

impl Startup {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl StartupRequest {
    /// Splits the first packet off `buf`; `Ok(None)` until it is whole.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<StartupRequest>> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if len < 8 {
            return Err(Error::InvalidLength { len: len as i64 });
        }
        if len as usize > STARTUP_BYTES_MAX {
            return Err(Error::TooLarge {
                len: len as u64,
                max: STARTUP_BYTES_MAX as u64,
            });
        }
        if buf.len() < len as usize {
            return Ok(None);
        }
        let mut packet = buf.split_to(len as usize);
        packet.advance(4);
        let code = packet.get_i32();
        let request = match code {
            SSL_REQUEST if packet.is_empty() => StartupRequest::SslRequest,
            GSSENC_REQUEST if packet.is_empty() => StartupRequest::GssEncRequest,
            CANCEL_REQUEST if packet.len() == 8 => StartupRequest::Cancel {
                process_id: packet.get_i32(),
                secret_key: packet.get_i32(),
            },
            SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => {
                return Err(Error::Malformed { what: "startup" })
            }
            _ => {
                let major = (code >> 16) as u16;
                let minor = (code & 0xffff) as u16;
                if major != PROTOCOL_3 {
                    return Err(Error::UnsupportedProtocol { major, minor });
                }
                StartupRequest::Startup(Startup {
                    minor_version: minor,
                    params: decode_params(&packet)?,
                })
            }
        };
        Ok(Some(request))
    }
}

fn decode_params(body: &[u8]) -> Result<Vec<(String, String)>> {
    let mut reader = Reader::new(body, "startup");
    let mut params = Vec::new();
    loop {
        let name = reader.cstr()?;
        if name.is_empty() {
            break;
        }
        let value = reader.cstr()?;
        params.push((utf8(name)?, utf8(value)?));
    }
    if !reader.is_empty() {
        return Err(Error::Malformed { what: "startup" });
    }
    Ok(params)
}

fn utf8(bytes: &[u8]) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| Error::Malformed { what: "startup" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn packet(code: i32, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_i32(body.len() as i32 + 8);
        b.put_i32(code);
        b.put_slice(body);
        b
    }

    #[test]
    fn decodes_each_kind_of_first_packet() {
        let cases = [
            (packet(SSL_REQUEST, b""), StartupRequest::SslRequest),
            (packet(GSSENC_REQUEST, b""), StartupRequest::GssEncRequest),
            (
                packet(CANCEL_REQUEST, &[0, 0, 0, 7, 0, 0, 0, 9]),
                StartupRequest::Cancel {
                    process_id: 7,
                    secret_key: 9,
                },
            ),
            (
                packet(196_608, b"user\0app\0database\0db\0\0"),
                StartupRequest::Startup(Startup {
                    minor_version: 0,
                    params: vec![
                        ("user".into(), "app".into()),
                        ("database".into(), "db".into()),
                    ],
                }),
            ),
        ];
        for (mut bytes, expected) in cases {
            assert_eq!(StartupRequest::decode(&mut bytes).unwrap(), Some(expected));
            assert!(bytes.is_empty());
        }
    }

    #[test]
    fn refuses_bad_packets() {
        assert!(StartupRequest::decode(&mut packet(131_072, b"")).is_err());
        assert!(StartupRequest::decode(&mut packet(196_608, b"user\0app")).is_err());
        let mut huge = BytesMut::from(&[0x00, 0x01, 0x00, 0x00][..]);
        assert!(matches!(
            StartupRequest::decode(&mut huge),
            Err(Error::TooLarge { .. })
        ));
    }
}
