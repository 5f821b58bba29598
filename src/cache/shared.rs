//! The shared tier: Redis holds the table generations every pgstash agrees
//! on, results keyed under the generations they were filled with, and the
//! channel that tells every pgstash when a write moved a generation.
//!
//! Redis is an accelerator, never a dependency: every command has a short
//! timeout, failures open a circuit during which Redis is not asked at all,
//! and callers fall back to pass-through (or the local tier) on any error.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, RedisResult, Value};
use xxhash_rust::xxh3::xxh3_64;

use super::admission::FirstFills;
use super::busy_poll::{AwaitingReply, BusyPoll};
use super::generations::Snapshot;
use super::presence::Presence;
use crate::clock::{coarse_ms, COARSE_SLACK_MS};
use crate::config::RedisConfig;

/// INCR every generation key and announce the new values, in one round
/// trip and atomically. ARGV[3] is the publish command: SPUBLISH on a
/// cluster, whose shard channel shares the generation keys' hash slot.
const BUMP_SCRIPT: &str = r"
local out = {}
for i, k in ipairs(KEYS) do out[i] = redis.call('INCR', k) end
redis.call(ARGV[3], ARGV[1], ARGV[2] .. '|' .. table.concat(out, ','))
return out
";

/// On a cluster, the hash tag every generation key and both bus channels
/// carry: they live in one slot, so a bump's INCRs and its sharded
/// publish run in one script on one master, and one shard subscription
/// hears every bump and announcement. Results carry no tag and spread
/// over every master. A single Redis (or Sentinel) keeps the layout it
/// has always had.
const BUS_TAG: &str = "{bus}";

/// Stored values start with this (the last byte is the format version);
/// anything else in our key space is not ours and is never served.
const MAGIC: &[u8; 4] = b"PGS2";
/// The previous format (no flags byte, never compressed): still read, so
/// instances of both versions can share a Redis during an upgrade.
const MAGIC_V1: &[u8; 4] = b"PGS1";
/// Magic, checksum, creation time, flags, row description length.
const HEADER_LEN: usize = 4 + 8 + 8 + 1 + 4;
/// Flag: the payload is LZ4 block data with its length prepended.
const COMPRESSED: u8 = 1;
/// Larger payloads are stored as they are, and a compressed payload
/// claiming to expand beyond this is refused: a value that passes the
/// checksum (which guards against corruption, not forgery) still cannot
/// make this process allocate more.
const MAX_EXPANDED: usize = 64 << 20;

enum Connection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Clone for Connection {
    fn clone(&self) -> Self {
        match self {
            Connection::Single(c) => Connection::Single(c.clone()),
            Connection::Cluster(c) => Connection::Cluster(c.clone()),
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("redis circuit open")]
    CircuitOpen,
    #[error("redis timed out")]
    Timeout,
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("malformed reply from redis")]
    Reply,
    /// The batch this lookup went out in failed.
    #[error("{0}")]
    Batch(String),
}

/// Consecutive failures, counted so that one stall is one failure: a
/// command that was already in flight when the last failure was recorded
/// failed in the same moment as that one (a stall of Redis, or of this
/// process, times out every lookup in flight together). A Redis that stays
/// down or silent fails the commands sent after each failure too, and
/// opens the circuit after `circuit_failures` of them in a row.
#[derive(Default)]
struct Circuit {
    failures: u32,
    last_failure: Option<Instant>,
    open_until: Option<Instant>,
}

impl Circuit {
    /// Records a failure of a command sent at `sent`; true when it opens
    /// the circuit (or keeps it open) for `open_for`.
    fn fail(&mut self, sent: Instant, threshold: u32, open_for: Duration) -> bool {
        let now = Instant::now();
        if self.last_failure.is_none_or(|last| sent >= last) {
            self.failures += 1;
            self.last_failure = Some(now);
        }
        if self.failures < threshold {
            return false;
        }
        self.open_until = Some(now + open_for);
        true
    }
}

/// `tokio::time::timeout` for a Redis command, except that a reply already
/// received when the timer fires still counts. When this process has been
/// kept off the CPU for longer than `limit` (a busy node), the reply and
/// the timer come due in the same turn of the runtime, and the timer's
/// task may run before the connection's task has read the reply: one
/// yield lets it, and the command is asked once more.
async fn within<F: std::future::Future>(
    limit: Duration,
    command: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut command = std::pin::pin!(command);
    if let Ok(done) = tokio::time::timeout(limit, command.as_mut()).await {
        return Ok(done);
    }
    tokio::task::yield_now().await;
    tokio::time::timeout(Duration::ZERO, command).await
}

/// A Redis command run `within` its limit, its latency recorded: the
/// outcome, and when the command was sent (which the circuit counts by).
async fn timed<F: std::future::Future>(
    limit: Duration,
    command: F,
) -> (Result<F::Output, tokio::time::error::Elapsed>, Instant) {
    let sent = Instant::now();
    let outcome = within(limit, command).await;
    crate::admin::metrics::redis_latency(sent.elapsed());
    (outcome, sent)
}

/// Counters for the admin console and tests.
#[derive(Debug, Default)]
pub struct SharedStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub errors: AtomicU64,
    pub corrupt: AtomicU64,
    pub bumps_sent: AtomicU64,
    pub bumps_received: AtomicU64,
    /// Results written to Redis (counted when Redis acknowledged them).
    pub stored: AtomicU64,
    /// Lookups that skipped Redis: no instance had announced the entry.
    pub skipped: AtomicU64,
    /// Entries other instances announced.
    pub announced: AtomicU64,
    /// Times the bus was (re)subscribed and resynchronised.
    pub subscriptions: AtomicU64,
    /// MGETs that carried lookups (each may carry many).
    pub lookup_batches: AtomicU64,
    /// Fills not stored (yet) because `admit = "reuse"` waits for a
    /// result to be read again.
    pub deferred: AtomicU64,
}

pub struct SharedTier {
    config: RedisConfig,
    urls: Vec<String>,
    connection: Mutex<Option<Connection>>,
    connecting: tokio::sync::Mutex<()>,
    circuit: Mutex<Circuit>,
    bump_script: redis::Script,
    /// The subscription is up and the generations held locally were re-read
    /// after it (re)started: only then may the local tier be trusted.
    pub bus_healthy: AtomicBool,
    /// When anything last arrived on the bus (`coarse_ms`).
    last_heard: AtomicU64,
    /// Signalled whenever anything arrives on the bus.
    heard: tokio::sync::Notify,
    pub stats: SharedStats,
    /// Stores waiting for the write-behind task, which sends them in
    /// batches: a fill's client never waits for Redis, and many fills cost
    /// one round trip.
    pending_puts: Option<tokio::sync::mpsc::Sender<PendingPut>>,
    /// Entries known to be in Redis (announced on the bus).
    pub presence: Presence,
    /// Tells this instance's announcements from the others'.
    instance: [u8; 8],
    /// Lookups waiting to go out together (single Redis or Sentinel).
    lookups: Mutex<Vec<PendingLookup>>,
    /// Keeps the worker polling while lookups' replies are due
    /// (`busy_poll`).
    busy_poll: Option<Arc<BusyPoll>>,
    /// With `admit = "reuse"`: fills waiting for a second one.
    first_fills: Option<FirstFills>,
}

type LookupReply = Result<Option<Vec<u8>>, SharedError>;

/// One GET waiting for its batch.
struct PendingLookup {
    key: String,
    reply: tokio::sync::oneshot::Sender<LookupReply>,
}

/// The lookup that found the queue empty sends the batch; if it is
/// dropped first (its client left), the batch is sent from a task of its
/// own so the others are not left waiting.
struct BatchLeader<'a> {
    tier: &'a Arc<SharedTier>,
    sent: bool,
}

impl Drop for BatchLeader<'_> {
    fn drop(&mut self) {
        if self.sent {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let tier = self.tier.clone();
                runtime.spawn(async move { tier.send_lookups().await });
            }
            // No runtime to send from: the waiting lookups are answered
            // (with an error, so they miss) rather than left queued.
            Err(_) => drop(std::mem::take(
                &mut *self.tier.lookups.lock().unwrap_or_else(|e| e.into_inner()),
            )),
        }
    }
}

/// One SET waiting to be sent. Its key and value are built by the
/// write-behind task, off the path of the client whose query filled it.
struct PendingPut {
    key: u128,
    generations: u64,
    stored: StoredResult,
    ttl: Duration,
    /// When the result was filled (µs since the epoch): its age counts
    /// from here, not from when the batch went out.
    filled_at: u64,
}

impl PendingPut {
    fn id(&self) -> u128 {
        entry_id_of(self.key, self.generations)
    }
}

/// Writes `bytes` into `out` as lowercase hex, two digits each.
fn write_hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
}

/// An entry's identity: its key and the generations it was filled under
/// (`SharedTier::entry_id_of_key` reads it back from a Redis key).
fn entry_id_of(key: u128, generations: u64) -> u128 {
    key ^ u128::from(generations)
}

/// Stores queued beyond this are dropped (a lost store is only a miss for
/// another instance later). Room for a burst of fills while a batch waits
/// out `PUT_LINGER` and the next is acknowledged: a value's buffers are
/// shared with the local tier, so a queued store costs about 100 bytes.
const PENDING_PUTS: usize = 16384;
const PUT_BATCH: usize = 256;
/// How long the first store of a batch waits for others. Each batch costs
/// both sides a write, a read, a reply, an announcement and its delivery
/// to every instance; at a few thousand misses a second, 50 ms makes that
/// a few percent of each store (at 2 ms it was some 40 % of what Redis
/// spent per store).
/// Another instance finds an entry up to this much later, which only
/// costs it a miss.
const PUT_LINGER: Duration = Duration::from_millis(50);
/// Pauses between retries of a failed step of the presence scan.
const SCAN_RETRY_FIRST: Duration = Duration::from_millis(50);
const SCAN_RETRY_MAX: Duration = Duration::from_secs(2);

impl Drop for SharedTier {
    fn drop(&mut self) {
        if let Some(poll) = &self.busy_poll {
            poll.stop();
        }
    }
}

impl SharedTier {
    pub fn new(config: RedisConfig) -> Arc<SharedTier> {
        let urls = config
            .url
            .split(',')
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        let (sender, receiver) = tokio::sync::mpsc::channel(PENDING_PUTS);
        let runtime = tokio::runtime::Handle::try_current().ok();
        let tier = Arc::new(SharedTier {
            pending_puts: runtime.is_some().then_some(sender),
            presence: Presence::new(config.presence_capacity),
            instance: rand::random(),
            lookups: Mutex::new(Vec::new()),
            busy_poll: BusyPoll::start(config.busy_poll),
            first_fills: (config.admit == "reuse").then(FirstFills::default),
            config,
            urls,
            connection: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            circuit: Mutex::new(Circuit::default()),
            bump_script: redis::Script::new(BUMP_SCRIPT),
            bus_healthy: AtomicBool::new(false),
            last_heard: AtomicU64::new(0),
            heard: tokio::sync::Notify::new(),
            stats: SharedStats::default(),
        });
        if let Some(runtime) = runtime {
            runtime.spawn(write_behind(Arc::downgrade(&tier), receiver));
        }
        tier
    }

    /// Time spent polling for lookups' replies (`busy_poll`); `None` when
    /// off.
    pub fn busy_polled(&self) -> Option<Duration> {
        self.busy_poll.as_ref().map(|poll| poll.spun())
    }

    /// Marks a lookup in flight for the poller, if `busy_poll` is on.
    fn awaiting_reply(&self) -> Option<AwaitingReply<'_>> {
        self.busy_poll.as_ref().map(|poll| poll.awaiting_reply())
    }

    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// The configured Redis URLs (cluster nodes, sentinels, or one server).
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Where a single Redis is reached: the URL, or the master the
    /// sentinels report.
    pub async fn bus_url(&self) -> Result<String, SharedError> {
        if self.config.sentinel_master.is_empty() {
            return self.urls.first().cloned().ok_or(SharedError::Reply);
        }
        self.master_url().await
    }

    /// Asks the sentinels, in order, where the master is now.
    async fn master_url(&self) -> Result<String, SharedError> {
        let mut last_error = SharedError::Reply;
        for sentinel in &self.urls {
            let asked = async {
                let client = redis::Client::open(sentinel.as_str())?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                let address: Option<(String, u16)> = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.config.sentinel_master)
                    .query_async(&mut conn)
                    .await?;
                Ok::<_, redis::RedisError>(address)
            };
            match tokio::time::timeout(self.config.connect_timeout, asked).await {
                Ok(Ok(Some((host, port)))) => {
                    // The master takes the sentinels' credentials and scheme.
                    let mut url = url::Url::parse(sentinel).map_err(|_| SharedError::Reply)?;
                    url.set_host(Some(&host)).map_err(|_| SharedError::Reply)?;
                    url.set_port(Some(port)).map_err(|_| SharedError::Reply)?;
                    return Ok(url.to_string());
                }
                Ok(Ok(None)) => last_error = SharedError::Reply,
                Ok(Err(e)) => last_error = SharedError::Redis(e),
                Err(_) => last_error = SharedError::Timeout,
            }
        }
        Err(last_error)
    }

    pub fn heard_now(&self) {
        self.last_heard.store(coarse_ms(), Ordering::SeqCst);
        self.heard.notify_waiters();
    }

    /// How long the bus is trusted after it last delivered.
    fn lease_ms(&self) -> u64 {
        (self.config.heartbeat * 3).as_millis() as u64
    }

    /// The bus is up and has delivered something (at least our own
    /// heartbeat) recently: bumps from other instances are arriving.
    pub fn bus_fresh(&self) -> bool {
        // Both readings may lag by up to a tick: the slack keeps the lease
        // from being stretched by that.
        let lease = self.lease_ms();
        self.bus_healthy.load(Ordering::SeqCst)
            && coarse_ms()
                .saturating_sub(self.last_heard.load(Ordering::SeqCst))
                .saturating_add(COARSE_SLACK_MS)
                < lease
    }

    /// `bus_fresh`, giving a lease that has only just run out a moment to
    /// be renewed. When this process was held up (a starved thread, a
    /// burst of work), the lease runs out while the bus's next delivery
    /// waits unread in the socket, or while this instance's own heartbeat
    /// waits to be sent; distrusting the local tier then would send every
    /// query of that moment to Redis for its generations, and past the
    /// cache if the circuit opened meanwhile. Trust still comes back only
    /// with a delivery: a bus silent for longer than two leases is not
    /// waited for, and the wait is at most a lookup's `timeout`.
    pub async fn bus_caught_up(&self) -> bool {
        if self.bus_fresh() {
            return true;
        }
        let silent = coarse_ms().saturating_sub(self.last_heard.load(Ordering::SeqCst));
        if !self.bus_healthy.load(Ordering::SeqCst) || silent > 2 * self.lease_ms() {
            return false;
        }
        let heard = self.heard.notified();
        tokio::pin!(heard);
        heard.as_mut().enable();
        if self.bus_fresh() {
            return true;
        }
        let _ = tokio::time::timeout(self.config.timeout, heard).await;
        self.bus_fresh()
    }

    /// Announces this instance on the bus. Sent while the circuit is open
    /// too: the subscription may well still deliver, and silence would
    /// restart it (and the scan that follows) for a Redis that was only
    /// slow for a moment. Its outcome counts as any command's, so the first
    /// heartbeat Redis answers in time closes the circuit again.
    pub async fn heartbeat(&self) -> Result<(), SharedError> {
        let mut conn = self.connection_despite_circuit().await?;
        let mut publish = redis::cmd(self.publish_command());
        publish.arg(self.channel()).arg("hb");
        self.query::<i64>(&mut conn, &publish).await.map(|_| ())
    }

    /// Records every entry in Redis under our prefix (single Redis or
    /// Sentinel; a cluster's keys are spread over its masters, and there
    /// the time-based warm-up applies). Returns whether the whole keyspace
    /// was scanned for subscription number `subscription`.
    ///
    /// A failed step (a timeout under load, a dropped connection) is
    /// retried from the same cursor after a pause, for as long as that
    /// subscription lasts: giving up would leave every lookup asking Redis
    /// until the longest TTL had passed.
    pub async fn scan_presence(&self, subscription: u64) -> bool {
        if self.config.cluster {
            return false;
        }
        let pattern = format!("{}r:*", self.config.prefix);
        let mut cursor: u64 = 0;
        let mut pause = SCAN_RETRY_FIRST;
        loop {
            if !self.presence.is_current(subscription) {
                return false;
            }
            let mut step = redis::cmd("SCAN");
            step.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<String>) = match self.run(&step).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::debug!(error = %e, "a step of the scan for stored entries failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(SCAN_RETRY_MAX);
                    continue;
                }
            };
            pause = SCAN_RETRY_FIRST;
            for key in &keys {
                if let Some(id) = self.entry_id_of_key(key) {
                    // The entry's own TTL is not asked for: remembering it
                    // too long only costs a lookup that misses.
                    self.presence.insert(id, self.presence.warmup());
                }
            }
            if self.presence.overflowed() {
                return false;
            }
            if next == 0 {
                return true;
            }
            cursor = next;
        }
    }

    /// The entry id encoded in a result key (`entry_key`'s inverse).
    fn entry_id_of_key(&self, redis_key: &str) -> Option<u128> {
        let rest = redis_key
            .strip_prefix(&self.config.prefix)?
            .strip_prefix("r:")?;
        let (key, generations) = rest.split_once(':')?;
        let key = u128::from_str_radix(key, 16).ok()?;
        let generations = u64::from_str_radix(generations, 16).ok()?;
        Some(entry_id_of(key, generations))
    }

    /// Where stored entries are announced.
    pub fn fills_channel(&self) -> String {
        format!("{}{}fills", self.config.prefix, self.bus_tag())
    }

    /// Pub/sub on one Redis; sharded pub/sub on a cluster, where a plain
    /// PUBLISH would be broadcast to every node.
    pub fn publish_command(&self) -> &'static str {
        if self.config.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// Takes an announcement from the bus (other instances' only: this
    /// one's entries are recorded once Redis has acknowledged them).
    pub fn on_announcement(&self, payload: &[u8]) {
        if payload.starts_with(&self.instance) {
            return;
        }
        if let Some(records) = payload.get(self.instance.len()..) {
            let count = self.presence.record_announcement(records);
            self.stats
                .announced
                .fetch_add(count as u64, Ordering::Relaxed);
        }
    }

    pub fn channel(&self) -> String {
        format!("{}{}invalidate", self.config.prefix, self.bus_tag())
    }

    pub fn circuit_open(&self) -> bool {
        let circuit = self.circuit.lock().unwrap_or_else(|e| e.into_inner());
        circuit
            .open_until
            .is_some_and(|until| Instant::now() < until)
    }

    fn record_success(&self) {
        let mut circuit = self.circuit.lock().unwrap_or_else(|e| e.into_inner());
        *circuit = Circuit::default();
        crate::admin::metrics::redis_up(true);
    }

    /// A command (or a connect) begun at `sent` failed.
    fn record_failure(&self, sent: Instant) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        crate::admin::metrics::redis_error();
        let mut circuit = self.circuit.lock().unwrap_or_else(|e| e.into_inner());
        let was_open = circuit.open_until.is_some();
        let threshold = self.config.circuit_failures;
        if circuit.fail(sent, threshold, self.config.circuit_open_for) {
            if !was_open {
                tracing::warn!("redis circuit opened");
            }
            crate::admin::metrics::redis_up(false);
        }
    }

    fn cached_connection(&self) -> Option<Connection> {
        self.connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn connection(&self) -> Result<Connection, SharedError> {
        if self.circuit_open() {
            return Err(SharedError::CircuitOpen);
        }
        if let Some(c) = self.cached_connection() {
            return Ok(c);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.cached_connection() {
            return Ok(c);
        }
        let began = Instant::now();
        let connected = tokio::time::timeout(self.config.connect_timeout, self.connect()).await;
        match connected {
            Ok(Ok(c)) => {
                *self.connection.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
                Ok(c)
            }
            Ok(Err(e)) => {
                self.record_failure(began);
                Err(e)
            }
            Err(_) => {
                self.record_failure(began);
                Err(SharedError::Timeout)
            }
        }
    }

    /// A connection even while the circuit is open: the circuit spares
    /// clients' lookups, not the work that keeps other instances right
    /// (bumps), shows the bus alive (heartbeats) or that nobody waits for
    /// (stores). A circuit opened by a moment's slowness would otherwise
    /// throw away every store queued while it was open.
    async fn connection_despite_circuit(&self) -> Result<Connection, SharedError> {
        if let Some(c) = self.cached_connection() {
            return Ok(c);
        }
        match self.connection().await {
            Err(SharedError::CircuitOpen) => {
                match tokio::time::timeout(self.config.connect_timeout, self.connect()).await {
                    Ok(connected) => connected,
                    Err(_) => Err(SharedError::Timeout),
                }
            }
            other => other,
        }
    }

    async fn connect(&self) -> Result<Connection, SharedError> {
        if self.config.cluster {
            // Each command is bounded by its own timeout; this only has to
            // outlast the longest of them.
            let client = redis::cluster::ClusterClientBuilder::new(self.urls.clone())
                .tcp_settings(no_delay())
                .connection_timeout(self.config.connect_timeout)
                .response_timeout(self.longest_command())
                .build()?;
            Ok(Connection::Cluster(client.get_async_connection().await?))
        } else {
            let url = self.bus_url().await?;
            let client = redis::Client::open(with_no_delay(&url)?)?;
            // Each command is bounded by its own timeout (a lookup's is
            // `timeout`, a write's bump and a batch of stores may take
            // longer): a connection-wide one would cut those short.
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(self.config.connect_timeout))
                .set_response_timeout(None);
            Ok(Connection::Single(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            ))
        }
    }

    /// The longest any command may take: a try of a bump, or a batch of
    /// stores.
    fn longest_command(&self) -> Duration {
        self.bump_try_timeout().max(self.store_timeout())
    }

    /// A write's bump may take `bump_timeout` over its three tries.
    fn bump_try_timeout(&self) -> Duration {
        (self.config.bump_timeout / 3).max(self.config.timeout)
    }

    fn store_timeout(&self) -> Duration {
        self.config.timeout * 4
    }

    /// Runs one command with the timeout and circuit bookkeeping.
    async fn run<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, SharedError> {
        let mut conn = self.connection().await?;
        self.query(&mut conn, cmd).await
    }

    /// One command on `conn` within the timeout, its outcome counted
    /// toward the circuit.
    async fn query<T: redis::FromRedisValue>(
        &self,
        conn: &mut Connection,
        cmd: &Cmd,
    ) -> Result<T, SharedError> {
        let (result, sent) = timed(self.config.timeout, cmd.query_async::<T>(conn)).await;
        self.finish(result, sent)
    }

    /// `finish` for a command allowed longer than a lookup: answered, but
    /// later than a lookup may wait, it says nothing for the circuit.
    fn finish_unhurried<T>(
        &self,
        result: Result<RedisResult<T>, tokio::time::error::Elapsed>,
        sent: Instant,
    ) -> Result<T, SharedError> {
        match result {
            Ok(Ok(v)) if sent.elapsed() > self.config.timeout => Ok(v),
            result => self.finish(result, sent),
        }
    }

    /// The outcome of a command sent at `sent`, counted toward the circuit.
    fn finish<T>(
        &self,
        result: Result<RedisResult<T>, tokio::time::error::Elapsed>,
        sent: Instant,
    ) -> Result<T, SharedError> {
        match result {
            Ok(Ok(v)) => {
                self.record_success();
                Ok(v)
            }
            Ok(Err(e)) => {
                // Behind sentinels, any error may mean the master moved:
                // ask them again on the next connect.
                let sentinel = !self.config.sentinel_master.is_empty();
                if sentinel
                    || e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_unrecoverable_error()
                {
                    *self.connection.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                self.record_failure(sent);
                Err(SharedError::Redis(e))
            }
            Err(_) => {
                self.record_failure(sent);
                Err(SharedError::Timeout)
            }
        }
    }

    /// The generation key of a table: in the bus's hash slot on a
    /// cluster; elsewhere one database's keys share a tag as they always
    /// have.
    pub fn generation_key(&self, database: u32, table: u32) -> String {
        if self.config.cluster {
            format!("{}{BUS_TAG}gen:{database}:{table}", self.config.prefix)
        } else {
            format!("{}{{gen:{database}}}:{table}", self.config.prefix)
        }
    }

    fn bus_tag(&self) -> &'static str {
        if self.config.cluster {
            BUS_TAG
        } else {
            ""
        }
    }

    /// Reads the authoritative generations of `tables` (0 if never bumped).
    pub async fn generations(
        &self,
        database: u32,
        tables: &[u32],
    ) -> Result<Vec<u64>, SharedError> {
        if tables.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for &t in tables {
            cmd.arg(self.generation_key(database, t));
        }
        let values: Vec<Option<u64>> = self.run(&cmd).await?;
        if values.len() != tables.len() {
            return Err(SharedError::Reply);
        }
        Ok(values.into_iter().map(|v| v.unwrap_or(0)).collect())
    }

    /// Moves the generations of `tables` in Redis and announces them.
    pub async fn bump(&self, database: u32, tables: &[u32]) -> Result<Vec<u64>, SharedError> {
        if tables.is_empty() {
            // Nothing to move; on a cluster a script without keys would
            // not even know which master to run on.
            return Ok(Vec::new());
        }
        // A lost bump leaves entries in Redis reachable under generations
        // that are no longer true, for every instance: try harder than for
        // a lookup, which may simply miss.
        let mut last_error = SharedError::Reply;
        for _ in 0..3 {
            match self.try_bump(database, tables).await {
                Ok(values) => return Ok(values),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    async fn try_bump(&self, database: u32, tables: &[u32]) -> Result<Vec<u64>, SharedError> {
        let mut conn = self.connection_despite_circuit().await?;
        let mut invocation = self.bump_script.prepare_invoke();
        for &t in tables {
            invocation.key(self.generation_key(database, t));
        }
        let tables_text: Vec<String> = tables.iter().map(u32::to_string).collect();
        let sent_at = now_micros();
        invocation.arg(self.channel());
        invocation.arg(format!("{database}|{}|{sent_at}", tables_text.join(",")));
        invocation.arg(self.publish_command());
        let (result, sent) = timed(
            self.bump_try_timeout(),
            invocation.invoke_async::<Vec<u64>>(&mut conn),
        )
        .await;
        let values = self.finish_unhurried(result, sent)?;
        self.stats.bumps_sent.fetch_add(1, Ordering::Relaxed);
        crate::admin::metrics::bus_message("sent");
        Ok(values)
    }

    /// Where a result filled under `snapshot` lives in Redis: a bump of any
    /// generation in it makes the key unreachable.
    pub fn entry_key(&self, key: u128, snapshot: &Snapshot) -> String {
        self.entry_key_of(key, generations_hash(snapshot))
    }

    /// `{prefix}r:{key:032x}:{generations:016x}`, written directly: it is
    /// built for every lookup and store, and `format!` of a `u128` in hex
    /// cost more than the rest of a lookup's bookkeeping.
    fn entry_key_of(&self, key: u128, generations: u64) -> String {
        let mut digits = [0u8; 32 + 1 + 16];
        let (key_digits, rest) = digits.split_at_mut(32);
        write_hex(&key.to_be_bytes(), key_digits);
        rest[0] = b':';
        write_hex(&generations.to_be_bytes(), &mut rest[1..]);
        let mut redis_key = String::with_capacity(self.config.prefix.len() + 2 + digits.len());
        redis_key.push_str(&self.config.prefix);
        redis_key.push_str("r:");
        redis_key.push_str(std::str::from_utf8(&digits).expect("hex digits are ASCII"));
        redis_key
    }

    /// The entry's identity in announcements: its key and generations.
    pub fn entry_id(key: u128, snapshot: &Snapshot) -> u128 {
        entry_id_of(key, generations_hash(snapshot))
    }

    pub async fn get(
        self: &Arc<Self>,
        key: u128,
        snapshot: &Snapshot,
    ) -> Result<Option<(StoredResult, Duration)>, SharedError> {
        let generations = generations_hash(snapshot);
        if self.bus_fresh() && self.presence.surely_absent(entry_id_of(key, generations)) {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let redis_key = self.entry_key_of(key, generations);
        let value = if self.config.cluster {
            let _awaiting = self.awaiting_reply();
            self.run(redis::cmd("GET").arg(&redis_key)).await?
        } else {
            self.get_batched(redis_key).await?
        };
        let Some(value) = value else {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        match StoredResult::decode_with_age(Bytes::from(value)) {
            Some(found) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(found))
            }
            None => {
                // Truncated, corrupted or written by something else: never
                // served, and removed so it is not met again.
                self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                crate::admin::metrics::redis_corrupt();
                let redis_key = self.entry_key_of(key, generations);
                let _ = self.run::<i64>(redis::cmd("DEL").arg(redis_key)).await;
                Ok(None)
            }
        }
    }

    /// A GET that goes out with the others queued at the same moment, as
    /// one MGET: concurrent sessions' lookups then cost Redis and this
    /// process one read and one write each way instead of one per lookup.
    /// The first lookup into an empty queue lets the sessions that are
    /// ready run first (one yield, no timer), then sends what has queued.
    async fn get_batched(self: &Arc<Self>, key: String) -> LookupReply {
        if self.circuit_open() {
            return Err(SharedError::CircuitOpen);
        }
        let (reply, replied) = tokio::sync::oneshot::channel();
        let leads = {
            let mut lookups = self.lookups.lock().unwrap_or_else(|e| e.into_inner());
            lookups.push(PendingLookup { key, reply });
            lookups.len() == 1
        };
        if leads {
            let mut leader = BatchLeader {
                tier: self,
                sent: false,
            };
            tokio::task::yield_now().await;
            leader.sent = true;
            self.send_lookups().await;
        }
        replied.await.unwrap_or(Err(SharedError::Reply))
    }

    /// Sends every queued lookup as one MGET and hands out the values.
    async fn send_lookups(&self) {
        let batch = std::mem::take(&mut *self.lookups.lock().unwrap_or_else(|e| e.into_inner()));
        if batch.is_empty() {
            return;
        }
        self.stats.lookup_batches.fetch_add(1, Ordering::Relaxed);
        let mut mget = redis::cmd("MGET");
        for lookup in &batch {
            mget.arg(&lookup.key);
        }
        let replied = {
            let _awaiting = self.awaiting_reply();
            self.run::<Vec<Option<Vec<u8>>>>(&mget).await
        };
        match replied {
            Ok(values) if values.len() == batch.len() => {
                for (lookup, value) in batch.into_iter().zip(values) {
                    let _ = lookup.reply.send(Ok(value));
                }
            }
            Ok(_) => {
                for lookup in batch {
                    let _ = lookup.reply.send(Err(SharedError::Reply));
                }
            }
            Err(e) => {
                let reason = e.to_string();
                for lookup in batch {
                    let _ = lookup.reply.send(Err(SharedError::Batch(reason.clone())));
                }
            }
        }
    }

    /// Whether a fresh fill goes to Redis now: always, unless
    /// `admit = "reuse"` and this instance has not filled it before.
    pub fn admits(&self, key: u128, snapshot: &Snapshot) -> bool {
        let Some(first_fills) = &self.first_fills else {
            return true;
        };
        if first_fills.seen_before(Self::entry_id(key, snapshot)) {
            return true;
        }
        self.stats.deferred.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Stores a result just filled under the generations it was filled
    /// with; sent by the write-behind task.
    pub fn put(&self, key: u128, snapshot: &Snapshot, stored: &StoredResult, ttl: Duration) {
        self.put_aged(key, snapshot, stored, ttl, Duration::ZERO);
    }

    /// Stores a result filled `age` ago, for the `ttl` it has left.
    pub fn put_aged(
        &self,
        key: u128,
        snapshot: &Snapshot,
        stored: &StoredResult,
        ttl: Duration,
        age: Duration,
    ) {
        let put = PendingPut {
            key,
            generations: generations_hash(snapshot),
            stored: stored.clone(),
            ttl,
            filled_at: now_micros().saturating_sub(age.as_micros() as u64),
        };
        if let Some(sender) = &self.pending_puts {
            if sender.try_send(put).is_err() {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sends a batch of stores: one pipeline on a single Redis, one
    /// command each (concurrently) on a cluster, where a batch's keys lie
    /// in many slots.
    async fn put_batch(&self, batch: &mut Vec<PendingPut>) {
        let Ok(mut conn) = self.connection_despite_circuit().await else {
            batch.clear();
            return;
        };
        let count = batch.len() as u64;
        // Announced after the stores, so whoever hears of an entry finds it.
        let records: Vec<(u128, Duration)> = batch.iter().map(|p| (p.id(), p.ttl)).collect();
        let mut announcement = self.instance.to_vec();
        announcement.extend_from_slice(&Presence::encode(&records));
        let set = |put: PendingPut| {
            let key = self.entry_key_of(put.key, put.generations);
            let value = put.stored.encode(self.config.compress_above, put.filled_at);
            // Sized up front: grown argument by argument, the command's
            // buffer was reallocated several times for every store.
            let mut cmd = Cmd::with_capacity(5, "SETPX".len() + key.len() + value.len() + 20);
            cmd.arg("SET")
                .arg(key)
                .arg(value.as_ref())
                .arg("PX")
                .arg(put.ttl.as_millis().max(1) as u64);
            cmd
        };
        let mut publish = redis::cmd(self.publish_command());
        publish.arg(self.fills_channel()).arg(announcement);
        // Encoded before the clock starts: the timeout is for Redis.
        let sets: Vec<Cmd> = batch.drain(..).map(set).collect();
        let (result, sent) = match &mut conn {
            Connection::Single(single) => {
                // Nothing is marked ignored: the replies are checked for
                // errors and then dropped either way, and ignoring fills a
                // set with every command's index.
                let mut pipe = Pipeline::with_capacity(sets.len() + 1);
                for cmd in sets {
                    pipe.add_command(cmd);
                }
                pipe.add_command(publish);
                timed(self.store_timeout(), pipe.query_async::<()>(single)).await
            }
            Connection::Cluster(cluster) => {
                let template = cluster.clone();
                let sets = sets.into_iter().map(|cmd| {
                    let mut cluster = template.clone();
                    async move { cmd.query_async::<()>(&mut cluster).await }
                });
                let stored_then_announced = async {
                    futures_util::future::join_all(sets)
                        .await
                        .into_iter()
                        .collect::<RedisResult<()>>()?;
                    publish.query_async::<()>(cluster).await
                };
                timed(self.store_timeout(), stored_then_announced).await
            }
        };
        if self.finish_unhurried(result, sent).is_ok() {
            // This instance's own lookups find its entries from now on.
            let now = coarse_ms();
            for (id, ttl) in records {
                self.presence.insert_at(id, ttl, now);
            }
            self.stats.stored.fetch_add(count, Ordering::Relaxed);
        }
    }
}

/// TCP settings for every connection to Redis. Without `TCP_NODELAY` a
/// lookup written while an earlier one's reply is outstanding waits for
/// that reply's acknowledgement (Nagle's algorithm): a Redis round trip
/// added to a hit whenever lookups overlap, which under load is always.
pub(super) fn no_delay() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// A single Redis's URL as connection info with `no_delay`.
pub(super) fn with_no_delay(url: &str) -> RedisResult<redis::ConnectionInfo> {
    Ok(redis::IntoConnectionInfo::into_connection_info(url)?.set_tcp_settings(no_delay()))
}

async fn write_behind(
    tier: std::sync::Weak<SharedTier>,
    mut pending: tokio::sync::mpsc::Receiver<PendingPut>,
) {
    let mut batch = Vec::with_capacity(PUT_BATCH);
    while pending.recv_many(&mut batch, PUT_BATCH).await > 0 {
        // Lingering a moment gathers the fills of concurrent clients into
        // one round trip: far fewer wake-ups and syscalls on both sides,
        // and nobody waits for these stores.
        if batch.len() < PUT_BATCH {
            tokio::time::sleep(PUT_LINGER).await;
            while batch.len() < PUT_BATCH {
                match pending.try_recv() {
                    Ok(put) => batch.push(put),
                    Err(_) => break,
                }
            }
        }
        let Some(tier) = tier.upgrade() else { return };
        tier.put_batch(&mut batch).await;
    }
}

/// A stable hash of the generations an entry was filled under.
fn generations_hash(snapshot: &Snapshot) -> u64 {
    let mut generations = Vec::with_capacity(12 + 12 * snapshot.tables.len());
    generations.extend_from_slice(&snapshot.database.to_be_bytes());
    generations.extend_from_slice(&snapshot.epoch.to_be_bytes());
    for (t, g) in snapshot.tables.iter() {
        generations.extend_from_slice(&t.to_be_bytes());
        generations.extend_from_slice(&g.to_be_bytes());
    }
    xxh3_64(&generations)
}

pub(super) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A result as stored in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResult {
    pub payload: Bytes,
    pub row_description: Option<Bytes>,
}

impl StoredResult {
    /// `PGS2`, xxh3-64 checksum of the rest, creation time (µs), flags,
    /// length of the row description (u32::MAX for none), row
    /// description, payload (LZ4-compressed when it is at least
    /// `compress_above` bytes, non-zero, and compression shrinks it).
    pub fn encode(&self, compress_above: usize, created: u64) -> Bytes {
        let rd = self.row_description.as_deref();
        let compressible =
            compress_above > 0 && (compress_above..=MAX_EXPANDED).contains(&self.payload.len());
        let compressed = compressible
            .then(|| lz4_flex::compress_prepend_size(&self.payload))
            .filter(|c| c.len() < self.payload.len());
        let (flags, payload) = match &compressed {
            Some(c) => (COMPRESSED, c.as_slice()),
            None => (0, self.payload.as_ref()),
        };
        let mut out =
            BytesMut::with_capacity(HEADER_LEN + rd.map_or(0, <[u8]>::len) + payload.len());
        out.put_slice(MAGIC);
        out.put_u64(0); // the checksum, once the rest is written
        out.put_u64(created);
        out.put_u8(flags);
        out.put_u32(rd.map_or(u32::MAX, |r| r.len() as u32));
        if let Some(rd) = rd {
            out.put_slice(rd);
        }
        out.put_slice(payload);
        let checksum = xxh3_64(&out[12..]);
        out[4..12].copy_from_slice(&checksum.to_be_bytes());
        out.freeze()
    }

    pub fn decode(value: Bytes) -> Option<StoredResult> {
        Self::decode_with_age(value).map(|(stored, _)| stored)
    }

    /// Decodes a value and tells how long ago it was stored.
    pub fn decode_with_age(value: Bytes) -> Option<(StoredResult, Duration)> {
        // Version 1 had no flags byte: its header ends one byte earlier.
        let (flags_at, header_len) = match value.get(..4)? {
            m if m == MAGIC => (Some(20), HEADER_LEN),
            m if m == MAGIC_V1 => (None, HEADER_LEN - 1),
            _ => return None,
        };
        if value.len() < header_len {
            return None;
        }
        let checksum = u64::from_be_bytes(value[4..12].try_into().ok()?);
        if xxh3_64(&value[12..]) != checksum {
            return None;
        }
        let created = u64::from_be_bytes(value[12..20].try_into().ok()?);
        let flags = flags_at.map_or(0, |at| value[at]);
        let rd_len = u32::from_be_bytes(value[header_len - 4..header_len].try_into().ok()?);
        let mut rest = value.slice(header_len..);
        let row_description = if rd_len == u32::MAX {
            None
        } else {
            let n = rd_len as usize;
            if n > rest.len() {
                return None;
            }
            Some(rest.split_to(n))
        };
        let payload = match flags {
            0 => rest,
            COMPRESSED => {
                let claimed = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
                if claimed > MAX_EXPANDED {
                    return None;
                }
                let expanded = lz4_flex::decompress_size_prepended(&rest).ok()?;
                if expanded.len() != claimed {
                    return None;
                }
                Bytes::from(expanded)
            }
            _ => return None,
        };
        let age = Duration::from_micros(now_micros().saturating_sub(created));
        Some((
            StoredResult {
                payload,
                row_description,
            },
            age,
        ))
    }
}

/// A bump as announced on the bus: database, (table, generation) pairs,
/// and when it was sent (µs since the epoch).
pub type Bump = (u32, Vec<(u32, u64)>, u64);

/// Parses a bus message: `database|t1,t2|sent_at_us|g1,g2`.
pub fn parse_bump(message: &str) -> Option<Bump> {
    let mut parts = message.split('|');
    let database = parts.next()?.parse().ok()?;
    let tables: Vec<u32> = parts
        .next()?
        .split(',')
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    let sent_at: u64 = parts.next()?.parse().ok()?;
    let generations: Vec<u64> = parts
        .next()?
        .split(',')
        .map(|g| g.parse().ok())
        .collect::<Option<_>>()?;
    if tables.len() != generations.len() {
        return None;
    }
    Some((
        database,
        tables.into_iter().zip(generations).collect(),
        sent_at,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_of_commands_in_flight_together_count_once() {
        let open_for = Duration::from_secs(2);
        let mut circuit = Circuit::default();
        // Eight lookups sent together, all timed out by one stall.
        let sent = Instant::now();
        for _ in 0..8 {
            assert!(!circuit.fail(sent, 3, open_for));
        }
        assert_eq!(circuit.failures, 1);
        // Each sent after the failure before it: a Redis that stays silent.
        assert!(!circuit.fail(Instant::now(), 3, open_for));
        assert!(circuit.fail(Instant::now(), 3, open_for));
        assert!(circuit
            .open_until
            .is_some_and(|until| until > Instant::now()));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_reply_that_arrived_with_the_timer_is_not_a_timeout() {
        // The reply is read by a task woken in the same turn as the
        // command's timer, after it: this thread was kept busy past both.
        let (answer, answered) = tokio::sync::oneshot::channel::<u8>();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let _ = answer.send(7);
        });
        tokio::spawn(async { std::thread::sleep(Duration::from_millis(30)) });
        let outcome = within(Duration::from_millis(5), answered).await;
        assert_eq!(outcome.ok().and_then(Result::ok), Some(7));

        let (_never, silent) = tokio::sync::oneshot::channel::<u8>();
        assert!(within(Duration::from_millis(5), silent).await.is_err());
    }

    /// A tier whose bus delivered a moment ago; nothing is asked of Redis.
    fn tier_heard_now(heartbeat: Duration) -> Arc<SharedTier> {
        let tier = SharedTier::new(RedisConfig {
            url: "redis://127.0.0.1:1".into(),
            heartbeat,
            ..RedisConfig::default()
        });
        tier.bus_healthy.store(true, Ordering::SeqCst);
        tier.heard_now();
        tier
    }

    #[tokio::test]
    async fn a_lease_that_just_ran_out_is_renewed_by_the_next_delivery() {
        let heartbeat = Duration::from_millis(100);
        let tier = tier_heard_now(heartbeat);
        let lease = heartbeat * 3 + Duration::from_millis(COARSE_SLACK_MS);
        tokio::time::sleep(lease + Duration::from_millis(COARSE_SLACK_MS)).await;
        assert!(!tier.bus_fresh(), "the lease has run out");
        let delivering = tier.clone();
        let delivery = tokio::spawn(async move {
            tokio::task::yield_now().await;
            delivering.heard_now();
        });
        assert!(tier.bus_caught_up().await, "trusted again once heard");
        delivery.await.unwrap();
    }

    #[tokio::test]
    async fn a_bus_silent_for_long_or_down_is_not_waited_for() {
        let heartbeat = Duration::from_millis(100);
        let tier = tier_heard_now(heartbeat);
        tokio::time::sleep(heartbeat * 7 + Duration::from_millis(2 * COARSE_SLACK_MS)).await;
        assert!(!tier.bus_caught_up().await, "silent for over two leases");
        tier.heard_now();
        tier.bus_healthy.store(false, Ordering::SeqCst);
        assert!(!tier.bus_caught_up().await, "subscription down");
    }

    fn decode(value: &[u8]) -> Option<StoredResult> {
        StoredResult::decode(Bytes::copy_from_slice(value))
    }

    #[tokio::test]
    async fn entry_keys_are_spelled_as_they_always_were() {
        // Entries other instances (and older versions) stored stay
        // reachable only if every instance spells their keys alike.
        let tier = SharedTier::new(RedisConfig {
            url: "redis://127.0.0.1:1".into(),
            prefix: "app:".into(),
            ..RedisConfig::default()
        });
        for (key, generations) in [
            (0u128, 0u64),
            (1, u64::MAX),
            (u128::MAX, 0x0123_4567_89ab_cdef),
            (0xfedc_ba98_7654_3210 << 64, 0xa0),
        ] {
            let spelled = tier.entry_key_of(key, generations);
            assert_eq!(spelled, format!("app:r:{key:032x}:{generations:016x}"));
            assert_eq!(
                tier.entry_id_of_key(&spelled),
                Some(entry_id_of(key, generations))
            );
        }
    }

    #[test]
    fn stored_results_round_trip_and_corruption_is_caught() {
        let stored = StoredResult {
            payload: Bytes::from_static(b"D\0\0\0\x06\0\0C\0\0\0\x0bSELECT 1\0"),
            row_description: Some(Bytes::from_static(b"T\0\0\0\x06\0\0")),
        };
        let encoded = stored.encode(1024, now_micros());
        assert_eq!(encoded[20], 0, "small payloads are stored as they are");
        assert_eq!(decode(&encoded), Some(stored));
        let mut corrupt = encoded.to_vec();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        assert_eq!(decode(&corrupt), None);
        assert_eq!(decode(&encoded[..encoded.len() - 3]), None);
        assert_eq!(decode(b"hello world, not ours at all"), None);
    }

    #[test]
    fn values_of_the_previous_format_are_still_read() {
        let (rd, payload) = (
            b"T\0\0\0\x06\0\0".as_slice(),
            b"C\0\0\0\x0bSELECT 1\0".as_slice(),
        );
        let mut body = Vec::new();
        body.extend_from_slice(&now_micros().to_be_bytes());
        body.extend_from_slice(&(rd.len() as u32).to_be_bytes());
        body.extend_from_slice(rd);
        body.extend_from_slice(payload);
        let mut v1 = b"PGS1".to_vec();
        v1.extend_from_slice(&xxh3_64(&body).to_be_bytes());
        v1.extend_from_slice(&body);
        let expected = StoredResult {
            payload: Bytes::copy_from_slice(payload),
            row_description: Some(Bytes::copy_from_slice(rd)),
        };
        assert_eq!(decode(&v1), Some(expected));
        let last = v1.len() - 1;
        v1[last] ^= 1;
        assert_eq!(decode(&v1), None);
    }

    #[test]
    fn large_payloads_are_compressed_when_that_shrinks_them() {
        let rows: Vec<u8> = (0..200u32)
            .flat_map(|i| format!("D\0\0\0\x1a\0\x01\0\0\0\x10account {i:08}").into_bytes())
            .collect();
        let stored = StoredResult {
            payload: Bytes::from(rows),
            row_description: None,
        };
        let encoded = stored.encode(1024, now_micros());
        assert_eq!(encoded[20], COMPRESSED);
        assert!(
            encoded.len() < stored.payload.len() / 2,
            "{} bytes",
            encoded.len()
        );
        assert_eq!(decode(&encoded), Some(stored.clone()));
        assert_eq!(stored.encode(0, now_micros())[20], 0, "0 never compresses");

        // Incompressible bytes are kept as they are.
        let noise: Vec<u8> = (0..512u32)
            .flat_map(|i| xxh3_64(&i.to_be_bytes()).to_be_bytes())
            .collect();
        let noisy = StoredResult {
            payload: Bytes::from(noise),
            row_description: None,
        };
        assert_eq!(noisy.encode(1024, now_micros())[20], 0);

        // A compressed payload that fails to expand is refused even with a
        // matching checksum.
        let mut forged = encoded.to_vec();
        forged.truncate(forged.len() - 5);
        let checksum = xxh3_64(&forged[12..]);
        forged[4..12].copy_from_slice(&checksum.to_be_bytes());
        assert_eq!(decode(&forged), None);
    }

    #[test]
    fn bus_messages_parse() {
        assert_eq!(
            parse_bump("5|10,11|99|3,4"),
            Some((5, vec![(10, 3), (11, 4)], 99))
        );
        assert_eq!(parse_bump("5|10|99|3,4"), None);
        assert_eq!(parse_bump("garbage"), None);
    }
}
