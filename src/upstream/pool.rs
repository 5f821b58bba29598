//! Pools of server connections, one per upstream (database, user).
//!
//! A semaphore bounds the connections a pool may have open; idle ones wait
//! in a LIFO stack so the warmest connection is reused first. Connection
//! failures are retried with exponential backoff and jitter until the
//! client's wait deadline, and a run of failures opens a circuit that fails
//! clients fast until a probe connection succeeds again.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::connection::{ConnectOptions, ServerConn, UpstreamError, UpstreamSecret, UpstreamTls};
use crate::config::{Config, PoolConfig, Target};
use crate::FastSet;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("timed out waiting for a server connection (query_wait_timeout)")]
    WaitTimeout,
    #[error("upstream unavailable, failing fast: {0}")]
    CircuitOpen(String),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl PoolError {
    pub fn sqlstate(&self) -> &str {
        match self {
            PoolError::WaitTimeout => "08P01",
            PoolError::CircuitOpen(_) => "57P03",
            PoolError::Upstream(e) => e.sqlstate(),
        }
    }
}

/// Traffic counters for SHOW STATS (PgBouncer's meanings).
#[derive(Debug, Default)]
pub struct PoolStats {
    pub queries: AtomicU64,
    pub xacts: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub wait_us: AtomicU64,
}

/// Counts consecutive connect failures; while open, only one probe at a
/// time may try to connect.
#[derive(Default)]
struct Circuit {
    failures: u32,
    open_until: Option<Instant>,
    last_error: String,
}

pub struct Pool {
    pub target: Target,
    /// `target` without the user: where this pool's catalog is kept.
    pub catalog_key: Target,
    /// How pgstash logs in as this pool's user: from the configuration, or
    /// learnt from a client that proved the user's password.
    secret: arc_swap::ArcSwapOption<UpstreamSecret>,
    secret_configured: bool,
    tls: Option<UpstreamTls>,
    settings: PoolConfig,
    connect_timeout: Duration,
    max_message_size: usize,
    size: AtomicUsize,
    permits: Arc<Semaphore>,
    /// Clients of this pool, and those waiting for a server now.
    pub clients: AtomicUsize,
    pub waiting: AtomicUsize,
    pub stats: PoolStats,
    /// PAUSE: no new transaction starts until RESUME.
    paused: tokio::sync::watch::Sender<bool>,
    /// RECONNECT: connections from an older generation are closed when
    /// they come back.
    generation: AtomicU64,
    idle: Mutex<Vec<ServerConn>>,
    circuit: Mutex<Circuit>,
    /// Statements Postgres has accepted on some connection of this pool.
    known_statements: Mutex<FastSet<u128>>,
    next_id: Arc<AtomicU64>,
}

impl Pool {
    /// Lends a server connection, connecting a new one if none is idle.
    pub async fn acquire(self: &Arc<Self>) -> Result<PooledConn, PoolError> {
        let deadline = Instant::now() + self.settings.query_wait_timeout;
        let started = Instant::now();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = self.wait_for_permit(deadline).await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        self.stats
            .wait_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let permit = permit?;
        while let Some(mut conn) = self.pop_idle() {
            if conn.created.elapsed() >= self.settings.server_lifetime {
                tokio::spawn(conn.terminate());
                continue;
            }
            if !conn.is_open() {
                continue;
            }
            if conn.last_used.elapsed() >= self.settings.server_check_delay && !conn.ping().await {
                continue;
            }
            return Ok(self.lend(conn, permit));
        }
        let conn = self.connect_with_backoff(deadline).await?;
        Ok(self.lend(conn, permit))
    }

    async fn wait_for_permit(&self, deadline: Instant) -> Result<OwnedSemaphorePermit, PoolError> {
        let mut paused = self.paused.subscribe();
        tokio::time::timeout_at(deadline.into(), async {
            while *paused.borrow_and_update() {
                if paused.changed().await.is_err() {
                    break;
                }
            }
            self.permits.clone().acquire_owned().await
        })
        .await
        .map_err(|_| PoolError::WaitTimeout)?
        .map_err(|_| PoolError::WaitTimeout)
    }

    pub fn pause(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Closes idle connections now and the others when they come back.
    pub fn reconnect(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Changes the pool size; connections above it close as they return.
    pub fn resize(&self, size: usize) {
        let old = self.size.swap(size, Ordering::Relaxed);
        if size > old {
            self.permits.add_permits(size - old);
        } else if size < old {
            let permits = self.permits.clone();
            let shrink = old - size;
            // Permits in use are taken back as they are released.
            tokio::spawn(async move {
                if let Ok(p) = permits.acquire_many_owned(shrink as u32).await {
                    p.forget();
                }
            });
        }
    }

    pub fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    /// Remembers how a client proved this pool's user, for logging in to
    /// Postgres as that user when the configuration holds no password.
    pub fn learn_secret(&self, secret: UpstreamSecret) {
        if self.secret_configured {
            return;
        }
        if self.secret.load().as_deref() != Some(&secret) {
            self.secret.store(Some(Arc::new(secret)));
        }
    }

    pub fn circuit_is_open(&self) -> bool {
        let circuit = self.circuit.lock().unwrap_or_else(|e| e.into_inner());
        circuit
            .open_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// Idle connections: (id, age, idle for).
    pub fn idle_servers(&self) -> Vec<(u64, Duration, Duration)> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.iter()
            .map(|c| (c.id, c.created.elapsed(), c.last_used.elapsed()))
            .collect()
    }

    fn lend(self: &Arc<Self>, conn: ServerConn, permit: OwnedSemaphorePermit) -> PooledConn {
        PooledConn {
            conn: Some(conn),
            pool: self.clone(),
            generation: self.generation.load(Ordering::Relaxed),
            _permit: permit,
        }
    }

    fn pop_idle(&self) -> Option<ServerConn> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    async fn connect_with_backoff(&self, deadline: Instant) -> Result<ServerConn, PoolError> {
        let mut backoff = Duration::from_millis(25);
        loop {
            self.check_circuit()?;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let secret = self.secret.load_full();
            let options = ConnectOptions {
                secret: secret.as_deref(),
                tls: self.tls.as_ref(),
                connect_timeout: self.connect_timeout,
                max_message_size: self.max_message_size,
            };
            let result = ServerConn::connect(id, &self.target, options).await;
            match result {
                Ok(conn) => {
                    self.record_success();
                    return Ok(conn);
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(target = %self.target.host, error = %e, "server connect failed");
                    self.record_failure(&e);
                    let jitter = rand::thread_rng().gen_range(0..=backoff.as_millis() as u64 / 2);
                    let pause = backoff + Duration::from_millis(jitter);
                    if Instant::now() + pause >= deadline {
                        return Err(PoolError::Upstream(e));
                    }
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(PoolError::Upstream(e)),
            }
        }
    }

    fn check_circuit(&self) -> Result<(), PoolError> {
        let mut circuit = self.circuit.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(until) = circuit.open_until {
            if Instant::now() < until {
                return Err(PoolError::CircuitOpen(circuit.last_error.clone()));
            }
            // Half-open: let this attempt through as the probe and hold the
            // others off for another period in case it fails too.
            circuit.open_until = Some(Instant::now() + self.settings.circuit_open_for);
        }
        Ok(())
    }

    fn record_failure(&self, error: &UpstreamError) {
        let mut circuit = self.circuit.lock().unwrap_or_else(|e| e.into_inner());
        circuit.failures += 1;
        circuit.last_error = error.to_string();
        if circuit.failures >= self.settings.circuit_failures {
            if circuit.open_until.is_none() {
                tracing::error!(target = %self.target.host, "circuit opened after {} failures", circuit.failures);
            }
            circuit.open_until = Some(Instant::now() + self.settings.circuit_open_for);
        }
    }

    fn record_success(&self) {
        let mut circuit = self.circuit.lock().unwrap_or_else(|e| e.into_inner());
        if circuit.open_until.is_some() {
            tracing::info!(target = %self.target.host, "circuit closed: upstream is back");
        }
        *circuit = Circuit::default();
    }

    pub fn is_known_statement(&self, id: u128) -> bool {
        self.known_statements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
    }

    pub fn remember_statement(&self, id: u128) {
        let mut known = self
            .known_statements
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Bounded: an application generating endless distinct statements
        // only loses the shortcut, never correctness.
        if known.len() >= 100_000 {
            known.clear();
        }
        known.insert(id);
    }

    /// After DDL a statement that was valid may not be any more.
    pub fn forget_statements(&self) {
        self.known_statements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Closes connections idle too long or too old, and tops the pool up to
    /// `min_idle`.
    async fn maintain(self: &Arc<Self>) {
        let now = Instant::now();
        let expired: Vec<ServerConn> = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let min_idle = self.settings.min_idle.min(self.size());
            let mut keep = Vec::with_capacity(idle.len());
            let mut expired = Vec::new();
            // The stack's bottom holds the least recently used connections.
            for conn in idle.drain(..) {
                let too_old = now.duration_since(conn.created) >= self.settings.server_lifetime;
                let idle_too_long =
                    now.duration_since(conn.last_used) >= self.settings.idle_timeout;
                if too_old || (idle_too_long && keep.len() + expired.len() >= min_idle) {
                    expired.push(conn);
                } else {
                    keep.push(conn);
                }
            }
            *idle = keep;
            expired
        };
        for conn in expired {
            conn.terminate().await;
        }
        let idle_count = self.idle.lock().unwrap_or_else(|e| e.into_inner()).len();
        // Idle connections hold no permit: count the lent ones too, so the
        // pool never grows past its size.
        let open = idle_count + self.active_count();
        if idle_count < self.settings.min_idle.min(self.size())
            && open < self.size()
            && self.check_circuit().is_ok()
        {
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                if let Ok(conn) = self
                    .connect_with_backoff(Instant::now() + self.connect_timeout)
                    .await
                {
                    drop(self.lend(conn, permit));
                }
            }
        }
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn active_count(&self) -> usize {
        self.size().saturating_sub(self.permits.available_permits())
    }
}

/// A server connection on loan. Dropping it gives the connection back to
/// its pool, or closes it when its state is unknown.
pub struct PooledConn {
    conn: Option<ServerConn>,
    pool: Arc<Pool>,
    generation: u64,
    // Released after the connection is back on the idle stack, so a woken
    // waiter finds it there.
    _permit: OwnedSemaphorePermit,
}

impl PooledConn {
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Deref for PooledConn {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        self.conn.as_ref().expect("connection present until drop")
    }
}

impl DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn.as_mut().expect("connection present until drop")
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if conn.broken
            || !conn.read_buf.is_empty()
            || self.generation != self.pool.generation.load(Ordering::Relaxed)
        {
            return;
        }
        conn.last_used = Instant::now();
        self.pool
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }
}

/// Every pool, keyed by upstream target; created on first use.
pub struct PoolSet {
    pools: Mutex<HashMap<Target, Arc<Pool>>>,
    next_id: Arc<AtomicU64>,
}

impl Default for PoolSet {
    fn default() -> Self {
        PoolSet {
            pools: Mutex::new(HashMap::new()),
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }
}

impl PoolSet {
    pub fn get(
        &self,
        config: &Config,
        target: &Target,
        client_database: &str,
        tls: Option<&UpstreamTls>,
    ) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(target.clone())
            .or_insert_with(|| {
                let size = config.pool_size_for(client_database, &target.user);
                let secret = config.upstream_secret_for(&target.user);
                Arc::new(Pool {
                    target: target.clone(),
                    catalog_key: crate::cache::catalog_key(target),
                    secret_configured: secret.is_some(),
                    secret: arc_swap::ArcSwapOption::from_pointee(secret),
                    tls: tls.cloned(),
                    settings: config.pool.clone(),
                    connect_timeout: config.upstream.connect_timeout,
                    max_message_size: config.max_message_size,
                    size: AtomicUsize::new(size),
                    permits: Arc::new(Semaphore::new(size)),
                    clients: AtomicUsize::new(0),
                    waiting: AtomicUsize::new(0),
                    stats: PoolStats::default(),
                    paused: tokio::sync::watch::Sender::new(false),
                    generation: AtomicU64::new(0),
                    idle: Mutex::new(Vec::new()),
                    circuit: Mutex::new(Circuit::default()),
                    known_statements: Mutex::new(FastSet::default()),
                    next_id: self.next_id.clone(),
                })
            })
            .clone()
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Runs pool upkeep every second until the set is dropped.
    pub fn spawn_maintenance(self: &Arc<Self>) {
        let weak: Weak<PoolSet> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(set) = weak.upgrade() else { return };
                for pool in set.all() {
                    pool.maintain().await;
                }
            }
        });
    }

    /// Closes every idle connection (on shutdown).
    pub async fn close_idle(&self) {
        for pool in self.all() {
            let conns: Vec<ServerConn> =
                std::mem::take(&mut *pool.idle.lock().unwrap_or_else(|e| e.into_inner()));
            for conn in conns {
                conn.terminate().await;
            }
        }
    }
}
