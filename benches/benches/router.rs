//! Router micro-benchmarks: hashing each key type to its partition, and
//! parsing a statement uncached (what the statement cache saves).
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

criterion_group!(benches, hashing, parsing);
criterion_main!(benches);
