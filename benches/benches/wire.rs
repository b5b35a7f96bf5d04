//! Wire micro-benchmarks: splitting the frames of a pgbench-style extended
//! query batch off a client buffer, decoding its Parse and Bind, and
//! encoding the reply rows the proxy writes itself.
//!
//! `cargo bench -p benches --bench wire`

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use wire::frontend::{self, Bind, Parse};
use wire::{rows, Frame, Header};

/// Parse + Bind + Describe + Execute + Sync, as a driver sends one query.
fn extended_batch() -> BytesMut {
    let mut out = BytesMut::new();
    frontend::encode_parse(
        &mut out,
        b"",
        b"SELECT abalance FROM pgbench_accounts WHERE aid = $1\0\0\0",
    );
    // One text parameter "12345", one text result column.
    let rest = b"\0\0\0\x01\0\0\0\x0512345\0\0";
    frontend::encode_bind(&mut out, b"", b"", rest);
    frontend::encode_target(&mut out, b'D', frontend::TARGET_PORTAL, b"");
    rows::encode_execute_unnamed(&mut out);
    out.extend_from_slice(&[b'S', 0, 0, 0, 4]);
    out
}

fn decoding(c: &mut Criterion) {
    let batch = extended_batch();
    c.bench_function("frame_split_extended_batch_5", |b| {
        b.iter(|| {
            let mut buf = batch.clone();
            let mut n = 0;
            while let Some(frame) = Frame::decode(&mut buf, 1 << 20).expect("valid") {
                n += frame.body().len();
            }
            black_box(n)
        })
    });
    c.bench_function("header_peek", |b| {
        b.iter(|| Header::peek(black_box(&batch), 1 << 20))
    });
    let mut buf = batch.clone();
    let parse = Frame::decode(&mut buf, 1 << 20)
        .expect("valid")
        .expect("a frame");
    let bind = Frame::decode(&mut buf, 1 << 20)
        .expect("valid")
        .expect("a frame");
    c.bench_function("parse_decode", |b| {
        b.iter(|| Parse::decode(black_box(parse.body())))
    });
    c.bench_function("bind_decode", |b| {
        b.iter(|| Bind::decode(black_box(bind.body())))
    });
    let mut query = BytesMut::new();
    frontend::encode_query(
        &mut query,
        b"SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
    );
    let query = Frame::decode(&mut query, 1 << 20)
        .expect("valid")
        .expect("a frame");
    c.bench_function("query_text", |b| {
        b.iter(|| frontend::query_text(black_box(query.body())))
    });
}

fn encoding(c: &mut Criterion) {
    let mut out = BytesMut::with_capacity(1 << 16);
    c.bench_function("encode_data_row_3_columns", |b| {
        b.iter(|| {
            out.clear();
            rows::encode_data_row(
                &mut out,
                black_box(&[Some(b"12345".as_slice()), None, Some(b"some text value")]),
            );
            black_box(out.len())
        })
    });
    c.bench_function("encode_command_complete", |b| {
        b.iter(|| {
            out.clear();
            rows::encode_command_complete(&mut out, black_box(b"SELECT 1"));
            black_box(out.len())
        })
    });
}

criterion_group!(benches, decoding, encoding);
criterion_main!(benches);
