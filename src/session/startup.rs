//! The startup phase: SSL/GSS negotiation (declined), cancel requests, the
//! StartupMessage, authentication, and the first server checkout that
//! validates the login and the client's startup parameters.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::settings::{self, ClientSettings};
use super::{AfterBatch, Session};
use crate::auth::{self, AuthOutcome};
use crate::config::PoolMode;
use crate::listener::Proxy;
use crate::protocol::messages::{self as msg, Severity};
use crate::protocol::startup::{split_startup, StartupPacket};
use crate::protocol::Outbox;

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
    mut stream: TcpStream,
    id: u64,
    proxy: Arc<Proxy>,
) -> Result<Option<Session>, StartupFailure> {
    let _ = stream.set_nodelay(true);
    let config = proxy.config();
    let deadline = config.startup_timeout;
    let mut buf = BytesMut::with_capacity(1024);
    let outcome = tokio::time::timeout(deadline, read_startup(&mut stream, &mut buf)).await;
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
        Ok(Ok(Some(StartupPacket::Startup(params)))) => {
            if params.get("database").map(String::as_str)
                == Some(crate::admin::console::ADMIN_DATABASE)
            {
                crate::admin::console::serve(stream, buf, &params, proxy).await;
                return Ok(None);
            }
            params
        }
        Ok(Ok(Some(_))) => return Ok(None),
    };
    match start_session(stream, buf, id, proxy, params).await {
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

async fn read_startup(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> Result<Option<StartupPacket>, StartupFailure> {
    loop {
        match split_startup(buf) {
            Ok(Some(StartupPacket::SslRequest | StartupPacket::GssEncRequest)) => {
                if !buf.is_empty() {
                    // Bytes sent before our answer would be read as if they
                    // had come through the encrypted channel.
                    return Err(refused("08P01", "unexpected data after encryption request"));
                }
                stream.write_all(b"N").await?;
            }
            Ok(Some(packet)) => return Ok(Some(packet)),
            Ok(None) => {
                if stream.read_buf(buf).await? == 0 {
                    return Ok(None);
                }
            }
            Err(e) => return Err(refused("08P01", e.to_string())),
        }
    }
}

async fn send_fatal(stream: &mut TcpStream, code: &str, message: &str) {
    let mut out = BytesMut::new();
    msg::error_response(&mut out, Severity::Fatal, code, message);
    let _ = stream.write_all(&out).await;
}

async fn start_session(
    stream: TcpStream,
    client_buf: BytesMut,
    id: u64,
    proxy: Arc<Proxy>,
    params: BTreeMap<String, String>,
) -> Result<Session, (TcpStream, StartupFailure)> {
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
    match auth::authenticate(&database, &user, &mut out) {
        AuthOutcome::Accepted => {}
    }
    let pool = proxy.pools.get(&config, &target, &database);
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
        statements: HashMap::new(),
        settings: client_settings,
        after_batch: AfterBatch::default(),
        cancel_key,
        cancel_slot,
        stop_requested: false,
        database: database.clone(),
        cache_state: Default::default(),
        unnamed: None,
        portal_fills: HashMap::new(),
        batch_clean: false,
        upstream_since: None,
        unsynced: false,
        unnamed_on_server: false,
        info: info.clone(),
        slow_candidate: None,
        portal_analysis: HashMap::new(),
        copy_in: false,
    };
    if mode == PoolMode::Session {
        *session
            .cancel_slot
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(super::cancel::ServerCancel {
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
