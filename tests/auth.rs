//! Client authentication, cancellation and the audit log, against the real
//! Postgres on 127.0.0.1:5432 (which trusts pgstash) and, for SCRAM
//! pass-through and auth_query, a throwaway Postgres that demands SCRAM.

mod support;

use std::time::{Duration, Instant};

use support::cluster::Cluster;
use support::TestProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

/// A login role in the main Postgres, dropped when the test ends.
struct Role {
    name: String,
}

impl Role {
    async fn create(prefix: &str) -> Role {
        let name = support::unique(prefix);
        support::direct("postgres")
            .await
            .batch_execute(&format!("CREATE ROLE {name} LOGIN"))
            .await
            .expect("create role");
        Role { name }
    }

    /// The role's SCRAM verifier as Postgres stores it for `password`.
    async fn scram_verifier(&self, password: &str) -> String {
        let client = support::direct("postgres").await;
        client
            .batch_execute(&format!(
                "SET password_encryption = 'scram-sha-256'; ALTER ROLE {} PASSWORD '{password}'",
                self.name
            ))
            .await
            .expect("set password");
        client
            .query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                &[&self.name],
            )
            .await
            .expect("read verifier")
            .get(0)
    }

    async fn drop(self) {
        let _ = support::direct("postgres")
            .await
            .batch_execute(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{0}';
                 DROP ROLE IF EXISTS {0}",
                self.name
            ))
            .await;
    }
}

/// Logs in through pgstash and returns the user Postgres sees, or the
/// SQLSTATE of the refusal.
async fn login(proxy: &TestProxy, user: &str, password: &str) -> Result<String, String> {
    let conn_str = format!(
        "host=127.0.0.1 port={} user={user} password='{password}' dbname=postgres",
        proxy.addr.port()
    );
    match tokio_postgres::connect(&conn_str, NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            let row = client
                .query_one("SELECT current_user::text", &[])
                .await
                .map_err(|e| e.to_string())?;
            Ok(row.get(0))
        }
        Err(e) => Err(e
            .as_db_error()
            .map(|d| d.code().code().to_owned())
            .unwrap_or_else(|| e.to_string())),
    }
}

/// psql through pgstash: (succeeded, stdout, stderr).
async fn psql(conn_str: String, password: &str, sql: &str) -> (bool, String, String) {
    let password = password.to_owned();
    let sql = sql.to_owned();
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new("psql")
            .arg(conn_str)
            .args(["-X", "-At", "-c", &sql])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("run psql");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .expect("psql task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_and_md5_logins_from_configured_users() {
    let scram_user = Role::create("scram_user").await;
    let md5_user = Role::create("md5_user").await;
    let proxy = TestProxy::start(&format!(
        r#"
        [auth]
        failure_delay = "50ms"
        [[auth.rules]]
        user = "{md5}"
        method = "md5"
        [[auth.rules]]
        address = "127.0.0.1/32"
        method = "scram-sha-256"
        [users.{scram}]
        password = "correct horse"
        [users.{md5}]
        password = "battery staple"
        "#,
        scram = scram_user.name,
        md5 = md5_user.name
    ))
    .await;

    assert_eq!(
        login(&proxy, &scram_user.name, "correct horse").await,
        Ok(scram_user.name.clone())
    );
    assert_eq!(
        login(&proxy, &md5_user.name, "battery staple").await,
        Ok(md5_user.name.clone())
    );
    assert_eq!(
        login(&proxy, &scram_user.name, "wrong").await,
        Err("28P01".into())
    );
    assert_eq!(
        login(&proxy, &md5_user.name, "wrong").await,
        Err("28P01".into())
    );
    assert_eq!(
        login(&proxy, "nobody_at_all", "whatever").await,
        Err("28P01".into())
    );

    for (user, password) in [
        (&scram_user.name, "correct horse"),
        (&md5_user.name, "battery staple"),
    ] {
        let conn_str = format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres",
            proxy.addr.port()
        );
        let (ok, out, err) = psql(conn_str.clone(), password, "SELECT current_user").await;
        assert!(ok, "psql as {user}: {err}");
        assert_eq!(&out, user);
        let (ok, _, err) = psql(conn_str, "nope", "SELECT 1").await;
        assert!(!ok);
        assert!(err.contains("password authentication failed"), "{err}");
    }
    proxy.stop().await;
    scram_user.drop().await;
    md5_user.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_wait_alike_and_longer_when_repeated() {
    let role = Role::create("slowed").await;
    let delay = Duration::from_millis(150);
    let config = format!(
        "[auth]\nmethod = \"scram-sha-256\"\nfailure_delay = \"150ms\"\nfailure_delay_max = \"2s\"\n[users.{}]\npassword = \"pw\"\n",
        role.name
    );
    // Fresh proxies, so each first failure starts from the base delay.
    for user in [role.name.as_str(), "no_such_user_anywhere"] {
        let proxy = TestProxy::start(&config).await;
        let started = Instant::now();
        assert_eq!(login(&proxy, user, "bad").await, Err("28P01".into()));
        let took = started.elapsed();
        assert!(
            took >= delay && took < delay + Duration::from_secs(2),
            "{user}: {took:?}"
        );
    }
    let proxy = TestProxy::start(&config).await;
    let mut took = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(login(&proxy, &role.name, "bad").await, Err("28P01".into()));
        took.push(started.elapsed());
    }
    assert!(
        took[2] >= delay * 4,
        "third failure answered after {took:?}"
    );
    // A success clears the address's record.
    assert_eq!(login(&proxy, &role.name, "pw").await, Ok(role.name.clone()));
    let started = Instant::now();
    assert_eq!(login(&proxy, &role.name, "bad").await, Err("28P01".into()));
    assert!(started.elapsed() < delay * 4);
    proxy.stop().await;
    role.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_auth_file_with_plain_md5_and_scram_secrets() {
    let plain = Role::create("file_plain").await;
    let hashed = Role::create("file_md5").await;
    let scram = Role::create("file_scram").await;
    let verifier = scram.scram_verifier("scram pw").await;
    let md5 = format!("md5{:x}", md5::compute(format!("md5 pw{}", hashed.name)));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("userlist.txt");
    std::fs::write(
        &file,
        format!(
            ";; PgBouncer userlist\n\"{}\" \"plain pw\"\n\"{}\" \"{md5}\"\n\"{}\" \"{verifier}\"\n",
            plain.name, hashed.name, scram.name
        ),
    )
    .unwrap();
    let proxy = TestProxy::start(&format!(
        "[auth]\nmethod = \"md5\"\nfailure_delay = \"10ms\"\nauth_file = \"{}\"\n",
        file.display()
    ))
    .await;
    for (role, password) in [
        (&plain, "plain pw"),
        (&hashed, "md5 pw"),
        // md5 with a SCRAM verifier means SCRAM, as in Postgres.
        (&scram, "scram pw"),
    ] {
        assert_eq!(
            login(&proxy, &role.name, password).await,
            Ok(role.name.clone())
        );
        assert_eq!(
            login(&proxy, &role.name, "not it").await,
            Err("28P01".into())
        );
    }
    proxy.stop().await;
    for role in [plain, hashed, scram] {
        role.drop().await;
    }
}

/// A Postgres that wants SCRAM from everyone over TCP.
fn scram_only_cluster() -> Cluster {
    let hba = "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n";
    Cluster::start_with(
        &[("pg_hba.conf", hba.as_bytes())],
        &["password_encryption = 'scram-sha-256'"],
    )
}

/// Runs setup SQL over the cluster's Unix socket (trusted).
async fn over_socket(cluster: &Cluster, sql: &str) {
    let conn_str = format!(
        "host={} port={} user=postgres dbname=postgres",
        cluster.socket_dir().display(),
        cluster.port()
    );
    support::connect(&conn_str)
        .await
        .batch_execute(sql)
        .await
        .expect("setup over the socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_and_scram_pass_through() {
    let cluster = tokio::task::spawn_blocking(scram_only_cluster)
        .await
        .unwrap();
    over_socket(
        &cluster,
        "ALTER ROLE postgres PASSWORD 'admin pw';
         CREATE ROLE app LOGIN PASSWORD 'app pw';",
    )
    .await;
    let proxy = TestProxy::start(&format!(
        r#"
        [upstream]
        host = "127.0.0.1"
        port = {}
        [auth]
        method = "scram-sha-256"
        failure_delay = "10ms"
        auth_user = "postgres"
        auth_query = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1"
        [users.postgres]
        password = "admin pw"
        "#,
        cluster.port()
    ))
    .await;
    // app is listed nowhere in pgstash: its verifier comes from
    // auth_query, and pgstash logs in to Postgres with the keys app's
    // client proved.
    assert_eq!(login(&proxy, "app", "app pw").await, Ok("app".into()));
    assert_eq!(login(&proxy, "app", "wrong").await, Err("28P01".into()));
    assert_eq!(login(&proxy, "ghost", "x").await, Err("28P01".into()));
    let conn_str = format!(
        "host=127.0.0.1 port={} user=app dbname=postgres",
        proxy.addr.port()
    );
    let (ok, out, err) = psql(conn_str, "app pw", "SELECT current_user").await;
    assert!(ok, "{err}");
    assert_eq!(out, "app");
    proxy.stop().await;
}

/// Sends a CancelRequest with any key.
async fn send_cancel(addr: std::net::SocketAddr, pid: i32, secret: i32) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = Vec::with_capacity(16);
    request.extend_from_slice(&16i32.to_be_bytes());
    request.extend_from_slice(&80877102i32.to_be_bytes());
    request.extend_from_slice(&pid.to_be_bytes());
    request.extend_from_slice(&secret.to_be_bytes());
    stream.write_all(&request).await.unwrap();
    // pgstash closes the connection once it has acted on the request.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
}

/// Waits until Postgres runs a statement with this marker.
async fn wait_until_running(marker: &str) {
    let direct = support::direct("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
                &[&marker],
            )
            .await
            .unwrap()
            .get(0);
        if running > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{marker} never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_reach_only_the_query_of_their_own_client() {
    let proxy = TestProxy::start("[pool]\nsize = 1\n[cache]\nenabled = false\n").await;
    let idle = proxy.connect("postgres").await;
    let busy = proxy.connect("postgres").await;
    idle.simple_query("SELECT 1").await.unwrap();

    // The only server connection runs the busy client's query; the idle
    // client's key and a made-up key must leave it alone.
    let marker = support::unique("cancel_marker");
    let sql = format!("SELECT pg_sleep(1.5), '{marker}'");
    let running = tokio::spawn(async move {
        let result = busy.simple_query(&sql).await.map(|_| ());
        (busy, result)
    });
    wait_until_running(&marker).await;
    idle.cancel_token().cancel_query(NoTls).await.unwrap();
    send_cancel(proxy.addr, 12345, 67890).await;
    let (busy, result) = running.await.unwrap();
    assert!(
        result.is_ok(),
        "another client's cancel reached: {result:?}"
    );

    // The busy client's own key cancels its query at once.
    let marker = support::unique("cancel_marker");
    let sql = format!("SELECT pg_sleep(10), '{marker}'");
    let token = busy.cancel_token();
    let running = tokio::spawn(async move { busy.simple_query(&sql).await.map(|_| ()) });
    wait_until_running(&marker).await;
    let started = Instant::now();
    token.cancel_query(NoTls).await.unwrap();
    let error = running.await.unwrap().expect_err("query was not cancelled");
    assert_eq!(error.code().map(|c| c.code()), Some("57014"));
    assert!(started.elapsed() < Duration::from_secs(1));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_interrupt_cancels_through_pgstash() {
    let proxy = TestProxy::start("[cache]\nenabled = false\n").await;
    let marker = support::unique("psql_sigint");
    let mut child = std::process::Command::new("psql")
        .arg(proxy.conn_str("postgres"))
        .args(["-X", "-c", &format!("SELECT pg_sleep(10), '{marker}'")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_running(&marker).await;
    let started = Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let output = tokio::task::spawn_blocking(move || {
        let mut stderr = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let _ = child.wait();
        stderr
    })
    .await
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        output.contains("canceling statement due to user request"),
        "{output}"
    );
    proxy.stop().await;
}

/// Messages from a raw connection until EOF: (tag, body) pairs.
async fn read_all_messages(stream: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes)).await;
    parse_messages(&bytes)
}

fn parse_messages(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut messages = Vec::new();
    while bytes.len() >= 5 {
        let len = i32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        if bytes.len() < len + 1 {
            break;
        }
        messages.push((bytes[0], bytes[5..len + 1].to_vec()));
        bytes = &bytes[len + 1..];
    }
    messages
}

fn startup_message(user: &str) -> Vec<u8> {
    support::startup_packet(&[("user", user), ("database", "postgres")])
}

/// Reads one message (for the first challenge of a handshake).
async fn read_message(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await.unwrap();
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await.unwrap();
    (header[0], body)
}

fn error_code(body: &[u8]) -> String {
    body.split(|&b| b == 0)
        .find_map(|field| field.strip_prefix(b"C"))
        .map(|code| String::from_utf8_lossy(code).into_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_handshakes_get_clean_errors() {
    let role = Role::create("handshake").await;
    let proxy = TestProxy::start(&format!(
        "[auth]\nmethod = \"scram-sha-256\"\nfailure_delay = \"10ms\"\n[[auth.rules]]\nuser = \"{0}_clear\"\nmethod = \"password\"\n[[auth.rules]]\nmethod = \"scram-sha-256\"\n[users.{0}]\npassword = \"pw\"\n",
        role.name
    ))
    .await;

    let cases: Vec<(&str, String, Vec<u8>)> = vec![
        // SASLInitialResponse announcing more data than it carries.
        ("short SASL data", role.name.clone(), {
            let mut body = b"SCRAM-SHA-256\0".to_vec();
            body.extend_from_slice(&1000i32.to_be_bytes());
            body.extend_from_slice(b"n,,n=");
            body
        }),
        // A negative length where pgwire's decoder would have panicked.
        ("negative SASL length", role.name.clone(), {
            let mut body = b"SCRAM-SHA-256\0".to_vec();
            body.extend_from_slice(&(-7i32).to_be_bytes());
            body
        }),
        ("garbage client-first", role.name.clone(), {
            let mut body = b"SCRAM-SHA-256\0".to_vec();
            body.extend_from_slice(&3i32.to_be_bytes());
            body.extend_from_slice(b"xyz");
            body
        }),
        ("unoffered mechanism", role.name.clone(), {
            let mut body = b"SCRAM-SHA-1\0".to_vec();
            body.extend_from_slice(&5i32.to_be_bytes());
            body.extend_from_slice(b"n,,n=");
            body
        }),
        ("oversized password", format!("{}_clear", role.name), {
            let mut body = vec![b'a'; 100_000];
            body.push(0);
            body
        }),
    ];
    for (case, user, body) in cases {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(&startup_message(&user)).await.unwrap();
        let (tag, _) = read_message(&mut stream).await;
        assert_eq!(tag, b'R', "{case}: expected an authentication request");
        let mut message = vec![b'p'];
        message.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        message.extend_from_slice(&body);
        let _ = stream.write_all(&message).await;
        let answers = read_all_messages(&mut stream).await;
        let (tag, body) = answers.last().cloned().unwrap_or_default();
        assert_eq!(tag, b'E', "{case}: {answers:?}");
        assert_eq!(error_code(&body), "08P01", "{case}");
    }

    // A client that walks away mid-handshake leaves nothing behind.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(&startup_message(&role.name))
        .await
        .unwrap();
    assert_eq!(read_message(&mut stream).await.0, b'R');
    drop(stream);

    assert_eq!(login(&proxy, &role.name, "pw").await, Ok(role.name.clone()));
    proxy.stop().await;
    role.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_records_logins_and_privileged_statements() {
    let role = Role::create("audited").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let table = support::unique("audited_table");
    let proxy = TestProxy::start(&format!(
        "[audit]\ndestination = \"{}\"\n[auth]\nmethod = \"scram-sha-256\"\nfailure_delay = \"10ms\"\n[users.{}]\npassword = \"pw\"\n",
        log.display(),
        role.name
    ))
    .await;
    assert_eq!(
        login(&proxy, &role.name, "wrong").await,
        Err("28P01".into())
    );
    let (client, connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user={} password=pw dbname=postgres",
            proxy.addr.port(),
            role.name
        ),
        NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "CREATE TEMP TABLE {table} (a text DEFAULT 'secret value'); SELECT 1"
        ))
        .await
        .unwrap();
    client.simple_query("SELECT 42").await.unwrap();
    drop(client);
    proxy.stop().await;

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let logins: Vec<&serde_json::Value> = lines.iter().filter(|l| l["event"] == "login").collect();
    assert_eq!(logins.len(), 2, "{text}");
    assert_eq!(logins[0]["outcome"], "failure");
    assert_eq!(logins[1]["outcome"], "success");
    assert_eq!(logins[1]["method"], "scram-sha-256");
    assert_eq!(logins[1]["user"], role.name.as_str());
    assert!(logins[1]["client_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let statements: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["event"] == "statement").collect();
    assert_eq!(statements.len(), 1, "{text}");
    assert_eq!(statements[0]["kind"], "ddl");
    let fingerprint = statements[0]["fingerprint"].as_str().unwrap();
    assert!(fingerprint.contains(&table), "{fingerprint}");
    assert!(
        !text.contains("secret value"),
        "a literal reached the audit log"
    );
    assert!(!text.contains("\"pw\""));
    role.drop().await;
}
