//! Test harness: starts pgstash in-process on port 0 in front of the real
//! PostgreSQL on 127.0.0.1:5432 (or `PGSTASH_TEST_PG`), and helpers to
//! talk to both.
#![allow(dead_code)]

pub mod cluster;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use pgstash::config::Config;
use pgstash::listener::{self, Proxy};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

pub fn pg_host() -> String {
    std::env::var("PGSTASH_TEST_PGHOST").unwrap_or_else(|_| "127.0.0.1".into())
}

pub fn pg_port() -> u16 {
    std::env::var("PGSTASH_TEST_PGPORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5432)
}

pub struct TestProxy {
    pub addr: SocketAddr,
    pub proxy: std::sync::Arc<Proxy>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl TestProxy {
    /// Starts pgstash with `extra` TOML appended to a pass-through config.
    pub async fn start(extra: &str) -> TestProxy {
        let text = format!("listen = \"127.0.0.1:0\"\n{extra}\n");
        let mut config = Config::from_toml_and_env(&text, &[]).expect("test config");
        if config.upstream.host.is_empty() {
            config.upstream.host = pg_host();
            config.upstream.port = pg_port();
        }
        Self::start_with(config).await
    }

    pub async fn start_with(config: Config) -> TestProxy {
        if let Ok(filter) = std::env::var("PGSTASH_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let listener = listener::bind(&config).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let proxy = Proxy::new(config).expect("proxy configuration loads");
        let shared = proxy.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            listener::run(listener, proxy, async {
                let _ = rx.await;
            })
            .await;
        });
        TestProxy {
            addr,
            proxy: shared,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn conn_str(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={database} application_name=pgstash-test",
            self.addr.port()
        )
    }

    pub async fn connect(&self, database: &str) -> Client {
        connect(&self.conn_str(database)).await
    }

    /// Stops accepting and drains, as on SIGTERM.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn connect(conn_str: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conn_str, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {conn_str}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A connection straight to Postgres, bypassing pgstash.
pub async fn direct(database: &str) -> Client {
    connect(&format!(
        "host={} port={} user=postgres dbname={database}",
        pg_host(),
        pg_port()
    ))
    .await
}

/// A name no other test (or test run) uses.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates a fresh database and returns its name.
pub async fn fresh_database(prefix: &str) -> String {
    let name = unique(prefix);
    direct("postgres")
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    name
}

pub async fn drop_database(name: &str) {
    let _ = direct("postgres")
        .await
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
}

/// A StartupMessage (protocol 3.0) with these parameters, for tests that
/// speak the protocol byte by byte.
pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec();
    for (name, value) in params {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}
