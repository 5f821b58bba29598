//! Metric names and the handles the hot path uses. Names are part of the
//! interface (dashboards and alerts use them): change none.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `pgstash_cache_lookups_total` | counter | `outcome` = hit, miss, bypass |
//! | `pgstash_cache_bypass_total` | counter | `reason` |
//! | `pgstash_cache_fills_total` | counter | |
//! | `pgstash_cache_fills_discarded_total` | counter | |
//! | `pgstash_cache_invalidations_total` | counter | `scope` = tables, database |
//! | `pgstash_cache_evictions_total` | counter | `cause` = size, expired, replaced, explicit |
//! | `pgstash_cache_entries` | gauge | |
//! | `pgstash_cache_bytes` | gauge | |
//! | `pgstash_cache_hit_duration_seconds` | histogram | |
//! | `pgstash_upstream_duration_seconds` | histogram | |
//! | `pgstash_cache_hits_total` | counter | `tier` = local, redis |
//! | `pgstash_redis_up` | gauge | |
//! | `pgstash_redis_duration_seconds` | histogram | |
//! | `pgstash_redis_errors_total` | counter | |
//! | `pgstash_redis_corrupt_total` | counter | |
//! | `pgstash_bus_messages_total` | counter | `direction` = sent, received |
//! | `pgstash_bus_delay_seconds` | histogram | |
//! | `pgstash_clients` | gauge | |
//! | `pgstash_auth_total` | counter | `outcome` = success, failure |
//! | `pgstash_cancel_requests_total` | counter | `outcome` = relayed, idle, unmatched |
//! | `pgstash_server_connections` | gauge | `state` = active, idle |

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram, Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::sql::analyze::Reason;

/// Seconds; from a few microseconds (a hit) to seconds (a slow query).
const DURATION_BUCKETS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 1.0, 5.0,
];

/// Handles for the metrics recorded on every query.
pub struct Metrics {
    pub hits: Counter,
    pub misses: Counter,
    pub bypasses: Counter,
    pub fills: Counter,
    pub fills_discarded: Counter,
    pub invalidations_tables: Counter,
    pub invalidations_database: Counter,
    pub hit_duration: Histogram,
    pub upstream_duration: Histogram,
    local_hits: Counter,
    redis_hits: Counter,
    redis_duration: Histogram,
    evictions_size: Counter,
    evictions_expired: Counter,
    evictions_replaced: Counter,
    evictions_explicit: Counter,
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
static METRICS: OnceLock<Metrics> = OnceLock::new();

/// Installs the Prometheus recorder once per process. Tests that start
/// several proxies in one process share it.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &DURATION_BUCKETS)
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// The handles; the recorder is installed first so they are live.
pub fn get() -> &'static Metrics {
    METRICS.get_or_init(|| {
        install();
        Metrics {
            hits: counter!("pgstash_cache_lookups_total", "outcome" => "hit"),
            misses: counter!("pgstash_cache_lookups_total", "outcome" => "miss"),
            bypasses: counter!("pgstash_cache_lookups_total", "outcome" => "bypass"),
            fills: counter!("pgstash_cache_fills_total"),
            fills_discarded: counter!("pgstash_cache_fills_discarded_total"),
            invalidations_tables: counter!("pgstash_cache_invalidations_total", "scope" => "tables"),
            invalidations_database: counter!("pgstash_cache_invalidations_total", "scope" => "database"),
            hit_duration: histogram!("pgstash_cache_hit_duration_seconds"),
            upstream_duration: histogram!("pgstash_upstream_duration_seconds"),
            local_hits: counter!("pgstash_cache_hits_total", "tier" => "local"),
            redis_hits: counter!("pgstash_cache_hits_total", "tier" => "redis"),
            redis_duration: histogram!("pgstash_redis_duration_seconds"),
            evictions_size: counter!("pgstash_cache_evictions_total", "cause" => "size"),
            evictions_expired: counter!("pgstash_cache_evictions_total", "cause" => "expired"),
            evictions_replaced: counter!("pgstash_cache_evictions_total", "cause" => "replaced"),
            evictions_explicit: counter!("pgstash_cache_evictions_total", "cause" => "explicit"),
        }
    })
}

pub fn login(outcome: &'static str) {
    counter!("pgstash_auth_total", "outcome" => outcome).increment(1);
}

pub fn cancel_request(outcome: &'static str) {
    counter!("pgstash_cancel_requests_total", "outcome" => outcome).increment(1);
}

/// Which tier answered a hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Local,
    Redis,
}

pub fn tier_hit(tier: Tier) {
    let m = get();
    match tier {
        Tier::Local => &m.local_hits,
        Tier::Redis => &m.redis_hits,
    }
    .increment(1);
}

/// 0 while the circuit to Redis is open.
pub fn redis_up(up: bool) {
    gauge!("pgstash_redis_up").set(if up { 1.0 } else { 0.0 });
}

/// Every Redis command or connect that failed or timed out, whether or not
/// the circuit opened.
pub fn redis_error() {
    counter!("pgstash_redis_errors_total").increment(1);
}

pub fn redis_latency(elapsed: std::time::Duration) {
    get().redis_duration.record(elapsed);
}

pub fn redis_corrupt() {
    counter!("pgstash_redis_corrupt_total").increment(1);
}

pub fn bus_message(direction: &'static str) {
    counter!("pgstash_bus_messages_total", "direction" => direction).increment(1);
}

/// Time from a write's bump in another pgstash to its arrival here.
pub fn bus_delay(delay: std::time::Duration) {
    histogram!("pgstash_bus_delay_seconds").record(delay);
}

pub fn bypass(reason: Reason) {
    let m = get();
    m.bypasses.increment(1);
    counter!("pgstash_cache_bypass_total", "reason" => reason.as_str()).increment(1);
}

pub fn eviction(cause: moka::notification::RemovalCause) {
    use moka::notification::RemovalCause;
    let m = get();
    match cause {
        RemovalCause::Size => &m.evictions_size,
        RemovalCause::Expired => &m.evictions_expired,
        RemovalCause::Replaced => &m.evictions_replaced,
        RemovalCause::Explicit => &m.evictions_explicit,
    }
    .increment(1);
}

/// Entries dropped at once by a flush of the local tier, which are not
/// reported one by one.
pub fn flushed(entries: u64) {
    get().evictions_explicit.increment(entries);
}

pub fn set_gauges(clients: usize, active: usize, idle: usize, entries: u64, bytes: u64) {
    gauge!("pgstash_clients").set(clients as f64);
    gauge!("pgstash_server_connections", "state" => "active").set(active as f64);
    gauge!("pgstash_server_connections", "state" => "idle").set(idle as f64);
    gauge!("pgstash_cache_entries").set(entries as f64);
    gauge!("pgstash_cache_bytes").set(bytes as f64);
}
