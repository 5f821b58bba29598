//! The accept loop: client limits, one task per client, and shutdown —
//! stop accepting, let in-flight transactions finish up to a deadline,
//! then close what is left.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
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
}

impl Proxy {
    pub fn new(config: Config) -> Arc<Proxy> {
        let cache = config
            .cache
            .enabled
            .then(|| Arc::new(Cache::new(config.cache.clone())));
        Arc::new(Proxy {
            cache,
            config: Arc::new(config),
            pools: Arc::new(PoolSet::default()),
            cancels: CancelRegistry::default(),
            clients: AtomicUsize::new(0),
            next_client: AtomicU64::new(1),
        })
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.clone()
    }

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
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
    tracing::info!("shutdown complete");
}
