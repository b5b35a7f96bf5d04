//! pgoutput: the logical replication stream of a shard primary, decoded
//! (walsender CopyData payloads and the `pgoutput` plugin's messages, protocol
//! version 1), and the client's standby status update, encoded.
//!
//! The cache must drop results whose rows changed, including rows written past
//! the proxy, directly on PostgreSQL; the proxy learns of those from this stream
//! (`proxy::changes` does the IO). Sans-IO like `wire`: bytes in, values out,
//! and no input makes it panic (a proptest feeds it arbitrary bytes).
//!
//! Formats: PostgreSQL docs, "Streaming Replication Protocol"
//! (protocol-replication.html) and "Logical Replication Message Formats"
//! (protocol-logicalrep-message-formats.html).

use std::time::{SystemTime, UNIX_EPOCH};

/// A failure to decode bytes the server sent: a protocol mismatch, never a
/// state the stream can recover from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated {what}")]
    Truncated { what: &'static str },
    #[error("unknown {what} tag 0x{tag:02x}")]
    UnknownTag { what: &'static str, tag: u8 },
    #[error("invalid {what}")]
    Invalid { what: &'static str },
    #[error("{extra} unexpected bytes after {what}")]
    TrailingBytes { what: &'static str, extra: usize },
}

pub type Result<T, E = DecodeError> = std::result::Result<T, E>;

/// CopyData payload tags of the streaming replication protocol.
pub const XLOG_DATA: u8 = b'w';
pub const PRIMARY_KEEPALIVE: u8 = b'k';
pub const STANDBY_STATUS_UPDATE: u8 = b'r';

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00 UTC).
const PG_EPOCH_UNIX_SECONDS: u64 = 946_684_800;

/// A CopyData payload the server sends once streaming has started (B).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationMessage<'a> {
    /// XLogData: `data` is one pgoutput message, see [`LogicalMessage`].
    XLogData {
        wal_start: u64,
        wal_end: u64,
        /// Server clock, microseconds since 2000-01-01.
        send_time: i64,
        data: &'a [u8],
    },
    /// Primary keepalive message: the server's WAL end; it wants a standby
    /// status update soon if `reply_requested`.
    Keepalive {
        wal_end: u64,
        send_time: i64,
        reply_requested: bool,
    },
}

impl<'a> ReplicationMessage<'a> {
    /// Decodes the payload of one CopyData message.
    pub fn decode(payload: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(payload, "replication message");
        match r.u8()? {
            XLOG_DATA => {
                let mut r = Reader::new(r.rest(), "XLogData");
                let wal_start = r.u64()?;
                let wal_end = r.u64()?;
                let send_time = r.i64()?;
                Ok(ReplicationMessage::XLogData {
                    wal_start,
                    wal_end,
                    send_time,
                    data: r.rest(),
                })
            }
            PRIMARY_KEEPALIVE => {
                let mut r = Reader::new(r.rest(), "primary keepalive");
                let message = ReplicationMessage::Keepalive {
                    wal_end: r.u64()?,
                    send_time: r.i64()?,
                    reply_requested: r.u8()? != 0,
                };
                r.finish()?;
                Ok(message)
            }
            tag => Err(DecodeError::UnknownTag {
                what: "replication message",
                tag,
            }),
        }
    }
}

/// Standby status update (F): how far the client has processed the stream.
/// The server may recycle WAL up to `flushed` (for a logical slot, the slot's
/// confirmed position).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatusUpdate {
    pub written: u64,
    pub flushed: u64,
    pub applied: u64,
    /// Client clock, microseconds since 2000-01-01 (see [`pg_timestamp`]).
    pub clock: i64,
    /// Asks the server to answer with a keepalive right away.
    pub reply_requested: bool,
}

impl StandbyStatusUpdate {
    /// Bytes in the encoded payload.
    pub const LEN: usize = 1 + 8 * 4 + 1;

    /// The CopyData payload (not the CopyData frame around it).
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0] = STANDBY_STATUS_UPDATE;
        out[1..9].copy_from_slice(&self.written.to_be_bytes());
        out[9..17].copy_from_slice(&self.flushed.to_be_bytes());
        out[17..25].copy_from_slice(&self.applied.to_be_bytes());
        out[25..33].copy_from_slice(&self.clock.to_be_bytes());
        out[33] = u8::from(self.reply_requested);
        out
    }
}

/// `time` as PostgreSQL's wire timestamp: microseconds since 2000-01-01 UTC.
pub fn pg_timestamp(time: SystemTime) -> i64 {
    let pg_epoch = UNIX_EPOCH + std::time::Duration::from_secs(PG_EPOCH_UNIX_SECONDS);
    match time.duration_since(pg_epoch) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |us| -us),
    }
}

/// Parses an LSN as PostgreSQL prints it (`pg_lsn`): two hex numbers of at most
/// 8 digits, `16/B374D848`.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    let half = |s: &str| {
        if s.is_empty() || s.len() > 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(s, 16).ok()
    };
    Some((u64::from(half(high)?) << 32) | u64::from(half(low)?))
}

/// Formats an LSN as PostgreSQL prints it: `16/B374D848`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// A table as pgoutput describes it, sent before the first change to it in a
/// session and again after its definition changed. With
/// `publish_via_partition_root` a partition's changes carry its root's
/// description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    /// Namespace; pgoutput sends `pg_catalog` as the empty string.
    pub schema: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

/// What an old tuple (Update, Delete) holds: the table's `REPLICA IDENTITY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// The primary key.
    Default,
    /// Nothing: no old tuple at all.
    Nothing,
    /// Every column.
    Full,
    /// The columns of a chosen unique index.
    Index,
}

/// One column of a [`Relation`], in table order (dropped and generated columns
/// are not sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Part of the replica identity: present in a key-only old tuple.
    pub key: bool,
}

/// A row: one value per column of its [`Relation`], in the same order.
pub type Tuple = Vec<Value>;

/// One column value of a [`Tuple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL; also every non-key column of a key-only old tuple.
    Null,
    /// An unchanged TOASTed value the server did not send (new tuple of an
    /// Update that did not touch it).
    Unchanged,
    /// The value in its text output format.
    Text(Vec<u8>),
    /// The value in its binary format (protocol version 2 and later only).
    Binary(Vec<u8>),
}

impl Value {
    /// The bytes of a text or binary value.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Text(bytes) | Value::Binary(bytes) => Some(bytes),
            Value::Null | Value::Unchanged => None,
        }
    }
}

/// One pgoutput message (protocol version 1), the data of an XLogData.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    /// A transaction's changes follow; it commits at `final_lsn`.
    Begin {
        final_lsn: u64,
        commit_time: i64,
        xid: u32,
    },
    /// The transaction's changes are complete. `end_lsn` is the end of its
    /// commit record: the position from which streaming would resume after it.
    Commit {
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    Relation(Relation),
    Insert {
        relation: u32,
        new: Tuple,
    },
    /// `old` is sent only when the replica identity is FULL (every column) or
    /// the update changed a replica identity column (key columns only, the
    /// others Null).
    Update {
        relation: u32,
        old: Option<Tuple>,
        new: Tuple,
    },
    /// `old` holds the replica identity: key columns only (the others Null)
    /// or, for REPLICA IDENTITY FULL, every column.
    Delete {
        relation: u32,
        old: Tuple,
    },
    Truncate {
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// Origin 'O', Type 'Y' or Message 'M': checked and skipped. Holds the tag.
    Other(u8),
}

impl LogicalMessage {
    /// Decodes one whole pgoutput message; bytes after it are an error.
    pub fn decode(data: &[u8]) -> Result<Self> {
        let mut r = Reader::new(data, "pgoutput message");
        let tag = r.u8()?;
        let mut r = Reader::new(r.rest(), message_name(tag));
        let message = match tag {
            b'B' => LogicalMessage::Begin {
                final_lsn: r.u64()?,
                commit_time: r.i64()?,
                xid: r.u32()?,
            },
            b'C' => {
                let _flags = r.u8()?; // unused, always 0
                LogicalMessage::Commit {
                    commit_lsn: r.u64()?,
                    end_lsn: r.u64()?,
                    commit_time: r.i64()?,
                }
            }
            b'O' => {
                r.u64()?; // origin's commit LSN
                r.cstr()?; // origin name
                LogicalMessage::Other(tag)
            }
            b'Y' => {
                r.u32()?; // type oid
                r.cstr()?; // namespace
                r.cstr()?; // name
                LogicalMessage::Other(tag)
            }
            b'M' => {
                r.u8()?; // flags (transactional)
                r.u64()?; // LSN
                r.cstr()?; // prefix
                let len = r.len()?;
                r.take(len)?;
                LogicalMessage::Other(tag)
            }
            b'R' => LogicalMessage::Relation(relation(&mut r)?),
            b'I' => {
                let relation = r.u32()?;
                r.expect(b'N')?;
                LogicalMessage::Insert {
                    relation,
                    new: tuple(&mut r)?,
                }
            }
            b'U' => {
                let relation = r.u32()?;
                let old = match r.u8()? {
                    b'K' | b'O' => {
                        let old = tuple(&mut r)?;
                        r.expect(b'N')?;
                        Some(old)
                    }
                    b'N' => None,
                    tag => {
                        return Err(DecodeError::UnknownTag {
                            what: "Update tuple",
                            tag,
                        })
                    }
                };
                LogicalMessage::Update {
                    relation,
                    old,
                    new: tuple(&mut r)?,
                }
            }
            b'D' => {
                let relation = r.u32()?;
                match r.u8()? {
                    b'K' | b'O' => {}
                    tag => {
                        return Err(DecodeError::UnknownTag {
                            what: "Delete tuple",
                            tag,
                        })
                    }
                }
                LogicalMessage::Delete {
                    relation,
                    old: tuple(&mut r)?,
                }
            }
            b'T' => {
                let count = r.len()?;
                let options = r.u8()?;
                // No allocation sized by the peer before its bytes are here.
                if r.remaining() < count.saturating_mul(4) {
                    return Err(r.truncated());
                }
                let relations = (0..count).map(|_| r.u32()).collect::<Result<_>>()?;
                LogicalMessage::Truncate {
                    relations,
                    cascade: options & 1 != 0,
                    restart_identity: options & 2 != 0,
                }
            }
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "pgoutput message",
                    tag,
                })
            }
        };
        r.finish()?;
        Ok(message)
    }
}

fn message_name(tag: u8) -> &'static str {
    match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'Y' => "Type",
        b'M' => "Message",
        b'R' => "Relation",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        _ => "pgoutput message",
    }
}

fn relation(r: &mut Reader<'_>) -> Result<Relation> {
    let oid = r.u32()?;
    let schema = r.string()?;
    let name = r.string()?;
    let replica_identity = match r.u8()? {
        b'd' => ReplicaIdentity::Default,
        b'n' => ReplicaIdentity::Nothing,
        b'f' => ReplicaIdentity::Full,
        b'i' => ReplicaIdentity::Index,
        tag => {
            return Err(DecodeError::UnknownTag {
                what: "replica identity",
                tag,
            })
        }
    };
    let count = r.count()?;
    let mut columns = Vec::with_capacity(count);
    for _ in 0..count {
        let flags = r.u8()?;
        columns.push(Column {
            key: flags & 1 != 0,
            name: r.string()?,
            type_oid: r.u32()?,
            type_modifier: r.i32()?,
        });
    }
    Ok(Relation {
        oid,
        schema,
        name,
        replica_identity,
        columns,
    })
}

/// TupleData: a column count, then each column's kind and value.
fn tuple(r: &mut Reader<'_>) -> Result<Tuple> {
    let count = r.count()?;
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        values.push(match r.u8()? {
            b'n' => Value::Null,
            b'u' => Value::Unchanged,
            b't' => {
                let len = r.len()?;
                Value::Text(r.take(len)?.to_vec())
            }
            b'b' => {
                let len = r.len()?;
                Value::Binary(r.take(len)?.to_vec())
            }
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "TupleData column",
                    tag,
                })
            }
        });
    }
    Ok(values)
}

/// Bounds-checked big-endian reads; every failure is an error, never a panic.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    fn truncated(&self) -> DecodeError {
        DecodeError::Truncated { what: self.what }
    }

    fn rest(&self) -> &'a [u8] {
        self.buf
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(self.truncated());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn expect(&mut self, tag: u8) -> Result<()> {
        match self.u8()? {
            got if got == tag => Ok(()),
            got => Err(DecodeError::UnknownTag {
                what: self.what,
                tag: got,
            }),
        }
    }

    fn i32(&mut self) -> Result<i32> {
        self.array().map(i32::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn i64(&mut self) -> Result<i64> {
        self.array().map(i64::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_be_bytes)
    }

    /// An Int16 count, which must not be negative.
    fn count(&mut self) -> Result<usize> {
        let n = i16::from_be_bytes(self.array()?);
        usize::try_from(n).map_err(|_| DecodeError::Invalid { what: self.what })
    }

    /// An Int32 length or count, which must not be negative.
    fn len(&mut self) -> Result<usize> {
        let n = self.i32()?;
        usize::try_from(n).map_err(|_| DecodeError::Invalid { what: self.what })
    }

    /// A NUL-terminated string, without its terminator.
    fn cstr(&mut self) -> Result<&'a [u8]> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.truncated())?;
        let s = self.take(end)?;
        self.take(1)?;
        Ok(s)
    }

    /// A name, in the database encoding; anything but UTF-8 is replaced lossily.
    fn string(&mut self) -> Result<String> {
        self.cstr().map(|s| String::from_utf8_lossy(s).into_owned())
    }

    fn finish(&self) -> Result<()> {
        match self.buf.len() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes {
                what: self.what,
                extra,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Hand encoding, as the server sends it.
    #[derive(Default)]
    struct Enc(Vec<u8>);

    impl Enc {
        fn new(tag: u8) -> Self {
            Enc(vec![tag])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn str(mut self, v: &str) -> Self {
            self.0.extend_from_slice(v.as_bytes());
            self.0.push(0);
            self
        }
        fn bytes(mut self, v: &[u8]) -> Self {
            self.0.extend_from_slice(v);
            self
        }
        /// TupleData: `None` null, `Some(None)` unchanged TOAST, `Some(Some(text))`.
        fn tuple(self, values: &[Option<Option<&str>>]) -> Self {
            let mut e = self.i16(values.len() as i16);
            for v in values {
                e = match v {
                    None => e.u8(b'n'),
                    Some(None) => e.u8(b'u'),
                    Some(Some(text)) => e.u8(b't').i32(text.len() as i32).bytes(text.as_bytes()),
                };
            }
            e
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(s.as_bytes().to_vec())
    }

    fn accounts() -> Relation {
        Relation {
            oid: 16384,
            schema: "public".into(),
            name: "accounts".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                    key: true,
                },
                Column {
                    name: "note".into(),
                    type_oid: 1043,
                    type_modifier: 36,
                    key: false,
                },
            ],
        }
    }

    /// Every kind of message, as encoded bytes and as decoded.
    fn logical_cases() -> Vec<(&'static str, Vec<u8>, LogicalMessage)> {
        vec![
            (
                "begin",
                Enc::new(b'B').u64(0x1_0000_0010).u64(77).i32(731).0,
                LogicalMessage::Begin {
                    final_lsn: 0x1_0000_0010,
                    commit_time: 77,
                    xid: 731,
                },
            ),
            (
                "commit",
                Enc::new(b'C').u8(0).u64(0x10).u64(0x48).u64(78).0,
                LogicalMessage::Commit {
                    commit_lsn: 0x10,
                    end_lsn: 0x48,
                    commit_time: 78,
                },
            ),
            (
                "origin",
                Enc::new(b'O').u64(5).str("elsewhere").0,
                LogicalMessage::Other(b'O'),
            ),
            (
                "type",
                Enc::new(b'Y').i32(16500).str("public").str("mood").0,
                LogicalMessage::Other(b'Y'),
            ),
            (
                "message",
                Enc::new(b'M')
                    .u8(1)
                    .u64(9)
                    .str("prefix")
                    .i32(3)
                    .bytes(b"a\0b")
                    .0,
                LogicalMessage::Other(b'M'),
            ),
            (
                "relation",
                Enc::new(b'R')
                    .i32(16384)
                    .str("public")
                    .str("accounts")
                    .u8(b'd')
                    .i16(2)
                    .u8(1)
                    .str("id")
                    .i32(20)
                    .i32(-1)
                    .u8(0)
                    .str("note")
                    .i32(1043)
                    .i32(36)
                    .0,
                LogicalMessage::Relation(accounts()),
            ),
            (
                "insert",
                Enc::new(b'I')
                    .i32(16384)
                    .u8(b'N')
                    .tuple(&[Some(Some("1")), None])
                    .0,
                LogicalMessage::Insert {
                    relation: 16384,
                    new: vec![text("1"), Value::Null],
                },
            ),
            (
                "update without old tuple",
                Enc::new(b'U')
                    .i32(16384)
                    .u8(b'N')
                    .tuple(&[Some(Some("1")), Some(None)])
                    .0,
                LogicalMessage::Update {
                    relation: 16384,
                    old: None,
                    new: vec![text("1"), Value::Unchanged],
                },
            ),
            (
                "update of the key",
                Enc::new(b'U')
                    .i32(16384)
                    .u8(b'K')
                    .tuple(&[Some(Some("1")), None])
                    .u8(b'N')
                    .tuple(&[Some(Some("2")), Some(Some(""))])
                    .0,
                LogicalMessage::Update {
                    relation: 16384,
                    old: Some(vec![text("1"), Value::Null]),
                    new: vec![text("2"), text("")],
                },
            ),
            (
                "update with full old tuple",
                Enc::new(b'U')
                    .i32(16384)
                    .u8(b'O')
                    .tuple(&[Some(Some("1")), Some(Some("x"))])
                    .u8(b'N')
                    .tuple(&[Some(Some("1")), Some(Some("y"))])
                    .0,
                LogicalMessage::Update {
                    relation: 16384,
                    old: Some(vec![text("1"), text("x")]),
                    new: vec![text("1"), text("y")],
                },
            ),
            (
                "delete by key",
                Enc::new(b'D')
                    .i32(16384)
                    .u8(b'K')
                    .tuple(&[Some(Some("7")), None])
                    .0,
                LogicalMessage::Delete {
                    relation: 16384,
                    old: vec![text("7"), Value::Null],
                },
            ),
            (
                "delete with full old tuple",
                Enc::new(b'D')
                    .i32(16384)
                    .u8(b'O')
                    .tuple(&[Some(Some("7")), Some(Some("z"))])
                    .0,
                LogicalMessage::Delete {
                    relation: 16384,
                    old: vec![text("7"), text("z")],
                },
            ),
            (
                "binary value",
                Enc::new(b'I')
                    .i32(1)
                    .u8(b'N')
                    .i16(1)
                    .u8(b'b')
                    .i32(2)
                    .bytes(&[0, 7])
                    .0,
                LogicalMessage::Insert {
                    relation: 1,
                    new: vec![Value::Binary(vec![0, 7])],
                },
            ),
            (
                "truncate",
                Enc::new(b'T').i32(2).u8(3).i32(16384).i32(16390).0,
                LogicalMessage::Truncate {
                    relations: vec![16384, 16390],
                    cascade: true,
                    restart_identity: true,
                },
            ),
        ]
    }

    #[test]
    fn decodes_each_logical_message() {
        for (name, bytes, expected) in logical_cases() {
            assert_eq!(LogicalMessage::decode(&bytes), Ok(expected), "{name}");
        }
    }

    #[test]
    fn every_proper_prefix_and_any_extra_byte_is_an_error() {
        for (name, bytes, _) in logical_cases() {
            for end in 0..bytes.len() {
                assert!(
                    LogicalMessage::decode(&bytes[..end]).is_err(),
                    "{name} cut at {end}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(
                matches!(
                    LogicalMessage::decode(&longer),
                    Err(DecodeError::TrailingBytes { extra: 1, .. })
                ),
                "{name} with an extra byte"
            );
        }
    }

    #[test]
    fn refuses_malformed_logical_messages() {
        let cases: &[(&str, Vec<u8>, DecodeError)] = &[
            (
                "unknown message",
                Enc::new(b'S').i32(1).0, // Stream Start: protocol version 2
                DecodeError::UnknownTag {
                    what: "pgoutput message",
                    tag: b'S',
                },
            ),
            (
                "insert without N",
                Enc::new(b'I').i32(1).u8(b'K').tuple(&[]).0,
                DecodeError::UnknownTag {
                    what: "Insert",
                    tag: b'K',
                },
            ),
            (
                "delete with a new tuple",
                Enc::new(b'D').i32(1).u8(b'N').tuple(&[]).0,
                DecodeError::UnknownTag {
                    what: "Delete tuple",
                    tag: b'N',
                },
            ),
            (
                "negative column count",
                Enc::new(b'I').i32(1).u8(b'N').i16(-1).0,
                DecodeError::Invalid { what: "Insert" },
            ),
            (
                "negative value length",
                Enc::new(b'I').i32(1).u8(b'N').i16(1).u8(b't').i32(-1).0,
                DecodeError::Invalid { what: "Insert" },
            ),
            (
                "unknown column kind",
                Enc::new(b'I').i32(1).u8(b'N').i16(1).u8(b'x').0,
                DecodeError::UnknownTag {
                    what: "TupleData column",
                    tag: b'x',
                },
            ),
            (
                "unknown replica identity",
                Enc::new(b'R').i32(1).str("s").str("t").u8(b'z').i16(0).0,
                DecodeError::UnknownTag {
                    what: "replica identity",
                    tag: b'z',
                },
            ),
            (
                "huge truncate count",
                Enc::new(b'T').i32(i32::MAX).u8(0).i32(1).0,
                DecodeError::Truncated { what: "Truncate" },
            ),
        ];
        for (name, bytes, expected) in cases {
            assert_eq!(
                LogicalMessage::decode(bytes).as_ref(),
                Err(expected),
                "{name}"
            );
        }
    }

    #[test]
    fn decodes_replication_messages() {
        let data = Enc::new(b'B').u64(1).u64(2).i32(3).0;
        let xlog = Enc::new(b'w').u64(0x10).u64(0x20).u64(5).bytes(&data).0;
        assert_eq!(
            ReplicationMessage::decode(&xlog),
            Ok(ReplicationMessage::XLogData {
                wal_start: 0x10,
                wal_end: 0x20,
                send_time: 5,
                data: &data,
            })
        );
        let keepalive = Enc::new(b'k').u64(0x30).u64(6).u8(1).0;
        assert_eq!(
            ReplicationMessage::decode(&keepalive),
            Ok(ReplicationMessage::Keepalive {
                wal_end: 0x30,
                send_time: 6,
                reply_requested: true,
            })
        );
        for end in 0..keepalive.len() {
            assert!(ReplicationMessage::decode(&keepalive[..end]).is_err());
        }
        for end in 0..25 {
            assert!(ReplicationMessage::decode(&xlog[..end]).is_err());
        }
        assert_eq!(
            ReplicationMessage::decode(b"r"),
            Err(DecodeError::UnknownTag {
                what: "replication message",
                tag: b'r'
            })
        );
    }

    #[test]
    fn encodes_standby_status_update() {
        let update = StandbyStatusUpdate {
            written: 0x0102_0304_0506_0708,
            flushed: 0x10,
            applied: 0x20,
            clock: -2,
            reply_requested: true,
        };
        let expected = Enc::new(b'r')
            .u64(0x0102_0304_0506_0708)
            .u64(0x10)
            .u64(0x20)
            .u64(u64::MAX - 1)
            .u8(1)
            .0;
        assert_eq!(update.encode().to_vec(), expected);
    }

    #[test]
    fn converts_clock_and_lsn() {
        let pg_epoch = UNIX_EPOCH + std::time::Duration::from_secs(PG_EPOCH_UNIX_SECONDS);
        assert_eq!(pg_timestamp(pg_epoch), 0);
        assert_eq!(
            pg_timestamp(pg_epoch + std::time::Duration::from_micros(1_500_001)),
            1_500_001
        );
        assert_eq!(pg_timestamp(UNIX_EPOCH), -946_684_800_000_000);

        let cases: &[(&str, Option<u64>)] = &[
            ("0/0", Some(0)),
            ("16/B374D848", Some(0x16_B374_D848)),
            ("FFFFFFFF/FFFFFFFF", Some(u64::MAX)),
            ("0/1a", Some(0x1a)),
            ("1/", None),
            ("/1", None),
            ("1", None),
            ("100000000/0", None),
            ("+1/0", None),
            ("0/0/0", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_lsn(text), *expected, "{text}");
            if let Some(lsn) = expected {
                assert_eq!(parse_lsn(&format_lsn(*lsn)), Some(*lsn));
            }
        }
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ReplicationMessage::decode(&bytes);
            let _ = LogicalMessage::decode(&bytes);
            let _ = parse_lsn(&String::from_utf8_lossy(&bytes));
        }

        /// Random bytes rarely get past a tag; these start from a valid
        /// message and change a few of its bytes.
        #[test]
        fn mutated_messages_never_panic(
            case in 0..14usize,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let cases = logical_cases();
            let mut bytes = cases[case % cases.len()].1.clone();
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            let _ = LogicalMessage::decode(&bytes);
            let _ = LogicalMessage::decode(&bytes[..cut.index(bytes.len() + 1)]);
            let mut xlog = Enc::new(b'w').u64(1).u64(2).u64(3).0;
            xlog.extend_from_slice(&bytes);
            let decoded = ReplicationMessage::decode(&xlog);
            let Ok(ReplicationMessage::XLogData { data, .. }) = decoded else {
                panic!("XLogData around any data decodes: {decoded:?}");
            };
            prop_assert_eq!(data, &bytes[..]);
        }
    }
}
