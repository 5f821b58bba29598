//! Which results are in Redis, as far as this instance can tell: every
//! pgstash announces the entries it stores on the bus, so a lookup for an
//! entry nobody announced can skip the Redis round trip and go straight to
//! Postgres.
//!
//! The knowledge is complete only once the subscription has been up for
//! as long as an entry can live (`warmup`): entries stored before that were
//! never announced to this instance, so until then every lookup asks Redis.
//! A scan of Redis (for each subscription) makes it complete sooner.
//! Losing the bus suspends completeness until the bus is back. A set that
//! was complete before is trusted again at once: what was announced while
//! the bus was down is missed only until the new subscription's scan has
//! found it, and a long rescan of a shared Redis does not send every miss
//! to Redis meanwhile. An announcement that was missed costs a Redis hit
//! (the query goes to Postgres instead), never a stale row: entries are
//! still read and checked as before when they are looked up.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::coarse_ms;

/// One announced entry: its id and how long it lives (ms).
const RECORD_LEN: usize = 16 + 4;

const SHARDS: usize = 16;

/// Ids are hashes already: their bits are as good as any hash of them.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys are hashed")
    }
    fn write_u64(&mut self, folded: u64) {
        self.0 = folded;
    }
}

/// An id folded to the 64 bits the set keeps: a slot of 16 bytes rather
/// than the 32 a `u128` key is aligned to, so the set takes half the
/// memory and its lookups touch less of it. Two live ids that fold alike
/// share a slot holding the later of their expiries: one may look present
/// when it is not, which costs a Redis lookup, never the other way round.
fn folded(id: u128) -> u64 {
    (id as u64) ^ ((id >> 64) as u64)
}

/// Folded id → when it expires (`coarse_ms`), and when a full shard may
/// next be swept: a sweep that found nothing expired is not repeated for
/// every insert after it.
#[derive(Default)]
struct Shard {
    ids: HashMap<u64, u64, BuildHasherDefault<IdHasher>>,
    next_sweep_ms: u64,
}

/// How long a full shard waits before it is swept again.
const SWEEP_INTERVAL_MS: u64 = 1000;

/// How far the set can be trusted to hold every live entry.
#[derive(Clone, Copy)]
enum Completeness {
    /// Subscribed: complete from `Presence::complete_from` (once warm,
    /// or scanned).
    Subscribed,
    /// The bus is down. `was_complete`: the set was complete when it was
    /// lost, so it is again as soon as the bus is back.
    Down { was_complete: bool },
}

pub struct Presence {
    shards: Vec<Mutex<Shard>>,
    /// Ids per shard before expired ones are swept out.
    shard_capacity: usize,
    /// A shard was full of live ids: some announcements were dropped, so
    /// nothing is sure until a sweep makes room again.
    overflowed: AtomicBool,
    completeness: Mutex<Completeness>,
    /// While subscribed, when the set is complete from (`coarse_ms`);
    /// `u64::MAX` while the bus is down. Set under the `completeness`
    /// lock; read by every lookup, which takes no lock for it.
    complete_from: AtomicU64,
    warmup: Mutex<Duration>,
    /// Counts subscriptions, so a scan of Redis finishing after the bus
    /// was lost and regained does not vouch for the new subscription.
    subscriptions: AtomicU64,
}

impl Presence {
    pub fn new(capacity: u64) -> Presence {
        Presence {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            shard_capacity: (capacity as usize).div_ceil(SHARDS),
            overflowed: AtomicBool::new(capacity == 0),
            completeness: Mutex::new(Completeness::Down {
                was_complete: false,
            }),
            complete_from: AtomicU64::new(u64::MAX),
            warmup: Mutex::new(Duration::from_secs(3600)),
            subscriptions: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: u128) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[(id >> 120) as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The longest an entry may live in Redis.
    pub fn set_warmup(&self, warmup: Duration) {
        *self.warmup.lock().unwrap_or_else(|e| e.into_inner()) = warmup;
    }

    pub fn warmup(&self) -> Duration {
        *self.warmup.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, id: u128, ttl: Duration) {
        self.insert_at(id, ttl, coarse_ms());
    }

    /// `insert` with the time read once for many.
    pub fn insert_at(&self, id: u128, ttl: Duration, now: u64) {
        let expires = now.saturating_add(ttl.as_millis() as u64);
        let mut shard = self.shard(id);
        let id = folded(id);
        if shard.ids.len() >= self.shard_capacity && !shard.ids.contains_key(&id) {
            if now >= shard.next_sweep_ms {
                shard.ids.retain(|_, &mut expires| expires > now);
                shard.next_sweep_ms = now + SWEEP_INTERVAL_MS;
            }
            if shard.ids.len() >= self.shard_capacity {
                self.overflowed.store(true, Ordering::Relaxed);
                return;
            }
            self.overflowed.store(false, Ordering::Relaxed);
        }
        let slot = shard.ids.entry(id).or_insert(expires);
        *slot = (*slot).max(expires);
    }

    /// The subscription is (again) receiving announcements; returns its
    /// number for `scanned`.
    pub fn subscribed(&self) -> u64 {
        let warmup = *self.warmup.lock().unwrap_or_else(|e| e.into_inner());
        let mut completeness = self.completeness();
        let now = coarse_ms();
        let from = match *completeness {
            Completeness::Down { was_complete: true } => now,
            _ => now.saturating_add(warmup.as_millis() as u64),
        };
        *completeness = Completeness::Subscribed;
        self.complete_from.store(from, Ordering::SeqCst);
        self.subscriptions.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn completeness(&self) -> std::sync::MutexGuard<'_, Completeness> {
        self.completeness.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every entry that was in Redis when subscription number
    /// `subscription` started has been recorded (by scanning Redis): the
    /// set is complete without waiting for old entries to expire.
    pub fn scanned(&self, subscription: u64) {
        let completeness = self.completeness();
        if matches!(*completeness, Completeness::Subscribed)
            && self.subscriptions.load(Ordering::SeqCst) == subscription
        {
            self.complete_from.store(coarse_ms(), Ordering::SeqCst);
        }
    }

    /// Whether subscription number `subscription` is still the one
    /// announcements arrive on.
    pub fn is_current(&self, subscription: u64) -> bool {
        matches!(*self.completeness(), Completeness::Subscribed)
            && self.subscriptions.load(Ordering::SeqCst) == subscription
    }

    /// Whether announcements had to be dropped for lack of room.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// The subscription is down: announcements may be missed.
    pub fn lost(&self) {
        let mut completeness = self.completeness();
        // Only the first report of a loss knows whether the set was complete.
        if let Completeness::Subscribed = *completeness {
            *completeness = Completeness::Down {
                was_complete: coarse_ms() >= self.complete_from.load(Ordering::SeqCst),
            };
            self.complete_from.store(u64::MAX, Ordering::SeqCst);
        }
    }

    /// Whether Redis surely holds no entry with this id. After an
    /// overflow the set may lack live ids, so nothing is sure.
    pub fn surely_absent(&self, id: u128) -> bool {
        if self.overflowed() {
            return false;
        }
        let now = coarse_ms();
        if now < self.complete_from.load(Ordering::SeqCst) {
            return false;
        }
        !matches!(self.shard(id).ids.get(&folded(id)), Some(&expires) if expires > now)
    }

    pub fn encode(records: &[(u128, Duration)]) -> Vec<u8> {
        let mut payload = Vec::with_capacity(records.len() * RECORD_LEN);
        for (id, ttl) in records {
            payload.extend_from_slice(&id.to_be_bytes());
            let millis = u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX);
            payload.extend_from_slice(&millis.to_be_bytes());
        }
        payload
    }

    /// Records every announced entry; a payload of the wrong length is
    /// ignored whole.
    pub fn record_announcement(&self, payload: &[u8]) -> usize {
        if payload.len() % RECORD_LEN != 0 {
            return 0;
        }
        let now = coarse_ms();
        for record in payload.chunks_exact(RECORD_LEN) {
            let (id, millis) = record.split_at(16);
            let id = u128::from_be_bytes(id.try_into().unwrap_or_default());
            let millis = u32::from_be_bytes(millis.try_into().unwrap_or_default());
            self.insert_at(id, Duration::from_millis(u64::from(millis)), now);
        }
        payload.len() / RECORD_LEN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_set_vouches_for_nothing_until_expired_ids_make_room() {
        let presence = Presence::new(SHARDS as u64);
        presence.set_warmup(Duration::ZERO);
        presence.subscribed();
        // Ids 0 and 1 land in the same shard, of room for one.
        presence.insert(0, Duration::from_millis(1));
        // Past the expiry on the coarse clock too.
        std::thread::sleep(Duration::from_millis(1 + 2 * crate::clock::COARSE_SLACK_MS));
        presence.insert(1, Duration::from_secs(60));
        assert!(presence.surely_absent(0), "expired ids are swept out");
        presence.insert(2, Duration::from_secs(60));
        assert!(presence.overflowed());
        assert!(!presence.surely_absent(3));
    }

    #[test]
    fn ids_that_fold_alike_err_towards_asking_redis() {
        let presence = Presence::new(100);
        presence.set_warmup(Duration::ZERO);
        presence.subscribed();
        let announced: u128 = (7 << 64) | 5;
        let twin: u128 = (9 << 64) | (9 ^ 7 ^ 5);
        assert_eq!(folded(announced), folded(twin));
        presence.insert(announced, Duration::from_secs(60));
        assert!(!presence.surely_absent(announced));
        assert!(!presence.surely_absent(twin), "a twin costs a Redis lookup");
        presence.insert(twin, Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(1 + 2 * crate::clock::COARSE_SLACK_MS));
        assert!(
            !presence.surely_absent(announced),
            "a twin's shorter life must not hide a live id"
        );
        assert!(presence.surely_absent(announced ^ 1));
    }

    #[test]
    fn complete_only_after_warmup_and_while_subscribed() {
        let presence = Presence::new(100);
        presence.set_warmup(Duration::ZERO);
        assert!(!presence.surely_absent(1), "not subscribed yet");
        presence.subscribed();
        assert!(presence.surely_absent(1));
        let payload = Presence::encode(&[(1, Duration::from_secs(60))]);
        assert_eq!(presence.record_announcement(&payload), 1);
        assert!(!presence.surely_absent(1));
        assert!(presence.surely_absent(2));
        assert_eq!(presence.record_announcement(&payload[..7]), 0);
        presence.lost();
        assert!(!presence.surely_absent(2));
        presence.lost();
        presence.set_warmup(Duration::from_secs(60));
        presence.subscribed();
        assert!(
            presence.surely_absent(2),
            "complete before the loss, so again at once"
        );
        assert!(!presence.surely_absent(1));

        // Lost before it was ever complete: back to warming up.
        let presence = Presence::new(100);
        presence.set_warmup(Duration::from_secs(60));
        presence.subscribed();
        presence.lost();
        let first = presence.subscribed();
        assert!(!presence.surely_absent(2), "still warming up");
        let second = presence.subscribed();
        presence.scanned(first);
        assert!(
            !presence.surely_absent(2),
            "a scan for an older subscription"
        );
        presence.scanned(second);
        assert!(presence.surely_absent(2));
    }
}
