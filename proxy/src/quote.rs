//! Quote: text made safe to put in the SQL the proxy writes itself.

/// `s` as an SQL string literal, as PostgreSQL's `quote_literal` writes it:
/// an escape string (`E'...'`) when it holds a backslash, so it reads the
/// same whatever `standard_conforming_strings` is.
pub fn literal(s: &str) -> String {
    let escaped = s.replace('\'', "''");
    if s.contains('\\') {
        format!("E'{}'", escaped.replace('\\', "\\\\"))
    } else {
        format!("'{escaped}'")
    }
}

/// `s` as an SQL identifier, always quoted.
pub fn identifier(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_like_postgres() {
        let cases = [
            ("plain", "'plain'", "\"plain\""),
            ("it's", "'it''s'", "\"it's\""),
            ("a\\b", "E'a\\\\b'", "\"a\\b\""),
            ("say \"hi\"", "'say \"hi\"'", "\"say \"\"hi\"\"\""),
        ];
        for (s, quoted, ident) in cases {
            assert_eq!(literal(s), quoted);
            assert_eq!(identifier(s), ident);
        }
    }
}
