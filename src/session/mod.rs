//! One task per client: startup, then frames relayed between the client
//! and whichever server connection it holds.
//!
//! In transaction mode a server belongs to the client from the first
//! message of a transaction until ReadyForQuery reports idle with nothing
//! else in flight. The `pending` queue mirrors, in order, the responses the
//! client is owed; it lets pgstash answer some messages itself (a Parse the
//! server already knows, a Close of a shared statement) at exactly the
//! place in the stream where Postgres would have answered.

mod backend;
mod batch_cache;
mod caching;
pub mod cancel;
mod frontend;
pub mod settings;
mod startup;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::tls::ClientStream;
use tokio::sync::watch;
use tracing::Instrument;

use crate::config::PoolMode;
use crate::listener::Proxy;
use crate::protocol::messages::{self as msg, Severity};
use crate::protocol::Outbox;
use crate::sql::analyze::Analysis;
use crate::sql::effects::{PinReason, SessionEffects};
use crate::upstream::pool::Pool;
use crate::upstream::{PooledConn, UpstreamError};
use crate::FastMap;
use caching::{CacheSession, Fill, WriteSet};
use cancel::CancelSlot;
use settings::ClientSettings;

/// A named statement as the client prepared it, under the shared name it
/// has on every server connection.
#[derive(Debug)]
pub struct Statement {
    pub id: u128,
    pub server_name: Vec<u8>,
    pub query: Vec<u8>,
    pub param_types: Vec<u32>,
    pub effects: SessionEffects,
    /// Present when the cache is on.
    pub analysis: Option<Arc<Analysis>>,
}

/// A response the client is owed, in the order it is owed.
#[derive(Debug)]
enum Expect {
    /// ParseComplete. `shown` is false for a Parse pgstash injected itself;
    /// `prepared` and `client_name` are undone if the Parse fails.
    Parse {
        shown: bool,
        prepared: Option<u128>,
        client_name: Option<Vec<u8>>,
    },
    Bind,
    /// CloseComplete; `shown` is false for a Close pgstash sent itself.
    Close {
        shown: bool,
    },
    /// `capture`: the RowDescription goes with the fill of the Execute
    /// that follows.
    Describe {
        capture: bool,
    },
    /// An Execute; its writes are recorded when it completes, and a
    /// cacheable one carries the fill capturing its rows.
    Execute {
        writes: Option<Box<WriteSet>>,
        fill: Option<Box<Fill>>,
    },
    Sync,
    /// A simple Query; a cacheable read carries the fill capturing it.
    Query {
        fill: Option<Box<Fill>>,
        writes: Option<Box<WriteSet>>,
    },
    FunctionCall,
    /// Bytes pgstash composed, due once everything before them is delivered.
    Local(BytesMut),
    /// A ReadyForQuery pgstash answers itself with the status current then.
    LocalReady,
    /// Where the client ended a COPY; no response of its own. Syncs sent
    /// between the start of a COPY FROM STDIN and its end are ignored by
    /// Postgres, and this marks where that stretch ends.
    CopyEnd,
}

impl Expect {
    fn is_sync_point(&self) -> bool {
        matches!(
            self,
            Expect::Sync | Expect::Query { .. } | Expect::FunctionCall | Expect::LocalReady
        )
    }
}

/// Whether the session goes on after handling an event.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("client connection: {0}")]
    Client(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(String),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// Deferred effects that apply once the batch that caused them is done.
#[derive(Debug, Default)]
struct AfterBatch {
    reset_all: bool,
    discard_all: bool,
    deallocate_all: bool,
    reset: Vec<String>,
    error_seen: bool,
    /// Postgres said a shared statement's plan is stale.
    stale_statements: bool,
}

pub struct Session {
    id: u64,
    proxy: Arc<Proxy>,
    client: ClientStream,
    client_buf: BytesMut,
    out: Outbox,
    server_out: BytesMut,
    pool: Arc<Pool>,
    server: Option<PooledConn>,
    mode: PoolMode,
    pending: VecDeque<Expect>,
    tx_status: u8,
    pinned: Option<PinReason>,
    /// After an error pgstash raised itself mid-batch, client messages are
    /// dropped until Sync, as Postgres does.
    discard_until_sync: bool,
    statements: FastMap<Vec<u8>, Arc<Statement>>,
    settings: ClientSettings,
    after_batch: AfterBatch,
    cancel_key: (i32, i32),
    cancel_slot: CancelSlot,
    stop_requested: bool,
    /// The client's database name, as rules name it.
    database: String,
    cache_state: CacheSession,
    /// The analysis behind the unnamed statement and each portal, so an
    /// Execute knows what it writes.
    unnamed: Option<Arc<Statement>>,
    portal_analysis: FastMap<Vec<u8>, Arc<Analysis>>,
    /// Keys for portals whose results may be captured.
    portal_fills: FastMap<Vec<u8>, batch_cache::PortalFill>,
    /// The batch being received started with nothing in flight, outside a
    /// transaction, and has run only cacheable reads so far.
    batch_clean: bool,
    /// Extended-protocol messages went to the server since its last Sync.
    unsynced: bool,
    /// The attached server holds the client's unnamed statement.
    unnamed_on_server: bool,
    info: Arc<crate::listener::ClientInfo>,
    /// The literal-free text of the statement in flight, kept only when the
    /// slow-query log is on.
    slow_candidate: Option<String>,
    /// When the oldest request now in flight was written upstream.
    upstream_since: Option<std::time::Instant>,
    /// The server is in COPY FROM STDIN and ignores Sync until the client
    /// sends CopyDone or CopyFail.
    copy_in: bool,
}

/// Serves one client connection from accept to close.
pub async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    shutdown: watch::Receiver<bool>,
) {
    let id = proxy.next_client_id();
    let span = tracing::info_span!("client", id, %peer);
    async move {
        // Boxed: the session's state machine is deep, and the task that
        // spawns it should not have to carry its layout.
        let session = match Box::pin(startup::accept(stream, peer, id, proxy.clone())).await {
            Ok(Some(session)) => session,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "startup failed");
                return;
            }
        };
        tracing::debug!("client ready");
        Box::pin(session.serve(shutdown)).await;
    }
    .instrument(span)
    .await
}

impl Session {
    async fn serve(mut self, mut shutdown: watch::Receiver<bool>) {
        self.stop_requested = *shutdown.borrow();
        let result = self.serve_loop(&mut shutdown).await;
        match &result {
            Ok(()) => {}
            Err(SessionError::Protocol(message)) => {
                let mut out = BytesMut::new();
                msg::error_response(&mut out, Severity::Fatal, "08P01", message);
                self.out.push(out);
                let _ = self.out.flush_to(&mut self.client).await;
            }
            Err(e) => tracing::debug!(error = %e, "session ended"),
        }
        self.finish().await;
    }

    async fn serve_loop(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        // A client may send its first queries together with its startup.
        if !self.client_buf.is_empty() && self.on_client_input().await? == Flow::Stop {
            return Ok(());
        }
        loop {
            if self.stop_requested && self.is_between_transactions() {
                let mut out = BytesMut::new();
                msg::error_response(
                    &mut out,
                    Severity::Fatal,
                    "57P01",
                    "terminating connection due to administrator command",
                );
                self.out.push(out);
                self.out.flush_to(&mut self.client).await?;
                return Ok(());
            }
            tokio::select! {
                read = self.client.read_some(&mut self.client_buf) => {
                    if read? == 0 {
                        return Ok(());
                    }
                    let flow = self.on_client_input().await?;
                    // A plaintext client's buffer is only allocated once it
                    // has sent something, so an idle one holds none. A TLS
                    // read needs room up front, so its buffer is kept
                    // rather than allocated again for every message.
                    if self.client_buf.is_empty() && !self.client.is_tls() {
                        self.client_buf = BytesMut::new();
                    }
                    if flow == Flow::Stop {
                        return Ok(());
                    }
                }
                read = read_server(&mut self.server), if self.server.is_some() => {
                    match read {
                        Ok(0) => self.on_server_lost(UpstreamError::Io(std::io::ErrorKind::UnexpectedEof.into())).await?,
                        Ok(_) => self.on_server_input().await?,
                        Err(e) => self.on_server_lost(e.into()).await?,
                    }
                }
                _ = shutdown.changed(), if !self.stop_requested => {
                    self.stop_requested = true;
                }
            }
        }
    }

    /// The client's search_path as set in its session ("" for the default).
    fn search_path(&self) -> &str {
        self.settings
            .current
            .get("search_path")
            .map_or("", String::as_str)
    }

    /// Remembers a statement's shape for the slow-query log.
    fn note_statement(&mut self, text: &[u8]) {
        if !self.proxy.config().slow_query_threshold.is_zero() && self.slow_candidate.is_none() {
            let text = String::from_utf8_lossy(text);
            self.slow_candidate = Some(crate::sql::fingerprint::normalized(&text));
        }
        let audit = self.proxy.audit.load();
        if audit.enabled() {
            let text = String::from_utf8_lossy(text);
            if let Some(kind) = crate::audit::statement_kind(&text) {
                let subject = crate::audit::AuditSubject {
                    client_addr: &self.info.addr,
                    user: &self.info.user,
                    database: &self.info.database,
                };
                let fingerprint = crate::sql::fingerprint::normalized(&text);
                audit.record(
                    &subject,
                    &crate::audit::AuditEvent::Statement {
                        kind,
                        fingerprint: &fingerprint,
                    },
                );
            }
        }
    }

    fn is_between_transactions(&self) -> bool {
        self.pending.is_empty() && self.tx_status == b'I' && !self.unsynced && !self.copy_in
    }

    /// Answers `bytes` now if nothing is owed before them, else in turn.
    fn push_local(&mut self, bytes: BytesMut) {
        if self.pending.is_empty() {
            self.out.push(bytes);
        } else {
            self.pending.push_back(Expect::Local(bytes));
        }
    }

    fn push_local_ready(&mut self) {
        if self.pending.is_empty() {
            let mut out = BytesMut::new();
            msg::ready_for_query(&mut out, self.tx_status);
            self.out.push(out);
        } else {
            self.pending.push_back(Expect::LocalReady);
        }
    }

    /// An ErrorResponse of pgstash's own, in its place in the stream.
    fn push_error(&mut self, code: &str, message: &str) {
        let mut out = BytesMut::new();
        msg::error_response(&mut out, Severity::Error, code, message);
        self.push_local(out);
    }

    /// Takes a server connection from the pool if the client has none, and
    /// brings its settings in line with the client's.
    async fn ensure_attached(&mut self) -> Result<(), (String, String)> {
        if self.server.is_some() {
            return Ok(());
        }
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| (e.sqlstate().to_owned(), format!("pgstash: {e}")))?;
        match settings::apply(&mut conn, self.id, &mut self.settings).await {
            Ok(None) => {}
            Ok(Some(error)) => return Err(error),
            Err(e) => {
                conn.broken = true;
                return Err((e.sqlstate().to_owned(), format!("pgstash: {e}")));
            }
        }
        self.info
            .attached
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.cancel_slot.attach(cancel::ServerCancel {
            addr: conn.cancel_addr.clone(),
            pid: conn.cancel_key.0,
            secret: conn.cancel_key.1,
        });
        self.server = Some(conn);
        // A fresh checkout is idle: the moment to (re)load the catalog, so
        // that writes of the transaction starting now can be resolved.
        if self.proxy.cache.is_some() {
            self.load_catalog().await;
        }
        Ok(())
    }

    fn detach(&mut self) {
        self.unsynced = false;
        self.unnamed_on_server = false;
        self.info
            .attached
            .store(false, std::sync::atomic::Ordering::Relaxed);
        if self.cancel_slot.detach() {
            if let Some(server) = self.server.as_mut() {
                server.broken = true;
            }
        }
        self.server = None;
    }

    /// At the end of a batch, with the server idle: apply deferred effects,
    /// read back changed settings and, in transaction mode, give the server
    /// back.
    async fn on_batch_end(&mut self) -> Result<(), SessionError> {
        if !self.is_between_transactions() {
            return Ok(());
        }
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let after = std::mem::take(&mut self.after_batch);
        if after.error_seen && (after.discard_all || after.reset_all || after.deallocate_all) {
            // Which statement failed is unknown, so neither is the server's
            // state: let it go rather than guess.
            server.broken = true;
        }
        if after.discard_all {
            server.prepared.clear();
            self.statements.clear();
            if self.mode == PoolMode::Transaction {
                self.pinned = None;
            }
        }
        if after.deallocate_all {
            server.prepared.clear();
        }
        if after.stale_statements && !server.broken {
            // Every shared statement here may be planned for an old schema.
            match server.run_internal("DEALLOCATE ALL").await {
                Ok(r) if r.error.is_none() => server.prepared.clear(),
                _ => server.broken = true,
            }
        }
        if after.discard_all || after.reset_all {
            server.settings.clear();
            server.applied_for = None;
            self.settings.reset_all();
        }
        for name in after.reset {
            server.settings.remove(&name);
            server.applied_for = None;
            self.settings.reset(&name);
        }
        if !server.broken {
            settings::read_back(server, &mut self.settings).await?;
            if let Some((code, message)) =
                settings::apply(server, self.id, &mut self.settings).await?
            {
                tracing::warn!(code, message, "restoring client settings failed");
            }
        }
        let keep = self.mode == PoolMode::Session || self.pinned.is_some();
        let broken = server.broken;
        if keep && !broken && self.proxy.cache.is_some() {
            self.load_catalog().await;
        }
        if !keep || broken {
            if keep {
                // The server this client relied on is gone; so is its
                // session state, which the client cannot get back.
                return Err(SessionError::Protocol(
                    "server session state was lost".into(),
                ));
            }
            self.detach();
        }
        Ok(())
    }

    /// The server went away under the client.
    async fn on_server_lost(&mut self, error: UpstreamError) -> Result<(), SessionError> {
        tracing::warn!(error = %error, "server connection lost");
        if let Some(server) = self.server.as_mut() {
            server.broken = true;
        }
        self.detach();
        let keeps_state =
            self.mode == PoolMode::Session || self.pinned.is_some() || self.tx_status != b'I';
        if keeps_state {
            // The client's transaction or session state is gone with the
            // server; carrying on would run its next statements outside the
            // transaction it thinks it is in.
            let mut out = BytesMut::new();
            msg::error_response(
                &mut out,
                Severity::Fatal,
                "08006",
                &format!("pgstash: {error}"),
            );
            self.out.push(out);
            self.out.flush_to(&mut self.client).await?;
            return Err(SessionError::Upstream(error));
        }
        // Autocommit work in flight failed; each pending sync point gets an
        // error and a ReadyForQuery, and the client may go on. Writes in
        // flight may or may not have committed: publish them as if they had.
        for expect in self.pending.iter_mut() {
            if let Expect::Query { writes, .. } | Expect::Execute { writes, .. } = expect {
                if let Some(w) = writes.take() {
                    self.cache_state.tx_writes.merge(*w);
                }
            }
        }
        self.on_transaction_boundary(b'I').await;
        let mut error_sent = false;
        let message = format!("pgstash: {error}");
        while let Some(expect) = self.pending.pop_front() {
            match expect {
                Expect::Local(bytes) => self.out.push(bytes),
                e if e.is_sync_point() => {
                    if !error_sent && !matches!(e, Expect::LocalReady) {
                        let mut out = BytesMut::new();
                        msg::error_response(&mut out, Severity::Error, "08006", &message);
                        self.out.push(out);
                    }
                    let mut out = BytesMut::new();
                    msg::ready_for_query(&mut out, b'I');
                    self.out.push(out);
                    error_sent = false;
                }
                _ => {
                    if !error_sent {
                        let mut out = BytesMut::new();
                        msg::error_response(&mut out, Severity::Error, "08006", &message);
                        self.out.push(out);
                        error_sent = true;
                    }
                }
            }
        }
        if error_sent {
            self.discard_until_sync = true;
        }
        self.out.flush_to(&mut self.client).await?;
        Ok(())
    }

    /// Leaves the server connection clean for its next user, or closes it.
    async fn finish(mut self) {
        self.proxy.cancels.unregister(self.cancel_key);
        self.proxy.unregister_client(self.id);
        self.pool
            .clients
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let Some(mut server) = self.server.take() else {
            return;
        };
        // A cancel still on its way must not reach the server's next user.
        if self.cancel_slot.detach() || !self.pending.is_empty() {
            server.broken = true;
            return;
        }
        if self.tx_status != b'I' {
            match server.run_internal("ROLLBACK").await {
                Ok(r) if r.error.is_none() => {}
                _ => server.broken = true,
            }
        }
        if !server.broken && (self.mode == PoolMode::Session || self.pinned.is_some()) {
            match server.run_internal("DISCARD ALL").await {
                Ok(r) if r.error.is_none() => {
                    server.prepared.clear();
                    server.settings.clear();
                    server.applied_for = None;
                }
                _ => server.broken = true,
            }
        }
    }
}

async fn read_server(server: &mut Option<PooledConn>) -> std::io::Result<usize> {
    match server.as_mut() {
        Some(conn) => conn.read_more().await,
        None => std::future::pending().await,
    }
}
