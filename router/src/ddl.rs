//! DDL: how a declared sharded table is laid out on one shard.
//!
//! The client writes an ordinary `CREATE TABLE`; on every shard the proxy
//! runs it as a `PARTITION BY HASH (key)` parent plus exactly the child
//! partitions that shard owns, named `<table>_p<index>` (zero-padded to the
//! width of the modulus, so they sort). A row routed to the wrong shard then
//! fails inside PostgreSQL ("no partition of relation ... found for row")
//! instead of landing in the wrong place.

use pg_query::protobuf::{self, node::Node as N, PartitionElem, PartitionSpec, PartitionStrategy};

use crate::shard_map::{Group, PartitionIdx, ShardId, Table};

/// Why a `CREATE TABLE` cannot be laid out as the declared sharded table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LayoutError(pub String);

/// The name of partition `index` of `table` in a group of `modulus` partitions.
pub fn partition_name(table: &str, index: PartitionIdx, modulus: u32) -> String {
    let width = modulus.saturating_sub(1).max(1).to_string().len().max(3);
    format!("{table}_p{:0width$}", index.0)
}

/// The statements that create `table` on `shard`: the client's `CREATE TABLE`
/// turned into a hash-partitioned parent, then one child per owned partition.
pub fn create_on_shard(
    create_sql: &str,
    table: &Table,
    group: &Group,
    shard: ShardId,
) -> Result<Vec<String>, LayoutError> {
    let mut parsed = pg_query::parse(create_sql, pg_query::ParserOptions::DEFAULT)
        .map_err(|e| LayoutError(e.to_string()))?
        .protobuf;
    if parsed.stmts.len() != 1 {
        return Err(LayoutError(format!(
            "CREATE TABLE {} must be sent on its own, not with other statements",
            table.name
        )));
    }
    let Some(N::CreateStmt(create)) = parsed.stmts[0].stmt.as_mut().and_then(|s| s.node.as_mut())
    else {
        return Err(LayoutError("not a CREATE TABLE statement".into()));
    };
    if create.partspec.is_some() || create.partbound.is_some() || !create.inh_relations.is_empty() {
        return Err(LayoutError(format!(
            "{} is a sharded table: Shardline partitions it by hash of {}; leave out PARTITION BY, PARTITION OF and INHERITS",
            table.name, table.key
        )));
    }
    let has_key = create
        .table_elts
        .iter()
        .any(|e| matches!(&e.node, Some(N::ColumnDef(c)) if c.colname == table.key));
    if !has_key {
        return Err(LayoutError(format!(
            "sharded table {} was declared with key column {}, which this CREATE TABLE does not define",
            table.name, table.key
        )));
    }
    create.partspec = Some(PartitionSpec {
        strategy: PartitionStrategy::Hash as i32,
        part_params: vec![protobuf::Node {
            node: Some(N::PartitionElem(Box::new(PartitionElem {
                name: table.key.clone(),
                expr: None,
                collation: vec![],
                opclass: vec![],
                location: -1,
            }))),
        }],
        location: -1,
    });
    let if_not_exists = create.if_not_exists;
    let parent = parsed
        .deparse(pg_query::DeparseOptions::default())
        .map_err(|e| LayoutError(e.to_string()))?;
    let modulus = group.modulus();
    let mut statements = vec![parent];
    for (i, p) in group.partitions.iter().enumerate() {
        if p.owner != shard {
            continue;
        }
        let child = partition_name(&table.name, PartitionIdx(i as u32), modulus);
        statements.push(format!(
            "CREATE TABLE {}{} PARTITION OF {} FOR VALUES WITH (MODULUS {modulus}, REMAINDER {i})",
            if if_not_exists { "IF NOT EXISTS " } else { "" },
            quote_ident(&child),
            quote_ident(&table.name),
        ));
    }
    Ok(statements)
}

/// Quotes an identifier only when PostgreSQL needs it.
fn quote_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard_map::{KeyType, Partition, PartitionState};

    fn layout(owners: &[u32]) -> (Table, Group) {
        let table = Table {
            name: "accounts".into(),
            key: "id".into(),
            key_type: KeyType::Int8,
            group: "int8_4".into(),
        };
        let group = Group {
            name: "int8_4".into(),
            key_type: KeyType::Int8,
            partitions: owners
                .iter()
                .map(|&o| Partition {
                    owner: ShardId(o),
                    state: PartitionState::Stable,
                })
                .collect(),
        };
        (table, group)
    }

    #[test]
    fn a_shard_gets_the_parent_and_only_its_partitions() {
        let (table, group) = layout(&[0, 1, 0, 1]);
        let sql = "CREATE TABLE accounts (id int8 PRIMARY KEY, balance numeric NOT NULL DEFAULT 0)";
        let on_1 = create_on_shard(sql, &table, &group, ShardId(1)).expect("layout");
        assert_eq!(on_1.len(), 3);
        assert!(
            on_1[0].ends_with("PARTITION BY HASH (id)"),
            "parent: {}",
            on_1[0]
        );
        assert!(
            on_1[0].contains("balance numeric NOT NULL DEFAULT 0"),
            "{}",
            on_1[0]
        );
        assert_eq!(
            on_1[1],
            "CREATE TABLE accounts_p001 PARTITION OF accounts FOR VALUES WITH (MODULUS 4, REMAINDER 1)"
        );
        assert_eq!(
            on_1[2],
            "CREATE TABLE accounts_p003 PARTITION OF accounts FOR VALUES WITH (MODULUS 4, REMAINDER 3)"
        );
        // The parent statement itself parses again (deparse is faithful).
        assert!(crate::parses(&on_1[0]));
        // A shard that owns nothing still gets the parent, so queries plan.
        assert_eq!(
            create_on_shard(sql, &table, &group, ShardId(7))
                .expect("layout")
                .len(),
            1
        );
    }

    #[test]
    fn if_not_exists_carries_over_to_the_partitions() {
        let (table, group) = layout(&[0]);
        let out = create_on_shard(
            "CREATE TABLE IF NOT EXISTS accounts (id int8, note text)",
            &table,
            &group,
            ShardId(0),
        )
        .expect("layout");
        assert!(
            out[0].starts_with("CREATE TABLE IF NOT EXISTS accounts"),
            "{}",
            out[0]
        );
        assert!(
            out[1].starts_with("CREATE TABLE IF NOT EXISTS accounts_p000"),
            "{}",
            out[1]
        );
    }

    #[test]
    fn layouts_that_cannot_work_are_refused_with_a_reason() {
        let (table, group) = layout(&[0]);
        for (sql, needle) in [
            ("CREATE TABLE accounts (uid int8)", "key column id"),
            (
                "CREATE TABLE accounts (id int8) PARTITION BY RANGE (id)",
                "leave out PARTITION BY",
            ),
            ("CREATE TABLE accounts (id int8); SELECT 1", "on its own"),
            ("CREATE INDEX ON accounts (id)", "not a CREATE TABLE"),
        ] {
            let err = create_on_shard(sql, &table, &group, ShardId(0)).expect_err(sql);
            assert!(err.0.contains(needle), "{sql}: {}", err.0);
        }
    }

    #[test]
    fn partition_names_are_padded_to_the_modulus() {
        assert_eq!(partition_name("t", PartitionIdx(7), 64), "t_p007");
        assert_eq!(partition_name("t", PartitionIdx(7), 4096), "t_p0007");
        assert_eq!(partition_name("t", PartitionIdx(0), 1), "t_p000");
    }
}
