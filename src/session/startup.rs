//! The startup phase: TLS (after an SSLRequest, or direct with ALPN),
//! cancel requests, the StartupMessage, client authentication, and the
//! first server checkout that validates the login and the client's startup
//! parameters.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::settings::{self, ClientSettings};
use super::{AfterBatch, Session};
use crate::audit::{AuditEvent, AuditSubject};
use crate::auth::{LoginError, LoginOk, LoginRequest};
use crate::config::{ClientTlsMode, PoolMode};
use crate::listener::{Proxy, Security};
use crate::protocol::messages::{self as msg, Severity};
use crate::protocol::startup::{split_startup, StartupPacket};
use crate::protocol::Outbox;
use crate::tls::{ClientStream, MaybeTls, ALPN_POSTGRESQL, TLS_HANDSHAKE_RECORD};
use crate::FastMap;

#[derive(Debug, thiserror::Error)]
pub enum StartupFailure {
    #[error("client i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{code}: {message}")]
    Refused { code: String, message: String },
    #[error("startup timed out")]
    Timeout,
}

fn refused(code: &str, message: impl Into<String>) -> StartupFailure {
    StartupFailure::Refused {
        code: code.to_owned(),
        message: message.into(),
    }
}

/// Runs the startup phase. `Ok(None)`: the connection had no session to
/// serve (a cancel request, or a client that went away).
pub async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    proxy: Arc<Proxy>,
) -> Result<Option<Session>, StartupFailure> {
    let _ = stream.set_nodelay(true);
    let config = proxy.config();
    let security = proxy.security();
    let deadline = config.startup_timeout;
    let mut buf = BytesMut::with_capacity(1024);
    // The stream is held here, not in the timed future, so a client that
    // times out can still be told why.
    let mut slot = Some(MaybeTls::Plain(stream));
    let outcome = tokio::time::timeout(
        deadline,
        read_startup(&mut slot, &mut buf, &security, config.tls.mode),
    )
    .await;
    let Some(mut stream) = slot else {
        return Err(StartupFailure::Timeout);
    };
    let params = match outcome {
        Err(_) => {
            send_fatal(&mut stream, "08P01", "pgstash: startup timed out").await;
            return Err(StartupFailure::Timeout);
        }
        Ok(Err(StartupFailure::Refused { code, message })) => {
            send_fatal(&mut stream, &code, &message).await;
            return Err(StartupFailure::Refused { code, message });
        }
        Ok(Err(e)) => return Err(e),
        Ok(Ok(None)) => return Ok(None),
        Ok(Ok(Some(StartupPacket::Cancel { pid, secret }))) => {
            proxy.cancels.cancel((pid, secret)).await;
            return Ok(None);
        }
        Ok(Ok(Some(StartupPacket::Startup(params)))) => params,
        Ok(Ok(Some(_))) => return Ok(None),
    };
    let login = tokio::time::timeout(
        deadline,
        log_in(&mut stream, &mut buf, &params, peer, &proxy, &security),
    )
    .await;
    let login = match login {
        Ok(Ok(login)) => login,
        Ok(Err(LoginError::Io(e))) => return Err(StartupFailure::Io(e)),
        Ok(Err(LoginError::Refused { code, message })) => {
            tracing::info!(code, message, "login refused");
            send_fatal(&mut stream, code, &message).await;
            return Err(refused(code, message));
        }
        Err(_) => {
            send_fatal(&mut stream, "08P01", "pgstash: authentication timed out").await;
            return Err(StartupFailure::Timeout);
        }
    };
    if params.get("database").map(String::as_str) == Some(crate::admin::console::ADMIN_DATABASE) {
        crate::admin::console::serve(stream, buf, &params, proxy).await;
        return Ok(None);
    }
    match start_session(stream, buf, id, proxy, params, login).await {
        Ok(session) => Ok(Some(session)),
        Err((mut stream, failure)) => {
            if let StartupFailure::Refused { code, message } = &failure {
                tracing::info!(code, message, "login refused");
                send_fatal(&mut stream, code, message).await;
            }
            Err(failure)
        }
    }
}

/// Reads up to the StartupMessage (or CancelRequest), answering encryption
/// requests on the way and switching `slot` to TLS when one is accepted.
async fn read_startup(
    slot: &mut Option<ClientStream>,
    buf: &mut BytesMut,
    security: &Security,
    mode: ClientTlsMode,
) -> Result<Option<StartupPacket>, StartupFailure> {
    let tls = security
        .server_tls
        .as_ref()
        .filter(|_| mode != ClientTlsMode::Disable);
    if let (Some(tls), Some(MaybeTls::Plain(tcp))) = (tls, slot.as_ref()) {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await? == 1 && first[0] == TLS_HANDSHAKE_RECORD {
            start_tls(slot, tls, true).await?;
        }
    }
    loop {
        let Some(stream) = slot.as_mut() else {
            return Ok(None);
        };
        match split_startup(buf) {
            Ok(Some(StartupPacket::SslRequest)) => {
                if !buf.is_empty() {
                    // Bytes sent before our answer would be read as if they
                    // had come through the encrypted channel.
                    return Err(refused("08P01", "unexpected data after encryption request"));
                }
                match tls {
                    Some(tls) if !stream.is_tls() => {
                        stream.write_all(b"S").await?;
                        stream.flush().await?;
                        start_tls(slot, tls, false).await?;
                    }
                    _ if stream.is_tls() => {
                        return Err(refused("08P01", "SSLRequest on an encrypted connection"))
                    }
                    _ => stream.write_all(b"N").await?,
                }
            }
            Ok(Some(StartupPacket::GssEncRequest)) => {
                if !buf.is_empty() {
                    return Err(refused("08P01", "unexpected data after encryption request"));
                }
                stream.write_all(b"N").await?;
                stream.flush().await?;
            }
            Ok(Some(StartupPacket::Startup(_)))
                if mode == ClientTlsMode::Require && !stream.is_tls() =>
            {
                return Err(refused(
                    "28000",
                    "pgstash requires TLS (tls.mode = require): connect with sslmode=require",
                ));
            }
            Ok(Some(packet)) => return Ok(Some(packet)),
            Ok(None) => {
                if stream.read_some(buf).await? == 0 {
                    return Ok(None);
                }
            }
            Err(e) => return Err(refused("08P01", e.to_string())),
        }
    }
}

/// The TLS handshake; a direct-TLS client must have asked for ALPN
/// "postgresql" (as Postgres 17 requires), so that a TLS client for some
/// other protocol is not taken for a Postgres one.
async fn start_tls(
    slot: &mut Option<ClientStream>,
    tls: &crate::tls::ServerTls,
    direct: bool,
) -> Result<(), StartupFailure> {
    let Some(MaybeTls::Plain(tcp)) = slot.take() else {
        return Err(refused("08P01", "TLS requested twice"));
    };
    let stream = tls.acceptor.accept(tcp).await?;
    let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    *slot = Some(MaybeTls::Tls(Box::new(stream)));
    if direct && alpn.as_deref() != Some(ALPN_POSTGRESQL) {
        return Err(refused(
            "08P01",
            "direct TLS connection without ALPN protocol \"postgresql\"",
        ));
    }
    Ok(())
}

async fn send_fatal(stream: &mut ClientStream, code: &str, message: &str) {
    let mut out = BytesMut::new();
    msg::error_response(&mut out, Severity::Fatal, code, message);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
}

/// Authenticates the client named by its startup parameters and records
/// the outcome in the audit log.
async fn log_in(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    params: &BTreeMap<String, String>,
    peer: SocketAddr,
    proxy: &Proxy,
    security: &Security,
) -> Result<LoginOk, LoginError> {
    let Some(user) = params.get("user") else {
        return Err(LoginError::Refused {
            code: "28000",
            message: "no PostgreSQL user name specified in startup packet".into(),
        });
    };
    let database = params.get("database").unwrap_or(user);
    let tls = stream.is_tls();
    let request = LoginRequest {
        proxy,
        authenticator: &security.authenticator,
        database,
        user,
        address: peer.ip(),
        tls,
    };
    let result = crate::auth::authenticate(stream, buf, &request).await;
    match &result {
        Ok(_) => crate::admin::metrics::login("success"),
        Err(LoginError::Refused { .. }) => crate::admin::metrics::login("failure"),
        Err(LoginError::Io(_)) => {}
    }
    let audit = proxy.audit.load();
    if audit.enabled() && !matches!(result, Err(LoginError::Io(_))) {
        let client_addr = peer.to_string();
        let subject = AuditSubject {
            client_addr: &client_addr,
            user,
            database,
        };
        let method = match &result {
            Ok(ok) => crate::auth::method_name(ok.method),
            Err(_) => request
                .authenticator
                .method_name_for(database, user, peer.ip()),
        };
        let reason = match &result {
            Err(LoginError::Refused { message, .. }) => Some(message.as_str()),
            _ => None,
        };
        let event = AuditEvent::Login {
            outcome: if result.is_ok() { "success" } else { "failure" },
            method,
            reason,
            tls,
        };
        audit.record(&subject, &event);
    }
    result
}

async fn start_session(
    stream: ClientStream,
    client_buf: BytesMut,
    id: u64,
    proxy: Arc<Proxy>,
    params: BTreeMap<String, String>,
    login: LoginOk,
) -> Result<Session, (ClientStream, StartupFailure)> {
    let config = proxy.config();
    let Some(user) = params.get("user").cloned() else {
        return Err((
            stream,
            refused(
                "28000",
                "no PostgreSQL user name specified in startup packet",
            ),
        ));
    };
    let database = params
        .get("database")
        .cloned()
        .unwrap_or_else(|| user.clone());
    if params.contains_key("replication") {
        return Err((
            stream,
            refused("0A000", "pgstash does not support replication connections"),
        ));
    }
    if proxy.client_count() > config.max_client_conn {
        return Err((stream, refused("53300", "sorry, too many clients already")));
    }
    let Some(target) = config.target(&database, &user) else {
        return Err((
            stream,
            refused("3D000", format!("database \"{database}\" does not exist")),
        ));
    };
    let mut out = BytesMut::new();
    msg::authentication_ok(&mut out);
    let pool = proxy.pool_for(&config, &target, &database);
    if let Some(secret) = login.upstream {
        pool.learn_secret(secret);
    }
    let mut client_settings = ClientSettings::from_startup(&params);
    // Checking out a server now validates the login and the startup
    // parameters, and gives the ParameterStatus values the client expects.
    let mut server = match pool.acquire().await {
        Ok(server) => server,
        Err(e) => return Err((stream, refused(e.sqlstate(), format!("pgstash: {e}")))),
    };
    match settings::apply(&mut server, id, &mut client_settings).await {
        Ok(None) => {}
        Ok(Some((code, message))) => return Err((stream, refused(&code, message))),
        Err(e) => {
            server.broken = true;
            return Err((stream, refused(e.sqlstate(), format!("pgstash: {e}"))));
        }
    }
    let reported: HashMap<String, &String> = client_settings
        .current
        .iter()
        .map(|(k, v)| (k.clone(), v))
        .collect();
    for (name, value) in &server.startup_params {
        let value = reported
            .get(&name.to_ascii_lowercase())
            .map_or(value.as_str(), |v| v.as_str());
        msg::parameter_status(&mut out, name, value);
    }
    let (cancel_key, cancel_slot) = proxy.cancels.register();
    msg::backend_key_data(&mut out, cancel_key.0, cancel_key.1);
    msg::ready_for_query(&mut out, b'I');
    let mode = config.pool.mode;
    let info = Arc::new(crate::listener::ClientInfo {
        id,
        user: user.clone(),
        database: database.clone(),
        addr: stream
            .tcp()
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        application_name: params.get("application_name").cloned().unwrap_or_default(),
        connected_at: std::time::SystemTime::now(),
        attached: std::sync::atomic::AtomicBool::new(mode == PoolMode::Session),
    });
    proxy.register_client(info.clone());
    pool.clients
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut session = Session {
        id,
        proxy: proxy.clone(),
        client: stream,
        client_buf,
        out: Outbox::default(),
        server_out: BytesMut::new(),
        pool,
        server: None,
        mode,
        pending: VecDeque::new(),
        tx_status: b'I',
        pinned: (mode == PoolMode::Session).then_some("session pool mode"),
        discard_until_sync: false,
        statements: FastMap::default(),
        settings: client_settings,
        after_batch: AfterBatch::default(),
        cancel_key,
        cancel_slot,
        stop_requested: false,
        database: database.clone(),
        cache_state: Default::default(),
        unnamed: None,
        portal_fills: FastMap::default(),
        batch_clean: false,
        upstream_since: None,
        unsynced: false,
        unnamed_on_server: false,
        info: info.clone(),
        slow_candidate: None,
        portal_analysis: FastMap::default(),
        copy_in: false,
    };
    if mode == PoolMode::Session {
        session.cancel_slot.attach(super::cancel::ServerCancel {
            addr: server.cancel_addr.clone(),
            pid: server.cancel_key.0,
            secret: server.cancel_key.1,
        });
        session.server = Some(server);
    } else {
        drop(server);
    }
    session.out.push(out);
    if let Err(e) = session.out.flush_to(&mut session.client).await {
        proxy.cancels.unregister(session.cancel_key);
        proxy.unregister_client(id);
        session
            .pool
            .clients
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        return Err((session.client, StartupFailure::Io(e)));
    }
    Ok(session)
}
