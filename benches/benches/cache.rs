//! Cache micro-benchmarks: the store's hit path (a lookup by request
//! identity that finds a current entry), a miss, a fill (ticket + insert),
//! and invalidating one key.
//!
//! `cargo bench -p benches --bench cache`

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use cache::store::{Origin, Settings, Store};
use criterion::{criterion_group, criterion_main, Criterion};

fn store() -> Store {
    Store::new(&Settings {
        max_bytes: 64 << 20,
        entry_bytes_max: 64 << 10,
        ttl: Duration::from_secs(60),
        tti: None,
    })
}

fn identity(i: u64) -> Vec<u8> {
    format!("Qapp\0app\0........SELECT balance FROM accounts WHERE id = {i}").into_bytes()
}

fn key(i: u64) -> Vec<u8> {
    let mut k = vec![b'i'];
    k.extend_from_slice(&(i as i64).to_le_bytes());
    k
}

/// A RowDescription, one DataRow and CommandComplete: a typical point read.
fn reply() -> Bytes {
    Bytes::from(vec![b'x'; 120])
}

fn origin() -> Origin {
    Origin {
        table: "accounts".into(),
        shard: 0,
    }
}

fn store_paths(c: &mut Criterion) {
    let s = store();
    for i in 0..10_000 {
        let ticket = s.ticket("accounts", &key(i));
        s.insert(&identity(i), reply(), ticket, origin());
    }
    s.run_pending_tasks();
    let hot = identity(42);
    c.bench_function("cache_get_hit", |b| b.iter(|| s.get(black_box(&hot))));
    let cold = identity(1_000_000);
    c.bench_function("cache_get_miss", |b| b.iter(|| s.get(black_box(&cold))));
    let mut i = 20_000;
    c.bench_function("cache_fill", |b| {
        b.iter(|| {
            i += 1;
            let ticket = s.ticket("accounts", &key(i));
            s.insert(&identity(i), reply(), ticket, origin())
        })
    });
    let k = key(42);
    c.bench_function("cache_invalidate_key", |b| {
        b.iter(|| s.invalidate_key("accounts", black_box(&k)))
    });
}

criterion_group!(benches, store_paths);
criterion_main!(benches);
