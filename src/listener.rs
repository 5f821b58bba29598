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

use crate::cache::Cache;
use crate::config::Config;
use crate::session::{self, cancel::CancelRegistry};
use crate::upstream::PoolSet;

/// State every session shares.
pub struct Proxy {
    config: Arc<Config>,
    pub pools: Arc<PoolSet>,
    pub cancels: CancelRegistry,
    /// The result cache, when enabled.
    pub cache: Option<Arc<Cache>>,
    clients: AtomicUsize,
    next_client: AtomicU64,
    draining: AtomicBool,
    /// Where the HTTP endpoint listens, once bound.
    pub metrics_addr: OnceLock<SocketAddr>,
}

impl Proxy {
    pub fn new(config: Config) -> Arc<Proxy> {
        let cache = config
            .cache
            .enabled
            .then(|| Arc::new(Cache::new(config.cache.clone(), config.redis.clone())));
        Arc::new(Proxy {
            cache,
            config: Arc::new(config),
            pools: Arc::new(PoolSet::default()),
            cancels: CancelRegistry::default(),
            clients: AtomicUsize::new(0),
            next_client: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            metrics_addr: OnceLock::new(),
        })
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.clone()
    }

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
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

/// Serves clients until `shutdown` resolves, then drains.
pub async fn run(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    proxy.pools.spawn_maintenance();
    crate::admin::metrics::install();
    let http = if proxy.config.metrics_listen.is_empty() {
        None
    } else {
        match TcpListener::bind(&proxy.config.metrics_listen).await {
            Ok(l) => {
                if let Ok(addr) = l.local_addr() {
                    let _ = proxy.metrics_addr.set(addr);
                    tracing::info!(%addr, "HTTP endpoint listening");
                }
                Some(tokio::spawn(crate::admin::http::serve(l, proxy.clone())))
            }
            Err(e) => {
                tracing::error!(error = %e, addr = %proxy.config.metrics_listen, "cannot bind the HTTP endpoint");
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
                proxy.clients.fetch_add(1, Ordering::Relaxed);
                let guard = ClientGuard(proxy.clone());
                let proxy = proxy.clone();
                let stop = stop_rx.clone();
                sessions.spawn(async move {
                    let _guard = guard;
                    session::run(stream, peer, proxy, stop).await;
                });
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = &mut shutdown => break,
        }
    }
    proxy.draining.store(true, Ordering::Relaxed);
    drop(listener);
    let deadline = proxy.config.shutdown_timeout;
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
