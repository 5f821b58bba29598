//! The admin console (virtual database `pgstash`) and the HTTP endpoint,
//! driven by tokio-postgres and raw HTTP against a running pgstash.

mod support;

use std::time::{Duration, Instant};

use pgstash::config::Config;
use support::{unique, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{Client, SimpleQueryMessage};

async fn admin(proxy: &TestProxy) -> Client {
    support::connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=pgstash",
        proxy.addr.port()
    ))
    .await
}

/// Rows of an admin command as name → value maps.
async fn show(client: &Client, command: &str) -> Vec<std::collections::HashMap<String, String>> {
    client
        .simple_query(command)
        .await
        .unwrap_or_else(|e| panic!("{command}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), r.get(i).unwrap_or("").to_owned()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn hits(proxy: &TestProxy) -> u64 {
    proxy
        .proxy
        .cache
        .as_ref()
        .unwrap()
        .stats
        .hits
        .load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_commands_reflect_traffic() {
    let proxy = TestProxy::start("").await;
    let console = admin(&proxy).await;
    let client = proxy.connect("test").await;
    client.simple_query("SELECT 1").await.unwrap();
    let count = |rows: &[std::collections::HashMap<String, String>]| -> u64 {
        rows.iter()
            .filter(|r| r["database"] == "test")
            .map(|r| r["total_query_count"].parse::<u64>().unwrap())
            .sum()
    };
    let before = count(&show(&console, "SHOW STATS").await);
    for _ in 0..5 {
        client.simple_query("SELECT random()").await.unwrap();
    }
    assert_eq!(count(&show(&console, "SHOW STATS").await), before + 5);
    let pools = show(&console, "SHOW POOLS").await;
    assert!(pools
        .iter()
        .any(|p| p["database"] == "test" && p["cl_active"] == "1"));
    let clients = show(&console, "SHOW CLIENTS").await;
    assert!(clients
        .iter()
        .any(|c| c["database"] == "test" && c["application_name"] == "pgstash-test"));
    assert!(!show(&console, "SHOW SERVERS").await.is_empty());
    assert!(show(&console, "SHOW CONFIG")
        .await
        .iter()
        .any(|r| r["key"] == "pool.size"));
    let cache = show(&console, "SHOW CACHE").await;
    assert!(cache.iter().any(|r| r["name"] == "hit_ratio"));
    let queries = show(&console, "SHOW CACHED QUERIES").await;
    assert!(queries
        .iter()
        .all(|q| !q["query"].contains("random()") || q["bypass_reason"] == "volatile_function"));
    let err = console.simple_query("SHOW NONSENSE").await.unwrap_err();
    assert!(err.as_db_error().unwrap().message().contains("known:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_transactions_until_resume() {
    let proxy = TestProxy::start("").await;
    let console = admin(&proxy).await;
    let client = proxy.connect("test").await;
    client.simple_query("SELECT random()").await.unwrap();
    console.simple_query("PAUSE test").await.unwrap();
    let started = Instant::now();
    let held = tokio::spawn(async move {
        client.simple_query("SELECT random()").await.unwrap();
        started.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a query ran while paused");
    console.simple_query("RESUME test").await.unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .unwrap()
        .unwrap();
    assert!(waited >= Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_invalidate_makes_the_next_read_a_miss() {
    let proxy = TestProxy::start("").await;
    let console = admin(&proxy).await;
    let client = proxy.connect("test").await;
    let t = unique("adm");
    support::direct("test")
        .await
        .batch_execute(&format!(
            "CREATE TABLE {t} (v int); INSERT INTO {t} VALUES (1)"
        ))
        .await
        .unwrap();
    let sql = format!("SELECT v FROM {t}");
    client.simple_query(&sql).await.unwrap();
    let before = hits(&proxy);
    client.simple_query(&sql).await.unwrap();
    assert_eq!(hits(&proxy), before + 1);
    console
        .simple_query(&format!("CACHE INVALIDATE test.{t}"))
        .await
        .unwrap();
    client.simple_query(&sql).await.unwrap();
    assert_eq!(
        hits(&proxy),
        before + 1,
        "read after CACHE INVALIDATE was a hit"
    );
    client.simple_query(&sql).await.unwrap();
    assert_eq!(hits(&proxy), before + 2);
    console.simple_query("CACHE FLUSH test").await.unwrap();
    client.simple_query(&sql).await.unwrap();
    assert_eq!(hits(&proxy), before + 2, "read after CACHE FLUSH was a hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_pool_size_and_cache_rules_without_dropping_clients() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let t = unique("rl");
    let base = format!(
        "listen = \"127.0.0.1:0\"\n[upstream]\nhost = \"{}\"\nport = {}\n[pool]\nsize = 5\n",
        support::pg_host(),
        support::pg_port()
    );
    std::fs::write(&path, &base).unwrap();
    let config = Config::load(Some(&path)).unwrap();
    let proxy = TestProxy::start_with(config).await;
    let _ = proxy.proxy.config_path.set(path.clone());
    let console = admin(&proxy).await;
    let client = proxy.connect("test").await;
    support::direct("test")
        .await
        .batch_execute(&format!(
            "CREATE TABLE {t} (v int); INSERT INTO {t} VALUES (1)"
        ))
        .await
        .unwrap();
    let sql = format!("SELECT v FROM {t}");
    client.simple_query(&sql).await.unwrap();
    let before = hits(&proxy);
    client.simple_query(&sql).await.unwrap();
    assert_eq!(hits(&proxy), before + 1);

    std::fs::write(
        &path,
        format!("{base}size_is_ignored = 0\n")
            .replace("size_is_ignored = 0\n", "")
            .replace("size = 5", "size = 3")
            + &format!("[[cache.rules]]\ntable = \"{t}\"\ncache = false\n"),
    )
    .unwrap();
    console.simple_query("RELOAD").await.unwrap();
    let pools = show(&console, "SHOW POOLS").await;
    assert!(
        pools
            .iter()
            .any(|p| p["database"] == "test" && p["pool_size"] == "3"),
        "{pools:?}"
    );
    // The same client, still connected, now bypasses the cache for t.
    client.simple_query(&sql).await.unwrap();
    client.simple_query(&sql).await.unwrap();
    assert_eq!(hits(&proxy), before + 1, "the reloaded rule did not apply");
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoint_metrics_health_and_drain() {
    let proxy = TestProxy::start(
        "metrics_listen = \"127.0.0.1:0\"\ndrain_grace = \"1s\"\nshutdown_timeout = \"5s\"",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let addr = loop {
        if let Some(addr) = proxy.proxy.metrics_addr.get() {
            break *addr;
        }
        assert!(Instant::now() < deadline, "HTTP endpoint never bound");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let client = proxy.connect("test").await;
    client.simple_query("SELECT 1").await.unwrap();
    let (status, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "pgstash_cache_lookups_total",
        "pgstash_clients",
        "pgstash_server_connections",
        "pgstash_upstream_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    // Every sample line is `name{labels} value`.
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line: {line}");
    }
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    assert_eq!(http_get(addr, "/readyz").await.0, 200);
    let port = proxy.addr.port();
    let stop = tokio::spawn(proxy.stop());
    // Not ready at once, while the listener still accepts for the grace period.
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        if http_get(addr, "/readyz").await.0 == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed ready after shutdown began"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok(),
        "listener closed before the grace period"
    );
    stop.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_an_unreachable_upstream_while_healthz_stays_up() {
    let proxy = TestProxy::start(
        "metrics_listen = \"127.0.0.1:0\"\n[upstream]\nhost = \"127.0.0.1\"\nport = 1",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let addr = loop {
        if let Some(addr) = proxy.proxy.metrics_addr.get() {
            break *addr;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("upstream"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_speaks_to_the_admin_console() {
    let proxy = TestProxy::start("").await;
    let client = proxy.connect("test").await;
    client.simple_query("SELECT 1").await.unwrap();
    let output = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.addr.port().to_string(),
            "-U",
            "postgres",
            "-d",
            "pgstash",
            "-X",
            "-A",
            "-c",
            "SHOW POOLS",
            "-c",
            "SHOW CACHE",
        ])
        .env_remove("PGPASSWORD")
        .output()
        .expect("psql (apt-get install postgresql-client)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("cl_active") && text.contains("test|postgres"),
        "{text}"
    );
    assert!(text.contains("hit_ratio"), "{text}");
}
