//! The result cache: statement analysis, the catalog knowledge it needs,
//! keys, the local tier, and invalidation by table generation.
//!
//! A read is served from the cache only when its result is exactly what
//! Postgres would return now: the key covers everything that changes the
//! answer's bytes, and an entry is valid only while the generations of
//! every table it read are the ones it was filled under.

pub mod admission;
pub mod bus;
pub mod busy_poll;
pub mod catalog;
pub mod flight;
pub mod generations;
pub mod key;
pub mod local;
pub mod policy;
pub mod presence;
pub mod shapes;
pub mod shared;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::{CacheConfig, RedisConfig, Target};
use crate::sql::analyze::{analyze, Analysis, Reason};
use crate::sql::fingerprint::fingerprint;
use crate::{FastHasher, FastMap};
use catalog::Catalog;
use generations::Generations;
use generations::Snapshot;
use local::{Entry, LocalTier};
use shared::{SharedTier, StoredResult};

/// What the cache did with one statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Bypass(Reason),
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Bypass(reason) => reason.as_str(),
        }
    }
}

/// Counters of what the cache did, for tests, the admin console and
/// metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub bypasses: AtomicU64,
    pub fills: AtomicU64,
    /// Fills thrown away because a write to a table they read completed
    /// while they were in flight.
    pub fills_discarded: AtomicU64,
    pub invalidations: AtomicU64,
}

impl CacheStats {
    pub fn count(&self, outcome: Outcome) {
        let metrics = crate::admin::metrics::get();
        match outcome {
            Outcome::Hit => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                metrics.hits.increment(1);
            }
            Outcome::Miss => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                metrics.misses.increment(1);
            }
            Outcome::Bypass(reason) => {
                self.bypasses.fetch_add(1, Ordering::Relaxed);
                crate::admin::metrics::bypass(reason);
            }
        }
    }

    pub fn fill(&self, stored: bool) {
        let metrics = crate::admin::metrics::get();
        if stored {
            self.fills.fetch_add(1, Ordering::Relaxed);
            metrics.fills.increment(1);
        } else {
            self.fills_discarded.fetch_add(1, Ordering::Relaxed);
            metrics.fills_discarded.increment(1);
        }
    }

    pub fn invalidation(&self, whole_database: bool) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        let metrics = crate::admin::metrics::get();
        if whole_database {
            metrics.invalidations_database.increment(1);
        } else {
            metrics.invalidations_tables.increment(1);
        }
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

struct CatalogSlot {
    catalog: Arc<Catalog>,
    stale: bool,
}

pub struct Cache {
    /// Swapped whole on RELOAD (rules, TTLs); capacity needs a restart.
    pub config: arc_swap::ArcSwap<CacheConfig>,
    pub local: LocalTier,
    pub generations: Arc<Generations>,
    /// The Redis tier and bus, when configured.
    pub shared: Option<Arc<SharedTier>>,
    pub stats: CacheStats,
    pub shapes: shapes::Shapes,
    pub flights: Arc<flight::Flights>,
    analyses: moka::sync::Cache<u128, Arc<Analysis>, FastHasher>,
    catalogs: RwLock<FastMap<Target, CatalogSlot>>,
}

impl Cache {
    /// Creates the cache; with a Redis URL, also starts following the
    /// invalidation bus (so it must be called inside the runtime).
    pub fn new(config: CacheConfig, redis: RedisConfig) -> Cache {
        let generations = Arc::new(Generations::default());
        if redis.url.starts_with("rediss://") {
            // rediss:// needs a process-wide TLS provider; one may already be
            // installed, which is just as good.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let shared = (!redis.url.is_empty()).then(|| SharedTier::new(redis));
        if let Some(shared) = &shared {
            // Entries stored before this instance listened live at most
            // this long; hints may ask for longer, and such entries are
            // then only found by instances that heard of them.
            let longest_ttl = config
                .rules
                .iter()
                .filter_map(|r| r.ttl)
                .fold(config.default_ttl, std::cmp::max);
            shared.presence.set_warmup(longest_ttl);
            bus::spawn(shared.clone(), Arc::downgrade(&generations));
        }
        Cache {
            local: LocalTier::new(config.capacity_bytes),
            generations,
            shared,
            stats: CacheStats::default(),
            shapes: shapes::Shapes::default(),
            flights: Arc::new(flight::Flights::default()),
            analyses: moka::sync::Cache::builder()
                .max_capacity(config.analysis_capacity)
                .build_with_hasher(FastHasher::default()),
            catalogs: RwLock::new(FastMap::default()),
            config: arc_swap::ArcSwap::from_pointee(config),
        }
    }

    /// Whether local entries may be served: always without Redis; with it,
    /// only while the bus is known to deliver every bump (or when the
    /// operator chose the local tier as the fallback).
    pub fn local_trusted(&self) -> bool {
        match &self.shared {
            None => true,
            Some(shared) => shared.bus_fresh() || shared.config().on_failure == "local",
        }
    }

    /// Whether a local entry may still be served: while the bus is down
    /// (in "local" fallback) only entries younger than `degraded_ttl`.
    pub fn local_entry_usable(&self, entry: &Entry) -> bool {
        match &self.shared {
            Some(shared) if !shared.bus_fresh() => {
                shared.config().on_failure == "local"
                    && entry.stored_at.elapsed() < shared.config().degraded_ttl
            }
            _ => true,
        }
    }

    /// The generations a decision is made under: the local mirror when it
    /// is trustworthy and complete, otherwise read from Redis.
    pub async fn snapshot(&self, database: u32, tables: &[u32]) -> Result<Snapshot, Reason> {
        let Some(shared) = &self.shared else {
            return Ok(self.generations.snapshot(database, tables));
        };
        if shared.bus_caught_up().await {
            if let Some(snapshot) = self.generations.known(database, tables) {
                return Ok(snapshot);
            }
        }
        let keys = with_epoch(tables.iter().copied());
        match shared.generations(database, &keys).await {
            Ok(values) => {
                let pairs: Vec<(u32, u64)> =
                    keys.iter().copied().zip(values.iter().copied()).collect();
                self.generations.observe(database, &pairs);
                Ok(Snapshot {
                    database,
                    epoch: values[0],
                    tables: pairs[1..].into(),
                })
            }
            Err(_) if shared.config().on_failure == "local" => {
                Ok(self.generations.snapshot(database, tables))
            }
            Err(_) => Err(Reason::SharedTierDown),
        }
    }

    /// Publishes a write: moves generations (in Redis and locally) before
    /// the writer's client hears of the commit.
    pub async fn publish(&self, database: u32, tables: &[u32], whole_database: bool) {
        let keys: Vec<u32> = if whole_database {
            vec![generations::EPOCH]
        } else {
            tables.to_vec()
        };
        let Some(shared) = &self.shared else {
            self.generations.bump(database, &keys);
            return;
        };
        match shared.bump(database, &keys).await {
            Ok(values) => {
                let pairs: Vec<(u32, u64)> = keys.iter().copied().zip(values).collect();
                self.generations.observe(database, &pairs);
            }
            Err(e) => {
                // Other pgstash instances cannot be told; this one at least
                // forgets what the write may have changed.
                tracing::warn!(error = %e, "cannot publish a write to redis; local tier flushed");
                self.local.clear();
            }
        }
    }

    /// Stores a completed fill: with Redis, only after checking the
    /// authoritative generations, then in both tiers. `leader` is released
    /// once the entry is in place.
    pub fn store_fill(
        self: &Arc<Self>,
        key: u128,
        snapshot: Snapshot,
        stored: StoredResult,
        ttl: std::time::Duration,
        leader: Option<flight::Leader>,
    ) {
        let Some(shared) = self.shared.clone() else {
            let current = self.generations.is_current(&snapshot);
            self.stats.fill(current);
            if current {
                self.local.insert(key, entry(snapshot, stored, ttl));
            }
            drop(leader);
            return;
        };
        if self.mirror_vouches_for(&shared, &snapshot) {
            self.keep_fill(&shared, key, snapshot, stored, ttl);
            self.stats.fill(true);
            drop(leader);
            return;
        }
        let cache = self.clone();
        tokio::spawn(async move {
            let current = (shared.bus_caught_up().await
                && cache.mirror_vouches_for(&shared, &snapshot))
                || current_in_redis(&shared, &snapshot).await;
            cache.stats.fill(current);
            if current {
                cache.keep_fill(&shared, key, snapshot, stored, ttl);
            }
            drop(leader);
        });
    }

    /// Whether `snapshot` may be stored in Redis on the local mirror's word.
    /// While the bus delivers every bump, the mirror of the generations is
    /// as good as Redis's (the entry's key carries its generations, so a
    /// bump still in flight makes it unreachable).
    fn mirror_vouches_for(&self, shared: &SharedTier, snapshot: &Snapshot) -> bool {
        shared.bus_fresh() && self.generations.is_current(snapshot)
    }

    /// Puts a current fill in the local tier, and in Redis unless
    /// admission waits for the result to be read again.
    fn keep_fill(
        &self,
        shared: &SharedTier,
        key: u128,
        snapshot: Snapshot,
        stored: StoredResult,
        ttl: std::time::Duration,
    ) {
        let admitted = shared.admits(key, &snapshot);
        if admitted {
            shared.put(key, &snapshot, &stored, ttl);
        }
        let entry = entry(snapshot, stored, ttl);
        entry.unshared.store(!admitted, Ordering::Relaxed);
        self.local.insert(key, entry);
    }

    /// A local hit is being served from `entry`: if Redis does not have it
    /// yet (admission waited for this reuse), it is stored there now, for
    /// the TTL it has left, under the same rule as a fill. A hit served
    /// while the bus is down (`on_failure = "local"`) stores nothing.
    pub fn local_hit(&self, key: u128, entry: &Entry) {
        if !entry.unshared.load(Ordering::Relaxed) {
            return;
        }
        let Some(shared) = &self.shared else { return };
        if !self.mirror_vouches_for(shared, &entry.snapshot)
            || !entry.unshared.swap(false, Ordering::Relaxed)
        {
            return;
        }
        let age = entry.stored_at.elapsed();
        let Some(left) = entry.ttl.checked_sub(age).filter(|d| !d.is_zero()) else {
            return;
        };
        let stored = StoredResult {
            payload: entry.payload.clone(),
            row_description: entry.row_description.clone(),
        };
        shared.put_aged(key, &entry.snapshot, &stored, left, age);
    }

    /// Keeps a Redis hit in the local tier for what is left of its TTL
    /// under the query that found it: the next hit is local.
    pub fn promote(
        &self,
        key: u128,
        snapshot: Snapshot,
        stored: StoredResult,
        left: std::time::Duration,
    ) {
        self.local.insert(key, entry(snapshot, stored, left));
    }

    /// The databases whose catalogs are loaded: (name, OID).
    pub fn databases(&self) -> Vec<(String, u32)> {
        let catalogs = self.catalogs.read().unwrap_or_else(|e| e.into_inner());
        catalogs
            .iter()
            .map(|(target, slot)| (target.database.clone(), slot.catalog.database_oid))
            .collect()
    }

    /// `table` (`name` or `schema.name`, default search_path) in the
    /// database named `database`: its OID and what a write to it changes.
    pub fn resolve_table(&self, database: &str, table: &str) -> Option<(u32, Vec<u32>)> {
        let catalogs = self.catalogs.read().unwrap_or_else(|e| e.into_inner());
        let catalog = catalogs
            .iter()
            .find(|(t, _)| t.database == database)?
            .1
            .catalog
            .clone();
        drop(catalogs);
        let name = match table.split_once('.') {
            Some((schema, name)) => crate::sql::analyze::Name {
                schema: Some(schema.to_owned()),
                name: name.to_owned(),
            },
            None => crate::sql::analyze::Name {
                schema: None,
                name: table.to_owned(),
            },
        };
        let schemas = catalog.search_schemas(&catalog.default_search_path, "");
        let oid = catalog.resolve(&name, &schemas)?;
        let tables = catalog.write_closure(oid).unwrap_or_else(|| vec![oid]);
        Some((catalog.database_oid, tables))
    }

    pub fn top_shapes(&self, n: usize) -> Vec<shapes::ShapeStats> {
        self.shapes.top(n)
    }

    /// The analysis of `sql`, parsed once per statement shape.
    pub fn analyze(&self, sql: &str) -> Arc<Analysis> {
        self.analyze_shaped(sql).1
    }

    /// The statement's shape (its literal-free fingerprint) and analysis.
    pub fn analyze_shaped(&self, sql: &str) -> (u128, Arc<Analysis>) {
        let shape = fingerprint(sql);
        if let Some(found) = self.analyses.get(&shape) {
            return (shape, found);
        }
        let analysis = Arc::new(analyze(sql));
        self.analyses.insert(shape, analysis.clone());
        (shape, analysis)
    }

    /// The catalog of a database, unless it must be (re)loaded first.
    /// `database` is a catalog key (`catalog_key`), computed once per pool.
    pub fn catalog(&self, database: &Target) -> Option<Arc<Catalog>> {
        let catalogs = self.catalogs.read().unwrap_or_else(|e| e.into_inner());
        catalogs
            .get(database)
            .filter(|slot| !slot.stale)
            .map(|slot| slot.catalog.clone())
    }

    pub fn store_catalog(&self, database: &Target, catalog: Catalog) -> Arc<Catalog> {
        let catalog = Arc::new(catalog);
        self.catalogs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                database.clone(),
                CatalogSlot {
                    catalog: catalog.clone(),
                    stale: false,
                },
            );
        catalog
    }

    /// After DDL: the catalog is reloaded before the next cache decision,
    /// and everything cached for the database becomes unreachable. The
    /// order matters: a reader that sees the new epoch must not decide with
    /// the old catalog.
    pub async fn schema_changed(&self, database: &Target, database_oid: u32) {
        self.mark_catalog_stale(database);
        self.publish(database_oid, &[], true).await;
    }

    pub fn mark_catalog_stale(&self, database: &Target) {
        let mut catalogs = self.catalogs.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = catalogs.get_mut(database) {
            slot.stale = true;
        }
    }
}

/// Whether the generations `snapshot` was filled under are still Redis's.
async fn current_in_redis(shared: &SharedTier, snapshot: &Snapshot) -> bool {
    let keys = with_epoch(snapshot.tables.iter().map(|&(t, _)| t));
    match shared.generations(snapshot.database, &keys).await {
        Ok(values) => {
            values[0] == snapshot.epoch
                && values[1..]
                    .iter()
                    .zip(snapshot.tables.iter())
                    .all(|(v, (_, g))| v == g)
        }
        Err(_) => false,
    }
}

/// The generation keys Redis is asked for: the database's epoch, then
/// each table's.
fn with_epoch(tables: impl ExactSizeIterator<Item = u32>) -> Vec<u32> {
    let mut keys = Vec::with_capacity(tables.len() + 1);
    keys.push(generations::EPOCH);
    keys.extend(tables);
    keys
}

fn entry(snapshot: Snapshot, stored: StoredResult, ttl: std::time::Duration) -> Entry {
    Entry::new(snapshot, stored.payload, stored.row_description, ttl)
}

/// The key of a target's catalog: catalogs are per database, whichever
/// user reads them.
pub fn catalog_key(target: &Target) -> Target {
    Target {
        user: String::new(),
        ..target.clone()
    }
}
