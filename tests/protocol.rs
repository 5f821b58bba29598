//! Drivers' view of pgstash: tokio-postgres through the proxy against a
//! real PostgreSQL, in transaction pooling mode.

mod support;

use futures_util::{pin_mut, SinkExt, StreamExt, TryStreamExt};
use support::{unique, TestProxy};
use tokio_postgres::types::Type;
use tokio_postgres::SimpleQueryMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries() {
    let proxy = TestProxy::start("").await;
    let client = proxy.connect("test").await;
    let rows = client
        .simple_query("SELECT 1 AS a; SELECT 'x' AS b, NULL AS c")
        .await
        .unwrap();
    let values: Vec<Option<String>> = rows
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).map(str::to_owned))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(values, vec![Some("1".into()), Some("x".into()), None]);
    let row = client
        .query_one("SELECT $1::int + 1, $2::text", &[&41i32, &"hi"])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, &str>(1), "hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_survive_transaction_pooling() {
    // 50 clients, 4 server connections: every client lands on servers that
    // never saw its statements.
    let proxy = TestProxy::start("[pool]\nsize = 4\nmin_idle = 0\n").await;
    let table = unique("prep");
    let setup = proxy.connect("test").await;
    setup
        .batch_execute(&format!("CREATE TABLE {table} (id int primary key, v int)"))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for c in 0..50i32 {
        let conn_str = proxy.conn_str("test");
        let table = table.clone();
        tasks.push(tokio::spawn(async move {
            let client = support::connect(&conn_str).await;
            let insert = client
                .prepare(&format!("INSERT INTO {table} VALUES ($1, $2)"))
                .await
                .unwrap();
            let select = client
                .prepare(&format!("SELECT v FROM {table} WHERE id = $1"))
                .await
                .unwrap();
            for i in 0..10i32 {
                let id = c * 100 + i;
                client.execute(&insert, &[&id, &(id * 2)]).await.unwrap();
                let row = client.query_one(&select, &[&id]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), id * 2);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let count: i64 = setup
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 500);
    setup
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_and_an_error_in_the_middle() {
    let proxy = TestProxy::start("[pool]\nsize = 2\n").await;
    let client = proxy.connect("test").await;
    let a = client.prepare("SELECT $1::int * 2").await.unwrap();
    // tokio-postgres pipelines concurrent futures on one connection.
    let futures: Vec<_> = (0..100i32)
        .map(|i| {
            let client = &client;
            let a = &a;
            async move {
                if i == 50 {
                    client.query_one("SELECT 1/0", &[]).await.map(|_| -1)
                } else {
                    client.query_one(a, &[&i]).await.map(|r| r.get::<_, i32>(0))
                }
            }
        })
        .collect();
    let results = futures_util::future::join_all(futures).await;
    for (i, r) in results.into_iter().enumerate() {
        if i == 50 {
            let err = r.unwrap_err();
            assert_eq!(err.code().unwrap().code(), "22012");
        } else {
            assert_eq!(r.unwrap(), i as i32 * 2);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_round_trip_text_and_binary() {
    let proxy = TestProxy::start("").await;
    let client = proxy.connect("test").await;
    let table = unique("copy");
    client
        .batch_execute(&format!("CREATE TABLE {table} (id int, t text, b bytea)"))
        .await
        .unwrap();
    let sink = client
        .copy_in(&format!("COPY {table} FROM STDIN"))
        .await
        .unwrap();
    pin_mut!(sink);
    let mut data = String::new();
    for i in 0..10_000 {
        data.push_str(&format!("{i}\trow {i}\t\\\\x{:02x}\n", i % 256));
    }
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 10_000);

    let stream = client
        .copy_out(&format!("COPY {table} TO STDOUT"))
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    let out: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8(out).unwrap(), data);

    // Binary: copy out, copy into a second table, compare.
    let copy_table = format!("{table}_2");
    client
        .batch_execute(&format!("CREATE TABLE {copy_table} (LIKE {table})"))
        .await
        .unwrap();
    let stream = client
        .copy_out(&format!("COPY {table} TO STDOUT (FORMAT binary)"))
        .await
        .unwrap();
    let binary: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    let sink = client
        .copy_in(&format!("COPY {copy_table} FROM STDIN (FORMAT binary)"))
        .await
        .unwrap();
    pin_mut!(sink);
    for chunk in binary {
        sink.send(chunk).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 10_000);
    let diff: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM ((TABLE {table} EXCEPT TABLE {copy_table}) UNION ALL (TABLE {copy_table} EXCEPT TABLE {table})) d"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(diff, 0);
    client
        .batch_execute(&format!("DROP TABLE {table}, {copy_table}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_failure_leaves_the_connection_usable() {
    let proxy = TestProxy::start("[pool]\nsize = 1\n").await;
    let client = proxy.connect("test").await;
    let table = unique("copyfail");
    client
        .batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .unwrap();
    let sink = client
        .copy_in::<_, bytes::Bytes>(&format!("COPY {table} FROM STDIN"))
        .await
        .unwrap();
    pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"not a number\n"))
        .await
        .unwrap();
    let err = sink.finish().await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "22P02");
    let row = client.query_one("SELECT 7", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_wide_rows_nulls_and_binary_formats() {
    let proxy = TestProxy::start("").await;
    let client = proxy.connect("test").await;
    let big: Vec<u8> = (0..10 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let row = client.query_one("SELECT $1::bytea", &[&big]).await.unwrap();
    assert_eq!(row.get::<_, Vec<u8>>(0), big);
    let columns: Vec<String> = (0..500)
        .map(|i| {
            if i % 3 == 0 {
                format!("NULL::int AS c{i}")
            } else {
                format!("{i} AS c{i}")
            }
        })
        .collect();
    let row = client
        .query_one(&format!("SELECT {}", columns.join(", ")), &[])
        .await
        .unwrap();
    assert_eq!(row.len(), 500);
    assert_eq!(row.get::<_, Option<i32>>(0), None);
    assert_eq!(row.get::<_, Option<i32>>(499), Some(499));
    // tokio-postgres asks for binary results; check a few types survive.
    let stmt = client
        .prepare_typed(
            "SELECT $1::float8, $2::timestamptz, $3::numeric::text",
            &[Type::FLOAT8, Type::TIMESTAMPTZ, Type::NUMERIC],
        )
        .await;
    assert!(stmt.is_ok());
    let row = client
        .query_one("SELECT 1.5::float8, 'x'::text, ARRAY[1,2,3]::int4[]", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, f64>(0), 1.5);
    assert_eq!(row.get::<_, Vec<i32>>(2), vec![1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_reach_the_client() {
    let proxy = TestProxy::start("").await;
    let conn_str = proxy.conn_str("test");
    let (client, mut connection) = tokio_postgres::connect(&conn_str, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(async move {
        let mut stream = Box::pin(stream);
        while let Some(Ok(message)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notice(notice) = message {
                let _ = tx.send(notice.message().to_owned());
            }
        }
    });
    client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello from postgres'; END $$")
        .await
        .unwrap();
    let notice = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
        .await
        .unwrap();
    assert_eq!(notice.as_deref(), Some("hello from postgres"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_follow_the_client_across_servers() {
    let proxy = TestProxy::start("[pool]\nsize = 2\n").await;
    let a = proxy.connect("test").await;
    let b = proxy.connect("test").await;
    a.batch_execute("SET statement_timeout = '1234ms'; SET myapp.tenant = 'a'")
        .await
        .unwrap();
    b.batch_execute("SET myapp.tenant = 'b'").await.unwrap();
    // Interleave many short transactions so each client hops servers.
    for _ in 0..20 {
        let ta: String = a
            .query_one("SELECT current_setting('myapp.tenant')", &[])
            .await
            .unwrap()
            .get(0);
        let tb: String = b
            .query_one("SELECT current_setting('myapp.tenant')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!((ta.as_str(), tb.as_str()), ("a", "b"));
        let st: String = b
            .query_one("SHOW statement_timeout", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(st, "0");
    }
    let st: String = a
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(st, "1234ms");
    // RESET goes back to the startup value, not the server default.
    a.batch_execute("SET application_name = 'changed'")
        .await
        .unwrap();
    a.batch_execute("RESET application_name").await.unwrap();
    let name: String = a
        .query_one("SHOW application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "pgstash-test");
    a.batch_execute("RESET ALL").await.unwrap();
    let st: String = a
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(st, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_keep_their_server_and_disconnects_roll_back() {
    let proxy = TestProxy::start("[pool]\nsize = 1\n").await;
    let table = unique("tx");
    let a = proxy.connect("test").await;
    a.batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .unwrap();
    a.batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)"))
        .await
        .unwrap();
    let seen: i64 = a
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 1);
    drop(a); // disconnect mid-transaction
             // With one server connection, the next client gets the same server; it
             // must have been rolled back.
    let b = proxy.connect("test").await;
    let seen: i64 = b
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 0);
    let status: String = b
        .query_one("SELECT current_setting('transaction_isolation')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "read committed");
    b.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_tables_pin_the_client() {
    let proxy = TestProxy::start("[pool]\nsize = 3\n").await;
    let a = proxy.connect("test").await;
    let others: Vec<_> =
        futures_util::future::join_all((0..3).map(|_| proxy.connect("test"))).await;
    a.batch_execute("CREATE TEMP TABLE scratch (v int); INSERT INTO scratch VALUES (5)")
        .await
        .unwrap();
    for other in &others {
        other.query_one("SELECT 1", &[]).await.unwrap();
    }
    let v: i32 = a
        .query_one("SELECT v FROM scratch", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_and_deallocate_are_understood() {
    let proxy = TestProxy::start("[pool]\nsize = 1\n").await;
    let client = proxy.connect("test").await;
    let stmt = client.prepare("SELECT 11").await.unwrap();
    let v: i32 = client.query_one(&stmt, &[]).await.unwrap().get(0);
    assert_eq!(v, 11);
    drop(stmt); // tokio-postgres sends Close
    let stmt = client.prepare("SELECT 11").await.unwrap();
    let v: i32 = client.query_one(&stmt, &[]).await.unwrap().get(0);
    assert_eq!(v, 11);
    client.batch_execute("DISCARD ALL").await.unwrap();
    let again = client.prepare("SELECT 12").await.unwrap();
    let v: i32 = client.query_one(&again, &[]).await.unwrap().get(0);
    assert_eq!(v, 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_limited_execute_suspends_the_portal() {
    let proxy = TestProxy::start("").await;
    let mut client = proxy.connect("test").await;
    let tx = client.transaction().await.unwrap();
    let stmt = tx
        .prepare("SELECT g FROM generate_series(1, 10) g")
        .await
        .unwrap();
    let portal = tx.bind(&stmt, &[]).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let rows = tx.query_portal(&portal, 3).await.unwrap();
        if rows.is_empty() {
            break;
        }
        seen.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
    }
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_pins_and_notifications_arrive() {
    let proxy = TestProxy::start("[pool]\nsize = 2\n").await;
    let channel = unique("chan");
    let (client, mut connection) =
        tokio_postgres::connect(&proxy.conn_str("test"), tokio_postgres::NoTls)
            .await
            .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = Box::pin(futures_util::stream::poll_fn(move |cx| {
            connection.poll_message(cx)
        }));
        while let Some(Ok(message)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .unwrap();
    let other = proxy.connect("test").await;
    other
        .batch_execute(&format!("NOTIFY {channel}, 'ping'"))
        .await
        .unwrap();
    let payload = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
        .await
        .expect("notification within 5 s");
    assert_eq!(payload.as_deref(), Some("ping"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_query() {
    let proxy = TestProxy::start("").await;
    let client = proxy.connect("test").await;
    let token = client.cancel_token();
    let started = std::time::Instant::now();
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(10)").await });
    // Cancel once the query is running upstream, i.e. visible in pg_stat_activity.
    let observer = support::direct("test").await;
    loop {
        let running: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(10)' AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if running > 0 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "query never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = sleeper.await.unwrap().unwrap_err();
    assert_eq!(err.code().unwrap().code(), "57014");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

/// Reads backend messages until ReadyForQuery; returns their tags and the
/// first column of the first DataRow, if any.
async fn read_until_ready(stream: &mut tokio::net::TcpStream) -> (Vec<u8>, Option<String>) {
    use tokio::io::AsyncReadExt;
    let mut tags = Vec::new();
    let mut value = None;
    loop {
        let tag = stream.read_u8().await.unwrap();
        let len = stream.read_i32().await.unwrap() as usize;
        let mut body = vec![0u8; len - 4];
        stream.read_exact(&mut body).await.unwrap();
        tags.push(tag);
        if tag == b'D' && value.is_none() {
            let n = i32::from_be_bytes(body[2..6].try_into().unwrap()) as usize;
            value = Some(String::from_utf8_lossy(&body[6..6 + n]).into_owned());
        }
        if tag == b'Z' {
            return (tags, value);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unnamed_statement_follows_the_client_to_another_server() {
    use bytes::{BufMut, BytesMut};
    use tokio::io::AsyncWriteExt;
    let proxy = TestProxy::start("[pool]\nsize = 1\nmin_idle = 0\n").await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "postgres"), ("database", "test")],
        &mut out,
    )
    .unwrap();
    stream.write_all(&out).await.unwrap();
    read_until_ready(&mut stream).await;

    out.clear();
    postgres_protocol::message::frontend::parse("", "SELECT $1::int + 1", [23u32], &mut out)
        .unwrap();
    postgres_protocol::message::frontend::sync(&mut out);
    stream.write_all(&out).await.unwrap();
    let (tags, _) = read_until_ready(&mut stream).await;
    assert_eq!(tags, b"1Z");

    // A fresh server connection for the next transaction.
    let admin = support::connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=pgstash",
        proxy.addr.port()
    ))
    .await;
    admin.simple_query("RECONNECT").await.unwrap();

    out.clear();
    let mut bind = BytesMut::new();
    bind.put_slice(b"\0\0"); // portal "", statement ""
    bind.put_i16(0); // parameter formats: all text
    bind.put_i16(1);
    bind.put_i32(2);
    bind.put_slice(b"41");
    bind.put_i16(0); // result formats: all text
    out.put_u8(b'B');
    out.put_i32(4 + bind.len() as i32);
    out.put_slice(&bind);
    postgres_protocol::message::frontend::execute("", 0, &mut out).unwrap();
    postgres_protocol::message::frontend::sync(&mut out);
    stream.write_all(&out).await.unwrap();
    let (tags, value) = read_until_ready(&mut stream).await;
    assert_eq!(
        tags, b"2DCZ",
        "the client must see exactly what Postgres would send"
    );
    assert_eq!(value.as_deref(), Some("42"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_across_a_schema_change_behave_as_on_postgres() {
    let proxy = TestProxy::start("[pool]\nsize = 1\n").await;
    let client = proxy.connect("test").await;
    let t = unique("ddlprep");
    client
        .batch_execute(&format!(
            "CREATE TABLE {t} (a int); INSERT INTO {t} VALUES (1)"
        ))
        .await
        .unwrap();
    let old = client.prepare(&format!("SELECT * FROM {t}")).await.unwrap();
    assert_eq!(client.query_one(&old, &[]).await.unwrap().len(), 1);
    client
        .batch_execute(&format!("ALTER TABLE {t} ADD COLUMN b int DEFAULT 2"))
        .await
        .unwrap();
    // Postgres refuses a statement prepared before the change...
    let err = client.query_one(&old, &[]).await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "0A000");
    // ...and one prepared again sees the new shape, on this server and others.
    let fresh = client.prepare(&format!("SELECT * FROM {t}")).await.unwrap();
    let row = client.query_one(&fresh, &[]).await.unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1)), (1, 2));
    let other = proxy.connect("test").await;
    let row = other
        .query_one(&format!("SELECT * FROM {t}"), &[])
        .await
        .unwrap();
    assert_eq!(row.len(), 2);
    client
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}
