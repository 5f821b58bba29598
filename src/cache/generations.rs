//! Table generations: the invalidation clock.
//!
//! Every base table has a generation, and every database an epoch that
//! stands for "all of its tables". A cached result remembers the
//! generations it was filled under and is served only while they are all
//! still current; a write moves the generations of what it may have
//! changed. Values come from one process-wide counter, so a generation
//! never repeats and a forgotten table (generation 0) can never be mistaken
//! for a bumped one.

use crate::FastMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// The table id standing for the whole database.
pub const EPOCH: u32 = 0;

/// Generations a result was filled under: the database epoch, then each
/// table it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub database: u32,
    pub epoch: u64,
    pub tables: Box<[(u32, u64)]>,
}

#[derive(Default)]
pub struct Generations {
    current: RwLock<FastMap<(u32, u32), u64>>,
    clock: AtomicU64,
}

impl Generations {
    /// Takes the generations of `tables` now, before a query goes upstream.
    pub fn snapshot(&self, database: u32, tables: &[u32]) -> Snapshot {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        let get = |t: u32| current.get(&(database, t)).copied().unwrap_or(0);
        Snapshot {
            database,
            epoch: get(EPOCH),
            tables: tables.iter().map(|&t| (t, get(t))).collect(),
        }
    }

    /// Whether nothing the snapshot covers has been written since.
    pub fn is_current(&self, snapshot: &Snapshot) -> bool {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        let get = |t: u32| current.get(&(snapshot.database, t)).copied().unwrap_or(0);
        get(EPOCH) == snapshot.epoch && snapshot.tables.iter().all(|&(t, g)| get(t) == g)
    }

    /// Moves the generations of `tables`.
    pub fn bump(&self, database: u32, tables: &[u32]) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        for &t in tables {
            current.insert(
                (database, t),
                self.clock.fetch_add(1, Ordering::Relaxed) + 1,
            );
        }
    }

    /// The snapshot from local values only if every one of them is known
    /// (with Redis, an unknown generation must be read from Redis).
    pub fn known(&self, database: u32, tables: &[u32]) -> Option<Snapshot> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        let epoch = *current.get(&(database, EPOCH))?;
        let tables = tables
            .iter()
            .map(|&t| current.get(&(database, t)).map(|&g| (t, g)))
            .collect::<Option<_>>()?;
        Some(Snapshot {
            database,
            epoch,
            tables,
        })
    }

    /// Records authoritative values (from Redis). Generations only move
    /// forward, so a late or repeated message changes nothing.
    pub fn observe(&self, database: u32, values: &[(u32, u64)]) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        for &(t, g) in values {
            let slot = current.entry((database, t)).or_insert(0);
            *slot = (*slot).max(g);
        }
    }

    /// Every (database, table) held, for re-reading after the bus was lost.
    pub fn held(&self) -> Vec<(u32, u32)> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_outdates_snapshots_that_cover_it() {
        let g = Generations::default();
        let s = g.snapshot(1, &[10, 11]);
        assert!(g.is_current(&s));
        g.bump(1, &[12]);
        assert!(g.is_current(&s));
        g.bump(2, &[10]);
        assert!(g.is_current(&s));
        g.bump(1, &[11]);
        assert!(!g.is_current(&s));
        let s = g.snapshot(1, &[10, 11]);
        g.bump(1, &[EPOCH]);
        assert!(!g.is_current(&s));
    }
}
