//! Hint: routing an application states in a comment, for statements whose
//! shard the parser cannot decide (a function call, a keyless statement
//! known to touch one shard): `/* shardline: shard=2 */` or
//! `/* shardline: key=42 */`; or for the choice between a shard's primary and
//! its replicas, which the application may know better than the text shows:
//! `/* shardline: primary */` or `/* shardline: replica */`. A text holds at
//! most one hint. Comments are found with PostgreSQL's own scanner, so the
//! same text inside a string literal is not a hint.

use pg_query::protobuf::Token;

use crate::analysis::Analysis;
use crate::hash::partition_of;
use crate::key_param::parse_text;
use crate::route::Route;
use crate::shard_map::{ShardId, ShardMap};

/// What a hint asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hint {
    /// Run on this shard.
    Shard(ShardId),
    /// Run where this key value lives (in the text form of the key's type).
    Key(String),
    /// Run on the shard's primary, even if the statement only reads (it must
    /// see the latest writes, say). Does not change which shard.
    Primary,
    /// Prefer one of the shard's replicas. Does not change which shard.
    Replica,
}

/// The hint in `sql`, if any. A malformed hint is an error (the client
/// asked for something; silently ignoring it could run the statement in
/// the wrong place).
pub fn hint(sql: &str) -> Result<Option<Hint>, String> {
    // Cheap check first: most statements carry no hint.
    if !sql.contains("shardline:") {
        return Ok(None);
    }
    let Ok(tokens) = pg_query::scan(sql) else {
        return Ok(None); // PostgreSQL reports what does not scan
    };
    for token in tokens.tokens {
        if token.token != Token::CComment as i32 && token.token != Token::SqlComment as i32 {
            continue;
        }
        let text = sql
            .get(token.start as usize..token.end as usize)
            .unwrap_or_default();
        let body = text
            .strip_prefix("/*")
            .map(|t| t.strip_suffix("*/").unwrap_or(t))
            .or_else(|| text.strip_prefix("--"))
            .unwrap_or(text)
            .trim();
        let Some(rest) = body.strip_prefix("shardline:") else {
            continue;
        };
        return parse(rest.trim()).map(Some);
    }
    Ok(None)
}

fn parse(spec: &str) -> Result<Hint, String> {
    let bad = || {
        format!("routing hint \"shardline: {spec}\" must be \"shardline: shard=N\", \"shardline: key=VALUE\", \"shardline: primary\" or \"shardline: replica\"")
    };
    match spec {
        "primary" => return Ok(Hint::Primary),
        "replica" => return Ok(Hint::Replica),
        _ => {}
    }
    let (name, value) = spec.split_once('=').ok_or_else(bad)?;
    let value = value.trim();
    match name.trim() {
        "shard" => value
            .parse()
            .map(|n| Hint::Shard(ShardId(n)))
            .map_err(|_| bad()),
        "key" if !value.is_empty() => Ok(Hint::Key(unquote(value))),
        _ => Err(bad()),
    }
}

/// The route once a hint is taken into account. A hint decides where the
/// parser could not (home, or every shard); where the statement's own keys
/// decide, a hint that disagrees is refused rather than followed.
/// [`Hint::Primary`] and [`Hint::Replica`] choose among a shard's servers,
/// not the shard: they leave the route as it is.
pub fn apply_hint(route: Route, hint: &Hint, analysis: &Analysis, map: &ShardMap) -> Route {
    let hinted = match hint {
        Hint::Primary | Hint::Replica => return route,
        Hint::Shard(id) => {
            if !map.shards.contains_key(id) {
                return Route::Refused(format!(
                    "routing hint names shard {id}, which does not exist"
                ));
            }
            *id
        }
        Hint::Key(value) => match key_owner(value, analysis, map) {
            Ok(id) => id,
            Err(why) => return Route::Refused(why),
        },
    };
    match route {
        Route::Home | Route::Every => Route::Shard(hinted),
        Route::Shard(id) if id == hinted => route,
        Route::Shard(id) => Route::Refused(format!(
            "routing hint says shard {hinted}, but the statement's key is on shard {id}"
        )),
        Route::Shards(_) => Route::Refused(format!(
            "routing hint says shard {hinted}, but the statement's keys are on several shards"
        )),
        refused @ Route::Refused(_) => refused,
    }
}

/// The owner of a hinted key: in the group of the statement's sharded table,
/// or of the only group there is.
fn key_owner(value: &str, analysis: &Analysis, map: &ShardMap) -> Result<ShardId, String> {
    let mut groups = analysis
        .targets
        .iter()
        .filter_map(|t| map.tables.get(&t.table))
        .map(|t| t.group.as_str())
        .collect::<Vec<_>>();
    groups.sort_unstable();
    groups.dedup();
    let group = match (groups.as_slice(), map.groups.len()) {
        ([one], _) => &map.groups[*one],
        ([], 1) => map.groups.values().next().expect("one group"),
        _ => {
            return Err(format!(
                "routing hint key={value} is ambiguous: use it on a statement about one sharded table (or colocation group), or use shard=N"
            ))
        }
    };
    let key = parse_text(group.key_type, value)?;
    let p = partition_of(&[Some(&key)], group.modulus()) as usize;
    Ok(group.partitions[p].owner)
}

/// `'it''s'` -> `it's`; an unquoted value is taken as written.
fn unquote(value: &str) -> String {
    match value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        Some(inner) => inner.replace("''", "'"),
        None => value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_in_comments() {
        for (sql, want) in [
            (
                "/* shardline: shard=2 */ SELECT f()",
                Some(Hint::Shard(ShardId(2))),
            ),
            (
                "SELECT f() /*shardline:shard = 0*/",
                Some(Hint::Shard(ShardId(0))),
            ),
            (
                "-- shardline: key=42\nSELECT f()",
                Some(Hint::Key("42".into())),
            ),
            (
                "/* shardline: key='o''brien' */ SELECT 1",
                Some(Hint::Key("o'brien".into())),
            ),
            ("/* shardline: primary */ SELECT 1", Some(Hint::Primary)),
            ("SELECT 1 /*shardline:replica*/", Some(Hint::Replica)),
            ("-- shardline:  primary \nSELECT 1", Some(Hint::Primary)),
            ("SELECT '/* shardline: shard=2 */'", None),
            ("SELECT '/* shardline: primary */'", None),
            ("SELECT 1 /* other comment */", None),
            ("SELECT 1", None),
        ] {
            assert_eq!(hint(sql), Ok(want), "{sql}");
        }
    }

    #[test]
    fn hints_decide_only_what_the_keys_leave_open() {
        use crate::analysis::analyse;
        use crate::shard_map::{KeyType, Shard, Table};
        let shards = [ShardId(0), ShardId(1)];
        let mut map = ShardMap::default();
        for id in shards {
            let primary = format!("h:{}", 5432 + id.0);
            map.shards.insert(
                id,
                Shard {
                    id,
                    primary,
                    replicas: vec![],
                },
            );
        }
        let group = crate::placement::placed_group("g", KeyType::Int8, 8, &shards);
        map.groups.insert("g".into(), group);
        let table = Table {
            name: "t".into(),
            key: "id".into(),
            key_type: KeyType::Int8,
            group: "g".into(),
        };
        map.tables.insert("t".into(), table);
        let owner = |k: i64| {
            map.groups["g"].partitions
                [partition_of(&[Some(&crate::hash::KeyValue::Int8(k))], 8) as usize]
                .owner
        };
        let run = |sql: &str| {
            let analysis = analyse(sql, &map).expect("analyses");
            let route = crate::route::route(&analysis, &map, crate::route::Params::default());
            match hint(sql).expect("well-formed") {
                Some(h) => apply_hint(route, &h, &analysis, &map),
                None => route,
            }
        };
        assert_eq!(
            run("/* shardline: shard=1 */ SELECT count(*) FROM t"),
            Route::Shard(ShardId(1))
        );
        assert_eq!(
            run("/* shardline: key=7 */ SELECT f()"),
            Route::Shard(owner(7))
        );
        assert_eq!(
            run(&format!(
                "/* shardline: shard={} */ SELECT * FROM t WHERE id = 7",
                owner(7).0
            )),
            Route::Shard(owner(7))
        );
        let other = if owner(7) == ShardId(0) { 1 } else { 0 };
        assert!(matches!(
            run(&format!(
                "/* shardline: shard={other} */ SELECT * FROM t WHERE id = 7"
            )),
            Route::Refused(_)
        ));
        assert!(matches!(
            run("/* shardline: shard=9 */ SELECT 1"),
            Route::Refused(_)
        ));
        assert!(matches!(
            run("/* shardline: key=abc */ SELECT f()"),
            Route::Refused(_)
        ));
        for server in ["primary", "replica"] {
            assert_eq!(
                run(&format!("/* shardline: {server} */ SELECT count(*) FROM t")),
                Route::Every,
                "{server}"
            );
            assert_eq!(
                run(&format!(
                    "/* shardline: {server} */ SELECT * FROM t WHERE id = 7"
                )),
                Route::Shard(owner(7)),
                "{server}"
            );
            assert_eq!(
                run(&format!("/* shardline: {server} */ SELECT 1")),
                Route::Home,
                "{server}"
            );
        }
    }

    #[test]
    fn malformed_hints_are_errors() {
        for sql in [
            "/* shardline: shard=x */ SELECT 1",
            "/* shardline: shard */ SELECT 1",
            "/* shardline: replica=1 */ SELECT 1",
            "/* shardline: key= */ SELECT 1",
            "/* shardline: primary=1 */ SELECT 1",
            "/* shardline: primary replica */ SELECT 1",
            "/* shardline: primary, shard=1 */ SELECT 1",
            "/* shardline: replicas */ SELECT 1",
            "/* shardline: */ SELECT 1",
        ] {
            assert!(hint(sql).is_err(), "{sql}");
        }
    }
}
