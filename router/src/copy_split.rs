//! CopySplitter: the rows of a `COPY table (cols) FROM STDIN` stream, each
//! sent to the shard owning its key, without buffering more than one row.
//!
//! CopyData messages split rows anywhere, so the splitter keeps the partial
//! row at the end of each chunk (bounded by `row_bytes_max`) and hands out
//! every complete row with its partition. Rows are passed on byte for byte;
//! only the key field is decoded, as COPY itself would read it:
//! - text format: fields split by the delimiter (tab by default), `\N` is
//!   NULL, backslash escapes (`\t`, `\n`, `\\`, octal `\123`, hex `\x41`);
//!   a row ends at an unescaped newline; `\.` alone ends the data.
//! - CSV: fields split by the delimiter (comma by default), `"` quotes with
//!   `""` inside, quoted fields may span lines; an unquoted empty field is NULL.

use crate::hash::partition_of;
use crate::key_param::parse_text;
use crate::shard_map::KeyType;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Csv,
}

/// What the splitter needs to know about the COPY.
#[derive(Clone, Debug)]
pub struct CopyLayout {
    pub format: CopyFormat,
    pub delimiter: u8,
    /// Whether the first line is a header (CSV `HEADER`): passed on, not routed.
    pub header: bool,
    /// Position of the key in the COPY's column list.
    pub key_column: usize,
    pub key_type: KeyType,
    pub modulus: u32,
    /// The longest row accepted; longer is an error (bounded memory).
    pub row_bytes_max: usize,
}

impl CopyLayout {
    pub fn new(format: CopyFormat, key_column: usize, key_type: KeyType, modulus: u32) -> Self {
        CopyLayout {
            format,
            delimiter: if format == CopyFormat::Csv {
                b','
            } else {
                b'\t'
            },
            header: false,
            key_column,
            key_type,
            modulus,
            row_bytes_max: 64 << 20,
        }
    }
}

/// One complete row (including its line end) and where it goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// A data row for partition `partition`.
    Row { partition: u32, bytes: Vec<u8> },
    /// The CSV header line or the text end marker `\.`: for every shard.
    Shared(Vec<u8>),
}

pub struct CopySplitter {
    layout: CopyLayout,
    partial: Vec<u8>,
    header_pending: bool,
    ended: bool,
    /// The first row ended in `\r\n`: PostgreSQL holds all rows to the
    /// line ending of the first, so a last row is completed the same way.
    crlf: Option<bool>,
}

impl CopySplitter {
    pub fn new(layout: CopyLayout) -> CopySplitter {
        let header_pending = layout.header;
        CopySplitter {
            layout,
            partial: Vec::new(),
            header_pending,
            ended: false,
            crlf: None,
        }
    }

    /// Feeds one CopyData payload; returns the rows it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Piece>, String> {
        self.partial.extend_from_slice(chunk);
        let mut pieces = Vec::new();
        let mut start = 0;
        while let Some(end) = row_end(&self.partial[start..], &self.layout).map(|e| start + e) {
            let row = &self.partial[start..end];
            if self.crlf.is_none() {
                self.crlf = Some(row.ends_with(b"\r\n"));
            }
            start = end;
            if self.ended {
                continue; // PostgreSQL ignores what follows `\.`
            }
            if self.header_pending {
                self.header_pending = false;
                pieces.push(Piece::Shared(row.to_vec()));
                continue;
            }
            // `\.` alone on a line ends the data, in CSV as in text.
            if strip_eol(row) == b"\\." {
                self.ended = true;
                pieces.push(Piece::Shared(row.to_vec()));
                continue;
            }
            let partition = self.partition_of_row(row)?;
            pieces.push(Piece::Row {
                partition,
                bytes: row.to_vec(),
            });
        }
        self.partial.drain(..start);
        if self.partial.len() > self.layout.row_bytes_max {
            return Err(format!(
                "a COPY row is longer than {} bytes",
                self.layout.row_bytes_max
            ));
        }
        Ok(pieces)
    }

    /// The end of the data (CopyDone): a last row without a newline is a row.
    pub fn finish(&mut self) -> Result<Vec<Piece>, String> {
        if self.partial.is_empty() || self.ended {
            return Ok(Vec::new());
        }
        let mut last = std::mem::take(&mut self.partial);
        if self.crlf == Some(true) {
            last.push(b'\r');
        }
        last.push(b'\n');
        self.feed(&last)
    }

    fn partition_of_row(&self, row: &[u8]) -> Result<u32, String> {
        let key = field(strip_eol(row), &self.layout)?;
        let value = match key {
            None => None,
            Some(text) => {
                let text = std::str::from_utf8(&text)
                    .map_err(|_| "COPY key field is not valid UTF-8".to_owned())?;
                Some(parse_text(self.layout.key_type, text)?)
            }
        };
        Ok(partition_of(&[value.as_ref()], self.layout.modulus))
    }
}

fn strip_eol(row: &[u8]) -> &[u8] {
    let row = row.strip_suffix(b"\n").unwrap_or(row);
    row.strip_suffix(b"\r").unwrap_or(row)
}

/// The length of the first complete row in `buf` (through its newline).
fn row_end(buf: &[u8], layout: &CopyLayout) -> Option<usize> {
    match layout.format {
        CopyFormat::Text => {
            let mut i = 0;
            while i < buf.len() {
                match buf[i] {
                    b'\\' => i += 2, // an escaped newline does not end the row
                    b'\n' => return Some(i + 1),
                    _ => i += 1,
                }
            }
            None
        }
        CopyFormat::Csv => {
            let mut quoted = false;
            for (i, &b) in buf.iter().enumerate() {
                match b {
                    b'"' => quoted = !quoted, // "" toggles twice: still inside
                    b'\n' if !quoted => return Some(i + 1),
                    _ => {}
                }
            }
            None
        }
    }
}

/// The decoded key field of one row (without its line end); `None` is NULL.
fn field(row: &[u8], layout: &CopyLayout) -> Result<Option<Vec<u8>>, String> {
    let missing = || format!("COPY row has no column {}", layout.key_column + 1);
    match layout.format {
        CopyFormat::Text => {
            let raw = split_text(row, layout.delimiter)
                .nth(layout.key_column)
                .ok_or_else(missing)?;
            if raw == b"\\N" {
                return Ok(None);
            }
            Ok(Some(unescape_text(raw)))
        }
        CopyFormat::Csv => csv_field(row, layout.delimiter, layout.key_column)?.ok_or_else(missing),
    }
}

/// Text-format fields: split at unescaped delimiters.
fn split_text(row: &[u8], delimiter: u8) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    let mut i = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        while i < row.len() {
            if row[i] == b'\\' {
                i += 2;
                continue;
            }
            if row[i] == delimiter {
                let f = &row[start..i];
                i += 1;
                start = i;
                return Some(f);
            }
            i += 1;
        }
        done = true;
        Some(&row[start.min(row.len())..])
    })
}

fn unescape_text(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' || i + 1 >= raw.len() {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let c = raw[i + 1];
        i += 2;
        match c {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = (c - b'0') as u32;
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + (d - b'0') as u32;
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            b'x' if raw.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u32;
                for _ in 0..2 {
                    match raw.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                        }
                        None => break,
                    }
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    out
}

/// Field `index` of a CSV row: `Ok(None)` if the row is shorter, `Some(None)`
/// for NULL (an unquoted empty field).
#[allow(clippy::type_complexity)]
fn csv_field(row: &[u8], delimiter: u8, index: usize) -> Result<Option<Option<Vec<u8>>>, String> {
    let mut i = 0;
    let mut n = 0;
    loop {
        let mut value = Vec::new();
        let mut quoted_any = false;
        let mut quoted = false;
        while i < row.len() {
            let b = row[i];
            if quoted {
                if b == b'"' {
                    if row.get(i + 1) == Some(&b'"') {
                        value.push(b'"');
                        i += 2;
                        continue;
                    }
                    quoted = false;
                } else {
                    value.push(b);
                }
            } else if b == b'"' {
                quoted = true;
                quoted_any = true;
            } else if b == delimiter {
                break;
            } else {
                value.push(b);
            }
            i += 1;
        }
        if quoted {
            return Err("unterminated CSV quoted field".into());
        }
        if n == index {
            let null = !quoted_any && value.is_empty();
            return Ok(Some((!null).then_some(value)));
        }
        if i >= row.len() {
            return Ok(None);
        }
        i += 1; // the delimiter
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::KeyValue;

    fn rows(pieces: Vec<Piece>) -> Vec<(Option<u32>, String)> {
        pieces
            .into_iter()
            .map(|p| match p {
                Piece::Row { partition, bytes } => {
                    (Some(partition), String::from_utf8(bytes).unwrap())
                }
                Piece::Shared(bytes) => (None, String::from_utf8(bytes).unwrap()),
            })
            .collect()
    }

    fn part(v: i64) -> Option<u32> {
        Some(partition_of(&[Some(&KeyValue::Int8(v))], 8))
    }

    #[test]
    fn text_rows_split_across_chunks_keep_their_bytes() {
        let mut s = CopySplitter::new(CopyLayout::new(CopyFormat::Text, 1, KeyType::Int8, 8));
        let data = b"a\t1\tx\nb\t22\ty\\\nz\n\\N\t-5\t\\N\n";
        let mut out = Vec::new();
        for chunk in data.chunks(3) {
            out.extend(rows(s.feed(chunk).expect("feed")));
        }
        out.extend(rows(s.finish().expect("finish")));
        assert_eq!(
            out,
            vec![
                (part(1), "a\t1\tx\n".to_owned()),
                (part(22), "b\t22\ty\\\nz\n".to_owned()),
                (part(-5), "\\N\t-5\t\\N\n".to_owned()),
            ]
        );
    }

    #[test]
    fn text_escapes_nulls_and_end_marker() {
        let mut s = CopySplitter::new(CopyLayout::new(CopyFormat::Text, 0, KeyType::Text, 8));
        let out = rows(s.feed(b"a\\tb\t1\n\\N\t2\n\\.\nignored\n").expect("feed"));
        let text = |t: &[u8]| Some(partition_of(&[Some(&KeyValue::Text(t.to_vec()))], 8));
        assert_eq!(out[0].0, text(b"a\tb"));
        assert_eq!(out[1].0, Some(partition_of(&[None], 8)));
        assert_eq!(out[2], (None, "\\.\n".to_owned()));
        assert_eq!(out.len(), 3);
        assert_eq!(unescape_text(b"\\101\\x42\\\\"), b"AB\\".to_vec());
    }

    #[test]
    fn csv_quotes_may_hold_delimiters_quotes_and_newlines() {
        let mut layout = CopyLayout::new(CopyFormat::Csv, 1, KeyType::Int8, 8);
        layout.header = true;
        let mut s = CopySplitter::new(layout);
        let data = b"name,id\n\"x, \"\"y\"\"\",7\n\"multi\nline\",\"8\"\nlast,9";
        let mut out = Vec::new();
        for chunk in data.chunks(5) {
            out.extend(rows(s.feed(chunk).expect("feed")));
        }
        out.extend(rows(s.finish().expect("finish")));
        assert_eq!(out[0], (None, "name,id\n".to_owned()));
        assert_eq!(out[1], (part(7), "\"x, \"\"y\"\"\",7\n".to_owned()));
        assert_eq!(out[2], (part(8), "\"multi\nline\",\"8\"\n".to_owned()));
        assert_eq!(out[3], (part(9), "last,9\n".to_owned()));
        // An unquoted empty key is NULL; a quoted empty one is an empty string.
        assert_eq!(csv_field(b"a,,b", b',', 1), Ok(Some(None)));
        assert_eq!(csv_field(b"a,\"\",b", b',', 1), Ok(Some(Some(Vec::new()))));
    }

    #[test]
    fn bad_rows_are_errors_not_guesses() {
        let mut s = CopySplitter::new(CopyLayout::new(CopyFormat::Text, 2, KeyType::Int8, 8));
        assert!(s.feed(b"1\t2\n").is_err(), "missing key column");
        let mut s = CopySplitter::new(CopyLayout::new(CopyFormat::Text, 0, KeyType::Int4, 8));
        assert!(s.feed(b"abc\n").is_err(), "key not an int4");
        let mut layout = CopyLayout::new(CopyFormat::Text, 0, KeyType::Int8, 8);
        layout.row_bytes_max = 16;
        let mut s = CopySplitter::new(layout);
        assert!(s.feed(&[b'1'; 32]).is_err(), "a row over the bound");
    }
}

/// The options of a `COPY ... FROM STDIN` that decide how its rows are
/// read: `(format, delimiter, header)`. Options that change how a field is
/// quoted or which text is NULL are refused: the splitter would then read
/// the key differently from PostgreSQL.
pub fn copy_options(sql: &str) -> Result<(CopyFormat, Option<u8>, bool), String> {
    use pg_query::protobuf::node::Node as N;
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT)
        .map_err(|e| e.to_string())?
        .protobuf;
    let Some(N::CopyStmt(copy)) = parsed
        .stmts
        .first()
        .and_then(|s| s.stmt.as_ref())
        .and_then(|s| s.node.as_ref())
    else {
        return Err("not a COPY statement".into());
    };
    let (mut format, mut delimiter, mut header) = (CopyFormat::Text, None, false);
    for option in &copy.options {
        let Some(N::DefElem(d)) = option.node.as_ref() else {
            continue;
        };
        let raw = match d.arg.as_ref().and_then(|a| a.node.as_ref()) {
            Some(N::String(s)) => Some(s.sval.as_str()),
            _ => None,
        };
        let value = match d.arg.as_ref().and_then(|a| a.node.as_ref()) {
            Some(N::String(s)) => Some(s.sval.to_ascii_lowercase()),
            Some(N::Boolean(b)) => Some(b.boolval.to_string()),
            Some(N::Integer(i)) => Some(i.ival.to_string()),
            _ => None,
        };
        match (d.defname.as_str(), value.as_deref()) {
            ("format", Some("text")) => format = CopyFormat::Text,
            ("format", Some("csv")) => format = CopyFormat::Csv,
            ("delimiter", Some(_)) if raw.is_some_and(|r| r.len() == 1) => {
                delimiter = raw.map(|r| r.as_bytes()[0]);
            }
            ("header", None | Some("true" | "on" | "1")) => header = true,
            ("header", Some("false" | "off" | "0")) => header = false,
            ("freeze" | "encoding", _) => {}
            (name, value) => {
                return Err(format!(
                    "COPY option {name}{} is not supported for a sharded table (Shardline splits \
                     the rows by key: text or CSV format, DELIMITER and HEADER only)",
                    value.map(|v| format!(" {v}")).unwrap_or_default()
                ))
            }
        }
    }
    Ok((format, delimiter, header))
}

#[cfg(test)]
mod option_tests {
    use super::*;

    #[test]
    fn a_last_row_without_a_line_end_gets_the_first_row_s() {
        let layout = CopyLayout::new(CopyFormat::Csv, 0, KeyType::Int8, 4);
        let mut splitter = CopySplitter::new(layout);
        let rows = splitter.feed(b"1,a\r\n2,b").unwrap();
        assert_eq!(rows.len(), 1);
        let last = splitter.finish().unwrap();
        match &last[..] {
            [Piece::Row { bytes, .. }] => assert_eq!(bytes, b"2,b\r\n"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn copy_options_are_read_or_refused() {
        assert_eq!(
            copy_options("COPY t (a) FROM STDIN").unwrap(),
            (CopyFormat::Text, None, false)
        );
        assert_eq!(
            copy_options("COPY t (a) FROM STDIN WITH (FORMAT csv, HEADER, DELIMITER ';')").unwrap(),
            (CopyFormat::Csv, Some(b';'), true)
        );
        assert_eq!(
            copy_options("COPY t (a) FROM STDIN CSV HEADER").unwrap(),
            (CopyFormat::Csv, None, true)
        );
        assert_eq!(
            copy_options("COPY t (a) FROM STDIN (DELIMITER 'X')").unwrap(),
            (CopyFormat::Text, Some(b'X'), false)
        );
        assert!(copy_options("COPY t (a) FROM STDIN (FORMAT binary)").is_err());
        assert!(copy_options("COPY t (a) FROM STDIN (FORMAT csv, QUOTE '''')").is_err());
        assert!(copy_options("COPY t (a) FROM STDIN (NULL 'x')").is_err());
    }
}
