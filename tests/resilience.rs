//! pgstash under hostile or failing conditions: malformed client bytes,
//! client limits, pool exhaustion, an upstream restart and SIGTERM during a
//! transaction. Each failure must stay with the client or period that caused
//! it while other clients keep working.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::cluster::Cluster;
use support::{unique, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

/// Long enough for a busy two-core machine, short enough that a hang is
/// reported as one instead of stalling the run.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A query only Postgres can answer: its volatile function keeps pgstash's
/// result cache out of the way of tests about servers and pools.
const UPSTREAM_QUERY: &str = "SELECT random()";

// --- Raw protocol -----------------------------------------------------------

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn query_frame(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    frame(b'Q', &body)
}

#[derive(Debug)]
enum Received {
    Message(u8, Vec<u8>),
    Closed,
}

async fn read_message(stream: &mut TcpStream) -> Received {
    let read = async {
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).await?;
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        assert!(len >= 4, "pgstash sent a message with length {len}");
        let mut body = vec![0u8; len as usize - 4];
        stream.read_exact(&mut body).await?;
        Ok::<_, std::io::Error>((header[0], body))
    };
    match tokio::time::timeout(IO_TIMEOUT, read).await {
        Err(_) => panic!("pgstash neither answered nor closed within {IO_TIMEOUT:?}"),
        Ok(Ok((tag, body))) => Received::Message(tag, body),
        Ok(Err(e)) => match e.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe => Received::Closed,
            _ => panic!("reading from pgstash: {e}"),
        },
    }
}

/// ErrorResponse fields by their type byte ('C' = SQLSTATE, 'M' = message).
fn error_fields(body: &[u8]) -> HashMap<u8, String> {
    body.split(|&b| b == 0)
        .filter(|field| !field.is_empty())
        .map(|field| (field[0], String::from_utf8_lossy(&field[1..]).into_owned()))
        .collect()
}

/// Logs in by hand and reads up to the first ReadyForQuery.
async fn raw_login(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect to pgstash");
    stream
        .write_all(&support::startup_packet(&[
            ("user", "postgres"),
            ("database", "test"),
        ]))
        .await
        .unwrap();
    loop {
        match read_message(&mut stream).await {
            Received::Message(b'Z', _) => return stream,
            Received::Message(b'E', body) => panic!("login refused: {:?}", error_fields(&body)),
            Received::Message(..) => {}
            Received::Closed => panic!("pgstash closed the connection during login"),
        }
    }
}

/// Runs a simple query by hand; returns the transaction status it ends in.
async fn raw_query(stream: &mut TcpStream, sql: &str) -> u8 {
    stream.write_all(&query_frame(sql)).await.unwrap();
    loop {
        match read_message(stream).await {
            Received::Message(b'Z', body) => return body[0],
            Received::Message(b'E', body) => panic!("{sql}: {:?}", error_fields(&body)),
            Received::Message(..) => {}
            Received::Closed => panic!("{sql}: pgstash closed the connection"),
        }
    }
}

/// The client must get an ErrorResponse with `code` and then see the
/// connection closed.
async fn expect_error_then_close(stream: &mut TcpStream, code: &str, what: &str) {
    let fields = loop {
        match read_message(stream).await {
            // Notices may precede the error; nothing else may.
            Received::Message(b'N', _) => {}
            Received::Message(b'E', body) => break error_fields(&body),
            other => panic!("{what}: expected an ErrorResponse, got {other:?}"),
        }
    };
    assert_eq!(
        fields.get(&b'C').map(String::as_str),
        Some(code),
        "{what}: {fields:?}"
    );
    expect_closed(stream, what).await;
}

async fn expect_closed(stream: &mut TcpStream, what: &str) {
    match read_message(stream).await {
        Received::Closed => {}
        other => panic!("{what}: expected the connection closed, got {other:?}"),
    }
}

// --- A client that must not notice other clients' trouble -----------------

/// Loops on queries through the proxy until stopped; any failure fails the
/// test when the bystander is finished.
struct Bystander {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    handle: JoinHandle<()>,
}

impl Bystander {
    async fn start(proxy: &TestProxy) -> Bystander {
        let client = proxy.connect("test").await;
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let handle = tokio::spawn({
            let stop = stop.clone();
            let done = done.clone();
            async move {
                let statement = client
                    .prepare("SELECT $1::int + 1 + (random() * 0)::int")
                    .await
                    .unwrap();
                let mut i = 0i32;
                while !stop.load(Ordering::Relaxed) {
                    let row = tokio::time::timeout(IO_TIMEOUT, client.query_one(&statement, &[&i]))
                        .await
                        .expect("bystander query hung")
                        .expect("bystander query failed");
                    assert_eq!(row.get::<_, i32>(0), i + 1);
                    tokio::time::timeout(IO_TIMEOUT, client.simple_query(UPSTREAM_QUERY))
                        .await
                        .expect("bystander simple query hung")
                        .expect("bystander simple query failed");
                    i += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let bystander = Bystander { stop, done, handle };
        bystander.wait_for_progress().await;
        bystander
    }

    /// Waits until the bystander completes another round of queries.
    async fn wait_for_progress(&self) {
        let before = self.done.load(Ordering::Relaxed);
        let deadline = Instant::now() + IO_TIMEOUT;
        while self.done.load(Ordering::Relaxed) <= before {
            assert!(!self.handle.is_finished(), "bystander stopped early");
            assert!(Instant::now() < deadline, "bystander made no progress");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn finish(self) {
        self.wait_for_progress().await;
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.expect("bystander failed");
    }
}

// --- Malformed input ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_a_startup_message_is_refused() {
    let proxy = TestProxy::start("startup_timeout = \"1s\"\n").await;
    let bystander = Bystander::start(&proxy).await;

    let mut http = TcpStream::connect(proxy.addr).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    expect_error_then_close(&mut http, "08P01", "HTTP request").await;
    bystander.wait_for_progress().await;

    // A length far beyond any startup packet must be refused before
    // pgstash waits for (or buffers) that many bytes.
    let mut huge = TcpStream::connect(proxy.addr).await.unwrap();
    huge.write_all(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0])
        .await
        .unwrap();
    expect_error_then_close(&mut huge, "08P01", "huge startup length").await;

    let mut negative = TcpStream::connect(proxy.addr).await.unwrap();
    negative
        .write_all(&[0xff, 0xff, 0xff, 0xf0, 0, 3, 0, 0])
        .await
        .unwrap();
    expect_error_then_close(&mut negative, "08P01", "negative startup length").await;

    let mut short = TcpStream::connect(proxy.addr).await.unwrap();
    short.write_all(&[0, 0, 0, 4, 0, 3, 0, 0]).await.unwrap();
    expect_error_then_close(&mut short, "08P01", "startup length below 8").await;

    // Parameters not NUL-terminated.
    let mut malformed = TcpStream::connect(proxy.addr).await.unwrap();
    let mut packet = support::startup_packet(&[("user", "postgres")]);
    *packet.last_mut().unwrap() = b'x';
    malformed.write_all(&packet).await.unwrap();
    expect_error_then_close(&mut malformed, "08P01", "unterminated startup parameters").await;

    // A plausible length, then silence: the startup deadline ends it.
    let mut lying = TcpStream::connect(proxy.addr).await.unwrap();
    let mut packet = support::startup_packet(&[("user", "postgres"), ("database", "test")]);
    packet[..4].copy_from_slice(&200i32.to_be_bytes());
    lying.write_all(&packet).await.unwrap();
    let started = Instant::now();
    expect_error_then_close(
        &mut lying,
        "08P01",
        "startup packet shorter than its length",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "startup_timeout of 1s took {:?}",
        started.elapsed()
    );
    bystander.wait_for_progress().await;

    // Connecting and saying nothing at all is cut off the same way.
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    expect_error_then_close(&mut silent, "08P01", "silent client").await;

    bystander.finish().await;
    let after = proxy.connect("test").await;
    after.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_after_startup_close_only_that_client() {
    let proxy = TestProxy::start("max_message_size = 4096\n").await;
    let bystander = Bystander::start(&proxy).await;

    let mut unknown = raw_login(proxy.addr).await;
    unknown.write_all(&frame(b'!', b"")).await.unwrap();
    expect_error_then_close(&mut unknown, "08P01", "unknown message type").await;
    bystander.wait_for_progress().await;

    let mut short = raw_login(proxy.addr).await;
    short.write_all(&[b'Q', 0, 0, 0, 2]).await.unwrap();
    expect_error_then_close(&mut short, "08P01", "frame length below 4").await;

    let mut negative = raw_login(proxy.addr).await;
    negative.write_all(&[b'Q', 0x80, 0, 0, 0]).await.unwrap();
    expect_error_then_close(&mut negative, "08P01", "negative frame length").await;

    // Only the header: the limit must apply before the body is buffered.
    let mut large = raw_login(proxy.addr).await;
    large.write_all(&[b'Q', 0, 0, 0x27, 0x10]).await.unwrap();
    expect_error_then_close(&mut large, "08P01", "message over max_message_size").await;
    bystander.wait_for_progress().await;

    // Within the limit the same kind of message is fine.
    let mut fits = raw_login(proxy.addr).await;
    let padded = format!("SELECT '{}'", "x".repeat(3000));
    assert_eq!(raw_query(&mut fits, &padded).await, b'I');

    // Also inside a transaction, where pgstash holds a server for the
    // client and must give it back rolled back.
    let table = unique("malformed");
    let setup = proxy.connect("test").await;
    setup
        .batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .unwrap();
    let mut in_tx = raw_login(proxy.addr).await;
    assert_eq!(raw_query(&mut in_tx, "BEGIN").await, b'T');
    assert_eq!(
        raw_query(&mut in_tx, &format!("INSERT INTO {table} VALUES (1)")).await,
        b'T'
    );
    in_tx.write_all(&frame(0xff, b"")).await.unwrap();
    expect_error_then_close(&mut in_tx, "08P01", "unknown message type in a transaction").await;

    // A Parse whose fields run off the end of the message.
    let mut parse = raw_login(proxy.addr).await;
    parse
        .write_all(&frame(b'P', b"stmt\0SELECT 1"))
        .await
        .unwrap();
    expect_error_then_close(&mut parse, "08P01", "malformed Parse").await;

    bystander.finish().await;
    let rows: i64 = setup
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows, 0,
        "the aborted client's transaction was not rolled back"
    );
    setup
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_frames_then_close_give_the_server_back() {
    // Two server connections and a short wait: a server leaked by a
    // vanished client shows up as a wait timeout below instead of a hang.
    let proxy = TestProxy::start("[pool]\nsize = 2\nquery_wait_timeout = \"3s\"\n").await;
    let table = unique("truncated");
    let setup = proxy.connect("test").await;
    setup
        .batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .unwrap();
    let bystander = Bystander::start(&proxy).await;

    // Between transactions.
    let mut idle = raw_login(proxy.addr).await;
    idle.write_all(&[b'Q', 0, 0, 0, 100]).await.unwrap();
    idle.write_all(b"SELECT").await.unwrap();
    idle.shutdown().await.unwrap();
    expect_closed(&mut idle, "truncated frame between transactions").await;

    // Inside a transaction.
    let mut in_tx = raw_login(proxy.addr).await;
    assert_eq!(raw_query(&mut in_tx, "BEGIN").await, b'T');
    assert_eq!(
        raw_query(&mut in_tx, &format!("INSERT INTO {table} VALUES (1)")).await,
        b'T'
    );
    in_tx.write_all(&[b'Q', 0, 0, 0, 100]).await.unwrap();
    in_tx.write_all(b"INSERT INTO").await.unwrap();
    in_tx.shutdown().await.unwrap();
    expect_closed(&mut in_tx, "truncated frame in a transaction").await;

    // With a query still running on the server.
    let mut busy = raw_login(proxy.addr).await;
    assert_eq!(raw_query(&mut busy, "BEGIN").await, b'T');
    busy.write_all(&query_frame(&format!(
        "INSERT INTO {table} SELECT 2 FROM pg_sleep(0.3)"
    )))
    .await
    .unwrap();
    busy.write_all(&[b'Q', 0, 0, 0, 100]).await.unwrap();
    drop(busy);
    bystander.wait_for_progress().await;
    bystander.finish().await;

    // Both server connections must be free again: hold both at once.
    let a = proxy.connect("test").await;
    let b = proxy.connect("test").await;
    a.batch_execute("BEGIN").await.unwrap();
    a.query_one(UPSTREAM_QUERY, &[]).await.unwrap();
    b.batch_execute("BEGIN").await.unwrap();
    b.query_one(UPSTREAM_QUERY, &[]).await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    b.batch_execute("COMMIT").await.unwrap();

    let rows: i64 = setup
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "a vanished client's transaction was committed");
    setup
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

// --- Limits -----------------------------------------------------------------

async fn try_connect(conn_str: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) =
        tokio::time::timeout(IO_TIMEOUT, tokio_postgres::connect(conn_str, NoTls))
            .await
            .unwrap_or_else(|_| panic!("connecting to {conn_str} hung"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn sqlstate(error: &tokio_postgres::Error) -> Option<&str> {
    error.code().map(|c| c.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_max_client_conn_are_refused() {
    let proxy = TestProxy::start("max_client_conn = 3\n").await;
    let conn_str = proxy.conn_str("test");
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(proxy.connect("test").await);
    }
    let error = match try_connect(&conn_str).await {
        Ok(_) => panic!("a 4th client was accepted with max_client_conn = 3"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&error), Some("53300"), "{error}");
    for client in &clients {
        client.simple_query("SELECT 1").await.unwrap();
    }

    // A freed slot is usable again once the old session has ended.
    drop(clients.pop());
    let deadline = Instant::now() + IO_TIMEOUT;
    let replacement = loop {
        match try_connect(&conn_str).await {
            Ok(client) => break client,
            Err(e) if sqlstate(&e) == Some("53300") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("slot never freed: {e}"),
        }
    };
    replacement.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_busy_pool_is_bounded() {
    let proxy =
        TestProxy::start("[pool]\nsize = 1\nmin_idle = 0\nquery_wait_timeout = \"500ms\"\n").await;
    let holder = proxy.connect("test").await;
    let waiter = proxy.connect("test").await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder.query_one(UPSTREAM_QUERY, &[]).await.unwrap();

    for simple in [false, true] {
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(5), async {
            if simple {
                waiter.simple_query(UPSTREAM_QUERY).await.map(drop)
            } else {
                waiter.query_one(UPSTREAM_QUERY, &[]).await.map(drop)
            }
        })
        .await
        .expect("a query waiting for the only server connection hung");
        let error = result.expect_err("query ran although the only server was busy");
        let waited = started.elapsed();
        assert!(
            error.code().is_some(),
            "expected an ErrorResponse, got {error}"
        );
        assert!(
            waited >= Duration::from_millis(400),
            "gave up after {waited:?}, before query_wait_timeout"
        );
        assert!(!waiter.is_closed(), "the waiting client was disconnected");
    }

    // A new client cannot even log in while the pool is exhausted, but it
    // too must hear so in bounded time.
    let started = Instant::now();
    let refused = try_connect(&proxy.conn_str("test")).await;
    assert!(refused.is_err(), "login succeeded with no server free");
    assert!(started.elapsed() < Duration::from_secs(5));

    holder.batch_execute("COMMIT").await.unwrap();
    waiter.query_one(UPSTREAM_QUERY, &[]).await.unwrap();
}

// --- Upstream restart ---------------------------------------------------------

/// One query's outcome, as a looping client saw it.
#[derive(Debug, Clone)]
struct Outcome {
    at: Instant,
    /// `None`: success; otherwise the SQLSTATE, or the error text when
    /// there was none.
    error: Option<String>,
}

fn describe(error: &tokio_postgres::Error) -> String {
    sqlstate(error).map_or_else(|| error.to_string(), str::to_owned)
}

/// Runs short queries until stopped, reconnecting when its connection is
/// gone; every outcome is timestamped, and successes are counted as they
/// happen so the test can follow along.
async fn loop_queries(
    conn_str: String,
    extended: bool,
    stop: Arc<AtomicBool>,
    successes: Arc<AtomicU64>,
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let mut client: Option<(Client, Option<tokio_postgres::Statement>)> = None;
    let mut i = 0i32;
    while !stop.load(Ordering::Relaxed) {
        if client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            match try_connect(&conn_str).await {
                Ok(c) => client = Some((c, None)),
                Err(e) => {
                    outcomes.push(Outcome {
                        at: Instant::now(),
                        error: Some(format!("connect: {}", describe(&e))),
                    });
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let (c, statement) = client.as_mut().expect("connected above");
        let result = tokio::time::timeout(IO_TIMEOUT, async {
            if !extended {
                return c.simple_query(UPSTREAM_QUERY).await.map(drop);
            }
            // Prepared once per connection and reused across restarts: the
            // statement must follow the client onto new server connections.
            if statement.is_none() {
                *statement = Some(c.prepare("SELECT $1::int + (random() * 0)::int").await?);
            }
            let row = c.query_one(statement.as_ref().unwrap(), &[&i]).await?;
            assert_eq!(row.get::<_, i32>(0), i);
            Ok(())
        })
        .await
        .unwrap_or_else(|_| panic!("a query hung for {IO_TIMEOUT:?}"));
        if result.is_ok() {
            successes.fetch_add(1, Ordering::Relaxed);
        }
        outcomes.push(Outcome {
            at: Instant::now(),
            error: result.err().map(|e| describe(&e)),
        });
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    outcomes
}

/// Waits until every loop has `more` successes beyond its count now.
async fn wait_for_successes(successes: &[Arc<AtomicU64>], more: u64, when: &str) {
    let targets: Vec<u64> = successes
        .iter()
        .map(|s| s.load(Ordering::Relaxed) + more)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while successes
        .iter()
        .zip(&targets)
        .any(|(s, &target)| s.load(Ordering::Relaxed) < target)
    {
        assert!(
            Instant::now() < deadline,
            "query loops stalled {when}: {:?} of {targets:?}",
            successes
                .iter()
                .map(|s| s.load(Ordering::Relaxed))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgstash_recovers_when_postgres_restarts() {
    let mut cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let proxy = TestProxy::start(&format!(
        "[upstream]\nhost = \"127.0.0.1\"\nport = {}\nconnect_timeout = \"2s\"\n\
         [pool]\nsize = 4\nquery_wait_timeout = \"5s\"\ncircuit_open_for = \"500ms\"\n",
        cluster.port()
    ))
    .await;
    let conn_str = proxy.conn_str("postgres");
    let probe = proxy.connect("postgres").await;
    probe.simple_query(UPSTREAM_QUERY).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let successes: Vec<Arc<AtomicU64>> = (0..6).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let loops: Vec<_> = successes
        .iter()
        .enumerate()
        .map(|(n, count)| {
            tokio::spawn(loop_queries(
                conn_str.clone(),
                n % 2 == 0,
                stop.clone(),
                count.clone(),
            ))
        })
        .collect();
    // Every loop gets going against a healthy server first.
    wait_for_successes(&successes, 5, "before the restart").await;

    let stopping = Instant::now();
    tokio::task::block_in_place(|| cluster.stop());

    // With the server down, a query must fail, and once the circuit is open
    // it must fail fast; a new login must fail too rather than hang.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    loop {
        let started = Instant::now();
        let result =
            tokio::time::timeout(Duration::from_secs(8), probe.simple_query(UPSTREAM_QUERY))
                .await
                .expect("a query with postgres down hung");
        let error = result.expect_err("a query succeeded with postgres down");
        let took = started.elapsed();
        let code = describe(&error);
        seen.push((code.clone(), took));
        if code == "57P03" && took < Duration::from_secs(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "queries never failed fast with the server down: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let login = try_connect(&conn_str).await;
    let Err(error) = login else {
        panic!("logged in with postgres down");
    };
    assert!(
        matches!(sqlstate(&error), Some("57P03" | "08006")),
        "login with postgres down: {error}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    tokio::task::block_in_place(|| cluster.start_again());
    let restarted = Instant::now();
    // Every loop must get back to work, and then keep working for a while
    // so that errors after recovery would show.
    wait_for_successes(&successes, 50, "after the restart").await;
    stop.store(true, Ordering::Relaxed);
    let mut histories = Vec::new();
    for handle in loops {
        histories.push(handle.await.expect("query loop panicked"));
    }
    let recovered = tokio::time::timeout(IO_TIMEOUT, probe.simple_query(UPSTREAM_QUERY))
        .await
        .expect("probe hung after the restart");
    assert!(
        recovered.is_ok(),
        "the probe client did not recover: {recovered:?}"
    );

    let mut total_errors = 0;
    for (n, history) in histories.iter().enumerate() {
        let errors: Vec<&Outcome> = history.iter().filter(|o| o.error.is_some()).collect();
        total_errors += errors.len();
        if let Some(early) = errors.iter().find(|o| o.at < stopping) {
            panic!("loop {n}: error before postgres went down: {early:?}");
        }
        let Some(back) = history
            .iter()
            .find(|o| o.at >= restarted && o.error.is_none())
        else {
            panic!(
                "loop {n} never succeeded after the restart; last: {:?}",
                history.last()
            );
        };
        let mut codes: Vec<&str> = errors.iter().filter_map(|o| o.error.as_deref()).collect();
        codes.sort_unstable();
        codes.dedup();
        // Shown with --nocapture; says what the clients went through.
        println!(
            "loop {n}: {} queries, {} errors {codes:?}, back {:?} after restart",
            history.len(),
            errors.len(),
            back.at - restarted
        );
        assert!(
            back.at - restarted < Duration::from_secs(3),
            "loop {n} took {:?} to recover",
            back.at - restarted
        );
        if let Some(late) = errors.iter().find(|o| o.at > back.at) {
            panic!(
                "loop {n}: error {:?} {:?} after recovering at {:?}",
                late.error,
                late.at - restarted,
                back.at - restarted
            );
        }
    }
    println!("probe with postgres down: {seen:?}");
    assert!(total_errors > 0, "no loop noticed postgres going down");
}

// --- SIGTERM ------------------------------------------------------------------

/// The pgstash binary, killed if the test ends before it exits.
struct Process {
    child: Child,
    log: std::path::PathBuf,
}

impl Process {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_transaction_in_flight_finish() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pgstash.toml");
    // One worker thread, the smallest runtime, drains as any other.
    std::fs::write(
        &config,
        "shutdown_timeout = \"10s\"\nworker_threads = 1\nlog_level = \"pgstash=debug\"\n[pool]\nsize = 4\n",
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = dir.path().join("pgstash.log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgstash"));
    // Every PGSTASH_* variable is read as a configuration override, and
    // unknown ones are refused: the test harness's own must not leak in.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PGSTASH_") {
            command.env_remove(name);
        }
    }
    let child = command
        .arg("--config")
        .arg(&config)
        .arg("--upstream")
        .arg(format!(
            "postgres://postgres@{}:{}",
            support::pg_host(),
            support::pg_port()
        ))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start pgstash");
    let mut process = Process { child, log };
    let app = unique("sigterm");
    let conn_str =
        format!("host=127.0.0.1 port={port} user=postgres dbname=test application_name={app}");

    // Ready once a login goes through; that also means the accept loop, and
    // with it the signal handler, is running.
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        match tokio_postgres::connect(&conn_str, NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                break client;
            }
            Err(e) => {
                if let Ok(Some(status)) = process.child.try_wait() {
                    panic!("pgstash exited with {status}\n{}", process.log());
                }
                assert!(
                    Instant::now() < deadline,
                    "pgstash not ready: {e}\n{}",
                    process.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let table = unique("sigterm");
    client
        .batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .unwrap();
    let bystander = try_connect(&conn_str).await.unwrap();
    bystander.simple_query("SELECT 1").await.unwrap();

    client
        .batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)"))
        .await
        .unwrap();
    let in_flight = tokio::spawn({
        let table = table.clone();
        async move {
            client.batch_execute("SELECT pg_sleep(1)").await?;
            client
                .batch_execute(&format!("INSERT INTO {table} VALUES (2)"))
                .await?;
            client.batch_execute("COMMIT").await?;
            Ok::<_, tokio_postgres::Error>(client)
        }
    });
    // The signal should land while the pg_sleep runs on the server.
    let observer = support::direct("test").await;
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let running: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = $1 AND state = 'active' AND query LIKE '%pg_sleep%'",
                &[&app],
            )
            .await
            .unwrap()
            .get(0);
        if running > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "pg_sleep never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    process.signal("TERM");

    // New connections are refused once the signal is handled. One that
    // reaches the listen queue just as the listener closes is reset
    // instead: not served either.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                break
            }
            Err(e) => panic!("unexpected connect error: {e}"),
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "still accepting connections 5s after SIGTERM"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(
        !in_flight.is_finished(),
        "the transaction finished before the listener closed; the test proves nothing"
    );

    let client = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the transaction in flight hung")
        .unwrap()
        .unwrap_or_else(|e| panic!("the transaction in flight failed: {e}\n{}", process.log()));
    let committed: i64 = support::direct("test")
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(committed, 2, "the transaction did not commit");

    // Finished transaction, idle clients: nothing left to wait for.
    let deadline = signalled + Duration::from_secs(10) + Duration::from_secs(2);
    let status = loop {
        if let Some(status) = process.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "pgstash still running past shutdown_timeout\n{}",
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited_after = signalled.elapsed();
    assert!(
        status.success(),
        "pgstash exited with {status}\n{}",
        process.log()
    );
    assert!(
        exited_after < Duration::from_secs(5),
        "idle clients held up shutdown: exit {exited_after:?} after SIGTERM\n{}",
        process.log()
    );
    assert!(bystander.simple_query("SELECT 1").await.is_err());
    assert!(client.simple_query("SELECT 1").await.is_err());
    support::direct("test")
        .await
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}
