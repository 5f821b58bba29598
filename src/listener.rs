//! The accept loop: client limits, one task per client, and shutdown —
//! stop accepting, let in-flight transactions finish up to a deadline,
//! then close what is left.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::audit::AuditLog;
use crate::auth::Authenticator;
use crate::cache::Cache;
use crate::config::{Config, Target};
use crate::session::{self, cancel::CancelRegistry};
use crate::tls::ServerTls;
use crate::upstream::connection::UpstreamTls;
use crate::upstream::{Pool, PoolSet};

/// What SHOW CLIENTS tells about one client.
#[derive(Debug)]
pub struct ClientInfo {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub addr: String,
    pub application_name: String,
    pub connected_at: std::time::SystemTime,
    /// Holding a server connection right now.
    pub attached: AtomicBool,
}

/// State every session shares.
pub struct Proxy {
    /// Swapped whole on RELOAD.
    config: arc_swap::ArcSwap<Config>,
    pub pools: Arc<PoolSet>,
    pub cancels: CancelRegistry,
    /// The result cache, when enabled.
    pub cache: Option<Arc<Cache>>,
    clients: AtomicUsize,
    next_client: AtomicU64,
    draining: AtomicBool,
    /// Where the HTTP endpoint listens, once bound.
    pub metrics_addr: OnceLock<SocketAddr>,
    pub client_infos: std::sync::Mutex<std::collections::HashMap<u64, Arc<ClientInfo>>>,
    /// SHUTDOWN from the admin console.
    pub shutdown_requested: tokio::sync::Notify,
    /// The file the configuration came from, for RELOAD.
    pub config_path: OnceLock<std::path::PathBuf>,
    /// TLS and authentication state, rebuilt on RELOAD.
    security: arc_swap::ArcSwap<Security>,
    pub audit: arc_swap::ArcSwap<AuditLog>,
}

/// What the files named in the configuration (certificates, the auth
/// file) were when last loaded.
pub struct Security {
    pub server_tls: Option<Arc<ServerTls>>,
    pub upstream_tls: Option<UpstreamTls>,
    pub authenticator: Authenticator,
}

impl Security {
    pub fn load(config: &Config, previous: Option<&Security>) -> Result<Security, String> {
        let server_tls = crate::tls::load_server(&config.tls).map_err(|e| e.to_string())?;
        let upstream_tls = crate::tls::load_upstream(&config.upstream)
            .map_err(|e| e.to_string())?
            .map(|connector| UpstreamTls {
                connector,
                mode: config.upstream.sslmode,
            });
        let authenticator = Authenticator::load(
            config,
            server_tls.as_ref().map(|t| t.certificate_pem.as_slice()),
            previous.map(|p| &p.authenticator),
        )?;
        Ok(Security {
            server_tls,
            upstream_tls,
            authenticator,
        })
    }
}

impl Proxy {
    /// Fails when a certificate, key or auth file named in the
    /// configuration cannot be loaded.
    pub fn new(config: Config) -> Result<Arc<Proxy>, String> {
        let security = Security::load(&config, None)?;
        let audit = AuditLog::open(&config.audit.destination)
            .map_err(|e| format!("audit.destination {}: {e}", config.audit.destination))?;
        let cache = config
            .cache
            .enabled
            .then(|| Arc::new(Cache::new(config.cache.clone(), config.redis.clone())));
        Ok(Arc::new(Proxy {
            security: arc_swap::ArcSwap::from_pointee(security),
            audit: arc_swap::ArcSwap::from_pointee(audit),
            cache,
            config: arc_swap::ArcSwap::from_pointee(config),
            pools: Arc::new(PoolSet::default()),
            cancels: CancelRegistry::default(),
            clients: AtomicUsize::new(0),
            next_client: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            metrics_addr: OnceLock::new(),
            client_infos: std::sync::Mutex::new(std::collections::HashMap::new()),
            shutdown_requested: tokio::sync::Notify::new(),
            config_path: OnceLock::new(),
        }))
    }

    pub fn security(&self) -> Arc<Security> {
        self.security.load_full()
    }

    /// Reloads certificates, keys, the auth file and the audit log for
    /// `config`; on failure the old ones stay.
    pub fn reload_security(&self, config: &Config) -> Result<(), String> {
        let fresh = Security::load(config, Some(&self.security()))?;
        self.security.store(Arc::new(fresh));
        if self.audit.load().destination() != config.audit.destination {
            let audit = AuditLog::open(&config.audit.destination)
                .map_err(|e| format!("audit.destination {}: {e}", config.audit.destination))?;
            self.audit.store(Arc::new(audit));
        }
        Ok(())
    }

    /// The pool for a target (created on first use).
    pub fn pool_for(&self, config: &Config, target: &Target, client_database: &str) -> Arc<Pool> {
        let security = self.security.load();
        self.pools.get(
            config,
            target,
            client_database,
            security.upstream_tls.as_ref(),
        )
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    pub fn register_client(&self, info: Arc<ClientInfo>) {
        self.client_infos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(info.id, info);
    }

    pub fn unregister_client(&self, id: u64) {
        self.client_infos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    pub fn clients(&self) -> Vec<Arc<ClientInfo>> {
        let mut all: Vec<_> = self
            .client_infos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|c| c.id);
        all
    }

    /// Swaps in a new configuration (RELOAD).
    pub fn replace_config(&self, config: Config) {
        self.config.store(Arc::new(config));
    }

    /// Whether some upstream server accepts TCP connections (for /readyz).
    pub async fn upstream_reachable(&self) -> bool {
        let config = self.config();
        let mut addresses: Vec<(String, u16)> = Vec::new();
        if !config.upstream.host.is_empty() {
            addresses.push((config.upstream.host.clone(), config.upstream.port));
        }
        for db in config.databases.values() {
            let host = db
                .host
                .clone()
                .unwrap_or_else(|| config.upstream.host.clone());
            addresses.push((host, db.port.unwrap_or(config.upstream.port)));
        }
        if addresses.is_empty() {
            return true;
        }
        for (host, port) in addresses {
            let connect = tokio::net::TcpStream::connect((host.as_str(), port));
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), connect).await {
                return true;
            }
        }
        false
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Brings the gauges up to date before they are read.
    pub fn refresh_gauges(&self) {
        let (mut active, mut idle) = (0, 0);
        for pool in self.pools.all() {
            active += pool.active_count();
            idle += pool.idle_count();
        }
        let (entries, bytes) = self
            .cache
            .as_ref()
            .map_or((0, 0), |c| (c.local.entry_count(), c.local.weighted_size()));
        crate::admin::metrics::set_gauges(self.client_count(), active, idle, entries, bytes);
    }

    pub fn next_client_id(&self) -> u64 {
        self.next_client.fetch_add(1, Ordering::Relaxed)
    }
}

/// Counts a client for as long as its task lives.
struct ClientGuard(Arc<Proxy>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Binds the configured address.
pub async fn bind(config: &Config) -> std::io::Result<TcpListener> {
    let addr: SocketAddr = config.listen.parse().map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("listen: {e}"))
    })?;
    TcpListener::bind(addr).await
}

/// Starts a client's session task, counted for as long as it runs.
fn spawn_session(
    sessions: &mut JoinSet<()>,
    proxy: &Arc<Proxy>,
    stop: &watch::Receiver<bool>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    proxy.clients.fetch_add(1, Ordering::Relaxed);
    let guard = ClientGuard(proxy.clone());
    let proxy = proxy.clone();
    let stop = stop.clone();
    sessions.spawn(async move {
        let _guard = guard;
        session::run(stream, peer, proxy, stop).await;
    });
}

/// Serves clients until `shutdown` resolves, then drains.
pub async fn run(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    proxy.pools.spawn_maintenance();
    crate::admin::metrics::install();
    let http = if proxy.config().metrics_listen.is_empty() {
        None
    } else {
        match TcpListener::bind(&proxy.config().metrics_listen).await {
            Ok(l) => {
                if let Ok(addr) = l.local_addr() {
                    let _ = proxy.metrics_addr.set(addr);
                    tracing::info!(%addr, "HTTP endpoint listening");
                }
                Some(tokio::spawn(crate::admin::http::serve(l, proxy.clone())))
            }
            Err(e) => {
                tracing::error!(error = %e, addr = %proxy.config().metrics_listen, "cannot bind the HTTP endpoint");
                None
            }
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut sessions = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: back off
                        // instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                spawn_session(&mut sessions, &proxy, &stop_rx, stream, peer);
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = &mut shutdown => break,
            _ = proxy.shutdown_requested.notified() => break,
        }
    }
    proxy.draining.store(true, Ordering::Relaxed);
    let grace = proxy.config().drain_grace;
    if !grace.is_zero() {
        tracing::info!(
            ?grace,
            "draining: /readyz fails; still accepting during the grace period"
        );
        let until = tokio::time::Instant::now() + grace;
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    if let Ok((stream, peer)) = accepted {
                        spawn_session(&mut sessions, &proxy, &stop_rx, stream, peer);
                    }
                }
                _ = tokio::time::sleep_until(until) => break,
            }
        }
    }
    drop(listener);
    let deadline = proxy.config().shutdown_timeout;
    tracing::info!(clients = sessions.len(), "shutting down: draining clients");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(deadline, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            clients = sessions.len(),
            "shutdown deadline reached; closing remaining clients"
        );
        sessions.abort_all();
        while sessions.join_next().await.is_some() {}
    }
    proxy.pools.close_idle().await;
    if let Some(http) = http {
        http.abort();
    }
    tracing::info!("shutdown complete");
}
