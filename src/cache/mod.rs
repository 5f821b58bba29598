//! The result cache: statement analysis, the catalog knowledge it needs,
//! keys, the local tier, and invalidation by table generation.
//!
//! A read is served from the cache only when its result is exactly what
//! Postgres would return now: the key covers everything that changes the
//! answer's bytes, and an entry is valid only while the generations of
//! every table it read are the ones it was filled under.

pub mod catalog;
pub mod flight;
pub mod generations;
pub mod key;
pub mod local;
pub mod policy;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::{CacheConfig, Target};
use crate::sql::analyze::{analyze, Analysis, Reason};
use crate::sql::fingerprint::fingerprint;
use catalog::Catalog;
use generations::Generations;
use local::LocalTier;

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
    pub config: CacheConfig,
    pub local: LocalTier,
    pub generations: Generations,
    pub stats: CacheStats,
    pub flights: Arc<flight::Flights>,
    analyses: moka::sync::Cache<u128, Arc<Analysis>>,
    catalogs: RwLock<HashMap<Target, CatalogSlot>>,
}

impl Cache {
    pub fn new(config: CacheConfig) -> Cache {
        Cache {
            local: LocalTier::new(config.capacity_bytes),
            generations: Generations::default(),
            stats: CacheStats::default(),
            flights: Arc::new(flight::Flights::default()),
            analyses: moka::sync::Cache::new(config.analysis_capacity),
            catalogs: RwLock::new(HashMap::new()),
            config,
        }
    }

    /// The analysis of `sql`, parsed once per statement shape.
    pub fn analyze(&self, sql: &str) -> Arc<Analysis> {
        let shape = fingerprint(sql);
        if let Some(found) = self.analyses.get(&shape) {
            return found;
        }
        let analysis = Arc::new(analyze(sql));
        self.analyses.insert(shape, analysis.clone());
        analysis
    }

    /// The catalog of a database, unless it must be (re)loaded first.
    pub fn catalog(&self, target: &Target) -> Option<Arc<Catalog>> {
        let catalogs = self.catalogs.read().unwrap_or_else(|e| e.into_inner());
        catalogs
            .get(&database_of(target))
            .filter(|slot| !slot.stale)
            .map(|slot| slot.catalog.clone())
    }

    pub fn store_catalog(&self, target: &Target, catalog: Catalog) -> Arc<Catalog> {
        let catalog = Arc::new(catalog);
        self.catalogs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                database_of(target),
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
    pub fn schema_changed(&self, target: &Target, database_oid: u32) {
        self.mark_catalog_stale(target);
        self.generations.bump_database(database_oid);
    }

    pub fn mark_catalog_stale(&self, target: &Target) {
        let mut catalogs = self.catalogs.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = catalogs.get_mut(&database_of(target)) {
            slot.stale = true;
        }
    }
}

/// Catalogs are per database, whichever user reads them.
fn database_of(target: &Target) -> Target {
    Target {
        user: String::new(),
        ..target.clone()
    }
}
