//! Session parameters that follow a client from one server connection to the next.
//!
//! A client's parameters come from its startup packet and from the SET/RESET
//! statements it ran. Each server connection records what has been applied to
//! it ([`crate::server::ParamState`]); on checkout the proxy runs the difference.
//! Startup parameters are replayed with `set_config`, which takes the value
//! exactly as the startup packet does; SET statements are replayed verbatim.

use std::collections::BTreeMap;
use std::sync::Arc;

use router::SessionEffect;

use crate::quote;
use crate::server::{ParamState, ServerParams};

/// Startup packet keys that are not session parameters.
const NOT_PARAMS: &[&str] = &["user", "database", "replication", "options"];

/// A client's startup parameters as statements, leaving out those equal to
/// the server's login defaults (nothing to do for them).
pub fn from_startup(params: &[(String, String)], defaults: &ServerParams) -> ParamState {
    let mut state = BTreeMap::new();
    let mut set = |name: &str, value: &str| {
        let name = name.to_ascii_lowercase();
        let canonical;
        let value = if name == "client_encoding" {
            canonical = canonical_encoding(value);
            canonical.as_str()
        } else {
            value
        };
        let same_as_server = defaults
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case(&name) && v == value);
        if !same_as_server {
            state.insert(name.clone(), set_config(&name, value).into());
        }
    };
    for (name, value) in params {
        if name == "options" {
            for (n, v) in parse_options(value) {
                set(&n, &v);
            }
        } else if !NOT_PARAMS.contains(&name.as_str()) && !name.starts_with("_pq_.") {
            set(name, value);
        }
    }
    Arc::new(state)
}

/// PostgreSQL's name for a client encoding, as it reports it in
/// ParameterStatus (`utf-8` and `unicode` are `UTF8`, `iso-8859-1` is
/// `LATIN1`); an unknown name comes back as given, for the server to reject.
pub fn canonical_encoding(name: &str) -> String {
    const CANONICAL: &[&str] = &[
        "SQL_ASCII",
        "EUC_JP",
        "EUC_CN",
        "EUC_KR",
        "EUC_TW",
        "EUC_JIS_2004",
        "UTF8",
        "MULE_INTERNAL",
        "LATIN1",
        "LATIN2",
        "LATIN3",
        "LATIN4",
        "LATIN5",
        "LATIN6",
        "LATIN7",
        "LATIN8",
        "LATIN9",
        "LATIN10",
        "WIN1256",
        "WIN1258",
        "WIN866",
        "WIN874",
        "KOI8R",
        "WIN1251",
        "WIN1252",
        "ISO_8859_5",
        "ISO_8859_6",
        "ISO_8859_7",
        "ISO_8859_8",
        "WIN1250",
        "WIN1253",
        "WIN1254",
        "WIN1255",
        "WIN1257",
        "KOI8U",
        "SJIS",
        "BIG5",
        "GBK",
        "UHC",
        "GB18030",
        "JOHAB",
        "SHIFT_JIS_2004",
    ];
    // Aliases from PostgreSQL's encnames.c, compared as it compares them:
    // lower case, letters and digits only.
    const ALIASES: &[(&str, &str)] = &[
        ("unicode", "UTF8"),
        ("iso88591", "LATIN1"),
        ("iso88592", "LATIN2"),
        ("iso88593", "LATIN3"),
        ("iso88594", "LATIN4"),
        ("iso88599", "LATIN5"),
        ("iso885910", "LATIN6"),
        ("iso885913", "LATIN7"),
        ("iso885914", "LATIN8"),
        ("iso885915", "LATIN9"),
        ("iso885916", "LATIN10"),
        ("win", "WIN1251"),
        ("alt", "WIN866"),
        ("koi8", "KOI8R"),
        ("shiftjis", "SJIS"),
        ("mskanji", "SJIS"),
        ("abc", "WIN1258"),
        ("tcvn", "WIN1258"),
        ("tcvn5712", "WIN1258"),
        ("vscii", "WIN1258"),
        ("cp936", "GBK"),
        ("cp949", "UHC"),
        ("windows1250", "WIN1250"),
        ("windows1251", "WIN1251"),
        ("windows1252", "WIN1252"),
        ("windows1253", "WIN1253"),
        ("windows1254", "WIN1254"),
        ("windows1255", "WIN1255"),
        ("windows1256", "WIN1256"),
        ("windows1257", "WIN1257"),
        ("windows1258", "WIN1258"),
        ("windows866", "WIN866"),
        ("windows874", "WIN874"),
    ];
    let clean = |s: &str| -> String {
        s.chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    let wanted = clean(name);
    CANONICAL
        .iter()
        .find(|c| clean(c) == wanted)
        .copied()
        .or_else(|| ALIASES.iter().find(|(a, _)| *a == wanted).map(|(_, c)| *c))
        .map_or_else(|| name.to_owned(), str::to_owned)
}

/// `-c name=value` and `--name=value` pairs of a startup `options` string
/// (backslash escapes a space, as libpq documents).
pub fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut pairs = Vec::new();
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let setting = if w == "-c" {
            words.next()
        } else if let Some(rest) = w.strip_prefix("--") {
            Some(rest.to_owned())
        } else {
            w.strip_prefix("-c").map(str::to_owned)
        };
        if let Some((name, value)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            pairs.push((name.replace('-', "_"), value.to_owned()));
        }
    }
    pairs
}

fn set_config(name: &str, value: &str) -> String {
    format!(
        "SELECT pg_catalog.set_config({}, {}, false)",
        quote::literal(name),
        quote::literal(value)
    )
}

/// The SQL that brings a server's parameters to the client's; empty if equal.
pub fn sync_sql(client: &ParamState, server: &ParamState) -> String {
    let mut sql = String::new();
    // The common case, on every checkout; `Arc`'s `==` compares pointers first.
    if client == server {
        return sql;
    }
    for (name, statement) in client.iter() {
        if server.get(name) != Some(statement) {
            sql.push_str(statement);
            sql.push_str(";\n");
        }
    }
    for name in server.keys() {
        if !client.contains_key(name) {
            sql.push_str("RESET ");
            sql.push_str(&quote::identifier(name));
            sql.push_str(";\n");
        }
    }
    sql
}

/// A statement with `effect` ran on a server connection; its transaction has
/// not committed yet, so what it changed there is unknown until it does. An
/// unknown entry equals no client statement, so the next sync sets or resets it.
/// Returns whether the server's prepared statements are gone (they do not
/// wait for the commit).
pub fn executed(effect: &SessionEffect, server: &mut ParamState) -> bool {
    match effect {
        SessionEffect::Set { name, .. } | SessionEffect::Reset { name } => {
            Arc::make_mut(server).insert(name.clone(), unknown());
            false
        }
        SessionEffect::ResetAll => {
            Arc::make_mut(server)
                .values_mut()
                .for_each(|v| *v = unknown());
            false
        }
        SessionEffect::DiscardAll => {
            Arc::make_mut(server)
                .values_mut()
                .for_each(|v| *v = unknown());
            true
        }
        SessionEffect::DeallocateAll => true,
        SessionEffect::Unchanged => false,
    }
}

fn unknown() -> Arc<str> {
    Arc::from("")
}

/// The transaction of a statement with `effect` committed: the client now
/// wants the setting, and the server has it.
pub fn committed(
    effect: &SessionEffect,
    client: &mut ParamState,
    server: &mut ParamState,
    startup: &ParamState,
) {
    match effect {
        SessionEffect::Set { name, statement } => {
            let statement: Arc<str> = statement.as_str().into();
            Arc::make_mut(client).insert(name.clone(), statement.clone());
            Arc::make_mut(server).insert(name.clone(), statement);
        }
        SessionEffect::Reset { name } => {
            Arc::make_mut(server).remove(name);
            let client = Arc::make_mut(client);
            match startup.get(name) {
                Some(s) => client.insert(name.clone(), s.clone()),
                None => client.remove(name),
            };
        }
        SessionEffect::ResetAll | SessionEffect::DiscardAll => {
            *server = ParamState::default();
            *client = startup.clone();
        }
        SessionEffect::DeallocateAll | SessionEffect::Unchanged => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_split_like_libpq() {
        assert_eq!(
            parse_options("-c search_path=a,b --statement-timeout=5s -cwork_mem=1MB -c x=a\\ b"),
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "1MB".into()),
                ("x".into(), "a b".into()),
            ]
        );
    }

    #[test]
    fn startup_params_equal_to_server_defaults_are_skipped() {
        let defaults: ServerParams = Arc::new(vec![("client_encoding".into(), "UTF8".into())]);
        let state = from_startup(
            &[
                ("user".into(), "u".into()),
                ("client_encoding".into(), "UTF8".into()),
                ("application_name".into(), "it's".into()),
            ],
            &defaults,
        );
        assert_eq!(state.len(), 1);
        assert_eq!(
            &*state["application_name"],
            "SELECT pg_catalog.set_config('application_name', 'it''s', false)"
        );
    }

    #[test]
    fn encodings_are_named_as_postgresql_names_them() {
        assert_eq!(canonical_encoding("utf-8"), "UTF8");
        assert_eq!(canonical_encoding("Unicode"), "UTF8");
        assert_eq!(canonical_encoding("latin1"), "LATIN1");
        assert_eq!(canonical_encoding("ISO-8859-1"), "LATIN1");
        assert_eq!(canonical_encoding("euc_jp"), "EUC_JP");
        assert_eq!(canonical_encoding("windows-1252"), "WIN1252");
        assert_eq!(canonical_encoding("nonsense"), "nonsense");
    }

    #[test]
    fn sync_sets_what_differs_and_resets_what_is_extra() {
        let client = ParamState::new(BTreeMap::from([("a".into(), "SET a = 1".into())]));
        let server = ParamState::new(BTreeMap::from([("b".into(), "SET b = 2".into())]));
        assert_eq!(sync_sql(&client, &server), "SET a = 1;\nRESET \"b\";\n");
        // Equal contents in another map are equal too, not only the same map.
        let server = ParamState::new((*client).clone());
        assert_eq!(sync_sql(&client, &server), "");
    }
}
