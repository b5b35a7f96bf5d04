//! Rows: the messages a scatter/gather query reads and rewrites: Bind (F)
//! parameters, Parse (F) parameter types, RowDescription (B), DataRow (B).
//!
//! Forwarded frames never go through here; only a statement the proxy runs
//! on several shards and merges is taken apart this far, so these views
//! allocate one small `Vec` per message.

use bytes::{BufMut, BytesMut};

use crate::error::Result;
use crate::read::Reader;

/// The parameter part of a Bind (F) body, after the portal and statement names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BindParams<'a> {
    /// Parameter format codes: none (all text), one (for all) or one each.
    pub formats: Vec<i16>,
    /// Parameter values; `None` is SQL NULL.
    pub values: Vec<Option<&'a [u8]>>,
    /// Result column format codes, in the same convention as `formats`.
    pub result_formats: Vec<i16>,
}

impl<'a> BindParams<'a> {
    /// Decodes `rest` as [`crate::frontend::Bind::rest`] holds it.
    pub fn decode(rest: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(rest, "Bind");
        let formats = i16_list(&mut r)?;
        let count = r.i16()?.max(0) as usize;
        let mut values = Vec::with_capacity(count);
        for _ in 0..count {
            let len = r.i32()?;
            values.push(if len < 0 {
                None
            } else {
                Some(r.take(len as usize)?)
            });
        }
        let result_formats = i16_list(&mut r)?;
        Ok(BindParams {
            formats,
            values,
            result_formats,
        })
    }

    /// Appends a Bind (F) of the unnamed portal to the unnamed statement with
    /// these parameters and `result_formats`.
    pub fn encode_unnamed(&self, out: &mut BytesMut, result_formats: &[i16]) {
        let values: usize = self
            .values
            .iter()
            .map(|v| 4 + v.map_or(0, <[u8]>::len))
            .sum();
        let len = 2 + 2 + 2 * self.formats.len() + 2 + values + 2 + 2 * result_formats.len();
        out.put_u8(crate::frontend::BIND);
        out.put_i32(4 + len as i32);
        out.put_u8(0);
        out.put_u8(0);
        out.put_i16(self.formats.len() as i16);
        for &f in &self.formats {
            out.put_i16(f);
        }
        out.put_i16(self.values.len() as i16);
        for v in &self.values {
            match v {
                None => out.put_i32(-1),
                Some(v) => {
                    out.put_i32(v.len() as i32);
                    out.put_slice(v);
                }
            }
        }
        out.put_i16(result_formats.len() as i16);
        for &f in result_formats {
            out.put_i16(f);
        }
    }
}

/// The format code of column or parameter `index` under the list convention
/// of the protocol (none: text; one: all; else one each).
pub fn format_of(formats: &[i16], index: usize) -> i16 {
    match formats {
        [] => 0,
        [one] => *one,
        many => many.get(index).copied().unwrap_or(0),
    }
}

fn i16_list(r: &mut Reader<'_>) -> Result<Vec<i16>> {
    let n = r.i16()?.max(0) as usize;
    (0..n).map(|_| r.i16()).collect()
}

/// The parameter type OIDs of a Parse (F) `definition` (query, NUL, types).
pub fn parse_param_types(definition: &[u8]) -> Result<Vec<u32>> {
    let mut r = Reader::new(definition, "Parse");
    r.cstr()?;
    let n = r.i16()?.max(0) as usize;
    (0..n).map(|_| r.i32().map(|t| t as u32)).collect()
}

/// One column of a RowDescription (B).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column<'a> {
    /// The whole field as sent, for re-encoding unchanged.
    pub raw: &'a [u8],
    pub name: &'a [u8],
    pub type_oid: u32,
    pub format: i16,
}

/// The columns of a RowDescription (B) body.
pub fn row_description(body: &[u8]) -> Result<Vec<Column<'_>>> {
    let mut r = Reader::new(body, "RowDescription");
    let n = r.i16()?.max(0) as usize;
    let mut columns = Vec::with_capacity(n);
    for _ in 0..n {
        let start = r.rest();
        let name = r.cstr()?;
        r.take(4 + 2)?; // table oid, attribute number
        let type_oid = r.i32()? as u32;
        r.take(2 + 4)?; // type size, type modifier
        let format = r.i16()?;
        let used = start.len() - r.rest().len();
        columns.push(Column {
            raw: &start[..used],
            name,
            type_oid,
            format,
        });
    }
    Ok(columns)
}

/// Appends a RowDescription (B) of `columns`.
pub fn encode_row_description(out: &mut BytesMut, columns: &[Column<'_>]) {
    let len: usize = 2 + columns.iter().map(|c| c.raw.len()).sum::<usize>();
    out.put_u8(crate::backend::ROW_DESCRIPTION);
    out.put_i32(4 + len as i32);
    out.put_i16(columns.len() as i16);
    for c in columns {
        out.put_slice(c.raw);
    }
}

/// Appends a RowDescription (B) of text columns named `names`, belonging to
/// no table (as for a computed result).
pub fn encode_text_row_description(out: &mut BytesMut, names: &[&str]) {
    const TEXT_OID: i32 = 25;
    let len: usize = 2 + names.iter().map(|n| n.len() + 1 + 18).sum::<usize>();
    out.put_u8(crate::backend::ROW_DESCRIPTION);
    out.put_i32(4 + len as i32);
    out.put_i16(names.len() as i16);
    for name in names {
        out.put_slice(name.as_bytes());
        out.put_u8(0);
        out.put_i32(0); // table
        out.put_i16(0); // column number
        out.put_i32(TEXT_OID);
        out.put_i16(-1); // variable length
        out.put_i32(-1); // no type modifier
        out.put_i16(0); // text format
    }
}

/// The values of a DataRow (B) body; `None` is SQL NULL.
pub fn data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>> {
    let mut r = Reader::new(body, "DataRow");
    let n = r.i16()?.max(0) as usize;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.i32()?;
        values.push(if len < 0 {
            None
        } else {
            Some(r.take(len as usize)?)
        });
    }
    Ok(values)
}

/// Appends a DataRow (B) of `values`.
pub fn encode_data_row(out: &mut BytesMut, values: &[Option<&[u8]>]) {
    let len: usize = 2 + values
        .iter()
        .map(|v| 4 + v.map_or(0, <[u8]>::len))
        .sum::<usize>();
    out.put_u8(crate::backend::DATA_ROW);
    out.put_i32(4 + len as i32);
    out.put_i16(values.len() as i16);
    for v in values {
        match v {
            None => out.put_i32(-1),
            Some(v) => {
                out.put_i32(v.len() as i32);
                out.put_slice(v);
            }
        }
    }
}

/// Appends a CommandComplete (B) with `tag`.
pub fn encode_command_complete(out: &mut BytesMut, tag: &[u8]) {
    out.put_u8(crate::backend::COMMAND_COMPLETE);
    out.put_i32(4 + tag.len() as i32 + 1);
    out.put_slice(tag);
    out.put_u8(0);
}

/// Appends a message with an empty body (BindComplete, NoData, ...).
pub fn encode_empty(out: &mut BytesMut, tag: u8) {
    out.put_u8(tag);
    out.put_i32(4);
}

/// Appends an Execute (F) of the unnamed portal, all rows.
pub fn encode_execute_unnamed(out: &mut BytesMut) {
    out.put_u8(crate::frontend::EXECUTE);
    out.put_i32(4 + 1 + 4);
    out.put_u8(0);
    out.put_i32(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_params_round_trip() {
        let params = BindParams {
            formats: vec![1],
            values: vec![Some(&b"\0\0\0\x05"[..]), None],
            result_formats: vec![],
        };
        let mut out = BytesMut::new();
        params.encode_unnamed(&mut out, &[1, 0]);
        let bind = crate::frontend::Bind::decode(&out[5..]).expect("bind");
        assert_eq!(bind.portal, b"");
        let back = BindParams::decode(bind.rest).expect("params");
        assert_eq!(back.values, params.values);
        assert_eq!(back.formats, vec![1]);
        assert_eq!(back.result_formats, vec![1, 0]);
    }

    #[test]
    fn data_row_round_trip_and_garbage() {
        let mut out = BytesMut::new();
        encode_data_row(&mut out, &[Some(b"ab"), None, Some(b"")]);
        let values = data_row(&out[5..]).expect("row");
        assert_eq!(values, vec![Some(&b"ab"[..]), None, Some(&b""[..])]);
        assert!(data_row(&[0, 2, 0, 0, 0, 9, 1]).is_err());
        assert!(row_description(&[0, 1, b'a']).is_err());
    }
}
