//! The in-process tier: moka, bounded by bytes, each entry with its TTL.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::sync::Cache;
use moka::Expiry;

use super::generations::Snapshot;
use crate::FastHasher;

/// A stored result: the exact backend bytes, and the generations it was
/// filled under.
#[derive(Debug)]
pub struct Entry {
    pub snapshot: Snapshot,
    /// Simple protocol: RowDescription, DataRows, CommandComplete.
    /// Extended protocol: DataRows and CommandComplete.
    pub payload: Bytes,
    /// Extended protocol: the RowDescription a Describe of the portal got.
    pub row_description: Option<Bytes>,
    pub ttl: Duration,
    /// When it was stored here, for the shorter TTL while Redis is down.
    pub stored_at: Instant,
    /// Filled here but not stored in Redis yet (`admit = "reuse"`): the
    /// first hit on it stores it.
    pub unshared: AtomicBool,
}

impl Entry {
    pub fn new(
        snapshot: Snapshot,
        payload: Bytes,
        row_description: Option<Bytes>,
        ttl: Duration,
    ) -> Entry {
        Entry {
            snapshot,
            payload,
            row_description,
            ttl,
            stored_at: Instant::now(),
            unshared: AtomicBool::new(false),
        }
    }
}

struct PerEntryTtl;

impl Expiry<u128, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &u128,
        entry: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

pub struct LocalTier {
    entries: Cache<u128, Arc<Entry>, FastHasher>,
    /// `capacity_bytes = 0` turns the tier off (Redis then serves alone):
    /// nothing is stored, so nothing is evicted at once either.
    disabled: bool,
    evictions: Arc<std::sync::atomic::AtomicU64>,
}

impl LocalTier {
    pub fn new(capacity_bytes: u64) -> LocalTier {
        let evictions = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = evictions.clone();
        let entries = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_key, entry: &Arc<Entry>| {
                let size = entry.payload.len()
                    + entry.row_description.as_ref().map_or(0, Bytes::len)
                    + 128;
                u32::try_from(size).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .eviction_listener(move |_key, _entry, cause| {
                if cause.was_evicted() {
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                crate::admin::metrics::eviction(cause);
            })
            .build_with_hasher(FastHasher::default());
        LocalTier {
            entries,
            evictions,
            disabled: capacity_bytes == 0,
        }
    }

    pub fn get(&self, key: u128) -> Option<Arc<Entry>> {
        if self.disabled {
            return None;
        }
        self.entries.get(&key)
    }

    pub fn insert(&self, key: u128, entry: Entry) {
        if !self.disabled {
            self.entries.insert(key, Arc::new(entry));
        }
    }

    pub fn remove(&self, key: u128) {
        self.entries.invalidate(&key);
    }

    pub fn clear(&self) {
        self.entries.invalidate_all();
    }

    /// Entries dropped for size or age (not replaced or invalidated).
    pub fn evictions(&self) -> u64 {
        self.evictions.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    pub fn weighted_size(&self) -> u64 {
        self.entries.weighted_size()
    }
}
