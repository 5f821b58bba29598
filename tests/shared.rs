//! The Redis tier and invalidation bus with two pgstash instances sharing
//! one real Redis and one real PostgreSQL.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgstash::cache::shared::SharedTier;
use support::{unique, TestProxy};
use tokio_postgres::{Client, SimpleQueryMessage};

async fn scalar(client: &Client, sql: &str) -> String {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    messages
        .into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or_default().to_owned()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Fills stored in both tiers: Redis's part is written behind, so both
/// counters must have moved.
fn fills(proxy: &TestProxy) -> (u64, u64) {
    let cache = proxy.proxy.cache.as_ref().expect("cache on");
    let local = cache.stats.fills.load(Ordering::Relaxed);
    let redis = cache
        .shared
        .as_ref()
        .map_or(0, |s| s.stats.stored.load(Ordering::Relaxed));
    (local, redis)
}

/// Runs `sql` through `client` and waits until its fill is stored in both
/// tiers (fills are stored after the answer is sent).
async fn read_and_wait_for_fill(proxy: &TestProxy, client: &Client, sql: &str) -> String {
    let before = fills(proxy);
    let value = scalar(client, sql).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let stored = |now: (u64, u64)| now.0 > before.0 && now.1 > before.1;
    while !stored(fills(proxy)) {
        assert!(
            Instant::now() < deadline,
            "the fill of {sql} was never stored"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    value
}

fn shared(proxy: &TestProxy) -> &SharedTier {
    proxy
        .proxy
        .cache
        .as_ref()
        .and_then(|c| c.shared.as_deref())
        .expect("redis tier configured")
}

async fn start_with_redis(url: &str, prefix: &str, extra: &str) -> TestProxy {
    let proxy = TestProxy::start(&format!(
        "[redis]\nurl = \"{url}\"\nprefix = \"{prefix}:\"\ntimeout = \"500ms\"\n{extra}\n"
    ))
    .await;
    wait_for_bus(&proxy).await;
    proxy
}

async fn wait_for_bus(proxy: &TestProxy) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !shared(proxy).bus_healthy.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "invalidation bus never came up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sets `v` of `table` through `writer`, then expects `reader` to read the
/// new value within half a second (`stale`: what it means if it does not).
async fn write_then_read(writer: &Client, reader: &Client, table: &str, v: i32, stale: &str) {
    writer
        .batch_execute(&format!("UPDATE {table} SET v = {v}"))
        .await
        .unwrap();
    let sql = format!("SELECT v FROM {table}");
    let deadline = Instant::now() + Duration::from_millis(500);
    while scalar(reader, &sql).await != v.to_string() {
        assert!(Instant::now() < deadline, "{stale}");
    }
}

/// Two pgstash instances sharing one Redis key prefix on `url`, a fresh
/// table `(v int)` holding `value`, and a client on each.
struct Pair {
    prefix: String,
    a: TestProxy,
    b: TestProxy,
    ca: Client,
    cb: Client,
    table: String,
    direct: Client,
}

impl Pair {
    /// Bind every instance the test needs alive: a dropped one stops.
    async fn start(url: &str, extra: &str, label: &str, value: i32) -> Pair {
        let prefix = unique("pgstash_test");
        let a = start_with_redis(url, &prefix, extra).await;
        let b = start_with_redis(url, &prefix, extra).await;
        let table = unique(label);
        let direct = support::direct("test").await;
        direct
            .batch_execute(&format!(
                "CREATE TABLE {table} (v int); INSERT INTO {table} VALUES ({value})"
            ))
            .await
            .unwrap();
        let (ca, cb) = (a.connect("test").await, b.connect("test").await);
        Pair {
            prefix,
            a,
            b,
            ca,
            cb,
            table,
            direct,
        }
    }
}

/// Two pgstash instances on `url`: a fill through A is a Redis hit through
/// B, and writes through A reach B.
async fn assert_two_instances_share(url: &str, extra: &str) -> Pair {
    let pair = Pair::start(url, extra, "two", 0).await;
    let Pair {
        a,
        b,
        ca,
        cb,
        table: t,
        direct,
        ..
    } = &pair;
    let sql = format!("SELECT v FROM {t}");
    assert_eq!(read_and_wait_for_fill(a, ca, &sql).await, "0");
    let before = shared(b).stats.hits.load(Ordering::Relaxed);
    assert_eq!(scalar(cb, &sql).await, "0");
    assert_eq!(
        shared(b).stats.hits.load(Ordering::Relaxed),
        before + 1,
        "B did not hit A's fill in redis"
    );
    for i in 1..=5 {
        ca.batch_execute(&format!("UPDATE {t} SET v = {i}"))
            .await
            .unwrap();
        let written = Instant::now();
        while scalar(cb, &sql).await != i.to_string() {
            assert!(
                written.elapsed() < Duration::from_secs(2),
                "B stale 2 s after a write through A"
            );
        }
    }
    direct
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
    pair
}

/// Waits until an instance knows every entry in Redis (after its scan, or
/// once entries from before it listened have expired).
async fn wait_until_warm(proxy: &TestProxy) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !shared(proxy).presence.surely_absent(u128::MAX) {
        assert!(Instant::now() < deadline, "never finished warming up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `counter` of an instance's shared-tier stats moves past
/// `before`.
async fn wait_for_stat(
    proxy: &TestProxy,
    what: &str,
    counter: fn(&SharedTier) -> u64,
    before: u64,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(shared(proxy)) <= before {
        assert!(Instant::now() < deadline, "{what} never happened");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_skip_redis_for_entries_nobody_announced() {
    // Once an instance has scanned Redis (or listened for as long as
    // entries live), it knows every entry there and stops asking Redis for
    // the others.
    let extra = "[cache]\ndefault_ttl = \"1h\"";
    let Pair {
        prefix,
        a,
        b,
        ca,
        cb,
        table: t,
        direct,
    } = Pair::start("redis://127.0.0.1:6379", extra, "presence", 7).await;
    wait_until_warm(&b).await;

    // Nobody stored this one: B goes to Postgres without asking Redis.
    let skipped = |s: &SharedTier| s.stats.skipped.load(Ordering::Relaxed);
    let before = skipped(shared(&b));
    assert_eq!(scalar(&cb, &format!("SELECT v + 1 FROM {t}")).await, "8");
    assert_eq!(skipped(shared(&b)), before + 1);

    // A stores and announces; once B has heard, B asks Redis and hits.
    let announced = |s: &SharedTier| s.stats.announced.load(Ordering::Relaxed);
    let heard = announced(shared(&b));
    let sql = format!("SELECT v FROM {t}");
    assert_eq!(read_and_wait_for_fill(&a, &ca, &sql).await, "7");
    wait_for_stat(&b, "the announcement of A's fill", announced, heard).await;
    let hits = shared(&b).stats.hits.load(Ordering::Relaxed);
    assert_eq!(scalar(&cb, &sql).await, "7");
    assert_eq!(shared(&b).stats.hits.load(Ordering::Relaxed), hits + 1);

    // The extended protocol is answered from Redis too.
    let stored = |s: &SharedTier| s.stats.stored.load(Ordering::Relaxed);
    let (stored_before, heard) = (stored(shared(&a)), announced(shared(&b)));
    let hits = shared(&b).stats.hits.load(Ordering::Relaxed);
    let prepared = format!("SELECT v * $1::int FROM {t}");
    let fill = ca.query_one(&prepared, &[&3i32]).await.unwrap();
    assert_eq!(fill.get::<_, i32>(0), 21);
    wait_for_stat(&a, "the store of A's extended fill", stored, stored_before).await;
    wait_for_stat(
        &b,
        "the announcement of A's extended fill",
        announced,
        heard,
    )
    .await;
    let row = cb.query_one(&prepared, &[&3i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 21);
    assert_eq!(shared(&b).stats.hits.load(Ordering::Relaxed), hits + 1);

    // An instance started later learns of the entry by scanning Redis.
    let c = start_with_redis("redis://127.0.0.1:6379", &prefix, extra).await;
    wait_until_warm(&c).await;
    let cc = c.connect("test").await;
    assert_eq!(scalar(&cc, &sql).await, "7");
    assert_eq!(shared(&c).stats.hits.load(Ordering::Relaxed), 1);
    direct
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_through_one_pgstash_is_a_redis_hit_through_another() {
    let Pair {
        a,
        b,
        ca,
        cb,
        table: t,
        direct,
        ..
    } = Pair::start("redis://127.0.0.1:6379", "", "shared", 42).await;
    let sql = format!("SELECT v FROM {t}");
    assert_eq!(read_and_wait_for_fill(&a, &ca, &sql).await, "42");
    assert_eq!(scalar(&cb, &sql).await, "42");
    assert_eq!(
        shared(&b).stats.hits.load(Ordering::Relaxed),
        1,
        "B did not hit A's fill in redis"
    );
    // Promoted: with the bus delivering heartbeats, B trusts its local
    // tier and the next read does not go to Redis.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        b.proxy.cache.as_ref().unwrap().local_trusted(),
        "bus heartbeats not heard"
    );
    assert_eq!(scalar(&cb, &sql).await, "42");
    assert_eq!(
        shared(&b).stats.hits.load(Ordering::Relaxed),
        1,
        "promoted entry not served locally"
    );
    direct
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

/// A large result is stored compressed and served whole through another
/// instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_results_are_stored_compressed() {
    let pair = Pair::start("redis://127.0.0.1:6379", "", "large", 7).await;
    let sql = format!("SELECT repeat('pgstash ', 4000) || v FROM {}", pair.table);
    let expected = format!("{}7", "pgstash ".repeat(4000));
    assert_eq!(
        read_and_wait_for_fill(&pair.a, &pair.ca, &sql).await,
        expected
    );
    assert_eq!(scalar(&pair.cb, &sql).await, expected);
    assert_eq!(shared(&pair.b).stats.hits.load(Ordering::Relaxed), 1);

    let mut conn = redis_connection("redis://127.0.0.1:6379").await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:r:*", pair.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let stored: usize = redis::cmd("STRLEN")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        stored < 2_000,
        "a 32 kB result took {stored} bytes in redis"
    );
    pair.direct
        .batch_execute(&format!("DROP TABLE {}", pair.table))
        .await
        .unwrap();
}

/// A writes, B reads: B may be stale only until the bump reaches it; the
/// delay from A's CommandComplete to B serving the new value is measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_one_pgstash_invalidate_the_other() {
    // Unused instances are bound all the same: dropping one stops it.
    let Pair {
        a: _a,
        b: _b,
        ca,
        cb,
        table: t,
        direct,
        ..
    } = Pair::start("redis://127.0.0.1:6379", "", "bus", 0).await;
    let sql = format!("SELECT v FROM {t}");
    let mut delays = Vec::new();
    for i in 1..=200 {
        assert_eq!(scalar(&cb, &sql).await, (i - 1).to_string());
        ca.batch_execute(&format!("UPDATE {t} SET v = {i}"))
            .await
            .unwrap();
        let written = Instant::now();
        loop {
            if scalar(&cb, &sql).await == i.to_string() {
                break;
            }
            assert!(
                written.elapsed() < Duration::from_secs(2),
                "B still stale 2 s after the write"
            );
        }
        delays.push(written.elapsed());
    }
    delays.sort();
    let p = |q: f64| delays[((delays.len() as f64 - 1.0) * q) as usize];
    eprintln!(
        "write through A to fresh read through B: p50 {:?} p99 {:?} max {:?}",
        p(0.5),
        p(0.99),
        delays[delays.len() - 1]
    );
    assert!(delays[delays.len() - 1] < Duration::from_millis(500));
    direct
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_never_fails_queries() {
    // Nothing listens on port 1.
    let proxy = TestProxy::start(
        "[redis]\nurl = \"redis://127.0.0.1:1\"\ntimeout = \"20ms\"\nconnect_timeout = \"50ms\"\n",
    )
    .await;
    let client = proxy.connect("test").await;
    let t = unique("down");
    client
        .batch_execute(&format!(
            "CREATE TABLE {t} (v int); INSERT INTO {t} VALUES (7)"
        ))
        .await
        .unwrap();
    let started = Instant::now();
    for _ in 0..50 {
        assert_eq!(scalar(&client, &format!("SELECT v FROM {t}")).await, "7");
    }
    // The circuit keeps a dead Redis from adding its timeout to every query.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "50 queries took {:?}",
        started.elapsed()
    );
    assert!(shared(&proxy).circuit_open());
    client
        .batch_execute(&format!("UPDATE {t} SET v = 8"))
        .await
        .unwrap();
    assert_eq!(scalar(&client, &format!("SELECT v FROM {t}")).await, "8");
    client
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_values_in_redis_are_never_served() {
    let prefix = unique("pgstash_test");
    let a = start_with_redis("redis://127.0.0.1:6379", &prefix, "").await;
    let b = start_with_redis("redis://127.0.0.1:6379", &prefix, "").await;
    let t = unique("corrupt");
    let direct = support::direct("test").await;
    direct
        .batch_execute(&format!(
            "CREATE TABLE {t} (v text); INSERT INTO {t} VALUES ('right')"
        ))
        .await
        .unwrap();
    let ca = a.connect("test").await;
    let sql = format!("SELECT v FROM {t}");
    assert_eq!(read_and_wait_for_fill(&a, &ca, &sql).await, "right");
    let mut conn = redis_connection("redis://127.0.0.1:6379").await;
    let pattern = format!("{prefix}:r:*");
    let deadline = Instant::now() + Duration::from_secs(5);
    let keys: Vec<String> = loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            break keys;
        }
        assert!(Instant::now() < deadline, "the fill never reached redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for key in &keys {
        // Same length as before, wrong bytes: only the checksum can tell.
        let value: Vec<u8> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut bad = value.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x55;
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(bad)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let cb = b.connect("test").await;
    assert_eq!(scalar(&cb, &sql).await, "right");
    assert!(shared(&b).stats.corrupt.load(Ordering::Relaxed) >= 1);
    assert_eq!(shared(&b).stats.hits.load(Ordering::Relaxed), 0);
    for key in &keys {
        // Deleted, or replaced by B's own good fill: never the bad bytes.
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if let Some(value) = value {
            assert!(
                pgstash::cache::shared::StoredResult::decode(value.into()).is_some(),
                "corrupt value left in redis"
            );
        }
    }
    direct
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

/// A redis-server of the test's own, so its pub/sub clients can be killed
/// without touching anyone else.
struct OwnRedis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

/// A plain connection for the test's own commands to Redis.
async fn redis_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Stalls every client of the Redis behind `admin` for `ms` milliseconds.
async fn pause_redis(admin: &mut redis::aio::MultiplexedConnection, ms: u32) {
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg("ALL")
        .query_async(admin)
        .await
        .unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl OwnRedis {
    fn start() -> OwnRedis {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> OwnRedis {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnRedis {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_bus_stops_local_hits_until_it_is_back() {
    let own = OwnRedis::start();
    let Pair {
        a: _a,
        b,
        ca,
        cb,
        table: t,
        direct,
        ..
    } = Pair::start(&own.url(), "", "lost", 1).await;
    let sql = format!("SELECT v FROM {t}");
    assert_eq!(scalar(&cb, &sql).await, "1");

    let mut conn = redis_connection(&own.url()).await;
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Until B resubscribes it may not trust its local tier; either way a
    // write through A must be visible through B at once.
    write_then_read(&ca, &cb, &t, 2, "B stayed stale after losing the bus").await;
    wait_for_bus(&b).await;
    write_then_read(&ca, &cb, &t, 3, "B stale after the bus came back").await;
    direct
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

/// `PUBSUB <count>` for one channel on one node (NUMSUB or SHARDNUMSUB).
async fn subscribers(
    conn: &mut redis::aio::MultiplexedConnection,
    count: &str,
    channel: &str,
) -> i64 {
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg(count)
        .arg(channel)
        .query_async(conn)
        .await
        .unwrap();
    n
}

/// The same two-process test on a Redis Cluster of three masters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pgstash_on_a_redis_cluster() {
    let nodes: Vec<OwnRedis> = (0..3)
        .map(|_| {
            OwnRedis::start_with(&["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
        })
        .collect();
    let addresses: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let status = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addresses)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .status()
        .expect("redis-cli");
    assert!(status.success(), "redis-cli --cluster create failed");
    // Wait until every node agrees the cluster is up.
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in &nodes {
        let mut conn = redis_connection(&node.url()).await;
        loop {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut conn)
                .await
                .unwrap();
            if info.contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "cluster never became ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let urls: Vec<String> = nodes.iter().map(OwnRedis::url).collect();
    let url = urls.join(",");
    let pair = assert_two_instances_share(&url, "cluster = true").await;

    // The bus is sharded pub/sub: both instances hold a shard subscription
    // (on the master of the bus's slot) and no plain one anywhere.
    let channel = format!("{}:{{bus}}invalidate", pair.prefix);
    let mut node_connections = Vec::new();
    for node in &nodes {
        node_connections.push(redis_connection(&node.url()).await);
    }
    let (mut sharded, mut plain) = (0, 0);
    for conn in &mut node_connections {
        sharded += subscribers(conn, "SHARDNUMSUB", &channel).await;
        plain += subscribers(conn, "NUMSUB", &channel).await;
    }
    assert_eq!((sharded, plain), (2, 0), "shard and plain subscribers");

    // Killing the subscriptions: B resubscribes by itself, and a write
    // through A meanwhile is never read stale through B.
    let t = unique("clusterkill");
    // Created through B, whose catalog learns the table from its own DDL.
    pair.cb
        .batch_execute(&format!(
            "CREATE TABLE {t} (v int); INSERT INTO {t} VALUES (1)"
        ))
        .await
        .unwrap();
    let sql = format!("SELECT v FROM {t}");
    assert_eq!(read_and_wait_for_fill(&pair.b, &pair.cb, &sql).await, "1");
    let subscribed = shared(&pair.b).stats.subscriptions.load(Ordering::Relaxed);
    assert_eq!(subscribed, 1, "B's shard subscription restarted by itself");
    for conn in &mut node_connections {
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(conn)
            .await
            .unwrap();
    }
    write_then_read(&pair.ca, &pair.cb, &t, 2, "B stale after losing the bus").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while shared(&pair.b).stats.subscriptions.load(Ordering::Relaxed) == subscribed {
        assert!(Instant::now() < deadline, "B never resubscribed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    write_then_read(&pair.ca, &pair.cb, &t, 3, "B stale after the bus came back").await;
    pair.direct
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

/// Redis behind Sentinel: pgstash asks the sentinels for the master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pgstash_behind_redis_sentinel() {
    let master = OwnRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\nsentinel monitor pgstashmaster 127.0.0.1 {} 1\n",
            master.port
        ),
    )
    .unwrap();
    let child = Command::new("redis-server")
        .arg(&conf)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server --sentinel");
    let sentinel = OwnRedis {
        child,
        port,
        _dir: dir,
    };
    let client = redis::Client::open(sentinel.url()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
            let found: redis::RedisResult<Option<(String, u16)>> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg("pgstashmaster")
                .query_async(&mut conn)
                .await;
            if matches!(found, Ok(Some(_))) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "sentinel never reported the master"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pair =
        assert_two_instances_share(&sentinel.url(), "sentinel_master = \"pgstashmaster\"").await;
    assert!(shared(&pair.a).stats.bumps_sent.load(Ordering::Relaxed) >= 5);
}

/// The concurrent checker across two pgstash instances: writes through A,
/// reads through B and A. A read may miss a write only if that write
/// completed less than the bus delay bound before the read began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checker_across_two_pgstash() {
    use std::sync::{Arc, Mutex};
    const ROWS: i64 = 4;
    // Three heartbeats: past that a lagging subscriber stops trusting its
    // local tier.
    const BOUND: Duration = Duration::from_millis(300);
    let duration = Duration::from_secs(
        std::env::var("PGSTASH_CHECKER_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    );
    let prefix = unique("pgstash_test");
    let a = start_with_redis("redis://127.0.0.1:6379", &prefix, "[pool]\nsize = 4").await;
    let b = start_with_redis("redis://127.0.0.1:6379", &prefix, "[pool]\nsize = 4").await;
    let t = unique("chk2");
    let direct = support::direct("test").await;
    direct
        .batch_execute(&format!(
            "CREATE TABLE {t} (id bigint primary key, version bigint); INSERT INTO {t} SELECT g, 0 FROM generate_series(0, {}) g",
            ROWS - 1
        ))
        .await
        .unwrap();
    // Per row: (completed at, version) of every write.
    type Completions = Arc<Vec<Mutex<Vec<(Instant, i64)>>>>;
    let completed: Completions = Arc::new((0..ROWS).map(|_| Mutex::new(Vec::new())).collect());
    let deadline = Instant::now() + duration;
    let mut writers = Vec::new();
    for w in 0..2 {
        let client = a.connect("test").await;
        let (t, completed) = (t.clone(), completed.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0i64;
            while Instant::now() < deadline {
                let id = (n + w) % ROWS;
                let sql = format!(
                    "UPDATE {t} SET version = version + 1 WHERE id = {id} RETURNING version"
                );
                let version: i64 = scalar(&client, &sql).await.parse().unwrap();
                completed[id as usize]
                    .lock()
                    .unwrap()
                    .push((Instant::now(), version));
                n += 1;
            }
        }));
    }
    let mut readers = Vec::new();
    for r in 0..4 {
        let proxy = if r % 2 == 0 { &b } else { &a };
        let client = proxy.connect("test").await;
        let (t, completed) = (t.clone(), completed.clone());
        readers.push(tokio::spawn(async move {
            let (mut violations, mut within_bound, mut reads) = (0u64, 0u64, 0u64);
            let mut worst = Duration::ZERO;
            let mut n = 0i64;
            while Instant::now() < deadline {
                let id = (n + r) % ROWS;
                let began = Instant::now();
                let (floor, recent_floor) = {
                    let writes = completed[id as usize].lock().unwrap();
                    let before = |cutoff: Instant| {
                        writes
                            .iter()
                            .filter(|(at, _)| *at <= cutoff)
                            .map(|&(_, v)| v)
                            .max()
                            .unwrap_or(0)
                    };
                    (before(began - BOUND), before(began))
                };
                let seen: i64 =
                    scalar(&client, &format!("SELECT version FROM {t} WHERE id = {id}"))
                        .await
                        .parse()
                        .unwrap();
                reads += 1;
                if seen < floor {
                    violations += 1;
                    // How long ago the write this read missed had completed.
                    let writes = completed[id as usize].lock().unwrap();
                    if let Some((at, _)) = writes.iter().find(|(_, v)| *v == seen + 1) {
                        worst = worst.max(began.duration_since(*at));
                    }
                } else if seen < recent_floor {
                    within_bound += 1;
                }
                n += 1;
            }
            if violations > 0 {
                eprintln!("reader {r}: {violations} stale reads, oldest missed write completed {worst:?} before the read");
            }
            (violations, within_bound, reads)
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let (mut violations, mut within_bound, mut reads) = (0, 0, 0);
    for r in readers {
        let (v, w, n) = r.await.unwrap();
        violations += v;
        within_bound += w;
        reads += n;
    }
    eprintln!("two-instance checker: {reads} reads, {within_bound} stale within {BOUND:?} of a write, {violations} beyond it");
    assert_eq!(violations, 0);
    direct
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

/// Redis with a password (AUTH through the URL's user and password).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_auth() {
    let own = OwnRedis::start_with(&["--requirepass", "s3cret"]);
    let url = format!("redis://default:s3cret@127.0.0.1:{}", own.port);
    assert_two_instances_share(&url, "").await;
    // A wrong password is an unreachable Redis: queries still work.
    let wrong = TestProxy::start(&format!(
        "[redis]\nurl = \"redis://default:nope@127.0.0.1:{}\"\n",
        own.port
    ))
    .await;
    assert_eq!(
        scalar(&wrong.connect("test").await, "SELECT 1 + 1").await,
        "2"
    );
}

/// With `busy_poll` on, hits and invalidation across instances work as
/// without it; the time spent polling is counted, and none is spent while
/// no lookup is waiting for Redis. One worker thread, as the setting needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn busy_polling_changes_only_how_replies_are_awaited() {
    let pair = assert_two_instances_share("redis://127.0.0.1:6379", "busy_poll = \"5ms\"").await;
    let polled = || shared(&pair.b).busy_polled().expect("busy_poll is on");
    assert!(
        polled() > Duration::ZERO,
        "B's lookups in Redis were answered without polling"
    );
    // Once the last spin has been counted, nothing is in flight.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = polled();
        tokio::time::sleep(Duration::from_millis(50)).await;
        if polled() == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still polling 5 s after the last lookup"
        );
    }
    let idle = polled();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(polled(), idle, "polled with no lookup waiting for Redis");
}

/// TLS to Redis (`rediss://`), the server's certificate signed by a test CA
/// that the process trusts through SSL_CERT_FILE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success(), "openssl {args:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &path("ca.key"),
        "-out",
        &path("ca.crt"),
        "-days",
        "1",
        "-subj",
        "/CN=pgstash-test-ca",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &path("server.key"),
        "-out",
        &path("server.csr"),
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(path("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path("server.csr"),
        "-CA",
        &path("ca.crt"),
        "-CAkey",
        &path("ca.key"),
        "-CAcreateserial",
        "-out",
        &path("server.crt"),
        "-days",
        "1",
        "-extfile",
        &path("ext.cnf"),
    ]);
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args([
            "--tls-cert-file",
            &path("server.crt"),
            "--tls-key-file",
            &path("server.key"),
        ])
        .args([
            "--tls-ca-cert-file",
            &path("ca.crt"),
            "--tls-auth-clients",
            "no",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "TLS redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _server = OwnRedis {
        child,
        port,
        _dir: tempfile::tempdir().unwrap(),
    };
    // Only this test opens TLS connections, so trusting the test CA
    // process-wide affects no other test.
    std::env::set_var("SSL_CERT_FILE", path("ca.crt"));
    assert_two_instances_share(&format!("rediss://127.0.0.1:{port}"), "").await;
}

/// Lookups made at the same moment go to Redis as one MGET, each gets its
/// own value, and a lookup whose client left before its batch went out
/// does not strand the others.
#[tokio::test(flavor = "current_thread")]
async fn concurrent_lookups_share_one_round_trip() {
    use bytes::Bytes;
    use pgstash::cache::generations::Snapshot;
    use pgstash::cache::shared::StoredResult;
    use pgstash::config::RedisConfig;

    let tier = SharedTier::new(RedisConfig {
        url: "redis://127.0.0.1:6379".into(),
        prefix: format!("{}:", unique("pgstash_test")),
        timeout: Duration::from_millis(500),
        ..RedisConfig::default()
    });
    let snapshot = Snapshot {
        database: 1,
        epoch: 0,
        tables: vec![(42, 7)].into_boxed_slice(),
    };
    let result = |i: u128| StoredResult {
        payload: Bytes::from(format!("row {i}")),
        row_description: None,
    };
    for i in 0..20u128 {
        tier.put(i, &snapshot, &result(i), Duration::from_secs(60));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while tier.stats.stored.load(Ordering::Relaxed) < 20 {
        assert!(Instant::now() < deadline, "stores never reached redis");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let batches = tier.stats.lookup_batches.load(Ordering::Relaxed);
    let lookups = (0..21u128).map(|i| tier.get(i, &snapshot));
    let found = futures_util::future::join_all(lookups).await;
    for (i, found) in found.into_iter().enumerate() {
        let found = found.expect("lookup").map(|(stored, _)| stored);
        let expected = (i < 20).then(|| result(i as u128));
        assert_eq!(found, expected, "lookup {i}");
    }
    assert_eq!(
        tier.stats.lookup_batches.load(Ordering::Relaxed),
        batches + 1,
        "21 concurrent lookups should share one MGET"
    );

    // The first lookup leads its batch; dropped before sending it, it
    // leaves the batch to a task, and the second lookup is still answered.
    let mut leader = Box::pin(tier.get(0, &snapshot));
    assert!(futures_util::poll!(&mut leader).is_pending());
    let mut follower = Box::pin(tier.get(1, &snapshot));
    assert!(futures_util::poll!(&mut follower).is_pending());
    drop(leader);
    let answered = tokio::time::timeout(Duration::from_secs(2), follower)
        .await
        .expect("the follower was stranded")
        .expect("lookup");
    assert_eq!(answered.map(|(stored, _)| stored), Some(result(1)));
}

/// A failed step of the scan that tells an instance what is already in
/// Redis (here: its connection killed mid-scan) is retried from its
/// cursor: the scan still finishes, and lookups of entries nobody stored
/// skip Redis from then on rather than only once the longest TTL has
/// passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_presence_scan_survives_dropped_connections() {
    use bytes::Bytes;
    use pgstash::cache::generations::Snapshot;
    use pgstash::cache::shared::StoredResult;
    use pgstash::config::RedisConfig;

    let redis = OwnRedis::start_with(&["--enable-debug-command", "local"]);
    let mut admin = redis_connection(&redis.url()).await;
    // Others' keys, so that the scan takes a few hundred steps.
    let () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(300_000)
        .arg("others:")
        .query_async(&mut admin)
        .await
        .unwrap();
    let config = RedisConfig {
        url: redis.url(),
        prefix: "scanned:".into(),
        timeout: Duration::from_millis(500),
        ..RedisConfig::default()
    };
    let snapshot = Snapshot {
        database: 1,
        epoch: 0,
        tables: vec![(42, 7)].into_boxed_slice(),
    };
    let writer = SharedTier::new(config.clone());
    let stored = StoredResult {
        payload: Bytes::from_static(b"row"),
        row_description: None,
    };
    for key in 0..50u128 {
        writer.put(key, &snapshot, &stored, Duration::from_secs(600));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while writer.stats.stored.load(Ordering::Relaxed) < 50 {
        assert!(Instant::now() < deadline, "stores never reached redis");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let reader = SharedTier::new(config);
    reader.presence.set_warmup(Duration::from_secs(3600));
    let subscription = reader.presence.subscribed();
    let scanning = tokio::spawn({
        let reader = reader.clone();
        async move { reader.scan_presence(subscription).await }
    });
    let mut kills = 0;
    while kills < 3 && !scanning.is_finished() {
        let killed: i64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
            .query_async(&mut admin)
            .await
            .unwrap();
        kills += killed;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        kills > 0,
        "the scan finished before a connection could be killed"
    );
    let finished = tokio::time::timeout(Duration::from_secs(30), scanning)
        .await
        .expect("the scan never finished")
        .unwrap();
    assert!(finished, "the scan gave up after its connection was killed");
    reader.presence.scanned(subscription);
    for key in 0..50u128 {
        assert!(
            !reader
                .presence
                .surely_absent(SharedTier::entry_id(key, &snapshot)),
            "entry {key} is in redis but the scan missed it"
        );
    }
    assert!(reader
        .presence
        .surely_absent(SharedTier::entry_id(50, &snapshot)));
}

/// With `admit = "reuse"`, a result read once stays out of Redis. Read
/// again through the same instance (a local hit; with the local tier off,
/// a second fill) it is stored, with the age it had, and is then a Redis
/// hit through another instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admit_reuse_stores_only_results_read_again() {
    // Its own Redis: the test lists every key in it.
    let own = OwnRedis::start();
    let url = own.url();
    let url = url.as_str();
    let Pair {
        prefix,
        a,
        b,
        ca,
        cb,
        table: t,
        direct,
    } = Pair::start(url, "admit = \"reuse\"", "reuse", 5).await;
    let stat = |proxy: &TestProxy, counter: fn(&SharedTier) -> u64| counter(shared(proxy));
    let stored = |s: &SharedTier| s.stats.stored.load(Ordering::Relaxed);
    let deferred = |s: &SharedTier| s.stats.deferred.load(Ordering::Relaxed);
    let hits = |s: &SharedTier| s.stats.hits.load(Ordering::Relaxed);
    let local_fills = |proxy: &TestProxy| fills(proxy).0;

    let sql = format!("SELECT v FROM {t}");
    let filled = local_fills(&a);
    assert_eq!(scalar(&ca, &sql).await, "5");
    let deadline = Instant::now() + Duration::from_secs(5);
    while local_fills(&a) == filled {
        assert!(Instant::now() < deadline, "A never kept its fill");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(stat(&a, deferred), 1, "A's first fill should wait");
    assert_eq!(stat(&a, stored), 0, "A stored a result read once");
    assert_eq!(scalar(&cb, &sql).await, "5");
    assert_eq!(stat(&b, hits), 0, "B found a result read once in Redis");

    // Some age, which the stored copy must keep.
    let aged = Duration::from_millis(300);
    tokio::time::sleep(aged).await;
    assert_eq!(scalar(&ca, &sql).await, "5");
    wait_for_stat(&a, "the store of A's reused result", stored, 0).await;
    let mut redis = redis_connection(url).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:r:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let value: Vec<u8> = redis::cmd("GET")
        .arg(&keys[0])
        .query_async(&mut redis)
        .await
        .unwrap();
    let (_, age) =
        pgstash::cache::shared::StoredResult::decode_with_age(value.into()).expect("a valid value");
    assert!(age >= aged, "stored as {age:?} old, filled {aged:?} ago");

    // Another instance, without a local tier, hits it in Redis; its own
    // first fill of another query waits, and its second is stored.
    let c = start_with_redis(
        url,
        &prefix,
        "admit = \"reuse\"\n[cache]\ncapacity_bytes = 0",
    )
    .await;
    let cc = c.connect("test").await;
    assert_eq!(scalar(&cc, &sql).await, "5");
    assert_eq!(stat(&c, hits), 1, "C missed the reused result in Redis");
    let other = format!("SELECT v + 1 FROM {t}");
    assert_eq!(scalar(&cc, &other).await, "6");
    wait_for_stat(&c, "the deferral of C's first fill", deferred, 0).await;
    assert_eq!(stat(&c, stored), 0);
    assert_eq!(scalar(&cc, &other).await, "6");
    wait_for_stat(&c, "the store of C's second fill", stored, 0).await;
    assert_eq!(stat(&c, deferred), 1);
    direct
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

/// Redis stalled for a moment (here `CLIENT PAUSE`) opens the circuit, but
/// heartbeats go on: the first one answered in time closes the circuit
/// again, and the subscription, silent only for the stall, is not torn
/// down and rebuilt (which would stop local hits until a resync and a
/// fresh scan of Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moment_of_redis_stall_neither_restarts_the_bus_nor_keeps_the_circuit_open() {
    let redis = OwnRedis::start();
    let proxy = TestProxy::start(&format!(
        "[redis]\nurl = \"{}\"\nprefix = \"stall:\"\ntimeout = \"20ms\"\ncircuit_open_for = \"5s\"\n",
        redis.url()
    ))
    .await;
    wait_for_bus(&proxy).await;
    let tier = shared(&proxy);
    assert_eq!(tier.stats.subscriptions.load(Ordering::Relaxed), 1);

    let mut admin = redis_connection(&redis.url()).await;
    pause_redis(&mut admin, 300).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while !tier.circuit_open() {
        assert!(
            Instant::now() < deadline,
            "the stall never opened the circuit"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let opened = Instant::now();
    while tier.circuit_open() {
        assert!(
            opened.elapsed() < Duration::from_secs(2),
            "the circuit stayed open after Redis answered again"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Longer than the bus's silence limit (a second): a restart would show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        tier.stats.subscriptions.load(Ordering::Relaxed),
        1,
        "the bus was restarted"
    );
    assert!(proxy.proxy.cache.as_ref().unwrap().local_trusted());
}

/// A moment of Redis slowness opens the circuit; results filled while it
/// is open still reach Redis once it answers (stores are written behind,
/// nobody waits for them), instead of being thrown away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_queued_while_the_circuit_is_open_still_reach_redis() {
    let redis = OwnRedis::start();
    // Slow heartbeats keep the bus fresh through the stall, so fills go
    // on, and leave the circuit open for a while after it; with no
    // presence set every lookup asks Redis, and times out in the stall.
    let proxy = TestProxy::start(&format!(
        "[redis]\nurl = \"{}\"\nprefix = \"open:\"\ntimeout = \"40ms\"\ncircuit_open_for = \"5s\"\n\
         heartbeat = \"2s\"\npresence_capacity = 0\n",
        redis.url()
    ))
    .await;
    wait_for_bus(&proxy).await;
    let tier = shared(&proxy);
    let client = proxy.connect("test").await;
    let t = unique("open");
    client
        .batch_execute(&format!(
            "CREATE TABLE {t} (v int); INSERT INTO {t} VALUES (7)"
        ))
        .await
        .unwrap();
    // The table's generations are mirrored from here on.
    read_and_wait_for_fill(&proxy, &client, &format!("SELECT v FROM {t}")).await;

    let mut admin = redis_connection(&redis.url()).await;
    for attempt in 0.. {
        assert!(attempt < 3, "heartbeats kept closing the circuit first");
        let stored = tier.stats.stored.load(Ordering::Relaxed);
        pause_redis(&mut admin, 300).await;
        let mut fills = 0;
        while !tier.circuit_open() {
            fills += 1;
            assert!(fills <= 10, "timed-out lookups never opened the circuit");
            let sql = format!("SELECT v FROM {t} WHERE v > -{attempt}{fills}");
            assert_eq!(scalar(&client, &sql).await, "7");
        }
        // Filled while the circuit is open and Redis still paused.
        let sql = format!("SELECT v FROM {t} WHERE v > {attempt}");
        assert_eq!(scalar(&client, &sql).await, "7");
        if !tier.circuit_open() {
            // A heartbeat closed the circuit before the fill: try again.
            continue;
        }
        // Stores sent into the stall time out and are lost; the ones sent
        // once it is over, while the circuit is still open, land (however
        // soon the first of them closes it again).
        wait_for_stat(
            &proxy,
            "a store sent while the circuit was open",
            |s| s.stats.stored.load(Ordering::Relaxed),
            stored,
        )
        .await;
        break;
    }
    client
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

/// A write's bump may take `bump_timeout` (over three tries), far longer
/// than a lookup's `timeout`: a Redis stall longer than the one and
/// shorter than the other still tells every instance of the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_published_during_a_redis_stall_reaches_the_other_instance() {
    let redis = OwnRedis::start();
    let config = format!(
        "[redis]\nurl = \"{}\"\nprefix = \"bumpstall:\"\ntimeout = \"20ms\"\nbump_timeout = \"3s\"\n",
        redis.url()
    );
    let a = TestProxy::start(&config).await;
    let b = TestProxy::start(&config).await;
    wait_for_bus(&a).await;
    wait_for_bus(&b).await;
    let (ca, cb) = (a.connect("test").await, b.connect("test").await);
    let t = unique("bumpstall");
    ca.batch_execute(&format!(
        "CREATE TABLE {t} (v int); INSERT INTO {t} VALUES (0)"
    ))
    .await
    .unwrap();
    let sql = format!("SELECT v FROM {t}");
    assert_eq!(read_and_wait_for_fill(&b, &cb, &sql).await, "0");

    let mut admin = redis_connection(&redis.url()).await;
    pause_redis(&mut admin, 200).await;
    let sent = shared(&a).stats.bumps_sent.load(Ordering::Relaxed);
    ca.batch_execute(&format!("UPDATE {t} SET v = 1"))
        .await
        .unwrap();
    assert_eq!(
        shared(&a).stats.bumps_sent.load(Ordering::Relaxed),
        sent + 1,
        "the write's bump did not outlast the stall"
    );
    let written = Instant::now();
    while scalar(&cb, &sql).await != "1" {
        assert!(
            written.elapsed() < Duration::from_secs(2),
            "B still stale 2 s after the write"
        );
    }
    ca.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}
