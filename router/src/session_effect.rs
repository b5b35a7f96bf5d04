//! `SessionEffect`: what a statement text does to the session state of its server connection.
//!
//! In transaction pooling a client's session settings must follow it from one server
//! connection to the next. The proxy sees each statement text (a simple Query, or the
//! text of an extended-protocol Parse), asks [`session_effects`] what it changes, and
//! replays the resulting state on the next server connection it hands to that client.
//!
//! [`may_have_session_effects`] is the hot-path prefilter: a SIMD search of the raw
//! bytes that rules out almost every query without parsing. Texts that pass it are
//! parsed with PostgreSQL's own grammar (pg_query), never with a hand-written matcher.

use pg_query::protobuf::{DiscardMode, RawStmt, VariableSetKind, VariableSetStmt};
use pg_query::NodeEnum;

use crate::error::{Error, Result};

/// One change a statement makes to the session state of its server connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SessionEffect {
    /// `SET [SESSION] name ...` or `SET name FROM CURRENT` (never `SET LOCAL`).
    ///
    /// `name` is the GUC name, lowercased, as PostgreSQL's grammar names it:
    /// `SET TIME ZONE` is `timezone`, `SET NAMES` is `client_encoding`, `SET ROLE` is
    /// `role`, `SET SESSION AUTHORIZATION` is `session_authorization`.
    ///
    /// `statement` is the source text of that one statement, sliced from the input and
    /// trimmed, without its `;` (not a deparse), so replaying it alone re-applies the
    /// setting. It may contain comments, including a trailing `--` comment, so join
    /// several with `";\n"`, not `"; "`.
    Set { name: String, statement: String },
    /// `RESET name`, `SET name TO DEFAULT` (also `SET TIME ZONE LOCAL|DEFAULT`,
    /// `SET NAMES DEFAULT`, `SET SESSION AUTHORIZATION DEFAULT`): `name` lowercased.
    Reset { name: String },
    /// `RESET ALL`.
    ResetAll,
    /// `DISCARD ALL`: resets every setting and drops prepared statements, cursors,
    /// temporary tables, advisory locks and LISTEN registrations.
    DiscardAll,
    /// `DEALLOCATE [PREPARE] ALL`: drops every prepared statement.
    DeallocateAll,
    /// A SET, RESET, DISCARD or DEALLOCATE statement that changes nothing beyond
    /// its transaction (`SET LOCAL`, `SET TRANSACTION`, `DISCARD PLANS`,
    /// `DEALLOCATE name`). Listed so that the effects of a text line up one to
    /// one with the command tags its statements complete with.
    Unchanged,
}

impl SessionEffect {
    /// Whether a CommandComplete tag is one a statement of this family ends with:
    /// `SET`, `RESET`, `DISCARD ...` or `DEALLOCATE ...`.
    pub fn completes_with(tag: &[u8]) -> bool {
        tag == b"SET"
            || tag == b"RESET"
            || tag.starts_with(b"DISCARD")
            || tag.starts_with(b"DEALLOCATE")
    }
}

/// GUCs whose value lives for one transaction even when set without `LOCAL`:
/// PostgreSQL reinitialises them from the `default_transaction_*` settings at the start
/// of every transaction, so there is nothing to carry to another connection.
const TRANSACTION_SCOPED_GUCS: [&str; 3] = [
    "transaction_isolation",
    "transaction_read_only",
    "transaction_deferrable",
];

/// Cheap prefilter over raw statement bytes: `false` means the text certainly has no
/// session effect, so the caller can skip parsing.
///
/// Every statement with a session effect starts with `SET`, `RESET`, `DISCARD` or
/// `DEALLOCATE`, and every statement starts at the start of the text or after a `;`.
/// So this returns `true` when, at the start of the text or after any `;` byte, past
/// whitespace and comments, one of those words follows in any letter case as a whole
/// word (not followed by an identifier byte: letter, digit, `_`, `$` or non-ASCII).
///
/// A `;` inside a string literal or comment is looked at too; that only adds false
/// positives, which are expected and harmless (`SELECT 'a; reset'`): the caller parses
/// and can cache those. It runs on every simple Query, so it finds the `;` bytes with
/// SIMD and looks at nothing else. No allocation.
pub fn may_have_session_effects(sql: &[u8]) -> bool {
    std::iter::once(0)
        .chain(memchr::memchr_iter(b';', sql).map(|at| at + 1))
        .any(|start| keyword_at(sql, skip_blanks(sql, start)))
}

/// [`may_have_session_effects`] for the text of a Parse, which holds one
/// statement (PostgreSQL refuses more): only where that statement starts,
/// past blanks, comments and empty statements, is looked at, with no search
/// for `;` (so `SELECT 'a; reset'` is no false positive here).
pub fn statement_may_have_session_effects(sql: &[u8]) -> bool {
    let mut at = skip_blanks(sql, 0);
    while sql.get(at) == Some(&b';') {
        at = skip_blanks(sql, at + 1);
    }
    keyword_at(sql, at)
}

/// The first byte at or after `at` that is neither whitespace nor inside a comment
/// (`-- ...` to the end of the line, `/* ... */` nested), as PostgreSQL's lexer sees it.
fn skip_blanks(sql: &[u8], mut at: usize) -> usize {
    loop {
        match sql.get(at..).unwrap_or_default() {
            [b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' | b'\x0b', ..] => at += 1,
            [b'-', b'-', ..] => match memchr::memchr(b'\n', &sql[at..]) {
                Some(end) => at += end + 1,
                None => return sql.len(),
            },
            [b'/', b'*', ..] => {
                let mut depth = 0usize;
                loop {
                    match sql.get(at..).unwrap_or_default() {
                        [] => return sql.len(),
                        [b'/', b'*', ..] => {
                            depth += 1;
                            at += 2;
                        }
                        [b'*', b'/', ..] => {
                            depth -= 1;
                            at += 2;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => at += 1,
                    }
                }
            }
            _ => return at,
        }
    }
}

/// Whether one of the keywords starts at `sql[at]` as a whole word.
fn keyword_at(sql: &[u8], at: usize) -> bool {
    // `| 0x20` lowercases ASCII letters; only 'S' and 's' become 's', and so on.
    match sql.get(at).map(|b| b | 0x20) {
        Some(b's') => is_word_at(sql, at, b"set"),
        Some(b'r') => is_word_at(sql, at, b"reset"),
        Some(b'd') => is_word_at(sql, at, b"discard") || is_word_at(sql, at, b"deallocate"),
        _ => false,
    }
}

/// Whether `word` (lowercase ASCII) is at `sql[at..]`, in any case, and is not
/// followed by an identifier byte.
fn is_word_at(sql: &[u8], at: usize, word: &[u8]) -> bool {
    let Some(candidate) = sql.get(at..at + word.len()) else {
        return false;
    };
    // `Option::is_none_or` would read better but needs Rust 1.82; the workspace says 1.80.
    candidate.eq_ignore_ascii_case(word)
        && !matches!(sql.get(at + word.len()), Some(&next) if IDENTIFIER_BYTES[usize::from(next)])
}

/// The bytes that can continue an unquoted identifier or keyword in PostgreSQL's lexer
/// (`ident_cont` in scan.l): ASCII letters and digits, `_`, `$` and every non-ASCII byte.
static IDENTIFIER_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        table[byte] = b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
        byte += 1;
    }
    table
};

/// All session effects of the statements in `sql`, in statement order.
///
/// Statements without a session effect produce nothing; neither do `SET LOCAL`,
/// `SET TRANSACTION ...`, `SET SESSION CHARACTERISTICS AS TRANSACTION ...`,
/// `SET TRANSACTION SNAPSHOT` nor settings of the transaction-scoped GUCs
/// (`transaction_isolation`, `transaction_read_only`, `transaction_deferrable`).
///
/// A text that does not parse returns an empty `Vec`: PostgreSQL parses a whole simple
/// Query (or Parse) before running any of it, so it rejects the text without applying
/// anything and reports the error to the client itself. Use [`try_session_effects`] to
/// tell "no effects" from "did not parse".
///
/// Cost: one libpg_query parse plus a protobuf decode of the tree; the caller should
/// run [`may_have_session_effects`] first and cache results (see `EffectsCache`).
pub fn session_effects(sql: &str) -> Vec<SessionEffect> {
    try_session_effects(sql).unwrap_or_default()
}

/// Like [`session_effects`], but reports a text that does not parse as an error.
pub fn try_session_effects(sql: &str) -> Result<Vec<SessionEffect>> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT)?;
    let mut effects = Vec::new();
    for raw in &parsed.protobuf.stmts {
        let Some(node) = raw.stmt.as_ref().and_then(|stmt| stmt.node.as_ref()) else {
            continue;
        };
        let effect = match node {
            NodeEnum::VariableSetStmt(set) => variable_set_effect(set, raw, sql)?,
            NodeEnum::DiscardStmt(discard) => {
                (discard.target() == DiscardMode::DiscardAll).then_some(SessionEffect::DiscardAll)
            }
            NodeEnum::DeallocateStmt(deallocate) => {
                deallocate.isall.then_some(SessionEffect::DeallocateAll)
            }
            _ => continue,
        };
        effects.push(effect.unwrap_or(SessionEffect::Unchanged));
    }
    Ok(effects)
}

/// The effect of one `SET`/`RESET` statement, if it outlives its transaction.
fn variable_set_effect(
    set: &VariableSetStmt,
    raw: &RawStmt,
    sql: &str,
) -> Result<Option<SessionEffect>> {
    if set.is_local {
        return Ok(None);
    }
    let name = || set.name.to_ascii_lowercase();
    let effect = match set.kind() {
        // `SET TRANSACTION`, `SET SESSION CHARACTERISTICS`, `SET TRANSACTION SNAPSHOT`.
        VariableSetKind::VarSetMulti | VariableSetKind::Undefined => None,
        _ if TRANSACTION_SCOPED_GUCS
            .iter()
            .any(|guc| set.name.eq_ignore_ascii_case(guc)) =>
        {
            None
        }
        VariableSetKind::VarSetValue | VariableSetKind::VarSetCurrent => Some(SessionEffect::Set {
            name: name(),
            statement: statement_text(raw, sql)?.to_owned(),
        }),
        VariableSetKind::VarSetDefault | VariableSetKind::VarReset => {
            Some(SessionEffect::Reset { name: name() })
        }
        VariableSetKind::VarResetAll => Some(SessionEffect::ResetAll),
    };
    Ok(effect)
}

/// The trimmed source text of one parsed statement. pg_query reports byte offsets;
/// a length of 0 means "to the end of the text".
fn statement_text<'sql>(raw: &RawStmt, sql: &'sql str) -> Result<&'sql str> {
    let span_error = || Error::StatementSpan {
        location: raw.stmt_location,
        len: raw.stmt_len,
        text_len: sql.len(),
    };
    let start = usize::try_from(raw.stmt_location).map_err(|_| span_error())?;
    let len = usize::try_from(raw.stmt_len).map_err(|_| span_error())?;
    let text = if len == 0 {
        sql.get(start..)
    } else {
        start.checked_add(len).and_then(|end| sql.get(start..end))
    };
    text.map(str::trim).ok_or_else(span_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, statement: &str) -> SessionEffect {
        SessionEffect::Set {
            name: name.to_owned(),
            statement: statement.to_owned(),
        }
    }

    fn reset(name: &str) -> SessionEffect {
        SessionEffect::Reset {
            name: name.to_owned(),
        }
    }

    #[test]
    fn effects_of_statements() {
        // (sql, prefilter, effects)
        let cases: Vec<(&str, bool, Vec<SessionEffect>)> = vec![
            (
                "SET search_path TO a, b",
                true,
                vec![set("search_path", "SET search_path TO a, b")],
            ),
            (
                "set statement_timeout = '5s'",
                true,
                vec![set("statement_timeout", "set statement_timeout = '5s'")],
            ),
            (
                "SET TIME ZONE 'UTC'",
                true,
                vec![set("timezone", "SET TIME ZONE 'UTC'")],
            ),
            ("SET LOCAL x = 1", true, vec![SessionEffect::Unchanged]),
            (
                "SET LOCAL search_path TO DEFAULT",
                true,
                vec![SessionEffect::Unchanged],
            ),
            (
                "SET SESSION datestyle = ISO",
                true,
                vec![set("datestyle", "SET SESSION datestyle = ISO")],
            ),
            ("RESET search_path", true, vec![reset("search_path")]),
            ("RESET ALL", true, vec![SessionEffect::ResetAll]),
            ("DISCARD ALL", true, vec![SessionEffect::DiscardAll]),
            ("discard plans", true, vec![SessionEffect::Unchanged]),
            ("DEALLOCATE ALL", true, vec![SessionEffect::DeallocateAll]),
            (
                "DEALLOCATE PREPARE ALL",
                true,
                vec![SessionEffect::DeallocateAll],
            ),
            ("DEALLOCATE stmt1", true, vec![SessionEffect::Unchanged]),
            (
                "SELECT 1; SET application_name = 'x'; SELECT 2",
                true,
                vec![set("application_name", "SET application_name = 'x'")],
            ),
            ("UPDATE t SET a = 1", false, vec![]),
            ("SELECT 'a; reset'", true, vec![]),
            ("SELECT 1", false, vec![]),
            ("SELECT * FROM t LIMIT 10 OFFSET 20", false, vec![]),
            (
                "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
                true,
                vec![SessionEffect::Unchanged],
            ),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
                true,
                vec![SessionEffect::Unchanged],
            ),
            (
                "SET transaction_isolation = 'serializable'",
                true,
                vec![SessionEffect::Unchanged],
            ),
            (
                "RESET TRANSACTION ISOLATION LEVEL",
                true,
                vec![SessionEffect::Unchanged],
            ),
            ("SET work_mem TO DEFAULT", true, vec![reset("work_mem")]),
            (
                "SET NAMES 'UTF8'",
                true,
                vec![set("client_encoding", "SET NAMES 'UTF8'")],
            ),
            ("SET ROLE alice", true, vec![set("role", "SET ROLE alice")]),
            ("RESET ROLE", true, vec![reset("role")]),
            (
                "SET SESSION AUTHORIZATION bob",
                true,
                vec![set(
                    "session_authorization",
                    "SET SESSION AUTHORIZATION bob",
                )],
            ),
            (
                "SET SESSION AUTHORIZATION DEFAULT",
                true,
                vec![reset("session_authorization")],
            ),
            ("SET TIME ZONE LOCAL", true, vec![reset("timezone")]),
            (
                "SET \"Search_Path\" = public",
                true,
                vec![set("search_path", "SET \"Search_Path\" = public")],
            ),
            (
                "SET search_path FROM CURRENT",
                true,
                vec![set("search_path", "SET search_path FROM CURRENT")],
            ),
            (
                "  SET a.b = 1 ;\n\tRESET a.c;DISCARD ALL;",
                true,
                vec![
                    set("a.b", "SET a.b = 1"),
                    reset("a.c"),
                    SessionEffect::DiscardAll,
                ],
            ),
            (
                "SELECT 'é'; SET application_name = 'ü'",
                true,
                vec![set("application_name", "SET application_name = 'ü'")],
            ),
            ("SELEC 1; SET a.b = 1", true, vec![]),
            ("SET search_path TO", true, vec![]),
            ("", false, vec![]),
        ];
        for (sql, prefilter, effects) in cases {
            assert_eq!(
                may_have_session_effects(sql.as_bytes()),
                prefilter,
                "prefilter of {sql:?}"
            );
            assert_eq!(session_effects(sql), effects, "effects of {sql:?}");
            if !prefilter {
                assert!(effects.is_empty(), "prefilter hid an effect of {sql:?}");
            }
        }
    }

    #[test]
    fn unparseable_text_is_an_error_for_try_and_empty_otherwise() {
        for sql in ["SET search_path TO", "SELEC 1", "SET a = 1; \0"] {
            assert!(
                matches!(try_session_effects(sql), Err(Error::Parse(_))),
                "{sql:?}"
            );
            assert_eq!(session_effects(sql), vec![], "{sql:?}");
        }
    }

    /// The prefilter never hides an effect: on random texts built from statements,
    /// separators, comments and literals, whenever it says no, the parser agrees.
    #[test]
    fn prefilter_never_hides_an_effect() {
        use rand::{Rng, SeedableRng};
        let pieces = [
            "SET a.b = 1",
            "reset a.c",
            "Discard ALL",
            "DEALLOCATE ALL",
            "SELECT 1",
            "select 'x; set a.b = 2'",
            "UPDATE t SET a = 1",
            ";",
            "; ",
            " ",
            "\n\t",
            "/* c */",
            "/* /* ; */ SET */",
            "-- ; reset\n",
            "settings",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut texts_with_effects = 0;
        for _ in 0..3_000 {
            let sql: String = (0..rng.gen_range(1..7))
                .map(|_| pieces[rng.gen_range(0..pieces.len())])
                .collect();
            let effects = session_effects(&sql);
            if !may_have_session_effects(sql.as_bytes()) {
                assert_eq!(effects, vec![], "prefilter hid an effect of {sql:?}");
            } else if !effects.is_empty() {
                texts_with_effects += 1;
            }
            let statements = pg_query::parse(&sql, pg_query::ParserOptions::DEFAULT)
                .map_or(0, |p| p.protobuf.stmts.len());
            if statements <= 1 && !statement_may_have_session_effects(sql.as_bytes()) {
                assert_eq!(effects, vec![], "Parse prefilter hid an effect of {sql:?}");
            }
        }
        // The generator does produce texts with effects, so the check above had work.
        assert!(texts_with_effects > 100, "{texts_with_effects}");
    }

    #[test]
    fn prefilter_matches_whole_words_in_any_case() {
        let cases = [
            ("set x = 1", true),
            ("/*c*/SET x = 1", true),
            ("select 1;reset all", true),
            ("ReSeT x", true),
            ("Discard all", true),
            ("deallocate all", true),
            ("SET\"x\" = 1", true),
            ("select setting from pg_settings", false),
            ("select * from asset", false),
            ("select offset_ from dataset_", false),
            ("select $1set", false),
            ("select 1 offset 3", false),
            ("select discarded, deallocated", false),
            ("s", false),
            ("se", false),
            ("-- x\nSET a = 1", true),
            ("/* a /* b */ c */ reset x", true),
            ("select 1;\x0c\r\n  deallocate all", true),
            // A `;` in a comment or literal counts: a harmless false positive.
            ("select 1 -- ; set", true),
            ("select 1 /* ; */", false),
            ("update t set a = 1", false),
            (";", false),
        ];
        for (sql, expected) in cases {
            assert_eq!(
                may_have_session_effects(sql.as_bytes()),
                expected,
                "{sql:?}"
            );
        }
    }
}
