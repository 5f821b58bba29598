//! TLS on both sides of pgstash, against real servers: psql negotiating
//! TLS with an SSLRequest (certificate checks, SCRAM channel binding),
//! Postgres 17 style direct TLS with ALPN, the refusals around both, and
//! TLS towards Postgres checked against a throwaway cluster whose
//! pg_hba.conf only lets TLS connections in.
//!
//! Every test makes its own CA and server certificate, so nothing depends
//! on certificates lying around on the machine.

mod support;

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::cluster::Cluster;
use support::{unique, TestProxy};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

/// A refused connection is closed promptly; waiting longer than this means
/// pgstash is waiting for us, which is a failure in itself.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

const SSL_REQUEST_CODE: i32 = 80_877_103;

/// A test CA and a server certificate it signed, as PEM files in a
/// temporary directory (removed on drop).
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    /// A fresh CA, and a certificate for "localhost" and 127.0.0.1 (the
    /// names psql and pgstash check it against) signed by it.
    fn generate() -> Pki {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // Issuer and subject must differ, or OpenSSL takes the server
        // certificate for a self-signed one.
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pgstash test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");

        let key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .expect("server certificate");

        let dir = tempfile::Builder::new()
            .prefix("pgstash-tls-")
            .tempdir()
            .expect("create certificate directory");
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write PEM file");
            path
        };
        Pki {
            ca: write("ca.pem", ca.pem()),
            cert: write("server.pem", cert.pem()),
            key: write("server.key", key.serialize_pem()),
            _dir: dir,
        }
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The `[tls]` section serving `pki`'s certificate to clients.
fn client_tls(mode: &str, pki: &Pki) -> String {
    format!(
        "[tls]\nmode = \"{mode}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        pki.cert.display(),
        pki.key.display()
    )
}

/// Runs psql with `conninfo` and one statement, unaligned and tuples only.
/// psql blocks, so it runs off the runtime's workers.
async fn psql(conninfo: String, password: Option<&str>, sql: &str) -> Output {
    let password = password.map(str::to_owned);
    let sql = sql.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new("psql");
        command
            .arg(conninfo)
            .args(["-X", "-A", "-t", "-c", &sql])
            .stdin(Stdio::null())
            .env("PGCONNECT_TIMEOUT", "10");
        // The conninfo alone decides TLS and credentials, whatever the
        // environment running the tests has set.
        for var in [
            "PGPASSWORD",
            "PGPASSFILE",
            "PGSSLMODE",
            "PGSSLROOTCERT",
            "PGSSLCERT",
            "PGSSLKEY",
            "PGCHANNELBINDING",
            "PGSERVICE",
            "PGSERVICEFILE",
        ] {
            command.env_remove(var);
        }
        if let Some(password) = password {
            command.env("PGPASSWORD", password);
        }
        command
            .output()
            .expect("psql (apt-get install postgresql-client)")
    })
    .await
    .expect("psql task")
}

fn describe(output: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// psql's output, after checking that it succeeded.
fn stdout_of(output: &Output) -> String {
    assert!(output.status.success(), "psql failed: {}", describe(output));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// psql's error output, after checking that it failed.
fn stderr_of(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "psql succeeded: {}",
        describe(output)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn ssl_request() -> Vec<u8> {
    let mut packet = 8i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    packet
}

fn startup_message(user: &str, database: &str) -> Vec<u8> {
    support::startup_packet(&[("user", user), ("database", database)])
}

/// One tagged backend message.
async fn read_message<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<(u8, Vec<u8>)> {
    let tag = stream.read_u8().await?;
    let len = stream.read_i32().await?;
    let len = usize::try_from(len)
        .ok()
        .filter(|&len| len >= 4)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad message length"))?;
    let mut body = vec![0; len - 4];
    stream.read_exact(&mut body).await?;
    Ok((tag, body))
}

/// Everything the server sends until it closes the connection. A reset,
/// or a TLS peer that closes without close_notify, counts as closed: what
/// matters is what arrived before.
async fn read_until_closed<S: AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    tokio::time::timeout(CLOSE_TIMEOUT, async {
        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return received,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("pgstash did not close the connection")
}

/// Splits raw backend bytes into (tag, body) messages.
fn split_messages(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut messages = Vec::new();
    while bytes.len() >= 5 {
        let len = i32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        if len < 4 || bytes.len() < 1 + len {
            break;
        }
        messages.push((bytes[0], bytes[5..1 + len].to_vec()));
        bytes = &bytes[1 + len..];
    }
    messages
}

/// A field (`b'C'` SQLSTATE, `b'M'` message, …) of an ErrorResponse body.
fn error_field(body: &[u8], field: u8) -> Option<String> {
    body.split(|&b| b == 0)
        .find(|f| f.first() == Some(&field))
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
}

/// Checks that `received` is exactly one FATAL ErrorResponse with `code`
/// and returns its message.
fn expect_fatal(received: &[u8], code: &str) -> String {
    let messages = split_messages(received);
    let [(b'E', body)] = messages.as_slice() else {
        panic!("expected a single ErrorResponse, got {received:?}");
    };
    assert_eq!(
        error_field(body, b'S').as_deref(),
        Some("FATAL"),
        "{body:?}"
    );
    assert_eq!(error_field(body, b'C').as_deref(), Some(code), "{body:?}");
    error_field(body, b'M').unwrap_or_default()
}

/// A rustls connector trusting only `pki`'s CA, offering ALPN
/// "postgresql" when `alpn` is set.
fn tls_connector(pki: &Pki, alpn: bool) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read(&pki.ca)) {
        roots.add(ca.expect("CA PEM")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    if alpn {
        config.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_verify_full_through_tls() {
    let pki = Pki::generate();
    let proxy = TestProxy::start(&client_tls("require", &pki)).await;
    let base = format!(
        "host=localhost port={} user=postgres dbname=postgres",
        proxy.addr.port()
    );

    // verify-full checks the chain up to our CA and that the certificate
    // names "localhost".
    let verified = psql(
        format!(
            "{base} sslmode=verify-full sslrootcert={}",
            pki.ca.display()
        ),
        None,
        "select 1",
    )
    .await;
    assert_eq!(stdout_of(&verified), "1");

    let encrypted = psql(format!("{base} sslmode=require"), None, "select 1").await;
    assert_eq!(stdout_of(&encrypted), "1");

    // mode = require: a plaintext client is told why it is refused.
    let plaintext = psql(format!("{base} sslmode=disable"), None, "select 1").await;
    let stderr = stderr_of(&plaintext);
    assert!(stderr.contains("TLS"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_channel_binding_over_tls() {
    let pki = Pki::generate();
    // pgstash logs in to Postgres as this role with the configured
    // password; Postgres on 5432 trusts it, so the role needs none there.
    let role = unique("tls_scram");
    support::direct("postgres")
        .await
        .batch_execute(&format!("CREATE ROLE {role} LOGIN"))
        .await
        .expect("create role");
    let proxy = TestProxy::start(&format!(
        "{}\n[auth]\nmethod = \"scram-sha-256\"\nfailure_delay = \"10ms\"\n\n\
         [users.{role}]\npassword = \"pw\"\n",
        client_tls("require", &pki)
    ))
    .await;
    let conninfo = format!(
        "host=localhost port={} user={role} dbname=postgres sslmode=require channel_binding=require",
        proxy.addr.port()
    );

    // channel_binding=require makes libpq refuse unless pgstash offers
    // SCRAM-SHA-256-PLUS and the binding to its certificate checks out.
    let bound = psql(conninfo.clone(), Some("pw"), "select current_user").await;
    assert_eq!(stdout_of(&bound), role);

    let wrong = psql(conninfo, Some("not-pw"), "select current_user").await;
    let stderr = stderr_of(&wrong);
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );

    // Pooled server connections of the role may outlive the proxy for a
    // moment; a role left behind is harmless, so the drop may fail.
    proxy.stop().await;
    let _ = support::direct("postgres")
        .await
        .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_bytes_after_ssl_request_are_refused() {
    let pki = Pki::generate();
    let proxy = TestProxy::start(&client_tls("prefer", &pki)).await;

    // A StartupMessage sent before the answer to the SSLRequest would, if
    // TLS were started, be taken as if it had come through the encrypted
    // channel (the CVE-2021-23214 class of bug). One write, so both
    // packets are there when pgstash looks.
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let mut packets = ssl_request();
    packets.extend_from_slice(&startup_message("postgres", "postgres"));
    stream.write_all(&packets).await.expect("write");
    let received = read_until_closed(&mut stream).await;
    assert_ne!(
        received.first(),
        Some(&b'S'),
        "pgstash agreed to TLS: {received:?}"
    );
    let message = expect_fatal(&received, "08P01");
    assert!(
        message.contains("unexpected data after encryption request"),
        "{message}"
    );

    // mode = prefer still serves plaintext clients that behave.
    let (client, connection) = tokio_postgres::connect(&proxy.conn_str("postgres"), NoTls)
        .await
        .expect("plaintext client after the refusal");
    tokio::spawn(connection);
    let row = client.query_one("SELECT 1", &[]).await.expect("query");
    assert_eq!(row.get::<_, i32>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_needs_alpn() {
    let pki = Pki::generate();
    // mode = require: direct TLS counts as TLS.
    let proxy = TestProxy::start(&client_tls("require", &pki)).await;
    let name = ServerName::try_from("localhost").expect("server name");

    // A Postgres 17 client: TLS at once, no SSLRequest, ALPN "postgresql".
    let tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let mut tls = tls_connector(&pki, true)
        .connect(name.clone(), tcp)
        .await
        .expect("direct TLS handshake with ALPN");
    tls.write_all(&startup_message("postgres", "postgres"))
        .await
        .expect("write startup");
    let mut tags = Vec::new();
    let first = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let mut first = None;
        loop {
            let (tag, body) = read_message(&mut tls).await.expect("read startup reply");
            first.get_or_insert((tag, body));
            tags.push(tag);
            if tag == b'Z' {
                return first;
            }
        }
    })
    .await
    .expect("no ReadyForQuery");
    // AuthenticationOk: auth method trust is the default.
    assert_eq!(first, Some((b'R', vec![0, 0, 0, 0])), "messages: {tags:?}");
    tls.write_all(&[b'X', 0, 0, 0, 4]).await.expect("terminate");

    // Without ALPN the handshake itself succeeds (rustls only refuses a
    // client naming another protocol), so pgstash must refuse afterwards:
    // a TLS client of some other protocol is not a Postgres client.
    let tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let mut tls = tls_connector(&pki, false)
        .connect(name, tcp)
        .await
        .expect("direct TLS handshake without ALPN");
    let received = read_until_closed(&mut tls).await;
    let message = expect_fatal(&received, "08P01");
    assert!(message.contains("ALPN"), "{message}");
}

/// `[upstream]` pointing at `port` with `sslmode`, checking against `ca`.
/// No idle connections are opened in the background, and a refused login
/// is not waited on for long.
fn upstream(port: u16, sslmode: &str, ca: &Path) -> String {
    format!(
        "[upstream]\nhost = \"127.0.0.1\"\nport = {port}\nsslmode = \"{sslmode}\"\n\
         sslrootcert = \"{}\"\nconnect_timeout = \"5s\"\n\n\
         [pool]\nmin_idle = 0\nquery_wait_timeout = \"5s\"\n",
        ca.display()
    )
}

/// Whether the upstream connection serving a query through `proxy` is
/// encrypted, as Postgres sees it.
async fn upstream_ssl(proxy: &TestProxy) -> Result<bool, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(&proxy.conn_str("postgres"), NoTls).await?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

fn sqlstate(error: &tokio_postgres::Error) -> Option<String> {
    error.as_db_error().map(|d| d.code().code().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_verify_full() {
    let pki = Pki::generate();
    // Postgres lets TCP clients in only over TLS, so a query that works
    // through pgstash proves the upstream connection is encrypted.
    let files = [
        ("server.crt", read(&pki.cert)),
        ("server.key", read(&pki.key)),
        (
            "pg_hba.conf",
            b"local all all trust\n\
              hostssl all all 127.0.0.1/32 trust\n\
              host all all 127.0.0.1/32 reject\n"
                .to_vec(),
        ),
    ];
    let cluster = tokio::task::spawn_blocking(move || {
        let files: Vec<(&str, &[u8])> = files.iter().map(|(n, c)| (*n, c.as_slice())).collect();
        Cluster::start_with(
            &files,
            &[
                "ssl = on",
                "ssl_cert_file = 'server.crt'",
                "ssl_key_file = 'server.key'",
            ],
        )
    })
    .await
    .expect("start cluster");
    let port = cluster.port();

    let proxy = TestProxy::start(&upstream(port, "verify-full", &pki.ca)).await;
    let ssl = upstream_ssl(&proxy).await.expect("query over verify-full");
    assert!(ssl, "upstream connection not encrypted");
    proxy.stop().await;

    let proxy = TestProxy::start(&upstream(port, "disable", &pki.ca)).await;
    let error = upstream_ssl(&proxy)
        .await
        .expect_err("plaintext upstream got past pg_hba.conf");
    // Postgres' own refusal ("pg_hba.conf rejects connection"), passed on.
    assert_eq!(sqlstate(&error).as_deref(), Some("28000"), "{error:?}");
    proxy.stop().await;

    let proxy = TestProxy::start(&upstream(port, "require", &pki.ca)).await;
    let ssl = upstream_ssl(&proxy).await.expect("query over require");
    assert!(ssl, "upstream connection not encrypted");
    proxy.stop().await;

    // A certificate from a CA we do not trust must not be accepted.
    let stranger = Pki::generate();
    let proxy = TestProxy::start(&upstream(port, "verify-full", &stranger.ca)).await;
    let error = upstream_ssl(&proxy)
        .await
        .expect_err("verify-full accepted a certificate from another CA");
    assert_eq!(sqlstate(&error).as_deref(), Some("08001"), "{error:?}");
    proxy.stop().await;
}

/// Copies `pki`'s certificate and key over the files pgstash serves.
fn install(pki: &Pki, cert: &Path, key: &Path) {
    std::fs::write(cert, read(&pki.cert)).expect("write live certificate");
    std::fs::write(key, read(&pki.key)).expect("write live key");
}

/// psql's conninfo for `proxy` checking the certificate against `ca`.
fn verify_full(proxy: &TestProxy, ca: &Path) -> String {
    format!(
        "host=localhost port={} user=postgres dbname=postgres \
         sslmode=verify-full sslrootcert={}",
        proxy.addr.port(),
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_reloads_without_restart() {
    let first = Pki::generate();
    let second = Pki::generate();
    let dir = tempfile::Builder::new()
        .prefix("pgstash-reload-")
        .tempdir()
        .expect("create config directory");
    let cert = dir.path().join("live.pem");
    let key = dir.path().join("live.key");
    install(&first, &cert, &key);

    // RELOAD reads the configuration from its file, so the file must hold
    // all of it, not just the [tls] section.
    let text = format!(
        "listen = \"127.0.0.1:0\"\n\n\
         [upstream]\nhost = \"{}\"\nport = {}\n\n\
         [tls]\nmode = \"require\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        support::pg_host(),
        support::pg_port(),
        cert.display(),
        key.display()
    );
    let path = dir.path().join("pgstash.toml");
    std::fs::write(&path, &text).expect("write config file");
    let config = pgstash::config::Config::from_toml_and_env(&text, &[]).expect("config");
    let proxy = TestProxy::start_with(config).await;
    proxy
        .proxy
        .config_path
        .set(path)
        .expect("config path set once");

    let before = psql(verify_full(&proxy, &first.ca), None, "select 1").await;
    assert_eq!(stdout_of(&before), "1");

    // Renewal as certbot and friends do it: new files at the same paths,
    // then a reload; no restart, no dropped listener.
    install(&second, &cert, &key);
    let reloaded = pgstash::admin::console::reload(&proxy.proxy);
    assert!(reloaded.is_ok(), "reload: {reloaded:?}");

    let renewed = psql(verify_full(&proxy, &second.ca), None, "select 1").await;
    assert_eq!(stdout_of(&renewed), "1");
    // Both test CAs are named alike, so OpenSSL takes the old CA for the
    // new certificate's issuer and reports a bad signature ("EVP lib")
    // rather than an unknown issuer; either way the handshake fails.
    let stale = psql(verify_full(&proxy, &first.ca), None, "select 1").await;
    let stderr = stderr_of(&stale);
    assert!(stderr.contains("SSL error"), "{stderr}");

    // A half-written or broken file must not take TLS down: the reload
    // fails and the certificate loaded before stays in service.
    std::fs::write(&cert, "not a certificate\n").expect("write garbage");
    let broken = pgstash::admin::console::reload(&proxy.proxy);
    let error = broken.expect_err("reload accepted a broken certificate");
    assert!(error.contains("live.pem"), "{error}");

    let kept = psql(verify_full(&proxy, &second.ca), None, "select 1").await;
    assert_eq!(stdout_of(&kept), "1");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_mode_serves_plaintext_and_tls_alike() {
    let pki = Pki::generate();
    let proxy = TestProxy::start(&client_tls("allow", &pki)).await;
    let plaintext = format!(
        "host=localhost port={} user=postgres dbname=postgres sslmode=disable",
        proxy.addr.port()
    );
    let encrypted = verify_full(&proxy, &pki.ca);

    for conninfo in [&plaintext, &encrypted] {
        let output = psql(conninfo.clone(), None, "select 1").await;
        assert_eq!(stdout_of(&output), "1", "{conninfo}");
    }

    // \conninfo reports what libpq negotiated, so it tells the two apart
    // from the client's side (pg_stat_ssl would describe the upstream
    // connection, not this one).
    let output = psql(plaintext, None, "\\conninfo").await;
    let conninfo = stdout_of(&output);
    assert!(!conninfo.contains("SSL connection"), "{conninfo}");
    let output = psql(encrypted, None, "\\conninfo").await;
    let conninfo = stdout_of(&output);
    assert!(conninfo.contains("SSL connection"), "{conninfo}");
}
