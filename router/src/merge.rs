//! `compare`: PostgreSQL's ORDER BY order for one sort key of a cross-shard k-way merge.
//!
//! Every shard returns its rows sorted by the plan's keys ([`crate::scatter::Merge::Sorted`]);
//! the proxy merges the streams by comparing the key values as they arrived on the wire
//! (text or binary format), without decoding whole rows. The order must be exactly the
//! one PostgreSQL would use, or rows come out in a different order than one big server
//! would return them; a value it cannot order with certainty is an error, never a guess.
//! Text compares bytewise: the proxy only merges under the C collation.

use std::cmp::Ordering;

use crate::scatter::SortKey;

/// Type OIDs (pg_type.h).
mod oid {
    pub const BOOL: u32 = 16;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
}

/// Orders two values of one sort key as PostgreSQL's ORDER BY would: NULLs first or last
/// per `key.nulls_first`, non-NULL values reversed when `key.descending`. `format` is the
/// wire format of both values (0 text, 1 binary).
pub fn compare(
    key: &SortKey,
    type_oid: u32,
    format: i16,
    a: Option<&[u8]>,
    b: Option<&[u8]>,
) -> Result<Ordering, String> {
    let nulls = |first: bool| {
        if first {
            Ordering::Less
        } else {
            Ordering::Greater
        }
    };
    match (a, b) {
        (None, None) => Ok(Ordering::Equal),
        (None, Some(_)) => Ok(nulls(key.nulls_first)),
        (Some(_), None) => Ok(nulls(key.nulls_first).reverse()),
        (Some(a), Some(b)) => {
            let order = compare_values(type_oid, format, a, b)?;
            Ok(if key.descending {
                order.reverse()
            } else {
                order
            })
        }
    }
}

fn compare_values(type_oid: u32, format: i16, a: &[u8], b: &[u8]) -> Result<Ordering, String> {
    let binary = match format {
        0 => false,
        1 => true,
        other => return Err(format!("unknown wire format {other}")),
    };
    let unsupported = || format!("cannot merge-sort values of type oid {type_oid} across shards");
    match type_oid {
        oid::INT2 | oid::INT4 | oid::INT8 => {
            let width = match type_oid {
                oid::INT2 => 2,
                oid::INT4 => 4,
                _ => 8,
            };
            Ok(int(a, binary, width)?.cmp(&int(b, binary, width)?))
        }
        oid::OID => Ok(oid_value(a, binary)?.cmp(&oid_value(b, binary)?)),
        oid::FLOAT4 | oid::FLOAT8 => {
            let width = if type_oid == oid::FLOAT4 { 4 } else { 8 };
            Ok(cmp_float(
                float(a, binary, width)?,
                float(b, binary, width)?,
            ))
        }
        oid::NUMERIC => {
            if binary {
                Ok(numeric_binary(a)?.cmp(&numeric_binary(b)?))
            } else {
                Ok(numeric_text(a)?.cmp(&numeric_text(b)?))
            }
        }
        oid::BOOL => Ok(boolean(a, binary)?.cmp(&boolean(b, binary)?)),
        // Binary text is the same bytes as text; C collation is bytewise.
        oid::TEXT | oid::VARCHAR | oid::NAME => Ok(a.cmp(b)),
        oid::BPCHAR => Ok(trim_spaces(a).cmp(trim_spaces(b))),
        oid::UUID => Ok(uuid(a, binary)?.cmp(&uuid(b, binary)?)),
        oid::DATE | oid::TIMESTAMP | oid::TIMESTAMPTZ => {
            if binary {
                let width = if type_oid == oid::DATE { 4 } else { 8 };
                Ok(fixed_int(a, width)?.cmp(&fixed_int(b, width)?))
            } else {
                Ok(iso_instant(a, type_oid)?.cmp(&iso_instant(b, type_oid)?))
            }
        }
        _ => Err(unsupported()),
    }
}

fn text(value: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(value).map_err(|_| "a sort value is not valid UTF-8".to_owned())
}

/// A big-endian signed integer of exactly `width` bytes.
fn fixed_int(value: &[u8], width: usize) -> Result<i64, String> {
    match (width, value) {
        (2, &[a, b]) => Ok(i64::from(i16::from_be_bytes([a, b]))),
        (4, &[a, b, c, d]) => Ok(i64::from(i32::from_be_bytes([a, b, c, d]))),
        (8, bytes) if bytes.len() == 8 => {
            let mut array = [0u8; 8];
            array.copy_from_slice(bytes);
            Ok(i64::from_be_bytes(array))
        }
        _ => Err(format!(
            "a binary sort value has {} bytes, expected {width}",
            value.len()
        )),
    }
}

fn int(value: &[u8], binary: bool, width: usize) -> Result<i64, String> {
    if binary {
        fixed_int(value, width)
    } else {
        let s = text(value)?;
        s.parse()
            .map_err(|_| format!("sort value {s:?} is not an integer"))
    }
}

fn oid_value(value: &[u8], binary: bool) -> Result<u32, String> {
    if binary {
        match value {
            &[a, b, c, d] => Ok(u32::from_be_bytes([a, b, c, d])),
            _ => Err(format!("a binary oid has {} bytes", value.len())),
        }
    } else {
        let s = text(value)?;
        s.parse()
            .map_err(|_| format!("sort value {s:?} is not an oid"))
    }
}

fn float(value: &[u8], binary: bool, width: usize) -> Result<f64, String> {
    if binary {
        return match (width, value) {
            (4, &[a, b, c, d]) => Ok(f64::from(f32::from_be_bytes([a, b, c, d]))),
            (8, bytes) if bytes.len() == 8 => {
                let mut array = [0u8; 8];
                array.copy_from_slice(bytes);
                Ok(f64::from_be_bytes(array))
            }
            _ => Err(format!(
                "a binary float has {} bytes, expected {width}",
                value.len()
            )),
        };
    }
    let s = text(value)?;
    match s {
        "NaN" => Ok(f64::NAN),
        "Infinity" => Ok(f64::INFINITY),
        "-Infinity" => Ok(f64::NEG_INFINITY),
        _ => s
            .parse()
            .map_err(|_| format!("sort value {s:?} is not a float")),
    }
}

/// PostgreSQL's float order: NaN equals NaN and is greater than everything, -0 = 0.
fn cmp_float(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

fn boolean(value: &[u8], binary: bool) -> Result<bool, String> {
    match (binary, value) {
        (true, [0]) | (false, b"f") => Ok(false),
        (true, [1]) | (false, b"t") => Ok(true),
        _ => Err(format!("sort value {value:?} is not a boolean")),
    }
}

/// bpchar compares without its trailing spaces.
fn trim_spaces(value: &[u8]) -> &[u8] {
    let end = value.iter().rposition(|&c| c != b' ').map_or(0, |i| i + 1);
    &value[..end]
}

fn uuid(value: &[u8], binary: bool) -> Result<[u8; 16], String> {
    let mut out = [0u8; 16];
    if binary {
        if value.len() != 16 {
            return Err(format!("a binary uuid has {} bytes", value.len()));
        }
        out.copy_from_slice(value);
        return Ok(out);
    }
    let digits: Vec<u8> = value.iter().copied().filter(|&c| c != b'-').collect();
    if digits.len() != 32 {
        return Err(format!("sort value {value:?} is not a uuid"));
    }
    for (i, pair) in digits.chunks(2).enumerate() {
        let hex = text(pair)?;
        out[i] = u8::from_str_radix(hex, 16)
            .map_err(|_| format!("sort value {value:?} is not a uuid"))?;
    }
    Ok(out)
}

/// A numeric, ordered as PostgreSQL orders them: -Infinity, finite values, Infinity, NaN.
#[derive(Debug, PartialEq, Eq)]
enum Numeric {
    NegInfinity,
    Finite(Decimal),
    Infinity,
    NaN,
}

impl Ord for Numeric {
    fn cmp(&self, other: &Self) -> Ordering {
        let rank = |n: &Numeric| match n {
            Numeric::NegInfinity => 0,
            Numeric::Finite(_) => 1,
            Numeric::Infinity => 2,
            Numeric::NaN => 3,
        };
        match (self, other) {
            (Numeric::Finite(a), Numeric::Finite(b)) => a.cmp(b),
            _ => rank(self).cmp(&rank(other)),
        }
    }
}

impl PartialOrd for Numeric {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A finite decimal: sign and magnitude as significant digits in some base with the
/// weight of the first one (no leading or trailing zero digits; zero has no digits).
#[derive(Debug, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    weight: i64,
    digits: Vec<u16>,
}

impl Decimal {
    fn new(negative: bool, mut weight: i64, digits: &[u16]) -> Decimal {
        let leading = digits.iter().take_while(|&&d| d == 0).count();
        weight -= leading as i64;
        let digits = &digits[leading..];
        let end = digits.iter().rposition(|&d| d != 0).map_or(0, |i| i + 1);
        let digits = digits[..end].to_vec();
        Decimal {
            negative: negative && !digits.is_empty(),
            weight,
            digits,
        }
    }

    fn cmp_magnitude(&self, other: &Decimal) -> Ordering {
        match (self.digits.is_empty(), other.digits.is_empty()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
            (false, false) => self
                .weight
                .cmp(&other.weight)
                .then_with(|| self.digits.cmp(&other.digits)),
        }
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.negative, other.negative) {
            (false, false) => self.cmp_magnitude(other),
            (true, true) => other.cmp_magnitude(self),
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// numeric_out's text: `[-]digits[.digits]`, `NaN`, `Infinity`, `-Infinity`.
fn numeric_text(value: &[u8]) -> Result<Numeric, String> {
    let s = text(value)?;
    match s {
        "NaN" => return Ok(Numeric::NaN),
        "Infinity" => return Ok(Numeric::Infinity),
        "-Infinity" => return Ok(Numeric::NegInfinity),
        _ => {}
    }
    let (negative, unsigned) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int_part, frac_part) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let all_digits = |p: &str| p.bytes().all(|c| c.is_ascii_digit());
    if int_part.is_empty() || !all_digits(int_part) || !all_digits(frac_part) {
        return Err(format!("sort value {s:?} is not a numeric"));
    }
    // Base 10, the first digit weighing 10^(len-1).
    let digits: Vec<u16> = int_part
        .bytes()
        .chain(frac_part.bytes())
        .map(|c| u16::from(c - b'0'))
        .collect();
    Ok(Numeric::Finite(Decimal::new(
        negative,
        int_part.len() as i64 - 1,
        &digits,
    )))
}

/// numeric_send's binary: ndigits, weight, sign, dscale (int16 each), then ndigits
/// base-10000 digits.
fn numeric_binary(value: &[u8]) -> Result<Numeric, String> {
    let bad = || "a binary numeric is malformed".to_owned();
    let word = |i: usize| -> Result<u16, String> {
        match value.get(i * 2..i * 2 + 2) {
            Some(&[a, b]) => Ok(u16::from_be_bytes([a, b])),
            _ => Err(bad()),
        }
    };
    let ndigits = usize::from(word(0)?);
    let weight = i64::from(word(1)? as i16);
    let sign = word(2)?;
    if value.len() != 8 + ndigits * 2 {
        return Err(bad());
    }
    let negative = match sign {
        0x0000 => false,
        0x4000 => true,
        0xC000 => return Ok(Numeric::NaN),
        0xD000 => return Ok(Numeric::Infinity),
        0xF000 => return Ok(Numeric::NegInfinity),
        _ => return Err(bad()),
    };
    let digits = (0..ndigits)
        .map(|i| word(4 + i))
        .collect::<Result<Vec<u16>, String>>()?;
    if digits.iter().any(|&d| d >= 10_000) {
        return Err(bad());
    }
    Ok(Numeric::Finite(Decimal::new(negative, weight, &digits)))
}

/// A date or timestamp in ISO DateStyle text as microseconds since 0001-01-01 (proleptic
/// Gregorian, UTC for timestamptz); infinities at the ends. Other DateStyles are refused:
/// their text does not say the order safely.
fn iso_instant(value: &[u8], type_oid: u32) -> Result<i128, String> {
    let s = text(value)?;
    let refuse = || {
        format!("cannot merge-sort date/time value {s:?} across shards: only ISO DateStyle is supported")
    };
    match s {
        "infinity" => return Ok(i128::MAX),
        "-infinity" => return Ok(i128::MIN),
        _ => {}
    }
    let (s_body, bc) = match s.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    let (date, rest) = match type_oid {
        oid::DATE => (s_body, ""),
        _ => s_body.split_once(' ').ok_or_else(refuse)?,
    };
    let mut parts = date.split('-');
    let (Some(y), Some(m), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse());
    };
    let number = |p: &str, len: Option<usize>| -> Result<i64, String> {
        if p.is_empty()
            || !p.bytes().all(|c| c.is_ascii_digit())
            || len.is_some_and(|l| p.len() != l)
        {
            return Err(refuse());
        }
        p.parse().map_err(|_| refuse())
    };
    if y.len() < 4 {
        return Err(refuse());
    }
    let mut year = number(y, None)?;
    if bc {
        year = 1 - year;
    }
    let days = days_from_civil(year, number(m, Some(2))?, number(d, Some(2))?);
    let mut micros = i128::from(days) * 86_400_000_000;
    if type_oid == oid::DATE {
        return Ok(micros);
    }
    // HH:MM:SS[.ffffff] then, for timestamptz, [+-]HH[:MM[:SS]].
    let (clock, zone) = match type_oid {
        oid::TIMESTAMPTZ => {
            let at = rest.find(['+', '-']).ok_or_else(refuse)?;
            (&rest[..at], Some(&rest[at..]))
        }
        _ => (rest, None),
    };
    let (hms, fraction) = clock.split_once('.').unwrap_or((clock, ""));
    let mut hms = hms.split(':');
    let (Some(h), Some(mi), Some(sec), None) = (hms.next(), hms.next(), hms.next(), hms.next())
    else {
        return Err(refuse());
    };
    if fraction.len() > 6 || !fraction.bytes().all(|c| c.is_ascii_digit()) {
        return Err(refuse());
    }
    let fraction_micros = if fraction.is_empty() {
        0
    } else {
        number(&format!("{fraction:0<6}"), Some(6))?
    };
    let seconds = number(h, Some(2))? * 3600 + number(mi, Some(2))? * 60 + number(sec, Some(2))?;
    micros += i128::from(seconds) * 1_000_000 + i128::from(fraction_micros);
    if let Some(zone) = zone {
        let negative = zone.starts_with('-');
        let mut fields = zone[1..].split(':');
        let mut offset = 0;
        for (i, scale) in [3600, 60, 1].into_iter().enumerate() {
            match fields.next() {
                Some(f) => offset += number(f, Some(2))? * scale,
                None if i > 0 => break,
                None => return Err(refuse()),
            }
        }
        if fields.next().is_some() {
            return Err(refuse());
        }
        let offset = i128::from(if negative { -offset } else { offset }) * 1_000_000;
        micros -= offset;
    }
    Ok(micros)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (year 0 = 1 BC); Howard Hinnant's
/// `days_from_civil`.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scatter::SortColumn;

    const ASC: SortKey = SortKey {
        column: SortColumn::Visible(0),
        descending: false,
        nulls_first: false,
    };

    fn text_cmp(type_oid: u32, a: &str, b: &str) -> Ordering {
        compare(&ASC, type_oid, 0, Some(a.as_bytes()), Some(b.as_bytes()))
            .unwrap_or_else(|e| panic!("{a} vs {b}: {e}"))
    }

    /// Every value in `ascending` sorts strictly before the next one, in text format.
    fn assert_ascending(type_oid: u32, ascending: &[&str]) {
        for (i, a) in ascending.iter().enumerate() {
            for (j, b) in ascending.iter().enumerate() {
                assert_eq!(text_cmp(type_oid, a, b), i.cmp(&j), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn nulls_follow_the_key_and_descending_reverses_values_only() {
        let one = Some(&b"1"[..]);
        let two = Some(&b"2"[..]);
        let cases = [
            (false, false, None, one, Ordering::Greater),
            (false, true, None, one, Ordering::Less),
            (true, true, None, one, Ordering::Less),
            (true, false, one, None, Ordering::Less),
            (false, false, None, None, Ordering::Equal),
            (false, false, one, two, Ordering::Less),
            (true, true, one, two, Ordering::Greater),
        ];
        for (descending, nulls_first, a, b, expected) in cases {
            let key = SortKey {
                column: SortColumn::Hidden(0),
                descending,
                nulls_first,
            };
            assert_eq!(
                compare(&key, oid::INT4, 0, a, b),
                Ok(expected),
                "{descending} {nulls_first} {a:?} {b:?}"
            );
        }
    }

    #[test]
    fn integers_in_both_formats() {
        assert_ascending(
            oid::INT8,
            &["-9223372036854775808", "-10", "-9", "0", "9", "10"],
        );
        assert_ascending(oid::INT2, &["-32768", "-1", "2", "32767"]);
        assert_ascending(oid::OID, &["0", "2", "4294967295"]);
        let bin = |v: i32| v.to_be_bytes().to_vec();
        assert_eq!(
            compare(&ASC, oid::INT4, 1, Some(&bin(-5)), Some(&bin(3))),
            Ok(Ordering::Less)
        );
        assert_eq!(
            compare(
                &ASC,
                oid::OID,
                1,
                Some(&0xFFFF_FFFFu32.to_be_bytes()),
                Some(&1u32.to_be_bytes())
            ),
            Ok(Ordering::Greater)
        );
        assert_eq!(
            compare(
                &ASC,
                oid::INT2,
                1,
                Some(&(-1i16).to_be_bytes()),
                Some(&1i16.to_be_bytes())
            ),
            Ok(Ordering::Less)
        );
        assert!(compare(&ASC, oid::INT8, 1, Some(&[0, 1]), Some(&[0; 8])).is_err());
        assert!(compare(&ASC, oid::INT4, 0, Some(b"x"), Some(b"1")).is_err());
    }

    #[test]
    fn floats_put_nan_last_and_zero_signless() {
        assert_ascending(
            oid::FLOAT8,
            &[
                "-Infinity",
                "-1e+300",
                "-1.5",
                "0",
                "1e-300",
                "2.5",
                "Infinity",
                "NaN",
            ],
        );
        assert_eq!(text_cmp(oid::FLOAT8, "-0", "0"), Ordering::Equal);
        assert_eq!(text_cmp(oid::FLOAT4, "NaN", "NaN"), Ordering::Equal);
        let b8 = |v: f64| v.to_be_bytes().to_vec();
        assert_eq!(
            compare(
                &ASC,
                oid::FLOAT8,
                1,
                Some(&b8(f64::NAN)),
                Some(&b8(f64::INFINITY))
            ),
            Ok(Ordering::Greater)
        );
        assert_eq!(
            compare(&ASC, oid::FLOAT8, 1, Some(&b8(-0.0)), Some(&b8(0.0))),
            Ok(Ordering::Equal)
        );
        let b4 = |v: f32| v.to_be_bytes().to_vec();
        assert_eq!(
            compare(&ASC, oid::FLOAT4, 1, Some(&b4(-2.0)), Some(&b4(1.0))),
            Ok(Ordering::Less)
        );
    }

    #[test]
    fn numeric_text_is_exact() {
        assert_ascending(
            oid::NUMERIC,
            &[
                "-Infinity",
                "-123456789012345678901234567890.5",
                "-100",
                "-99.99",
                "-10.5",
                "-10.05",
                "-1",
                "-0.001",
                "0",
                "0.000000000000000000001",
                "0.05",
                "0.5",
                "1",
                "1.0000000000000000000001",
                "9.99",
                "10",
                "100.01",
                "123456789012345678901234567890",
                "Infinity",
                "NaN",
            ],
        );
        for (a, b) in [("1.50", "1.5"), ("0.00", "0"), ("-0.0", "0"), ("007", "7")] {
            assert_eq!(text_cmp(oid::NUMERIC, a, b), Ordering::Equal, "{a} = {b}");
        }
        for bad in ["1e5", "", "-", "1.2.3", "abc", " 1"] {
            assert!(
                compare(&ASC, oid::NUMERIC, 0, Some(bad.as_bytes()), Some(b"1")).is_err(),
                "{bad}"
            );
        }
    }

    /// numeric_send for a value given as base-10000 digits.
    fn numeric_bin(sign: u16, weight: i16, digits: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend((digits.len() as u16).to_be_bytes());
        out.extend(weight.to_be_bytes());
        out.extend(sign.to_be_bytes());
        out.extend(0u16.to_be_bytes());
        for d in digits {
            out.extend(d.to_be_bytes());
        }
        out
    }

    #[test]
    fn numeric_binary_is_exact() {
        let ascending = [
            numeric_bin(0xF000, 0, &[]),        // -Infinity
            numeric_bin(0x4000, 1, &[1, 5000]), // -10000.5... (1*10000 + 5000) = -15000
            numeric_bin(0x4000, 0, &[12]),      // -12
            numeric_bin(0x4000, -1, &[5000]),   // -0.5
            numeric_bin(0, 0, &[]),             // 0
            numeric_bin(0, -2, &[1]),           // 0.00000001
            numeric_bin(0, -1, &[5000]),        // 0.5
            numeric_bin(0, 0, &[12]),           // 12
            numeric_bin(0, 0, &[12, 1]),        // 12.0001
            numeric_bin(0, 1, &[1]),            // 10000
            numeric_bin(0xD000, 0, &[]),        // Infinity
            numeric_bin(0xC000, 0, &[]),        // NaN
        ];
        for (i, a) in ascending.iter().enumerate() {
            for (j, b) in ascending.iter().enumerate() {
                assert_eq!(
                    compare(&ASC, oid::NUMERIC, 1, Some(a), Some(b)),
                    Ok(i.cmp(&j)),
                    "{i} vs {j}"
                );
            }
        }
        // Trailing zero digits (a larger dscale) do not change the value.
        assert_eq!(
            compare(
                &ASC,
                oid::NUMERIC,
                1,
                Some(&numeric_bin(0, 0, &[12, 0])),
                Some(&numeric_bin(0, 0, &[12]))
            ),
            Ok(Ordering::Equal)
        );
        assert!(compare(&ASC, oid::NUMERIC, 1, Some(&[0, 1]), Some(&[0; 8])).is_err());
    }

    #[test]
    fn text_types_compare_bytewise() {
        assert_ascending(oid::TEXT, &["", "A", "B", "a", "ab", "b", "é"]);
        assert_ascending(oid::VARCHAR, &["abc", "abd"]);
        assert_eq!(text_cmp(oid::BPCHAR, "ab  ", "ab"), Ordering::Equal);
        assert_eq!(text_cmp(oid::BPCHAR, "a", "a!"), Ordering::Less);
        // Under C collation a space sorts before other printable characters.
        assert_eq!(text_cmp(oid::TEXT, "a b", "ab"), Ordering::Less);
        assert_ascending(oid::BOOL, &["f", "t"]);
        assert_eq!(
            compare(&ASC, oid::BOOL, 1, Some(&[1]), Some(&[0])),
            Ok(Ordering::Greater)
        );
    }

    #[test]
    fn uuids_compare_as_bytes() {
        assert_ascending(
            oid::UUID,
            &[
                "00000000-0000-0000-0000-000000000000",
                "0000000a-0000-0000-0000-000000000000",
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                "ffffffff-ffff-ffff-ffff-ffffffffffff",
            ],
        );
        assert_eq!(
            compare(&ASC, oid::UUID, 1, Some(&[0; 16]), Some(&[1; 16])),
            Ok(Ordering::Less)
        );
    }

    #[test]
    fn iso_dates_and_timestamps() {
        assert_ascending(
            oid::DATE,
            &[
                "-infinity",
                "4713-01-01 BC",
                "0044-03-15 BC",
                "0001-12-31 BC",
                "0001-01-01",
                "1999-12-31",
                "2000-01-01",
                "2024-02-29",
                "10000-01-01",
                "infinity",
            ],
        );
        assert_ascending(
            oid::TIMESTAMP,
            &[
                "0001-01-01 00:00:00 BC",
                "1999-12-31 23:59:59.999999",
                "2000-01-01 00:00:00",
                "2000-01-01 00:00:00.5",
                "2000-01-01 00:00:01",
                "infinity",
            ],
        );
        assert_ascending(
            oid::TIMESTAMPTZ,
            &[
                "2000-01-01 10:00:00+05",    // 05:00 UTC
                "2000-01-01 06:00:00+00",    // 06:00 UTC
                "2000-01-01 01:30:00-05:00", // 06:30 UTC
                "2000-01-01 07:00:00.25+00",
            ],
        );
        assert_eq!(
            text_cmp(
                oid::TIMESTAMPTZ,
                "2000-01-01 12:00:00+02",
                "2000-01-01 10:00:00+00"
            ),
            Ordering::Equal
        );
        for other_style in ["01/02/2000", "Sat Jan 01 00:00:00 2000", "01.02.2000"] {
            assert!(
                compare(
                    &ASC,
                    oid::DATE,
                    0,
                    Some(other_style.as_bytes()),
                    Some(b"2000-01-01")
                )
                .is_err(),
                "{other_style}"
            );
        }
        assert_eq!(
            compare(
                &ASC,
                oid::TIMESTAMPTZ,
                1,
                Some(&i64::MIN.to_be_bytes()),
                Some(&0i64.to_be_bytes())
            ),
            Ok(Ordering::Less)
        );
        assert_eq!(
            compare(
                &ASC,
                oid::DATE,
                1,
                Some(&(-1i32).to_be_bytes()),
                Some(&0i32.to_be_bytes())
            ),
            Ok(Ordering::Less)
        );
    }

    #[test]
    fn unsupported_types_and_formats_are_errors() {
        let err = compare(&ASC, 600, 0, Some(b"(1,2)"), Some(b"(1,3)")).expect_err("point");
        assert_eq!(
            err,
            "cannot merge-sort values of type oid 600 across shards"
        );
        assert!(compare(&ASC, oid::INT4, 2, Some(b"1"), Some(b"2")).is_err());
        // NULLs need no type knowledge.
        assert_eq!(compare(&ASC, 600, 0, None, None), Ok(Ordering::Equal));
    }
}
