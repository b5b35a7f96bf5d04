//! Insert split: a multi-row `INSERT ... VALUES` whose rows belong to
//! different shards, cut into one `INSERT` per shard.
//!
//! Each shard holds only the partitions it owns, so a row sent to another
//! shard fails there ("no partition of relation ... found for row"); the
//! statement must be cut by row. The cut is made on PostgreSQL's own parse
//! tree: only the VALUES rows change, so the column list, `OVERRIDING`,
//! `ON CONFLICT` and `RETURNING` reach every shard as the client wrote them.
//! Parameters are renumbered densely per shard (PostgreSQL requires every
//! `$n` up to the highest to have a type), and each piece says which of the
//! client's parameters it needs, so the caller can rebuild Parse and Bind.

use std::collections::{BTreeMap, BTreeSet};

use pg_query::protobuf::{self, node::Node as N, Node, ParseResult, Token};

use crate::analysis::{Analysis, KeySource, StatementKind, TableTarget};
use crate::hash::{partition_of, KeyValue};
use crate::route::{param_key, Params};
use crate::shard_map::{ShardId, ShardMap};

/// One shard's part of a split INSERT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardInsert {
    pub shard: ShardId,
    /// The INSERT with only this shard's rows, deparsed. Parameters renumbered $1..$k.
    pub sql: String,
    /// For each new parameter $i (1-based, in order), the client's original parameter number.
    pub params: Vec<u16>,
}

/// Splits a single-statement `INSERT ... VALUES` (the analysis shows one sharded target with
/// insert_rows > 1) into per-shard INSERTs, in ascending shard order. Rows keep their relative
/// order.
///
/// `analysis` must be the analysis of `sql` against `map`. When every row belongs to one shard
/// the result is that shard with `sql` unchanged and `params` = `1..=` the highest `$n` in it.
/// A key parameter PostgreSQL would reject (or the router cannot read) sends the whole
/// statement, unchanged, to [`ShardMap::HOME`], as [`crate::route`] does: PostgreSQL then
/// reports the error, and no other shard has taken part of the rows.
///
/// An `Err` is a message for the client (SQLSTATE 0A000, feature not supported).
pub fn split_insert(
    sql: &str,
    analysis: &Analysis,
    map: &ShardMap,
    params: Params<'_>,
) -> Result<Vec<ShardInsert>, String> {
    if let Some(why) = &analysis.refusal {
        return Err(why.clone());
    }
    let mut parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT)
        .map_err(|e| e.to_string())?
        .protobuf;
    if parsed.stmts.len() != 1 {
        return Err(
            "a multi-row INSERT into a sharded table must be sent on its own, not with other statements"
                .into(),
        );
    }
    check_values(&parsed)?;
    let target = insert_target(analysis)?;
    let rows = std::mem::take(values_rows(&mut parsed));
    if rows.len() != target.insert_rows {
        return Err(format!(
            "the INSERT into {} has {} rows but its analysis counted {}; analyse this text again",
            target.table,
            rows.len(),
            target.insert_rows
        ));
    }
    let Some(owners) = row_owners(target, &rows, map, params)? else {
        return Ok(vec![unchanged(sql, ShardMap::HOME)?]);
    };
    let mut by_shard: BTreeMap<ShardId, Vec<Node>> = BTreeMap::new();
    for (row, owner) in rows.into_iter().zip(owners) {
        by_shard.entry(owner).or_default().push(row);
    }
    if by_shard.len() == 1 {
        let (&shard, _) = by_shard.first_key_value().expect("one entry");
        return Ok(vec![unchanged(sql, shard)?]);
    }
    let mut pieces = Vec::with_capacity(by_shard.len());
    for (shard, shard_rows) in by_shard {
        *values_rows(&mut parsed) = shard_rows;
        let deparsed = parsed
            .deparse(pg_query::DeparseOptions::default())
            .map_err(|e| e.to_string())?;
        let (sql, params) = renumber(&deparsed)?;
        pieces.push(ShardInsert { shard, sql, params });
    }
    Ok(pieces)
}

/// The one sharded table the INSERT writes.
fn insert_target(analysis: &Analysis) -> Result<&TableTarget, String> {
    if analysis.kind != StatementKind::Insert {
        return Err("only INSERT ... VALUES can be split by shard".into());
    }
    match analysis.targets.as_slice() {
        [target] if target.writes => Ok(target),
        [] => Err("the INSERT does not write a sharded table".into()),
        [target, ..] => Err(format!(
            "a multi-row INSERT into sharded table {} spanning shards cannot also read sharded tables",
            target.table
        )),
    }
}

/// Checks that `parsed` is one plain `INSERT ... VALUES` (no WITH, no query
/// source, nothing applied to the VALUES).
fn check_values(parsed: &ParseResult) -> Result<(), String> {
    let statement = parsed
        .stmts
        .first()
        .and_then(|s| s.stmt.as_ref())
        .and_then(|s| s.node.as_ref());
    let Some(N::InsertStmt(insert)) = statement else {
        return Err("only INSERT ... VALUES can be split by shard".into());
    };
    if insert.with_clause.is_some() {
        return Err("a multi-row INSERT with WITH cannot be split by shard".into());
    }
    match insert.select_stmt.as_ref().and_then(|s| s.node.as_ref()) {
        Some(N::SelectStmt(select)) if !select.values_lists.is_empty() => {
            if is_plain_values(select) {
                Ok(())
            } else {
                Err("VALUES with ORDER BY, LIMIT, OFFSET or FOR UPDATE cannot be split by shard".into())
            }
        }
        _ => Err("INSERT ... SELECT into a sharded table cannot be split by shard; list the rows with VALUES".into()),
    }
}

/// The VALUES rows of the INSERT that [`check_values`] accepted.
fn values_rows(parsed: &mut ParseResult) -> &mut Vec<Node> {
    let statement = parsed
        .stmts
        .first_mut()
        .and_then(|s| s.stmt.as_mut())
        .and_then(|s| s.node.as_mut());
    let Some(N::InsertStmt(insert)) = statement else {
        unreachable!("check_values accepted only an INSERT");
    };
    match insert.select_stmt.as_mut().and_then(|s| s.node.as_mut()) {
        Some(N::SelectStmt(select)) => &mut select.values_lists,
        _ => unreachable!("check_values accepted only INSERT ... VALUES"),
    }
}

/// `VALUES (...), (...)` and nothing else: ORDER BY, LIMIT or OFFSET on the
/// VALUES decide which rows are inserted, so the rows cannot be dealt out.
fn is_plain_values(select: &protobuf::SelectStmt) -> bool {
    select.sort_clause.is_empty()
        && select.limit_count.is_none()
        && select.limit_offset.is_none()
        && select.locking_clause.is_empty()
        && select.with_clause.is_none()
        && select.into_clause.is_none()
}

/// The shard of every row, in row order; `None` when a key parameter cannot be
/// read (the statement then goes whole to the home shard).
fn row_owners(
    target: &TableTarget,
    rows: &[Node],
    map: &ShardMap,
    params: Params<'_>,
) -> Result<Option<Vec<ShardId>>, String> {
    let (table, group) = map.table_and_group(&target.table)?;
    let Some(keys) = &target.keys else {
        return Err(unresolved_key(target, rows, &table.key));
    };
    if keys.len() != rows.len() {
        return Err(format!(
            "the INSERT into {} has {} rows but {} keys",
            table.name,
            rows.len(),
            keys.len()
        ));
    }
    // An inserted NULL key goes where PostgreSQL puts it: the row hash of all-NULL.
    let owner = |value: Option<&KeyValue>| {
        let p = partition_of(&[value], group.modulus()) as usize;
        group.partitions[p].owner
    };
    let mut owners = Vec::with_capacity(keys.len());
    for key in keys {
        let shard = match key {
            KeySource::Const(v) => owner(Some(v)),
            KeySource::Param(n) => match params.get(*n)? {
                (None, _) => owner(None),
                (Some(bytes), format) => match param_key(table.key_type, format, bytes) {
                    Some(v) => owner(Some(&v)),
                    None => return Ok(None),
                },
            },
            KeySource::ParamArray(n) => {
                return Err(format!(
                    "parameter ${n} is an array of keys, not the key of an INSERT row"
                ))
            }
        };
        owners.push(shard);
    }
    Ok(Some(owners))
}

/// Why the analysis could not name every row's key, as precisely as the rows tell.
fn unresolved_key(target: &TableTarget, rows: &[Node], key: &str) -> String {
    let table = &target.table;
    let Some(column) = target.insert_key_column else {
        return format!("INSERT into sharded table {table} must set its key column {key}");
    };
    for (i, row) in rows.iter().enumerate() {
        let value = match row.node.as_ref() {
            Some(N::List(list)) => list.items.get(column).and_then(|v| v.node.as_ref()),
            _ => None,
        };
        match value {
            Some(N::SetToDefault(_)) => {
                return format!(
                    "row {} of a multi-row INSERT into sharded table {table} sets key column {key} to DEFAULT; write the key value",
                    i + 1
                )
            }
            Some(N::AConst(c)) if c.isnull => {
                return format!(
                    "row {} of a multi-row INSERT into sharded table {table} sets key column {key} to a NULL constant; send it as a parameter or in its own INSERT",
                    i + 1
                )
            }
            _ => {}
        }
    }
    format!(
        "a multi-row INSERT into sharded table {table} can be split by shard only if every row's key {key} is a constant or a parameter"
    )
}

/// The whole statement on one shard, as the client wrote it.
fn unchanged(sql: &str, shard: ShardId) -> Result<ShardInsert, String> {
    let highest = param_tokens(sql)?
        .into_iter()
        .map(|(_, n)| n)
        .max()
        .unwrap_or(0);
    Ok(ShardInsert {
        shard,
        sql: sql.to_owned(),
        params: (1..=highest).collect(),
    })
}

/// `sql` with its parameters renumbered `$1..$k` in the order of their original
/// numbers, and the original number of each.
///
/// Done on PostgreSQL's tokens rather than on the tree: the protobuf tree has no
/// mutable visitor without `unsafe`, and the scanner finds every `ParamRef` (a
/// `$n` is a PARAM token exactly when it is not inside a literal, identifier or comment).
fn renumber(sql: &str) -> Result<(String, Vec<u16>), String> {
    let tokens = param_tokens(sql)?;
    let used: Vec<u16> = tokens
        .iter()
        .map(|&(_, n)| n)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut out = String::with_capacity(sql.len());
    let mut copied = 0;
    for (span, n) in tokens {
        let new = used.binary_search(&n).expect("every number is in used") + 1;
        out.push_str(&sql[copied..span.start]);
        out.push('$');
        out.push_str(&new.to_string());
        copied = span.end;
    }
    out.push_str(&sql[copied..]);
    Ok((out, used))
}

/// The byte span and number of every `$n` in `sql`.
fn param_tokens(sql: &str) -> Result<Vec<(std::ops::Range<usize>, u16)>, String> {
    let tokens = pg_query::scan_tokens(sql).map_err(|e| e.to_string())?;
    tokens
        .iter()
        .filter(|t| t.token == Token::Param as i32)
        .map(|t| {
            let span = usize::try_from(t.start)
                .ok()
                .zip(usize::try_from(t.end).ok());
            let text = span.and_then(|(start, end)| sql.get(start..end));
            let number = text
                .and_then(|text| text.strip_prefix('$'))
                .and_then(|digits| digits.parse::<u16>().ok())
                .filter(|&n| n > 0);
            match (span, number) {
                (Some((start, end)), Some(n)) => Ok((start..end, n)),
                _ => Err(format!(
                    "parameter {} is out of range",
                    text.unwrap_or("(unreadable)")
                )),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::analyse;
    use crate::route::{route, Route};

    const SHARDS: [ShardId; 3] = [ShardId(0), ShardId(1), ShardId(2)];

    use crate::route::tests::map;

    fn owner(map: &ShardMap, id: i64) -> ShardId {
        let group = &map.groups["int8_16"];
        group.partitions[partition_of(&[Some(&KeyValue::Int8(id))], 16) as usize].owner
    }

    /// For every shard, in shard order, the first two account ids it owns.
    fn ids_by_shard(map: &ShardMap) -> Vec<[i64; 2]> {
        SHARDS
            .iter()
            .map(|&s| {
                let mut ids = (1..).filter(|&id| owner(map, id) == s);
                [ids.next().expect("an id"), ids.next().expect("an id")]
            })
            .collect()
    }

    fn split(sql: &str, values: &[Option<&[u8]>]) -> Result<Vec<ShardInsert>, String> {
        let map = map();
        let analysis = analyse(sql, &map).expect("analyses");
        let params = Params {
            values,
            formats: &[],
        };
        let pieces = split_insert(sql, &analysis, &map, params)?;
        check_pieces(&map, &pieces, values);
        Ok(pieces)
    }

    /// Every piece parses and, with its parameters picked from the client's,
    /// routes to exactly its own shard; shards ascend.
    fn check_pieces(map: &ShardMap, pieces: &[ShardInsert], values: &[Option<&[u8]>]) {
        for pair in pieces.windows(2) {
            assert!(pair[0].shard < pair[1].shard, "{pieces:?}");
        }
        for piece in pieces {
            assert!(crate::parses(&piece.sql), "{}", piece.sql);
            let own: Vec<Option<&[u8]>> = piece
                .params
                .iter()
                .map(|&n| values[usize::from(n) - 1])
                .collect();
            let analysis = analyse(&piece.sql, map).expect("analyses");
            let params = Params {
                values: &own,
                formats: &[],
            };
            assert_eq!(
                route(&analysis, map, params),
                Route::Shard(piece.shard),
                "{}",
                piece.sql
            );
        }
    }

    #[test]
    fn literal_rows_go_to_their_shards_in_order() {
        let map = map();
        let ids = ids_by_shard(&map);
        let [a0, a1] = ids[0];
        let [b0, _] = ids[1];
        let [c0, c1] = ids[2];
        let sql = format!(
            "INSERT INTO accounts (id, note) VALUES ({c0}, 'r0'), ({a0}, 'r1'), ({b0}, 'r2'), ({c1}, 'r3'), ({a1}, 'r4')"
        );
        let pieces = split(&sql, &[]).expect("splits");
        let expected = [
            (SHARDS[0], format!("({a0}, 'r1'), ({a1}, 'r4')")),
            (SHARDS[1], format!("({b0}, 'r2')")),
            (SHARDS[2], format!("({c0}, 'r0'), ({c1}, 'r3')")),
        ];
        assert_eq!(pieces.len(), expected.len());
        for (piece, (shard, rows)) in pieces.iter().zip(expected) {
            assert_eq!(piece.shard, shard);
            assert_eq!(
                piece.sql,
                format!("INSERT INTO accounts (id, note) VALUES {rows}")
            );
            assert!(piece.params.is_empty());
        }
    }

    #[test]
    fn two_shards_of_three() {
        let map = map();
        let ids = ids_by_shard(&map);
        let (a, c) = (ids[0][0], ids[2][0]);
        let sql = format!("INSERT INTO accounts (id) VALUES ({a}), ({c})");
        let pieces = split(&sql, &[]).expect("splits");
        let got: Vec<_> = pieces.iter().map(|p| (p.shard, p.sql.as_str())).collect();
        assert_eq!(
            got,
            [
                (
                    SHARDS[0],
                    format!("INSERT INTO accounts (id) VALUES ({a})").as_str()
                ),
                (
                    SHARDS[2],
                    format!("INSERT INTO accounts (id) VALUES ({c})").as_str()
                ),
            ]
        );
    }

    #[test]
    fn parameters_are_renumbered_per_shard_and_shared_ones_carried() {
        let map = map();
        let ids = ids_by_shard(&map);
        let (a0, a1, b0) = (
            ids[0][0].to_string(),
            ids[0][1].to_string(),
            ids[1][0].to_string(),
        );
        // $1, $3, $5 are keys (shards 0, 1, 0); $2 is used in two rows of different
        // shards; $6 only in RETURNING; $4 only in shard 1's row.
        let sql = "INSERT INTO accounts (id, note, n) VALUES ($1, $2, 1), ($3, $2, $4), ($5, 'x', 2) RETURNING id, $6::int";
        let values: [Option<&[u8]>; 6] = [
            Some(a0.as_bytes()),
            Some(b"shared"),
            Some(b0.as_bytes()),
            Some(b"4"),
            Some(a1.as_bytes()),
            Some(b"6"),
        ];
        let pieces = split(sql, &values).expect("splits");
        assert_eq!(
            pieces,
            [
                ShardInsert {
                    shard: SHARDS[0],
                    sql: "INSERT INTO accounts (id, note, n) VALUES ($1, $2, 1), ($3, 'x', 2) RETURNING id, $4::int".into(),
                    params: vec![1, 2, 5, 6],
                },
                ShardInsert {
                    shard: SHARDS[1],
                    sql: "INSERT INTO accounts (id, note, n) VALUES ($2, $1, $3) RETURNING id, $4::int".into(),
                    params: vec![2, 3, 4, 6],
                },
            ]
        );
    }

    #[test]
    fn a_key_parameter_used_in_two_rows_gets_one_number() {
        let map = map();
        let ids = ids_by_shard(&map);
        let (a, b) = (ids[0][0].to_string(), ids[1][0].to_string());
        let sql = "INSERT INTO accounts (id, n) VALUES ($2, 1), ($1, 2), ($2, 3)";
        let values: [Option<&[u8]>; 2] = [Some(b.as_bytes()), Some(a.as_bytes())];
        let pieces = split(sql, &values).expect("splits");
        assert_eq!(pieces.len(), 2);
        assert_eq!(
            (pieces[0].sql.as_str(), pieces[0].params.as_slice()),
            (
                "INSERT INTO accounts (id, n) VALUES ($1, 1), ($1, 3)",
                &[2][..]
            )
        );
        assert_eq!(
            (pieces[1].sql.as_str(), pieces[1].params.as_slice()),
            ("INSERT INTO accounts (id, n) VALUES ($1, 2)", &[1][..])
        );
    }

    #[test]
    fn on_conflict_and_its_parameters_reach_every_shard() {
        let map = map();
        let ids = ids_by_shard(&map);
        let (a, b) = (ids[0][0], ids[1][0]);
        let nothing =
            format!("INSERT INTO accounts (id) VALUES ({a}), ({b}) ON CONFLICT DO NOTHING");
        let pieces = split(&nothing, &[]).expect("splits");
        assert_eq!(pieces.len(), 2);
        for (piece, id) in pieces.iter().zip([a, b]) {
            assert_eq!(
                piece.sql,
                format!("INSERT INTO accounts (id) VALUES ({id}) ON CONFLICT DO NOTHING")
            );
        }

        // Shard 1's row is a constant, shard 0's a parameter; $3 is only in ON CONFLICT.
        let a = a.to_string();
        let update = format!(
            "INSERT INTO accounts AS t (id, n) VALUES ({b}, $1), ($2, 0) \
             ON CONFLICT (id) DO UPDATE SET n = t.n + $3 WHERE t.n < $3"
        );
        let values: [Option<&[u8]>; 3] = [Some(b"7"), Some(a.as_bytes()), Some(b"1")];
        let pieces = split(&update, &values).expect("splits");
        let conflict = "ON CONFLICT (id) DO UPDATE SET n = t.n + $2 WHERE t.n < $2";
        assert_eq!(
            pieces,
            [
                ShardInsert {
                    shard: SHARDS[0],
                    sql: format!("INSERT INTO accounts AS t (id, n) VALUES ($1, 0) {conflict}"),
                    params: vec![2, 3],
                },
                ShardInsert {
                    shard: SHARDS[1],
                    sql: format!("INSERT INTO accounts AS t (id, n) VALUES ({b}, $1) {conflict}"),
                    params: vec![1, 3],
                },
            ]
        );
    }

    #[test]
    fn rows_of_one_shard_give_the_statement_unchanged() {
        let map = map();
        let [a0, a1] = ids_by_shard(&map)[0];
        let sql = format!(
            "insert into accounts (id, note) values ({a0}, $1), ({a1}, 'b') /* kept */ returning $3"
        );
        let values: [Option<&[u8]>; 3] = [Some(b"a"), Some(b"unused"), Some(b"3")];
        let pieces = split(&sql, &values).expect("splits");
        assert_eq!(
            pieces,
            [ShardInsert {
                shard: SHARDS[0],
                sql: sql.clone(),
                params: vec![1, 2, 3],
            }]
        );
    }

    #[test]
    fn null_keys_go_where_postgres_puts_them() {
        let map = map();
        let p0 = map.groups["int8_16"].partitions[0].owner;
        let other = ids_by_shard(&map)
            .into_iter()
            .map(|[id, _]| id)
            .find(|&id| owner(&map, id) != p0)
            .expect("a shard besides partition 0's owner");
        let sql = format!("INSERT INTO accounts (id, n) VALUES ($1, 1), ({other}, 2), ($2, 3)");
        let values: [Option<&[u8]>; 2] = [None, None];
        let pieces = split(&sql, &values).expect("splits");
        assert_eq!(pieces.len(), 2);
        let null_piece = pieces.iter().find(|p| p.shard == p0).expect("p0's piece");
        assert_eq!(
            null_piece.sql,
            "INSERT INTO accounts (id, n) VALUES ($1, 1), ($2, 3)"
        );
        assert_eq!(null_piece.params, [1, 2]);
        let other_piece = pieces.iter().find(|p| p.shard != p0).expect("other piece");
        assert_eq!(
            other_piece.sql,
            format!("INSERT INTO accounts (id, n) VALUES ({other}, 2)")
        );
        assert!(other_piece.params.is_empty());
    }

    #[test]
    fn text_keys_and_binary_parameters() {
        let map = map();
        let group = &map.groups["text_16"];
        let shard_of = |name: &str| {
            let key = KeyValue::Text(name.as_bytes().to_vec());
            group.partitions[partition_of(&[Some(&key)], 16) as usize].owner
        };
        let names: Vec<String> = (0..)
            .map(|i| format!("user{i}"))
            .scan(BTreeSet::new(), |seen, name| {
                Some(seen.insert(shard_of(&name)).then_some(name))
            })
            .flatten()
            .take(2)
            .collect();
        let sql = format!(
            "INSERT INTO users (name) VALUES ('{}'), ('{}')",
            names[0], names[1]
        );
        let pieces = split(&sql, &[]).expect("splits");
        assert_eq!(pieces.len(), 2);

        // Binary int8 keys, and an undecodable one: the statement goes whole to HOME.
        let ids = ids_by_shard(&map);
        let (a, b) = (ids[0][0].to_be_bytes(), ids[1][0].to_be_bytes());
        let sql = "INSERT INTO accounts (id) VALUES ($1), ($2)";
        let analysis = analyse(sql, &map).expect("analyses");
        let values: [Option<&[u8]>; 2] = [Some(&a), Some(&b)];
        let params = Params {
            values: &values,
            formats: &[1],
        };
        let pieces = split_insert(sql, &analysis, &map, params).expect("splits");
        let shards: Vec<_> = pieces.iter().map(|p| p.shard).collect();
        assert_eq!(shards, [SHARDS[0], SHARDS[1]]);
        let bad: [Option<&[u8]>; 2] = [Some(&a), Some(b"abc")];
        let pieces = split(sql, &bad).expect("splits");
        assert_eq!(
            pieces,
            [ShardInsert {
                shard: ShardMap::HOME,
                sql: sql.into(),
                params: vec![1, 2],
            }]
        );
    }

    #[test]
    fn statements_that_cannot_be_split_are_refused_with_a_reason() {
        let one: [Option<&[u8]>; 1] = [Some(b"1")];
        for (sql, values, needle) in [
            (
                "INSERT INTO accounts (id) VALUES (1), (DEFAULT)",
                &[][..],
                "DEFAULT",
            ),
            (
                "INSERT INTO accounts (id) VALUES (1), (NULL)",
                &[],
                "NULL constant",
            ),
            (
                "INSERT INTO accounts (id) VALUES (1), (1 + 1)",
                &[],
                "constant or a parameter",
            ),
            (
                "INSERT INTO accounts (id) SELECT 1",
                &[],
                "INSERT ... SELECT",
            ),
            (
                "INSERT INTO accounts (id) VALUES (1), (2) LIMIT 1",
                &[],
                "LIMIT",
            ),
            (
                "WITH x AS (SELECT 1) INSERT INTO accounts (id) VALUES (1), (2)",
                &[],
                "WITH",
            ),
            (
                "INSERT INTO accounts (id) VALUES (1), (2); SELECT 1",
                &[],
                "on its own",
            ),
            ("SELECT * FROM accounts WHERE id = 1", &[], "only INSERT"),
            (
                "INSERT INTO plans (id) VALUES (1), (2)",
                &[],
                "does not write a sharded table",
            ),
            ("INSERT INTO accounts VALUES (1), (2)", &[], "column list"),
            (
                "INSERT INTO accounts (id, n) VALUES (1, (SELECT count(*) FROM users)), (2, 0)",
                &[],
                "cannot also read",
            ),
            (
                "INSERT INTO accounts (id) VALUES ($1), ($2)",
                &one,
                "$2 is not bound",
            ),
        ] {
            let map = map();
            let analysis = analyse(sql, &map).expect("analyses");
            let params = Params {
                values,
                formats: &[],
            };
            let why = split_insert(sql, &analysis, &map, params).expect_err(sql);
            assert!(why.contains(needle), "{sql}: {why}");
        }
    }

    #[test]
    fn renumbering_ignores_dollars_in_literals_and_identifiers() {
        let (sql, params) =
            renumber("INSERT INTO \"t$1\" (a, b) VALUES ($7, '$3'), ($9, $$ $2 $$) RETURNING $7")
                .expect("renumbers");
        assert_eq!(
            sql,
            "INSERT INTO \"t$1\" (a, b) VALUES ($1, '$3'), ($2, $$ $2 $$) RETURNING $1"
        );
        assert_eq!(params, [7, 9]);
    }
}
