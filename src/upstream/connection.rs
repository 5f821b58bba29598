//! One connection to Postgres: connect (over TLS when `sslmode` asks),
//! authenticate with postgres-protocol (cleartext, md5, SCRAM-SHA-256, or
//! SCRAM keys passed through from the client), then read and write raw
//! frames.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::scram::{KeyedScramClient, ScramKeys};
use crate::config::Target;
use crate::protocol::frame::{split_frame, Frame, FrameError};
use crate::protocol::messages::{self as msg, error_fields};
use crate::tls::{MaybeTls, ServerStream, UpstreamSslMode};
use crate::FastSet;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connection to {0} timed out")]
    ConnectTimeout(String),
    #[error("server connection lost: {0}")]
    Io(#[from] std::io::Error),
    /// Postgres refused us with an ErrorResponse; the SQLSTATE is kept so a
    /// client sees the same error it would have seen connecting directly.
    #[error("{message}")]
    Server { code: String, message: String },
    #[error("protocol violation from server: {0}")]
    Protocol(String),
    #[error("server requires a password for user {0:?} and none is configured")]
    NoPassword(String),
    #[error("TLS to {addr}: {message}")]
    Tls { addr: String, message: String },
}

/// How pgstash proves a user's identity to Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamSecret {
    Password(String),
    /// `md5…` as stored by Postgres: enough to answer an MD5 challenge.
    Md5Hash(String),
    /// Recovered from a client's SCRAM exchange against the same verifier.
    ScramKeys(ScramKeys),
}

/// TLS towards Postgres.
#[derive(Clone)]
pub struct UpstreamTls {
    pub connector: tokio_rustls::TlsConnector,
    pub mode: UpstreamSslMode,
}

/// Everything a new server connection needs besides its target.
pub struct ConnectOptions<'a> {
    pub secret: Option<&'a UpstreamSecret>,
    pub tls: Option<&'a UpstreamTls>,
    pub connect_timeout: Duration,
    pub max_message_size: usize,
}

impl UpstreamError {
    /// Failures of the server itself (count towards the circuit breaker and
    /// are retried), as opposed to Postgres refusing this login.
    pub fn is_transient(&self) -> bool {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::ConnectTimeout(_)
            | UpstreamError::Io(_) => true,
            // 57P03: starting up / shutting down; 53300: too many connections.
            UpstreamError::Server { code, .. } => code == "57P03" || code == "53300",
            _ => false,
        }
    }

    pub fn sqlstate(&self) -> &str {
        match self {
            UpstreamError::Server { code, .. } => code,
            UpstreamError::NoPassword(_) => "28P01",
            UpstreamError::Tls { .. } => "08001",
            UpstreamError::Protocol(_) => "08P01",
            _ => "08006",
        }
    }
}

impl From<FrameError> for UpstreamError {
    fn from(e: FrameError) -> Self {
        UpstreamError::Protocol(e.to_string())
    }
}

/// An authenticated server connection and what pgstash knows about its
/// session state.
pub struct ServerConn {
    pub id: u64,
    stream: ServerStream,
    pub read_buf: BytesMut,
    max_message_size: usize,
    /// ParameterStatus values reported at startup.
    pub startup_params: Vec<(String, String)>,
    /// The server's BackendKeyData, where a CancelRequest for it must go.
    pub cancel_key: (i32, i32),
    pub cancel_addr: String,
    /// Settings that differ from this connection's startup defaults, as
    /// values Postgres reports (lowercase names).
    pub settings: BTreeMap<String, String>,
    /// The client id and settings version last applied here, to skip
    /// comparing settings when the same client comes back unchanged.
    pub applied_for: Option<(u64, u64)>,
    /// Server-side prepared statements (pgstash's shared names).
    pub prepared: FastSet<u128>,
    pub created: Instant,
    pub last_used: Instant,
    /// Set when the connection's state is unknown; it is then closed
    /// instead of returning to the pool.
    pub broken: bool,
}

const INTERNAL_TIMEOUT: Duration = Duration::from_secs(5);

/// The result of a statement pgstash runs for itself.
#[derive(Debug, Default)]
pub struct InternalResult {
    pub rows: Vec<Vec<Option<String>>>,
    pub error: Option<(String, String)>,
    pub parameter_status: Vec<(String, String)>,
}

impl ServerConn {
    pub async fn connect(
        id: u64,
        target: &Target,
        options: ConnectOptions<'_>,
    ) -> Result<ServerConn, UpstreamError> {
        let addr = format!("{}:{}", target.host, target.port);
        let connect_timeout = options.connect_timeout;
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(addr.clone()))?
            .map_err(|source| UpstreamError::Connect {
                addr: addr.clone(),
                source,
            })?;
        stream.set_nodelay(true)?;
        let stream = match options.tls {
            Some(tls) => tokio::time::timeout(
                connect_timeout,
                negotiate_tls(stream, tls, &target.host, &addr),
            )
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(addr.clone()))??,
            None => MaybeTls::Plain(stream),
        };
        let mut conn = ServerConn {
            id,
            stream,
            read_buf: BytesMut::with_capacity(16 * 1024),
            max_message_size: options.max_message_size,
            startup_params: Vec::new(),
            cancel_key: (0, 0),
            cancel_addr: addr.clone(),
            settings: BTreeMap::new(),
            applied_for: None,
            prepared: FastSet::default(),
            created: Instant::now(),
            last_used: Instant::now(),
            broken: false,
        };
        tokio::time::timeout(connect_timeout, conn.startup(target, options.secret))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(addr))??;
        Ok(conn)
    }

    async fn startup(
        &mut self,
        target: &Target,
        secret: Option<&UpstreamSecret>,
    ) -> Result<(), UpstreamError> {
        let password = match secret {
            Some(UpstreamSecret::Password(p)) => Some(p.as_str()),
            _ => None,
        };
        let no_secret = || UpstreamError::NoPassword(target.user.clone());
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", target.user.as_str()),
                ("database", target.database.as_str()),
            ],
            &mut out,
        )?;
        self.write_all(&out).await?;
        let mut scram: Option<sasl::ScramSha256> = None;
        let mut keyed: Option<KeyedScramClient> = None;
        loop {
            let message = self.read_backend_message().await?;
            out.clear();
            match message {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    let pw =
                        password.ok_or_else(|| UpstreamError::NoPassword(target.user.clone()))?;
                    frontend::password_message(pw.as_bytes(), &mut out)?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let hash = match secret {
                        Some(UpstreamSecret::Password(pw)) => {
                            md5_hash(target.user.as_bytes(), pw.as_bytes(), body.salt())
                        }
                        Some(UpstreamSecret::Md5Hash(stored)) => {
                            crate::auth::md5_response(stored, &body.salt())
                        }
                        _ => return Err(no_secret()),
                    };
                    frontend::password_message(hash.as_bytes(), &mut out)?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut supported = false;
                    while let Some(m) = fallible_iterator::FallibleIterator::next(&mut mechanisms)?
                    {
                        supported |= m == sasl::SCRAM_SHA_256;
                    }
                    if !supported {
                        return Err(UpstreamError::Protocol(
                            "server offers no SASL mechanism pgstash supports".into(),
                        ));
                    }
                    match secret {
                        Some(UpstreamSecret::Password(pw)) => {
                            let client = sasl::ScramSha256::new(
                                pw.as_bytes(),
                                sasl::ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(
                                sasl::SCRAM_SHA_256,
                                client.message(),
                                &mut out,
                            )?;
                            scram = Some(client);
                        }
                        Some(UpstreamSecret::ScramKeys(keys)) => {
                            let client = KeyedScramClient::new(keys.clone());
                            frontend::sasl_initial_response(
                                sasl::SCRAM_SHA_256,
                                client.client_first().as_bytes(),
                                &mut out,
                            )?;
                            keyed = Some(client);
                        }
                        _ => return Err(no_secret()),
                    }
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    if let Some(client) = keyed.as_mut() {
                        let answer = client
                            .client_final(body.data())
                            .map_err(UpstreamError::Protocol)?;
                        frontend::sasl_response(answer.as_bytes(), &mut out)?;
                    } else {
                        let client = scram.as_mut().ok_or_else(|| {
                            UpstreamError::Protocol("unexpected SASL continue".into())
                        })?;
                        client.update(body.data())?;
                        frontend::sasl_response(client.message(), &mut out)?;
                    }
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    if let Some(client) = keyed.as_ref() {
                        client
                            .verify_server_final(body.data())
                            .map_err(UpstreamError::Protocol)?;
                    } else {
                        let client = scram.as_mut().ok_or_else(|| {
                            UpstreamError::Protocol("unexpected SASL final".into())
                        })?;
                        client.finish(body.data())?;
                    }
                }
                backend::Message::ParameterStatus(body) => {
                    self.startup_params
                        .push((body.name()?.to_owned(), body.value()?.to_owned()));
                }
                backend::Message::BackendKeyData(body) => {
                    self.cancel_key = (body.process_id(), body.secret_key());
                }
                backend::Message::NoticeResponse(_) => {}
                backend::Message::ErrorResponse(body) => {
                    let mut code = String::new();
                    let mut message = String::new();
                    let mut fields = body.fields();
                    while let Some(f) = fallible_iterator::FallibleIterator::next(&mut fields)? {
                        match f.type_() {
                            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                            _ => {}
                        }
                    }
                    return Err(UpstreamError::Server { code, message });
                }
                backend::Message::ReadyForQuery(_) => return Ok(()),
                _ => {
                    return Err(UpstreamError::Protocol(
                        "unexpected message during startup".into(),
                    ))
                }
            }
            if !out.is_empty() {
                self.write_all(&out).await?;
            }
        }
    }

    async fn read_backend_message(&mut self) -> Result<backend::Message, UpstreamError> {
        loop {
            if let Some(message) = backend::Message::parse(&mut self.read_buf)? {
                return Ok(message);
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(UpstreamError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    pub fn stream(&mut self) -> &mut ServerStream {
        &mut self.stream
    }

    /// Splits the next buffered frame, if a whole one is there.
    pub fn next_buffered_frame(&mut self) -> Result<Option<Frame>, UpstreamError> {
        Ok(split_frame(&mut self.read_buf, self.max_message_size)?)
    }

    /// Reads one frame, waiting for the network as needed.
    pub async fn read_frame(&mut self) -> Result<Frame, UpstreamError> {
        loop {
            if let Some(frame) = self.next_buffered_frame()? {
                return Ok(frame);
            }
            reserve_for_read(&mut self.read_buf);
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(UpstreamError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<(), UpstreamError> {
        self.stream.write_all(bytes).await?;
        // A TLS stream may keep the last record buffered until flushed.
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads whatever the server has sent into the frame buffer.
    pub async fn read_more(&mut self) -> std::io::Result<usize> {
        reserve_for_read(&mut self.read_buf);
        self.stream.read_buf(&mut self.read_buf).await
    }

    /// Writes client traffic while still draining the server's answers.
    ///
    /// A long pipeline or a big COPY can fill both directions' socket
    /// buffers; a server blocked on writing to us stops reading, and a
    /// plain write would then wait forever.
    pub async fn write_while_reading(&mut self, data: &[u8]) -> Result<(), UpstreamError> {
        reserve_for_read(&mut self.read_buf);
        match &mut self.stream {
            MaybeTls::Plain(stream) => {
                let (reader, writer) = stream.split();
                write_draining(reader, writer, data, &mut self.read_buf).await
            }
            MaybeTls::Tls(stream) => {
                let (reader, writer) = tokio::io::split(stream.as_mut());
                write_draining(reader, writer, data, &mut self.read_buf).await?;
                self.stream.flush().await?;
                Ok(())
            }
        }
    }
}

async fn write_draining<R, W>(
    mut reader: R,
    mut writer: W,
    data: &[u8],
    read_buf: &mut BytesMut,
) -> Result<(), UpstreamError>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut written = 0;
    while written < data.len() {
        tokio::select! {
            biased;
            n = writer.write(&data[written..]) => {
                let n = n?;
                if n == 0 {
                    return Err(UpstreamError::Io(std::io::ErrorKind::WriteZero.into()));
                }
                written += n;
            }
            n = reader.read_buf(read_buf), if read_buf.capacity() > read_buf.len() => {
                if n? == 0 {
                    return Err(UpstreamError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
            }
        }
    }
    Ok(())
}

impl ServerConn {
    /// Runs a statement of pgstash's own and reads its whole answer. Only
    /// called while no client traffic is in flight on this connection.
    pub async fn run_internal(&mut self, sql: &str) -> Result<InternalResult, UpstreamError> {
        self.run_internal_with(sql, &[]).await
    }

    /// `run_internal` with text parameters ($1, $2, …), sent apart from the
    /// statement so they need no quoting.
    pub async fn run_internal_with(
        &mut self,
        sql: &str,
        params: &[&str],
    ) -> Result<InternalResult, UpstreamError> {
        // A server that never answers (one still skipping to a Sync, say)
        // must not hold its pool slot forever.
        match tokio::time::timeout(INTERNAL_TIMEOUT, self.run_internal_unbounded(sql, params)).await
        {
            Ok(result) => result,
            Err(_) => {
                self.broken = true;
                Err(UpstreamError::Protocol(
                    "no answer to an internal statement".into(),
                ))
            }
        }
    }

    async fn run_internal_unbounded(
        &mut self,
        sql: &str,
        params: &[&str],
    ) -> Result<InternalResult, UpstreamError> {
        let mut out = BytesMut::new();
        if params.is_empty() {
            frontend::query(sql, &mut out)?;
        } else {
            frontend::parse("", sql, std::iter::empty(), &mut out)?;
            frontend::bind(
                "",
                "",
                std::iter::empty(),
                params.iter(),
                |value, buf| {
                    buf.extend_from_slice(value.as_bytes());
                    Ok(postgres_protocol::IsNull::No)
                },
                std::iter::empty(),
                &mut out,
            )
            .map_err(|_| UpstreamError::Protocol("cannot encode parameters".into()))?;
            frontend::execute("", 0, &mut out)?;
            frontend::sync(&mut out);
        }
        self.write_all(&out).await?;
        let mut result = InternalResult::default();
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                msg::DATA_ROW => result.rows.push(decode_text_row(frame.body())),
                msg::ERROR_RESPONSE => result.error = Some(error_fields(frame.body())),
                msg::PARAMETER_STATUS => {
                    if let Some(pair) = msg::parameter_status_fields(frame.body()) {
                        result.parameter_status.push(pair);
                    }
                }
                msg::READY_FOR_QUERY => {
                    if msg::ready_status(&frame.raw) != b'I' {
                        self.broken = true;
                    }
                    return Ok(result);
                }
                _ => {}
            }
        }
    }

    /// Whether an idle connection is still open, without a round trip: an
    /// idle server sends nothing, so anything readable (an EOF, or the
    /// FATAL Postgres sends when it shuts down) means it is gone.
    pub fn is_open(&mut self) -> bool {
        self.stream.is_quiet()
    }

    /// Checks that an idle connection still answers.
    pub async fn ping(&mut self) -> bool {
        matches!(self.run_internal(";").await, Ok(r) if r.error.is_none()) && !self.broken
    }

    pub async fn terminate(mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = tokio::time::timeout(Duration::from_millis(100), self.write_all(&out)).await;
    }
}

/// Asks Postgres for TLS (SSLRequest) and performs the handshake.
async fn negotiate_tls(
    mut stream: TcpStream,
    tls: &UpstreamTls,
    host: &str,
    addr: &str,
) -> Result<ServerStream, UpstreamError> {
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    stream.write_all(&request).await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    let tls_error = |message: String| UpstreamError::Tls {
        addr: addr.to_owned(),
        message,
    };
    match answer[0] {
        b'S' => {}
        b'N' if tls.mode == UpstreamSslMode::Prefer => return Ok(MaybeTls::Plain(stream)),
        b'N' => return Err(tls_error("server does not support TLS".into())),
        other => {
            return Err(tls_error(format!(
                "unexpected answer {other:#x} to SSLRequest"
            )))
        }
    }
    let name = crate::tls::server_name(host).map_err(|e| tls_error(e.to_string()))?;
    let stream = tls
        .connector
        .connect(name, stream)
        .await
        .map_err(|e| tls_error(e.to_string()))?;
    Ok(MaybeTls::Tls(Box::new(stream)))
}

/// Room for one sizeable read. A full BytesMut would otherwise be grown
/// 64 bytes at a time, one syscall each.
pub fn reserve_for_read(buf: &mut BytesMut) {
    const READ_CHUNK: usize = 16 * 1024;
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

fn decode_text_row(body: &[u8]) -> Vec<Option<String>> {
    let mut body = body;
    let Some(count) = crate::protocol::frame::get_i16(&mut body) else {
        return Vec::new();
    };
    let mut row = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count {
        let Some(len) = crate::protocol::frame::get_i32(&mut body) else {
            break;
        };
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = (len as usize).min(body.len());
        row.push(Some(String::from_utf8_lossy(&body[..len]).into_owned()));
        body = &body[len..];
    }
    row
}
