//! Micro-benchmarks of the per-message hot path: splitting a server's
//! answer into frames, batching those frames for the client, and scanning
//! statement text for session effects.

use std::hint::black_box;

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pgstash::protocol::frame::split_frame;
use pgstash::protocol::Outbox;
use pgstash::sql::session_effects;

const ROWS: usize = 1_000;
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// One read's worth of a result set: 1,000 DataRows shaped like
/// pgbench_accounts (aid, bid, abalance, an 84-character filler).
fn data_rows() -> BytesMut {
    let mut buf = BytesMut::new();
    let filler = [b' '; 84];
    for aid in 0..ROWS {
        let aid = aid.to_string();
        let columns: [&[u8]; 4] = [aid.as_bytes(), b"1", b"0", &filler];
        let body_len = 2 + columns.iter().map(|c| 4 + c.len()).sum::<usize>();
        buf.put_u8(b'D');
        buf.put_i32(4 + body_len as i32);
        buf.put_i16(columns.len() as i16);
        for column in columns {
            buf.put_i32(column.len() as i32);
            buf.put_slice(column);
        }
    }
    buf
}

fn split_all(mut buf: BytesMut) -> Vec<BytesMut> {
    let mut frames = Vec::with_capacity(ROWS);
    while let Some(frame) = split_frame(&mut buf, MAX_MESSAGE).expect("well-formed rows") {
        frames.push(frame.raw);
    }
    assert_eq!(frames.len(), ROWS);
    frames
}

/// Pushes every frame and drops the outbox, as a flush would: a merge
/// releases each frame's buffer share at push time, a separate chunk
/// only when the outbox is emptied, so both are timed.
fn push_all(frames: Vec<BytesMut>) -> usize {
    let mut out = Outbox::default();
    for frame in frames {
        out.push(frame);
    }
    out.len()
}

fn bench_split(c: &mut Criterion) {
    let rows = data_rows();
    let mut group = c.benchmark_group("split_frame");
    group.throughput(Throughput::Bytes(rows.len() as u64));
    // The copy of the input is setup, so only the splitting is timed; the
    // frames are returned so that freeing them is not timed either.
    group.bench_function("1000_data_rows", |b| {
        b.iter_batched(
            || rows.clone(),
            |mut buf| {
                let mut frames = Vec::with_capacity(ROWS);
                while let Some(frame) =
                    split_frame(&mut buf, MAX_MESSAGE).expect("well-formed rows")
                {
                    frames.push(frame);
                }
                frames
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn bench_outbox(c: &mut Criterion) {
    let rows = data_rows();
    let mut group = c.benchmark_group("outbox_push");
    group.throughput(Throughput::Elements(ROWS as u64));
    // Frames split from one read buffer: every push after the first
    // merges into the previous chunk.
    group.bench_function("1000_contiguous_frames", |b| {
        b.iter_batched(|| split_all(rows.clone()), push_all, BatchSize::SmallInput)
    });
    // The same frames in separate allocations, as when they come from
    // different reads: each stays a chunk of its own, freed on its own and
    // later written as a slice of its own (writev takes 64 at a time).
    group.bench_function("1000_scattered_frames", |b| {
        b.iter_batched(
            || {
                split_all(rows.clone())
                    .iter()
                    .map(|f| BytesMut::from(&f[..]))
                    .collect::<Vec<_>>()
            },
            push_all,
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn bench_session_effects(c: &mut Criterion) {
    let mut group = c.benchmark_group("session_effects");
    // pgbench -S in simple mode: ruled out by the leading-keyword scan.
    let select = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;";
    assert!(session_effects(select).is_empty());
    group.bench_function("pgbench_select", |b| {
        b.iter(|| session_effects(black_box(select)))
    });
    // A SET is tokenized to find the setting's name.
    let set = "SET statement_timeout = '5s'";
    assert_eq!(session_effects(set).set, ["statement_timeout"]);
    group.bench_function("set_statement", |b| {
        b.iter(|| session_effects(black_box(set)))
    });
    group.finish();
}

criterion_group!(benches, bench_split, bench_outbox, bench_session_effects);
criterion_main!(benches);
