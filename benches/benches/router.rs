//! Router micro-benchmarks: hashing each key type to its partition, parsing
//! a statement uncached (what the statement cache saves), and routing a
//! cached point SELECT and INSERT with bound parameters (issue 4's goal:
//! under 2 µs each).
//!
//! `cargo bench -p benches --bench router`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use router::hash::{partition_of, KeyValue};

fn hashing(c: &mut Criterion) {
    let keys = [
        ("int2", KeyValue::Int2(-1234)),
        ("int4", KeyValue::Int4(123_456_789)),
        ("int8", KeyValue::Int8(-9_876_543_210)),
        ("text_12", KeyValue::Text(b"user-1234567".to_vec())),
        ("text_64", KeyValue::Text(vec![b'x'; 64])),
        ("uuid", KeyValue::Uuid(*b"0123456789abcdef")),
    ];
    let mut group = c.benchmark_group("partition_of");
    for (name, key) in &keys {
        group.bench_function(*name, |b| {
            b.iter(|| partition_of(black_box(&[Some(key)]), black_box(64)))
        });
    }
    group.finish();
}

fn parsing(c: &mut Criterion) {
    let sql = "SELECT id, balance FROM accounts WHERE id = $1 AND status = 'open'";
    c.bench_function("pg_query_parse_uncached", |b| {
        b.iter(|| router::parses(black_box(sql)))
    });
}

/// accounts(id int8) over 4 shards, 64 partitions.
fn shard_map() -> router::ShardMap {
    use router::{placement, KeyType, Shard, ShardId, Table};
    let shards: Vec<ShardId> = (0..4).map(ShardId).collect();
    let mut map = router::ShardMap::default();
    for &id in &shards {
        let primary = format!("127.0.0.1:{}", 5432 + id.0);
        map.shards.insert(
            id,
            Shard {
                id,
                primary,
                replicas: vec![],
            },
        );
    }
    let name = "int8_64".to_owned();
    let key_type = KeyType::Int8;
    let group = placement::placed_group(&name, key_type, 64, &shards);
    map.groups.insert(name.clone(), group);
    let table = Table {
        name: "accounts".into(),
        key: "id".into(),
        key_type,
        group: name,
    };
    map.tables.insert("accounts".into(), table);
    map
}

fn routing(c: &mut Criterion) {
    let map = shard_map();
    let cache = router::AnalysisCache::new(10_000);
    let key = 123_456i64.to_be_bytes();
    let values = [Some(&key[..]), Some(&b"100"[..])];
    let formats = [1i16, 0];
    for (name, sql) in [
        (
            "route_cached_point_select",
            "SELECT id, balance FROM accounts WHERE id = $1",
        ),
        (
            "route_cached_insert",
            "INSERT INTO accounts (id, balance) VALUES ($1, $2)",
        ),
    ] {
        cache.get_or_analyse(sql, &map); // warm: the statement is cached
        c.bench_function(name, |b| {
            b.iter(|| {
                let analysis = cache.get_or_analyse(black_box(sql), &map);
                let params = router::Params {
                    values: &values,
                    formats: &formats,
                };
                router::route(&analysis, &map, params)
            })
        });
    }
}

criterion_group!(benches, hashing, parsing, routing);
criterion_main!(benches);
