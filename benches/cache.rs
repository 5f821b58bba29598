//! Micro-benchmarks of the result cache's per-statement work: analysing a
//! statement (a fresh parse, and the shape-cached path every later
//! execution takes), fingerprinting, computing keys, and a local-tier
//! lookup with its generation check.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion};
use pgstash::cache::key::{session_context, statement_key, Protocol};
use pgstash::cache::local::Entry;
use pgstash::cache::Cache;
use pgstash::config::{CacheConfig, RedisConfig};
use pgstash::sql::analyze::analyze;
use pgstash::sql::fingerprint::fingerprint;

/// pgbench -S in simple mode sends this with a new aid every time.
const SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;";

/// Distinct texts of one shape, so that the shape-cached path never sees
/// the same text twice in a row (as under pgbench -S); formatting them
/// in the timed loop would time `format!` too.
fn select_texts(count: usize) -> Vec<String> {
    (1..=count)
        .map(|aid| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"))
        .collect()
}

/// The settings a typical driver's session holds: what it sent at startup.
fn session_settings() -> BTreeMap<String, String> {
    [
        ("application_name", "pgbench"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("extra_float_digits", "3"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A cache without Redis: the local tier alone, as in a single instance.
fn local_cache() -> Cache {
    Cache::new(CacheConfig::default(), RedisConfig::default())
}

/// What the simple protocol stores for the pgbench select: RowDescription
/// (one int4 column), one DataRow, CommandComplete.
fn select_payload() -> Bytes {
    let mut buf = BytesMut::new();
    let name = b"abalance\0";
    buf.put_u8(b'T');
    buf.put_i32((4 + 2 + name.len() + 18) as i32);
    buf.put_i16(1);
    buf.put_slice(name);
    buf.put_u32(16_400); // table oid
    buf.put_i16(3); // column number
    buf.put_u32(23); // int4
    buf.put_i16(4);
    buf.put_i32(-1);
    buf.put_i16(0);
    buf.put_u8(b'D');
    buf.put_i32(4 + 2 + 4 + 4);
    buf.put_i16(1);
    buf.put_i32(4);
    buf.put_slice(b"1234");
    let tag = b"SELECT 1\0";
    buf.put_u8(b'C');
    buf.put_i32((4 + tag.len()) as i32);
    buf.put_slice(tag);
    buf.freeze()
}

fn bench_analysis(c: &mut Criterion) {
    let mut group = c.benchmark_group("analysis");
    let first = analyze(SELECT);
    assert!(first.is_cacheable_candidate());
    // What the first execution of a shape costs: sqlparser and the AST walk.
    group.bench_function("analyze_fresh", |b| b.iter(|| analyze(black_box(SELECT))));

    // Every later execution: fingerprint, then a hit in the shape map.
    let cache = local_cache();
    let texts = select_texts(1024);
    let cached = cache.analyze(&texts[0]);
    assert!(Arc::ptr_eq(&cached, &cache.analyze(&texts[1])));
    let mut i = 0;
    group.bench_function("cache_analyze_shape_hit", |b| {
        b.iter(|| {
            i = (i + 1) % texts.len();
            cache.analyze(black_box(&texts[i]))
        })
    });

    group.bench_function("fingerprint", |b| b.iter(|| fingerprint(black_box(SELECT))));
    group.finish();
}

fn bench_keys(c: &mut Criterion) {
    let mut group = c.benchmark_group("keys");
    let settings = session_settings();
    // Once per settings change in a session, not per statement.
    group.bench_function("session_context", |b| {
        b.iter(|| {
            session_context(
                black_box(16_384),
                "postgres",
                "\"$user\", public",
                &settings,
            )
        })
    });
    let context = session_context(16_384, "postgres", "\"$user\", public", &settings);
    group.bench_function("statement_key_simple", |b| {
        b.iter(|| {
            statement_key(
                black_box(context),
                Protocol::Simple,
                black_box(SELECT.as_bytes()),
                &[],
                b"",
            )
        })
    });
    // pgbench -M prepared: the text has $1, the value is in the Bind tail
    // (no parameter formats, one text value, no result formats).
    let prepared = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;";
    let bind = b"\0\0\0\x01\0\0\0\x0548213\0\0";
    group.bench_function("statement_key_extended", |b| {
        b.iter(|| {
            statement_key(
                black_box(context),
                Protocol::Extended,
                black_box(prepared),
                &[],
                black_box(bind),
            )
        })
    });
    group.bench_function("session_context_and_statement_key", |b| {
        b.iter(|| {
            let context = session_context(
                black_box(16_384),
                "postgres",
                "\"$user\", public",
                &settings,
            );
            statement_key(context, Protocol::Simple, SELECT.as_bytes(), &[], b"")
        })
    });
    group.finish();
}

fn bench_local_tier(c: &mut Criterion) {
    const DATABASE: u32 = 16_384;
    const TABLE: u32 = 16_400;
    const ENTRIES: usize = 100_000;
    let mut group = c.benchmark_group("local_tier");
    let cache = local_cache();
    let context = session_context(DATABASE, "postgres", "public", &session_settings());
    let payload = select_payload();
    // As many entries as pgbench -S at scale 1 fills, so the lookups do not
    // all land in one small, hot table.
    let keys: Vec<u128> = select_texts(ENTRIES)
        .iter()
        .map(|text| statement_key(context, Protocol::Simple, text.as_bytes(), &[], b""))
        .collect();
    for &key in &keys {
        cache.local.insert(
            key,
            Entry::new(
                cache.generations.snapshot(DATABASE, &[TABLE]),
                payload.clone(),
                None,
                Duration::from_secs(3600),
            ),
        );
    }
    let probe = cache.local.get(keys[0]).expect("inserted");
    assert!(cache.generations.is_current(&probe.snapshot));

    // The hit path: the entry, then whether what it read is unchanged.
    let mut i = 0;
    group.bench_function("get_and_is_current", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let entry = cache.local.get(black_box(keys[i])).expect("inserted");
            cache.generations.is_current(&entry.snapshot)
        })
    });
    // One key over and over: moka's own cost, with the entry and its
    // hash-table slot in the CPU cache (the difference to the above is
    // memory latency).
    group.bench_function("get_and_is_current_same_key", |b| {
        b.iter(|| {
            let entry = cache.local.get(black_box(keys[0])).expect("inserted");
            cache.generations.is_current(&entry.snapshot)
        })
    });
    // Taken before every lookup, hit or miss.
    group.bench_function("generations_snapshot", |b| {
        b.iter(|| cache.generations.snapshot(black_box(DATABASE), &[TABLE]))
    });
    let absent = statement_key(context, Protocol::Extended, SELECT.as_bytes(), &[], b"");
    group.bench_function("get_miss", |b| {
        b.iter(|| cache.local.get(black_box(absent)))
    });
    group.finish();
}

criterion_group!(benches, bench_analysis, bench_keys, bench_local_tier);
criterion_main!(benches);
