//! Key parameters: a shard key (or an array of them) sent as a Bind
//! parameter, decoded from the text or binary format the client chose, as
//! PostgreSQL's input and receive functions would read it.
//!
//! Decoding never panics on client bytes; a value that PostgreSQL would
//! reject is an error, and the statement is then left to PostgreSQL.

use crate::analysis::{parse_array_literal, parse_pg_int, parse_uuid, IntError};
use crate::hash::KeyValue;
use crate::shard_map::KeyType;

/// Bind parameter format codes (protocol docs, "Bind").
pub const FORMAT_TEXT: i16 = 0;
pub const FORMAT_BINARY: i16 = 1;

/// Arrays larger than this are not routed key by key (the statement fans out).
pub const ARRAY_KEYS_MAX: usize = 10_000;

/// Decodes one key value of `key_type` in `format`.
pub fn decode_key(key_type: KeyType, format: i16, bytes: &[u8]) -> Result<KeyValue, String> {
    match format {
        FORMAT_TEXT => {
            let text = std::str::from_utf8(bytes)
                .map_err(|_| "key parameter is not valid UTF-8".to_owned())?;
            parse_text(key_type, text)
        }
        FORMAT_BINARY => decode_binary(key_type, bytes),
        other => Err(format!("unknown parameter format code {other}")),
    }
}

/// A key from its text form (`int8in`, `textin`, `uuid_in`, ...); the
/// integer and uuid readers are shared with the statement analyser.
pub fn parse_text(key_type: KeyType, text: &str) -> Result<KeyValue, String> {
    let int = || match parse_pg_int(text) {
        Ok(v) => Ok(v),
        Err(IntError::Syntax) => Err(format!(
            "invalid input syntax for type {key_type}: \"{text}\""
        )),
        Err(IntError::Range) => Err(out_of_range(key_type, text)),
    };
    match key_type {
        KeyType::Int2 => i16::try_from(int()?)
            .map(KeyValue::Int2)
            .map_err(|_| out_of_range(key_type, text)),
        KeyType::Int4 => i32::try_from(int()?)
            .map(KeyValue::Int4)
            .map_err(|_| out_of_range(key_type, text)),
        KeyType::Int8 => int().map(KeyValue::Int8),
        KeyType::Text => Ok(KeyValue::Text(text.as_bytes().to_vec())),
        KeyType::Uuid => parse_uuid(text)
            .map(KeyValue::Uuid)
            .ok_or_else(|| format!("invalid input syntax for type uuid: \"{text}\"")),
    }
}

fn out_of_range(key_type: KeyType, text: &str) -> String {
    format!("value \"{text}\" is out of range for type {key_type}")
}

fn decode_binary(key_type: KeyType, b: &[u8]) -> Result<KeyValue, String> {
    let size = |n: usize| {
        if b.len() == n {
            Ok(())
        } else {
            Err(format!(
                "binary {key_type} parameter has {} bytes, not {n}",
                b.len()
            ))
        }
    };
    match key_type {
        KeyType::Int2 => size(2).map(|_| KeyValue::Int2(i16::from_be_bytes([b[0], b[1]]))),
        KeyType::Int4 => {
            size(4).map(|_| KeyValue::Int4(i32::from_be_bytes([b[0], b[1], b[2], b[3]])))
        }
        KeyType::Int8 => size(8).map(|_| {
            let mut x = [0u8; 8];
            x.copy_from_slice(b);
            KeyValue::Int8(i64::from_be_bytes(x))
        }),
        KeyType::Text => std::str::from_utf8(b)
            .map(|_| KeyValue::Text(b.to_vec()))
            .map_err(|_| "text parameter is not valid UTF-8".to_owned()),
        KeyType::Uuid => size(16).map(|_| {
            let mut x = [0u8; 16];
            x.copy_from_slice(b);
            KeyValue::Uuid(x)
        }),
    }
}

/// Decodes an array parameter (`= ANY($n)`); NULL elements are skipped (they
/// match no row). At most [`ARRAY_KEYS_MAX`] elements.
pub fn decode_key_array(
    key_type: KeyType,
    format: i16,
    bytes: &[u8],
) -> Result<Vec<KeyValue>, String> {
    match format {
        FORMAT_TEXT => {
            let text = std::str::from_utf8(bytes)
                .map_err(|_| "array parameter is not valid UTF-8".to_owned())?;
            parse_text_array(key_type, text)
        }
        FORMAT_BINARY => decode_binary_array(key_type, bytes),
        other => Err(format!("unknown parameter format code {other}")),
    }
}

/// A one-dimensional array literal `{a,b,"c d",NULL}` (`array_in`).
fn parse_text_array(key_type: KeyType, text: &str) -> Result<Vec<KeyValue>, String> {
    let elements =
        parse_array_literal(text).ok_or_else(|| format!("malformed array literal: \"{text}\""))?;
    if elements.len() > ARRAY_KEYS_MAX {
        return Err(format!("more than {ARRAY_KEYS_MAX} keys in one array"));
    }
    // NULL elements match no row.
    elements
        .into_iter()
        .flatten()
        .map(|e| parse_text(key_type, &e))
        .collect()
}

/// The binary array format (`array_send`): ndim, has-nulls flag, element
/// type, then per dimension (size, lower bound), then length-prefixed elements.
fn decode_binary_array(key_type: KeyType, b: &[u8]) -> Result<Vec<KeyValue>, String> {
    let bad = || "malformed binary array parameter".to_owned();
    let mut r = Reader { b, at: 0 };
    let ndim = r.i32().ok_or_else(bad)?;
    let _has_nulls = r.i32().ok_or_else(bad)?;
    let _elem_type = r.i32().ok_or_else(bad)?;
    if ndim == 0 {
        return Ok(Vec::new());
    }
    if ndim != 1 {
        return Err(format!("a {ndim}-dimensional array is not a list of keys"));
    }
    let len = r.i32().ok_or_else(bad)?;
    let _lower = r.i32().ok_or_else(bad)?;
    let len = usize::try_from(len).map_err(|_| bad())?;
    if len > ARRAY_KEYS_MAX {
        return Err(format!("more than {ARRAY_KEYS_MAX} keys in one array"));
    }
    let mut keys = Vec::with_capacity(len);
    for _ in 0..len {
        let n = r.i32().ok_or_else(bad)?;
        if n < 0 {
            continue; // NULL
        }
        let item = r.take(n as usize).ok_or_else(bad)?;
        keys.push(decode_binary(key_type, item)?);
    }
    if r.at != b.len() {
        return Err(bad());
    }
    Ok(keys)
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    fn i32(&mut self) -> Option<i32> {
        self.take(4)
            .map(|s| i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_keys_are_read_as_postgresql_reads_them() {
        let ok = [
            (KeyType::Int2, " -32768 ", KeyValue::Int2(i16::MIN)),
            (KeyType::Int4, "+42", KeyValue::Int4(42)),
            (
                KeyType::Int8,
                "9223372036854775807",
                KeyValue::Int8(i64::MAX),
            ),
            (
                KeyType::Text,
                " spaced ",
                KeyValue::Text(b" spaced ".to_vec()),
            ),
        ];
        for (ty, text, want) in ok {
            assert_eq!(parse_text(ty, text), Ok(want), "{ty} {text:?}");
        }
        for (ty, text) in [
            (KeyType::Int2, "32768"),
            (KeyType::Int4, "2147483648"),
            (KeyType::Int8, "1.5"),
            (KeyType::Int8, ""),
            (KeyType::Int4, "_1"),
        ] {
            assert!(parse_text(ty, text).is_err(), "{ty} {text:?} accepted");
        }
    }

    #[test]
    fn uuid_forms_accepted_by_uuid_in() {
        let want = KeyValue::Uuid([
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ]);
        for text in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
            "{a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11}",
        ] {
            assert_eq!(parse_text(KeyType::Uuid, text), Ok(want.clone()), "{text}");
        }
        for text in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
            "-a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eeb-c999c0b4ef8bb6d6bb9bd380a11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        ] {
            assert!(parse_text(KeyType::Uuid, text).is_err(), "{text} accepted");
        }
    }

    #[test]
    fn binary_keys_are_big_endian_and_sized() {
        assert_eq!(
            decode_key(KeyType::Int2, 1, &[0xff, 0xfe]),
            Ok(KeyValue::Int2(-2))
        );
        assert_eq!(
            decode_key(KeyType::Int4, 1, &[0, 0, 1, 0]),
            Ok(KeyValue::Int4(256))
        );
        assert_eq!(
            decode_key(KeyType::Int8, 1, &(-5i64).to_be_bytes()),
            Ok(KeyValue::Int8(-5))
        );
        assert_eq!(
            decode_key(KeyType::Uuid, 1, &[7; 16]),
            Ok(KeyValue::Uuid([7; 16]))
        );
        assert!(decode_key(KeyType::Int8, 1, &[0; 4]).is_err());
        assert!(decode_key(KeyType::Text, 1, &[0xff]).is_err());
        assert!(decode_key(KeyType::Int4, 2, b"1").is_err());
    }

    #[test]
    fn text_arrays() {
        assert_eq!(
            decode_key_array(KeyType::Int8, 0, b"{1, 2,NULL,3}"),
            Ok(vec![
                KeyValue::Int8(1),
                KeyValue::Int8(2),
                KeyValue::Int8(3)
            ])
        );
        assert_eq!(
            decode_key_array(KeyType::Text, 0, br#"{"a,b","NULL",c\d, e }"#),
            Ok(vec![
                KeyValue::Text(b"a,b".to_vec()),
                KeyValue::Text(b"NULL".to_vec()),
                KeyValue::Text(b"cd".to_vec()),
                KeyValue::Text(b"e".to_vec()),
            ])
        );
        assert_eq!(decode_key_array(KeyType::Int4, 0, b"{}"), Ok(vec![]));
        for bad in [&b"1,2"[..], b"{1,{2}}", b"{1,x}", b"{\"1}"] {
            assert!(decode_key_array(KeyType::Int4, 0, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn binary_arrays() {
        let mut b = Vec::new();
        for v in [1i32, 1, 20 /* int8 oid */, 3, 1] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        for item in [Some(7i64), None, Some(-1)] {
            match item {
                Some(v) => {
                    b.extend_from_slice(&8i32.to_be_bytes());
                    b.extend_from_slice(&v.to_be_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        assert_eq!(
            decode_key_array(KeyType::Int8, 1, &b),
            Ok(vec![KeyValue::Int8(7), KeyValue::Int8(-1)])
        );
        // Truncated, trailing bytes, a huge length: errors, not panics.
        assert!(decode_key_array(KeyType::Int8, 1, &b[..b.len() - 1]).is_err());
        let mut trailing = b.clone();
        trailing.push(0);
        assert!(decode_key_array(KeyType::Int8, 1, &trailing).is_err());
        let mut huge = b[..12].to_vec();
        huge.extend_from_slice(&i32::MAX.to_be_bytes());
        huge.extend_from_slice(&1i32.to_be_bytes());
        assert!(decode_key_array(KeyType::Int8, 1, &huge).is_err());
        assert_eq!(decode_key_array(KeyType::Int8, 1, &[0; 12]), Ok(vec![]));
    }
}
