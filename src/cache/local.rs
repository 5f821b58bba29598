//! The in-process tier: moka, bounded by bytes, each entry with its TTL.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
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

type Entries = Cache<u128, Arc<Entry>, FastHasher>;

/// A cleared cache with fewer entries than this is freed where it is
/// cleared: a thread would cost more (writes while Redis is down clear the
/// tier for every write).
const FREED_IN_PLACE: u64 = 10_000;

pub struct LocalTier {
    /// Swapped for an empty cache by `clear`.
    entries: ArcSwap<Entries>,
    /// 0 turns the tier off (Redis then serves alone): nothing is stored,
    /// so nothing is evicted at once either.
    capacity_bytes: u64,
    evictions: Arc<std::sync::atomic::AtomicU64>,
}

impl LocalTier {
    pub fn new(capacity_bytes: u64) -> LocalTier {
        let evictions = Arc::new(std::sync::atomic::AtomicU64::new(0));
        LocalTier {
            entries: ArcSwap::from_pointee(Self::build(capacity_bytes, &evictions)),
            capacity_bytes,
            evictions,
        }
    }

    fn build(capacity_bytes: u64, evictions: &Arc<std::sync::atomic::AtomicU64>) -> Entries {
        let counted = evictions.clone();
        Cache::builder()
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
            .build_with_hasher(FastHasher::default())
    }

    fn disabled(&self) -> bool {
        self.capacity_bytes == 0
    }

    pub fn get(&self, key: u128) -> Option<Arc<Entry>> {
        if self.disabled() {
            return None;
        }
        self.entries.load().get(&key)
    }

    pub fn insert(&self, key: u128, entry: Entry) {
        if !self.disabled() {
            self.entries.load().insert(key, Arc::new(entry));
        }
    }

    pub fn remove(&self, key: u128) {
        self.entries.load().invalidate(&key);
    }

    /// Empties the tier at once. moka's `invalidate_all` leaves the
    /// removal to the maintenance that inserts run: with a few hundred
    /// thousand entries that held the worker thread, and every session on
    /// it, for hundreds of milliseconds. Instead the cache is replaced by
    /// an empty one, and a large old one is freed on a thread of its own.
    pub fn clear(&self) {
        let old = self
            .entries
            .swap(Arc::new(Self::build(self.capacity_bytes, &self.evictions)));
        let entries = old.entry_count();
        crate::admin::metrics::flushed(entries);
        if entries < FREED_IN_PLACE {
            return;
        }
        // Should the thread not start, the closure (and the old cache) is
        // dropped here instead.
        let _ = std::thread::Builder::new()
            .name("pgstash-flush".into())
            .spawn(move || drop(old));
    }

    /// Entries dropped for size or age (not replaced or invalidated).
    pub fn evictions(&self) -> u64 {
        self.evictions.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.load().entry_count()
    }

    pub fn weighted_size(&self) -> u64 {
        self.entries.load().weighted_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(payload: &'static [u8]) -> Entry {
        let snapshot = Snapshot {
            database: 1,
            epoch: 0,
            tables: Default::default(),
        };
        Entry::new(
            snapshot,
            Bytes::from_static(payload),
            None,
            Duration::from_secs(60),
        )
    }

    #[test]
    fn a_cleared_tier_forgets_every_entry_and_keeps_serving() {
        let tier = LocalTier::new(1 << 20);
        for key in 0..1000u128 {
            tier.insert(key, entry(b"old"));
        }
        assert!(tier.get(7).is_some());
        tier.clear();
        assert!((0..1000u128).all(|key| tier.get(key).is_none()));
        tier.insert(7, entry(b"new"));
        assert_eq!(
            tier.get(7).expect("stored after the clear").payload,
            &b"new"[..]
        );
    }
}
