//! Route: which shards a statement must run on, from its [`Analysis`], the
//! shard map and (for the extended protocol) its bound parameters.
//!
//! Pure: the proxy calls it once per statement (the analysis is cached by
//! text; only parameter decoding and hashing happen per execution).

use std::collections::BTreeSet;

use crate::analysis::{Analysis, KeySource, TableTarget};
use crate::hash::{partition_of, KeyValue};
use crate::key_param::{decode_key, decode_key_array, FORMAT_BINARY, FORMAT_TEXT};
use crate::shard_map::{KeyType, ShardId, ShardMap};

/// Where a statement goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// No sharded table: the home shard.
    Home,
    /// Exactly one shard owns every key the statement touches.
    Shard(ShardId),
    /// Several shards, each for some of the keys.
    Shards(BTreeSet<ShardId>),
    /// A sharded table without a usable key: every shard.
    Every,
    /// Must not be run; the reason is for the client.
    Refused(String),
}

/// Bind parameters as the protocol carries them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Params<'a> {
    /// One per parameter; `None` is SQL NULL.
    pub values: &'a [Option<&'a [u8]>],
    /// Format codes: none (all text), one (for all), or one per parameter.
    pub formats: &'a [i16],
}

impl Params<'_> {
    fn format(&self, index: usize) -> i16 {
        match self.formats {
            [] => FORMAT_TEXT,
            [one] => *one,
            many => many.get(index).copied().unwrap_or(FORMAT_TEXT),
        }
    }

    /// Parameter `$n` (1-based): `Err` if it was not bound at all.
    pub fn get(&self, n: u16) -> Result<(Option<&[u8]>, i16), String> {
        let index = (n as usize)
            .checked_sub(1)
            .ok_or_else(|| "there is no parameter $0".to_owned())?;
        let value = self
            .values
            .get(index)
            .ok_or_else(|| format!("parameter ${n} is not bound"))?;
        Ok((*value, self.format(index)))
    }
}

/// The route of an analysed statement.
pub fn route(analysis: &Analysis, map: &ShardMap, params: Params<'_>) -> Route {
    if let Some(why) = &analysis.refusal {
        return Route::Refused(why.clone());
    }
    if analysis.targets.is_empty() {
        return Route::Home;
    }
    let mut shards = BTreeSet::new();
    for target in &analysis.targets {
        match target_shards(target, map, params) {
            Ok(Some(s)) => shards.extend(s),
            Ok(None) => return Route::Every,
            Err(why) => return Route::Refused(why),
        }
    }
    let mut it = shards.iter();
    match (it.next(), it.next()) {
        // No key can match (key = NULL, an empty IN list): any one shard
        // answers correctly, with no rows.
        (None, _) => Route::Home,
        (Some(&one), None) => Route::Shard(one),
        _ => Route::Shards(shards),
    }
}

/// The shards one table reference needs; `None` for every shard.
fn target_shards(
    target: &TableTarget,
    map: &ShardMap,
    params: Params<'_>,
) -> Result<Option<BTreeSet<ShardId>>, String> {
    let Some(keys) = &target.keys else {
        return Ok(None);
    };
    let (table, group) = map.table_and_group(&target.table)?;
    let inserting = target.insert_rows > 0;
    let mut shards = BTreeSet::new();
    let mut place = |value: Option<&KeyValue>| {
        // A NULL key matches no row; an inserted NULL key goes where
        // PostgreSQL puts it (the row hash of all-NULL is 0).
        if value.is_some() || inserting {
            let p = partition_of(&[value], group.modulus()) as usize;
            shards.insert(group.partitions[p].owner);
        }
    };
    for key in keys {
        match key {
            KeySource::Const(v) => place(Some(v)),
            KeySource::Param(n) => match params.get(*n)? {
                (None, _) => place(None),
                (Some(bytes), format) => match param_key(table.key_type, format, bytes) {
                    Some(v) => place(Some(&v)),
                    // PostgreSQL rejects or cannot match the value: it reports
                    // that itself wherever the statement runs.
                    None => return Ok(Some(BTreeSet::from([ShardMap::HOME]))),
                },
            },
            KeySource::ParamArray(n) => match params.get(*n)? {
                (None, _) => {} // = ANY(NULL) matches nothing
                (Some(bytes), format) => match decode_key_array(table.key_type, format, bytes) {
                    Ok(values) => values.iter().for_each(|v| place(Some(v))),
                    Err(_) => return Ok(None), // too many keys or a form we do not read: every shard
                },
            },
        }
    }
    Ok(Some(shards))
}

/// A key parameter. Binary integers may come in any integer width (a driver
/// may send an int8 for an int4 key); the value, not the width, decides.
pub(crate) fn param_key(key_type: KeyType, format: i16, bytes: &[u8]) -> Option<KeyValue> {
    let int_key = matches!(key_type, KeyType::Int2 | KeyType::Int4 | KeyType::Int8);
    if int_key && format == FORMAT_BINARY {
        let value: i64 = match *bytes {
            [a, b] => i16::from_be_bytes([a, b]).into(),
            [a, b, c, d] => i32::from_be_bytes([a, b, c, d]).into(),
            [a, b, c, d, e, f, g, h] => i64::from_be_bytes([a, b, c, d, e, f, g, h]),
            _ => return None,
        };
        return match key_type {
            KeyType::Int2 => i16::try_from(value).ok().map(KeyValue::Int2),
            KeyType::Int4 => i32::try_from(value).ok().map(KeyValue::Int4),
            _ => Some(KeyValue::Int8(value)),
        };
    }
    decode_key(key_type, format, bytes).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::analysis::analyse;
    use crate::placement;
    use crate::shard_map::Table;

    /// accounts (int8 id) and users (text name) over shards 0..3, 16 partitions each.
    pub(crate) fn map() -> ShardMap {
        let shards = [ShardId(0), ShardId(1), ShardId(2)];
        let mut map = ShardMap::default();
        for s in shards {
            map.shards.insert(
                s,
                crate::shard_map::Shard {
                    id: s,
                    primary: format!("127.0.0.1:{}", 5432 + s.0),
                    replicas: vec![],
                },
            );
        }
        for (table, key, key_type, group) in [
            ("accounts", "id", KeyType::Int8, "int8_16"),
            ("users", "name", KeyType::Text, "text_16"),
        ] {
            let placed = placement::placed_group(group, key_type, 16, &shards);
            map.groups.insert(group.into(), placed);
            map.tables.insert(
                table.into(),
                Table {
                    name: table.into(),
                    key: key.into(),
                    key_type,
                    group: group.into(),
                },
            );
        }
        map
    }

    fn owner(map: &ShardMap, key: KeyValue) -> ShardId {
        let group = &map.groups[&map.tables[match key {
            KeyValue::Text(_) => "users",
            _ => "accounts",
        }]
        .group];
        group.partitions[partition_of(&[Some(&key)], 16) as usize].owner
    }

    fn route_of(sql: &str, values: &[Option<&[u8]>], formats: &[i16]) -> Route {
        let map = map();
        let analysis = analyse(sql, &map).expect("analyses");
        route(&analysis, &map, Params { values, formats })
    }

    #[test]
    fn point_statements_go_to_the_owner() {
        let map = map();
        let o5 = owner(&map, KeyValue::Int8(5));
        assert_eq!(
            route_of("SELECT * FROM accounts WHERE id = 5", &[], &[]),
            Route::Shard(o5)
        );
        assert_eq!(
            route_of("SELECT * FROM accounts WHERE id = $1", &[Some(b"5")], &[]),
            Route::Shard(o5)
        );
        let binary = 5i64.to_be_bytes();
        assert_eq!(
            route_of(
                "UPDATE accounts SET x = 1 WHERE id = $1",
                &[Some(&binary)],
                &[1]
            ),
            Route::Shard(o5)
        );
        // An int4-wide binary value for the int8 key routes by its value.
        let narrow = 5i32.to_be_bytes();
        assert_eq!(
            route_of("DELETE FROM accounts WHERE id = $1", &[Some(&narrow)], &[1]),
            Route::Shard(o5)
        );
        let alice = owner(&map, KeyValue::Text(b"alice".to_vec()));
        assert_eq!(
            route_of(
                "SELECT * FROM users WHERE name = $1",
                &[Some(b"alice")],
                &[0]
            ),
            Route::Shard(alice)
        );
    }

    #[test]
    fn several_keys_give_the_set_of_their_owners() {
        let map = map();
        let ids: Vec<i64> = (1..=40).collect();
        let want: BTreeSet<ShardId> = ids
            .iter()
            .map(|&i| owner(&map, KeyValue::Int8(i)))
            .collect();
        assert_eq!(want.len(), 3, "40 keys over 3 shards reach all of them");
        let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        assert_eq!(
            route_of(
                &format!("SELECT * FROM accounts WHERE id IN ({list})"),
                &[],
                &[]
            ),
            Route::Shards(want.clone())
        );
        let array = format!("{{{list}}}");
        assert_eq!(
            route_of(
                "SELECT * FROM accounts WHERE id = ANY($1)",
                &[Some(array.as_bytes())],
                &[]
            ),
            Route::Shards(want)
        );
        // Multi-row INSERT: every row's owner.
        let o1 = owner(&map, KeyValue::Int8(1));
        let o2 = owner(&map, KeyValue::Int8(2));
        let both: BTreeSet<_> = [o1, o2].into();
        let expected = if both.len() == 1 {
            Route::Shard(o1)
        } else {
            Route::Shards(both)
        };
        assert_eq!(
            route_of(
                "INSERT INTO accounts (id, x) VALUES (1, 0), (2, 0)",
                &[],
                &[]
            ),
            expected
        );
    }

    #[test]
    fn keyless_unsharded_refused_and_null_routes() {
        assert_eq!(
            route_of("SELECT count(*) FROM accounts", &[], &[]),
            Route::Every
        );
        assert_eq!(route_of("SELECT * FROM plain_table", &[], &[]), Route::Home);
        assert_eq!(route_of("SELECT 1", &[], &[]), Route::Home);
        assert!(matches!(
            route_of("INSERT INTO accounts VALUES (1)", &[], &[]),
            Route::Refused(why) if why.contains("column list")
        ));
        // key = NULL matches nothing: one shard answers (with no rows).
        assert_eq!(
            route_of("SELECT * FROM accounts WHERE id = $1", &[None], &[]),
            Route::Home
        );
        // A value PostgreSQL will reject is left to PostgreSQL.
        assert_eq!(
            route_of("SELECT * FROM accounts WHERE id = $1", &[Some(b"abc")], &[]),
            Route::Shard(ShardMap::HOME)
        );
        // An unbound parameter is the client's mistake, reported as such.
        assert!(matches!(
            route_of("SELECT * FROM accounts WHERE id = $2", &[Some(b"1")], &[]),
            Route::Refused(why) if why.contains("$2")
        ));
        // An inserted NULL key goes to partition 0's owner, as PostgreSQL places it.
        let map = map();
        let p0 = map.groups["int8_16"].partitions[0].owner;
        assert_eq!(
            route_of("INSERT INTO accounts (id) VALUES ($1)", &[None], &[]),
            Route::Shard(p0)
        );
    }
}
