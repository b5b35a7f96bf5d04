//! Frame: one tagged protocol v3 message, split off a connection's read buffer.
//!
//! Every message after startup is `tag: u8, len: i32 (counts itself), body`.
//! See PostgreSQL docs, "Message Formats" (protocol-message-formats.html).
//! The decoder never allocates: a frame is `split_to(n).freeze()` of the read
//! buffer, so a frame forwarded unchanged is the very bytes that arrived.

use bytes::{Buf, Bytes, BytesMut};

use crate::error::{Error, Result};

/// Bytes in a frame header: the tag and the length.
pub const HEADER_LEN: usize = 5;

/// The tag and declared size of a message, read before its body has arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Length of the body, excluding tag and length field.
    pub body_len: u32,
}

impl Header {
    /// Whole frame length: header plus body.
    pub fn frame_len(self) -> usize {
        HEADER_LEN + self.body_len as usize
    }

    /// Reads a header from the front of `buf` without consuming it.
    /// `Ok(None)` if fewer than five bytes are buffered.
    pub fn peek(buf: &[u8], body_bytes_max: u32) -> Result<Option<Header>> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        if len < 4 {
            return Err(Error::InvalidLength { len: len as i64 });
        }
        let body_len = len as u32 - 4;
        if body_len > body_bytes_max {
            return Err(Error::TooLarge {
                len: body_len as u64 + 4,
                max: body_bytes_max as u64 + 4,
            });
        }
        Ok(Some(Header {
            tag: buf[0],
            body_len,
        }))
    }
}

/// One complete message: tag, length and body, as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    bytes: Bytes,
}

impl Frame {
    /// Splits the next complete frame off `buf`. `Ok(None)` until it is whole.
    /// The length is checked against `body_bytes_max` before any of the body
    /// is waited for, so an oversized frame is refused before it is buffered.
    pub fn decode(buf: &mut BytesMut, body_bytes_max: u32) -> Result<Option<Frame>> {
        let Some(header) = Header::peek(buf, body_bytes_max)? else {
            return Ok(None);
        };
        let frame_len = header.frame_len();
        if buf.len() < frame_len {
            // Reserve now so the rest arrives in one buffer without regrowth.
            buf.reserve(frame_len - buf.len());
            return Ok(None);
        }
        Ok(Some(Frame {
            bytes: buf.split_to(frame_len).freeze(),
        }))
    }

    /// Wraps already-encoded frame bytes (tests, synthetic replies).
    pub fn from_bytes(bytes: Bytes) -> Result<Frame> {
        let mut probe = &bytes[..];
        if probe.len() < HEADER_LEN {
            return Err(Error::Malformed { what: "frame" });
        }
        probe.advance(1);
        let len = probe.get_i32();
        if len < 4 || len as usize + 1 != bytes.len() {
            return Err(Error::InvalidLength { len: len as i64 });
        }
        Ok(Frame { bytes })
    }

    pub fn tag(&self) -> u8 {
        self.bytes[0]
    }

    pub fn body(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// The whole frame as received, for forwarding unchanged.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.put_i32(body.len() as i32 + 4);
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn splits_whole_frames_and_waits_for_partial_ones() {
        let mut bytes = frame(b'Q', b"select 1\0");
        bytes.extend(frame(b'S', b""));
        let mut buf = BytesMut::from(&bytes[..bytes.len() - 2]);
        let first = Frame::decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(first.tag(), b'Q');
        assert_eq!(first.body(), b"select 1\0");
        assert_eq!(Frame::decode(&mut buf, 1024).unwrap(), None);
        buf.extend_from_slice(&bytes[bytes.len() - 2..]);
        let second = Frame::decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(second.tag(), b'S');
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_bad_lengths_before_buffering() {
        let cases: &[(&[u8], Error)] = &[
            (&[b'Q', 0, 0, 0, 3], Error::InvalidLength { len: 3 }),
            (
                &[b'Q', 0xff, 0xff, 0xff, 0xff],
                Error::InvalidLength { len: -1 },
            ),
            (
                &[b'Q', 0x7f, 0xff, 0xff, 0xff],
                Error::TooLarge {
                    len: 0x7fff_ffff,
                    max: 104,
                },
            ),
        ];
        for (input, expected) in cases {
            let mut buf = BytesMut::from(*input);
            assert_eq!(Frame::decode(&mut buf, 100).unwrap_err(), *expected);
        }
    }
}
