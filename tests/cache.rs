//! The result cache against a real PostgreSQL: every kind of write makes
//! the next read see it, keys keep sessions with different roles, paths and
//! settings apart, and a concurrent checker finds no stale read.

mod support;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgstash::cache::CacheStats;
use support::{unique, TestProxy};
use tokio_postgres::{Client, SimpleQueryMessage};

/// Every value of every row of a simple query, as text.
async fn rows(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

async fn scalar(client: &Client, sql: &str) -> String {
    rows(client, sql).await[0][0].clone().unwrap_or_default()
}

fn hits(proxy: &TestProxy) -> u64 {
    CacheStats::get(&proxy.proxy.cache.as_ref().expect("cache on").stats.hits)
}

/// Reads `sql` twice and checks the second read came from the cache.
async fn read_cached(proxy: &TestProxy, client: &Client, sql: &str) -> String {
    let first = scalar(client, sql).await;
    let before = hits(proxy);
    let second = scalar(client, sql).await;
    assert_eq!(first, second);
    assert_eq!(
        hits(proxy),
        before + 1,
        "second read of {sql} was not a hit"
    );
    second
}

struct Fixture {
    proxy: TestProxy,
    client: Client,
    direct: Client,
}

async fn fixture() -> Fixture {
    let proxy = TestProxy::start("").await;
    let client = proxy.connect("test").await;
    let direct = support::direct("test").await;
    Fixture {
        proxy,
        client,
        direct,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_cached_and_writes_that_bypass_pgstash_are_not_seen() {
    // The control experiment: proves the other tests' reads really come
    // from the cache.
    let f = fixture().await;
    let t = unique("ctl");
    f.direct
        .batch_execute(&format!(
            "CREATE TABLE {t} (v int); INSERT INTO {t} VALUES (1)"
        ))
        .await
        .unwrap();
    let sql = format!("SELECT sum(v) FROM {t}");
    assert_eq!(read_cached(&f.proxy, &f.client, &sql).await, "1");
    f.direct
        .batch_execute(&format!("INSERT INTO {t} VALUES (1)"))
        .await
        .unwrap();
    assert_eq!(
        scalar(&f.client, &sql).await,
        "1",
        "a direct write is only seen after the TTL"
    );
    f.direct
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

/// For each write: cache a read, run the write through pgstash, and the
/// next read must see it.
async fn write_is_seen(
    setup: &str,
    read: &str,
    write: &str,
    expect_before: &str,
    expect_after: &str,
) {
    let f = fixture().await;
    f.direct.batch_execute(setup).await.unwrap();
    assert_eq!(
        read_cached(&f.proxy, &f.client, read).await,
        expect_before,
        "{read}"
    );
    f.client
        .batch_execute(write)
        .await
        .unwrap_or_else(|e| panic!("{write}: {e}"));
    assert_eq!(scalar(&f.client, read).await, expect_after, "after {write}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dml_kind_invalidates() {
    let t = unique("dml");
    let setup = format!(
        "CREATE TABLE {t} (id int primary key, v int); INSERT INTO {t} VALUES (1, 10), (2, 20)"
    );
    let read = format!("SELECT coalesce(sum(v), 0) FROM {t}");
    let src = format!("{t}_src");
    let cases = [
        (format!("INSERT INTO {t} VALUES (3, 30)"), "60"),
        (format!("UPDATE {t} SET v = v + 1 WHERE id = 1"), "31"),
        (format!("DELETE FROM {t} WHERE id = 2"), "10"),
        (format!("INSERT INTO {t} VALUES (1, 5) ON CONFLICT (id) DO UPDATE SET v = excluded.v"), "25"),
        (format!("WITH d AS (DELETE FROM {t} WHERE id = 1 RETURNING *) SELECT count(*) FROM d"), "20"),
        (format!("TRUNCATE {t}"), "0"),
        (format!("CREATE TEMP TABLE IF NOT EXISTS x (a int); DROP TABLE x; MERGE INTO {t} USING (VALUES (2, 99)) AS {src}(id, v) ON {t}.id = {src}.id WHEN MATCHED THEN UPDATE SET v = {src}.v"), "109"),
    ];
    for (write, after) in cases {
        let table = unique("dml");
        let setup = setup.replace(&t, &table);
        let read = read.replace(&t, &table);
        let write = write.replace(&t, &table);
        write_is_seen(&setup, &read, &write, "30", after).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_invalidates() {
    use futures_util::SinkExt;
    let f = fixture().await;
    let t = unique("copyinv");
    f.direct
        .batch_execute(&format!(
            "CREATE TABLE {t} (v int); INSERT INTO {t} VALUES (1)"
        ))
        .await
        .unwrap();
    let read = format!("SELECT count(*) FROM {t}");
    assert_eq!(read_cached(&f.proxy, &f.client, &read).await, "1");
    let sink = f
        .client
        .copy_in::<_, bytes::Bytes>(&format!("COPY {t} FROM STDIN"))
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"2\n3\n"))
        .await
        .unwrap();
    sink.finish().await.unwrap();
    assert_eq!(scalar(&f.client, &read).await, "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_views_cascades_and_triggers() {
    let p = unique("part");
    write_is_seen(
        &format!("CREATE TABLE {p} (k int, v int) PARTITION BY RANGE (k); CREATE TABLE {p}_a PARTITION OF {p} FOR VALUES FROM (0) TO (100); INSERT INTO {p} VALUES (1, 1)"),
        &format!("SELECT sum(v) FROM {p}"),
        &format!("INSERT INTO {p}_a VALUES (2, 2)"),
        "1",
        "3",
    )
    .await;
    let p2 = unique("part");
    write_is_seen(
        &format!("CREATE TABLE {p2} (k int, v int) PARTITION BY RANGE (k); CREATE TABLE {p2}_a PARTITION OF {p2} FOR VALUES FROM (0) TO (100); INSERT INTO {p2} VALUES (1, 1)"),
        &format!("SELECT sum(v) FROM {p2}_a"),
        &format!("UPDATE {p2} SET v = 5"),
        "1",
        "5",
    )
    .await;
    let v = unique("view");
    write_is_seen(
        &format!("CREATE TABLE {v}_base (v int); INSERT INTO {v}_base VALUES (1); CREATE VIEW {v} AS SELECT sum(v) AS s FROM {v}_base"),
        &format!("SELECT s FROM {v}"),
        &format!("INSERT INTO {v}_base VALUES (41)"),
        "1",
        "42",
    )
    .await;
    let c = unique("fk");
    write_is_seen(
        &format!("CREATE TABLE {c}_p (id int primary key); CREATE TABLE {c}_c (pid int REFERENCES {c}_p ON DELETE CASCADE); INSERT INTO {c}_p VALUES (1), (2); INSERT INTO {c}_c VALUES (1), (2)"),
        &format!("SELECT count(*) FROM {c}_c"),
        &format!("DELETE FROM {c}_p WHERE id = 1"),
        "2",
        "1",
    )
    .await;
    let g = unique("trg");
    write_is_seen(
        &format!("CREATE TABLE {g}_a (v int); CREATE TABLE {g}_log (v int); CREATE FUNCTION {g}_f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO {g}_log VALUES (NEW.v); RETURN NEW; END $$; CREATE TRIGGER {g}_t AFTER INSERT ON {g}_a FOR EACH ROW EXECUTE FUNCTION {g}_f()"),
        &format!("SELECT count(*) FROM {g}_log"),
        &format!("INSERT INTO {g}_a VALUES (7)"),
        "0",
        "1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_invalidates() {
    let d = unique("ddl");
    write_is_seen(
        &format!("CREATE TABLE {d} (v int); INSERT INTO {d} VALUES (1)"),
        &format!("SELECT count(*) FROM {d}"),
        &format!("DROP TABLE {d}; CREATE TABLE {d} (v int)"),
        "1",
        "0",
    )
    .await;
    // SELECT * changes shape when a column is added.
    let f = fixture().await;
    let a = unique("alter");
    f.direct
        .batch_execute(&format!(
            "CREATE TABLE {a} (v int); INSERT INTO {a} VALUES (1)"
        ))
        .await
        .unwrap();
    let star = format!("SELECT * FROM {a}");
    read_cached(&f.proxy, &f.client, &star).await;
    assert_eq!(rows(&f.client, &star).await[0].len(), 1);
    f.client
        .batch_execute(&format!("ALTER TABLE {a} ADD COLUMN w int DEFAULT 2"))
        .await
        .unwrap();
    assert_eq!(
        rows(&f.client, &star).await,
        vec![vec![Some("1".to_string()), Some("2".to_string())]]
    );
    let m = unique("mv");
    write_is_seen(
        &format!("CREATE TABLE {m}_b (v int); INSERT INTO {m}_b VALUES (1); CREATE MATERIALIZED VIEW {m} AS SELECT sum(v) AS s FROM {m}_b; INSERT INTO {m}_b VALUES (2)"),
        &format!("SELECT s FROM {m}"),
        &format!("REFRESH MATERIALIZED VIEW {m}"),
        "1",
        "3",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_reads_and_writes_with_bind_alone() {
    let f = fixture().await;
    let t = unique("prepw");
    f.direct
        .batch_execute(&format!(
            "CREATE TABLE {t} (id int primary key, v int); INSERT INTO {t} VALUES (1, 0)"
        ))
        .await
        .unwrap();
    let read = f
        .client
        .prepare(&format!("SELECT v FROM {t} WHERE id = $1"))
        .await
        .unwrap();
    let write = f
        .client
        .prepare(&format!("UPDATE {t} SET v = v + 1 WHERE id = $1"))
        .await
        .unwrap();
    for expected in 0..5i32 {
        let before = hits(&f.proxy);
        let v: i32 = f.client.query_one(&read, &[&1i32]).await.unwrap().get(0);
        assert_eq!(v, expected);
        let again: i32 = f.client.query_one(&read, &[&1i32]).await.unwrap().get(0);
        assert_eq!(again, expected);
        assert_eq!(
            hits(&f.proxy),
            before + 1,
            "second prepared read was not a hit"
        );
        // tokio-postgres executes a prepared statement with Bind/Execute only.
        f.client.execute(&write, &[&1i32]).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_publish_writes_at_commit_only() {
    let f = fixture().await;
    let t = unique("txw");
    f.direct
        .batch_execute(&format!(
            "CREATE TABLE {t} (v int); INSERT INTO {t} VALUES (1)"
        ))
        .await
        .unwrap();
    let other = f.proxy.connect("test").await;
    let read = format!("SELECT sum(v) FROM {t}");
    assert_eq!(read_cached(&f.proxy, &other, &read).await, "1");
    f.client
        .batch_execute(&format!("BEGIN; INSERT INTO {t} VALUES (10)"))
        .await
        .unwrap();
    // Uncommitted: the other client still reads the old (cached) value.
    let before = hits(&f.proxy);
    assert_eq!(scalar(&other, &read).await, "1");
    assert_eq!(hits(&f.proxy), before + 1);
    f.client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(scalar(&other, &read).await, "11");

    // A rolled-back write leaves the cache alone.
    assert_eq!(read_cached(&f.proxy, &other, &read).await, "11");
    f.client
        .batch_execute(&format!("BEGIN; INSERT INTO {t} VALUES (100)"))
        .await
        .unwrap();
    f.client.batch_execute("ROLLBACK").await.unwrap();
    let before = hits(&f.proxy);
    assert_eq!(scalar(&other, &read).await, "11");
    assert_eq!(hits(&f.proxy), before + 1, "ROLLBACK must not invalidate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_grants_and_row_level_security_never_leak() {
    let f = fixture().await;
    let t = unique("sec");
    let (r1, r2) = (unique("r1"), unique("r2"));
    f.direct
        .batch_execute(&format!(
            "CREATE ROLE {r1}; CREATE ROLE {r2}; CREATE TABLE {t} (owner text, v int);
             INSERT INTO {t} VALUES ('{r1}', 1), ('{r2}', 2);
             GRANT SELECT ON {t} TO {r1};"
        ))
        .await
        .unwrap();
    let read = format!("SELECT sum(v) FROM {t}");
    f.client
        .batch_execute(&format!("SET ROLE {r1}"))
        .await
        .unwrap();
    assert_eq!(read_cached(&f.proxy, &f.client, &read).await, "3");
    f.client
        .batch_execute(&format!("SET ROLE {r2}"))
        .await
        .unwrap();
    let err = f.client.simple_query(&read).await.unwrap_err();
    assert_eq!(
        err.code().unwrap().code(),
        "42501",
        "r2 must not see r1's cached rows"
    );
    // REVOKE through pgstash takes effect at once.
    f.client.batch_execute("RESET ROLE").await.unwrap();
    f.client
        .batch_execute(&format!("REVOKE SELECT ON {t} FROM {r1}"))
        .await
        .unwrap();
    f.client
        .batch_execute(&format!("SET ROLE {r1}"))
        .await
        .unwrap();
    let err = f.client.simple_query(&read).await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42501");
    f.client.batch_execute("RESET ROLE").await.unwrap();

    // Row-level security: each role sees only its rows, never cached.
    f.direct
        .batch_execute(&format!(
            "GRANT SELECT ON {t} TO {r1}, {r2}; ALTER TABLE {t} ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own ON {t} USING (owner = current_user)"
        ))
        .await
        .unwrap();
    // The policy was created behind pgstash's back: flush via a DDL
    // through it, as a deploy pipeline would run migrations.
    f.client
        .batch_execute(&format!(
            "COMMENT ON TABLE {t} IS 'rls'; ALTER TABLE {t} FORCE ROW LEVEL SECURITY"
        ))
        .await
        .unwrap();
    for (role, expected) in [(&r1, "1"), (&r2, "2"), (&r1, "1"), (&r2, "2")] {
        f.client
            .batch_execute(&format!("SET ROLE {role}"))
            .await
            .unwrap();
        assert_eq!(scalar(&f.client, &read).await, expected, "as {role}");
    }
    f.client.batch_execute("RESET ROLE").await.unwrap();
    f.direct
        .batch_execute(&format!("DROP TABLE {t}; DROP ROLE {r1}; DROP ROLE {r2}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_path_and_time_zone_are_part_of_the_key() {
    let f = fixture().await;
    let (a, b) = (unique("sa"), unique("sb"));
    f.direct
        .batch_execute(&format!(
            "CREATE SCHEMA {a}; CREATE SCHEMA {b};
             CREATE TABLE {a}.t (v text); CREATE TABLE {b}.t (v text);
             INSERT INTO {a}.t VALUES ('a'); INSERT INTO {b}.t VALUES ('b')"
        ))
        .await
        .unwrap();
    let other = f.proxy.connect("test").await;
    f.client
        .batch_execute(&format!("SET search_path = {a}"))
        .await
        .unwrap();
    other
        .batch_execute(&format!("SET search_path = {b}"))
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(scalar(&f.client, "SELECT v FROM t").await, "a");
        assert_eq!(scalar(&other, "SELECT v FROM t").await, "b");
    }
    let ts = "SELECT '2024-01-01 00:00:00+00'::timestamptz::text";
    f.client.batch_execute("SET TIME ZONE 'UTC'").await.unwrap();
    assert_eq!(
        read_cached(&f.proxy, &f.client, ts).await,
        "2024-01-01 00:00:00+00"
    );
    f.client
        .batch_execute("SET TIME ZONE 'Asia/Tokyo'")
        .await
        .unwrap();
    assert_eq!(scalar(&f.client, ts).await, "2024-01-01 09:00:00+09");
    f.direct
        .batch_execute(&format!("DROP SCHEMA {a} CASCADE; DROP SCHEMA {b} CASCADE"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_functions_are_never_cached() {
    let f = fixture().await;
    let s = unique("seq");
    f.direct
        .batch_execute(&format!("CREATE SEQUENCE {s}"))
        .await
        .unwrap();
    let before = hits(&f.proxy);
    for sql in [
        "SELECT now()::text".to_string(),
        "SELECT random()::text".to_string(),
        format!("SELECT nextval('{s}')::text"),
        "SELECT 'now'::timestamptz::text".to_string(),
        "SELECT clock_timestamp()::text".to_string(),
    ] {
        let a = scalar(&f.client, &sql).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
        let b = scalar(&f.client, &sql).await;
        assert_ne!(a, b, "{sql} returned the same value twice");
    }
    assert_eq!(hits(&f.proxy), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_and_huge_results_pass_through() {
    let f = fixture().await;
    let t = unique("odd");
    f.direct
        .batch_execute(&format!(
            "CREATE TABLE {t} (v int); INSERT INTO {t} VALUES (5)"
        ))
        .await
        .unwrap();
    // sqlparser does not know TABLE; Postgres does.
    assert_eq!(scalar(&f.client, &format!("TABLE {t}")).await, "5");
    let stats = &f.proxy.proxy.cache.as_ref().unwrap().stats;
    let fills = CacheStats::get(&stats.fills);
    let big = "SELECT repeat('x', 100 * 1024 * 1024)";
    let value = scalar(&f.client, big).await;
    assert_eq!(value.len(), 100 * 1024 * 1024);
    assert_eq!(
        CacheStats::get(&stats.fills),
        fills,
        "a 100 MB result must not be stored"
    );
}

/// Writers bump row versions while readers read them through pgstash; no
/// read may return a version older than one whose write had completed
/// before the read began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checker_finds_no_stale_read() {
    const ROWS: i64 = 4;
    let duration = Duration::from_secs(
        std::env::var("PGSTASH_CHECKER_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let proxy = TestProxy::start("[pool]\nsize = 6\n").await;
    let t = unique("chk");
    let direct = support::direct("test").await;
    direct
        .batch_execute(&format!(
            "CREATE TABLE {t} (id bigint primary key, version bigint); INSERT INTO {t} SELECT g, 0 FROM generate_series(0, {}) g",
            ROWS - 1
        ))
        .await
        .unwrap();
    let completed: Arc<Vec<AtomicI64>> = Arc::new((0..ROWS).map(|_| AtomicI64::new(0)).collect());
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for w in 0..2 {
        let client = proxy.connect("test").await;
        let (t, completed) = (t.clone(), completed.clone());
        tasks.push(tokio::spawn(async move {
            let update = client
                .prepare(&format!(
                    "UPDATE {t} SET version = version + 1 WHERE id = $1 RETURNING version"
                ))
                .await
                .unwrap();
            let mut n = 0i64;
            while Instant::now() < deadline {
                let id = (n + w) % ROWS;
                let version: i64 = if n % 2 == 0 {
                    client.query_one(&update, &[&id]).await.unwrap().get(0)
                } else {
                    let sql = format!(
                        "UPDATE {t} SET version = version + 1 WHERE id = {id} RETURNING version"
                    );
                    scalar(&client, &sql).await.parse().unwrap()
                };
                completed[id as usize].fetch_max(version, Ordering::SeqCst);
                n += 1;
            }
            0u64
        }));
    }
    for r in 0..4 {
        let client = proxy.connect("test").await;
        let (t, completed) = (t.clone(), completed.clone());
        tasks.push(tokio::spawn(async move {
            let select = client
                .prepare(&format!("SELECT version FROM {t} WHERE id = $1"))
                .await
                .unwrap();
            let mut violations = 0u64;
            let mut n = 0i64;
            while Instant::now() < deadline {
                let id = (n + r) % ROWS;
                let floor = completed[id as usize].load(Ordering::SeqCst);
                let seen: i64 = if n % 2 == 0 {
                    client.query_one(&select, &[&id]).await.unwrap().get(0)
                } else {
                    scalar(&client, &format!("SELECT version FROM {t} WHERE id = {id}"))
                        .await
                        .parse()
                        .unwrap()
                };
                if seen < floor {
                    violations += 1;
                    eprintln!("stale read: row {id} version {seen} < completed {floor}");
                }
                n += 1;
            }
            violations
        }));
    }
    let mut violations = 0;
    for task in tasks {
        violations += task.await.unwrap();
    }
    let stats = &proxy.proxy.cache.as_ref().unwrap().stats;
    eprintln!(
        "checker: hits {} misses {} fills {} discarded {}",
        CacheStats::get(&stats.hits),
        CacheStats::get(&stats.misses),
        CacheStats::get(&stats.fills),
        CacheStats::get(&stats.fills_discarded)
    );
    assert!(
        CacheStats::get(&stats.hits) > 0,
        "the checker never exercised the cache"
    );
    assert_eq!(violations, 0);
    direct
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}
