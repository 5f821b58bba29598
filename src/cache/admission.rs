//! Which fills go to Redis under `redis.admit = "reuse"`: a result earns
//! its place there by being read again through this instance. A result
//! kept in the local tier carries that mark itself (`Entry::unshared`);
//! one that is not (local tier off, or evicted) is remembered here by its
//! id until it is filled again.
//!
//! The memory is a fixed table of fingerprints, one per slot, overwritten
//! freely: forgetting a first fill only delays a store, and a fingerprint
//! collision only stores a result early. Neither can serve a wrong row,
//! since admission decides what is stored, never what is served.

use std::sync::atomic::{AtomicU64, Ordering};

/// 2^18 slots of 8 bytes: 2 MiB.
const SLOTS: usize = 1 << 18;

pub struct FirstFills {
    slots: Box<[AtomicU64]>,
}

impl Default for FirstFills {
    fn default() -> Self {
        FirstFills {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl FirstFills {
    /// Whether entry `id` was filled here before (and is now forgotten);
    /// if not, remembers this fill.
    pub fn seen_before(&self, id: u128) -> bool {
        let slot = &self.slots[id as usize % SLOTS];
        // Never 0, which marks an empty slot.
        let fingerprint = (id >> 64) as u64 | 1;
        if slot.load(Ordering::Relaxed) == fingerprint {
            slot.store(0, Ordering::Relaxed);
            return true;
        }
        slot.store(fingerprint, Ordering::Relaxed);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_second_fill_is_admitted_and_the_third_starts_over() {
        let fills = FirstFills::default();
        let id = 0xdead_beef_u128 << 64 | 7;
        assert!(!fills.seen_before(id));
        assert!(!fills.seen_before(id + 1), "another entry");
        assert!(fills.seen_before(id));
        assert!(!fills.seen_before(id));
        // Same slot, other fingerprint: the newer fill takes the slot.
        let rival = 0x1234_u128 << 64 | 7;
        assert!(!fills.seen_before(rival));
        assert!(!fills.seen_before(id));
    }
}
