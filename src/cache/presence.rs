//! Which results are in Redis, as far as this instance can tell: every
//! pgstash announces the entries it stores on the bus, so a lookup for an
//! entry nobody announced can skip the Redis round trip and go straight to
//! Postgres.
//!
//! The knowledge is complete only once the subscription has been up for
//! as long as an entry can live (`warmup`): entries stored before that were
//! never announced to this instance, so until then every lookup asks Redis.
//! Losing the bus ends completeness until it is back and warm again. An
//! announcement that was missed costs a Redis hit (the query goes to
//! Postgres instead), never a stale row: entries are still read and checked
//! as before when they are looked up.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use moka::sync::Cache;
use moka::Expiry;

/// One announced entry: its id and how long it lives (ms).
const RECORD_LEN: usize = 16 + 4;

struct AnnouncedTtl;

impl Expiry<u128, u32> for AnnouncedTtl {
    fn expire_after_create(
        &self,
        _id: &u128,
        millis: &u32,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(Duration::from_millis(u64::from(*millis)))
    }
}

pub struct Presence {
    ids: Cache<u128, u32>,
    capacity: u64,
    /// From when the set holds every live entry; `None` while the bus is
    /// down.
    complete_from: Mutex<Option<Instant>>,
    warmup: Mutex<Duration>,
    /// Counts subscriptions, so a scan of Redis finishing after the bus
    /// was lost and regained does not vouch for the new subscription.
    subscriptions: std::sync::atomic::AtomicU64,
}

impl Presence {
    pub fn new(capacity: u64) -> Presence {
        Presence {
            ids: Cache::builder()
                .max_capacity(capacity)
                .expire_after(AnnouncedTtl)
                .build(),
            capacity,
            complete_from: Mutex::new(None),
            warmup: Mutex::new(Duration::from_secs(3600)),
            subscriptions: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The longest an entry may live in Redis.
    pub fn set_warmup(&self, warmup: Duration) {
        *self.warmup.lock().unwrap_or_else(|e| e.into_inner()) = warmup;
    }

    pub fn warmup(&self) -> Duration {
        *self.warmup.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, id: u128, ttl: Duration) {
        let millis = u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX).max(1);
        self.ids.insert(id, millis);
    }

    /// The subscription is (again) receiving announcements; returns its
    /// number for `scanned`.
    pub fn subscribed(&self) -> u64 {
        let warmup = *self.warmup.lock().unwrap_or_else(|e| e.into_inner());
        *self.complete_from.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + warmup);
        self.subscriptions
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1
    }

    /// Every entry that was in Redis when subscription number
    /// `subscription` started has been recorded (by scanning Redis): the
    /// set is complete without waiting for old entries to expire.
    pub fn scanned(&self, subscription: u64) {
        let mut complete_from = self.complete_from.lock().unwrap_or_else(|e| e.into_inner());
        if complete_from.is_some()
            && self.subscriptions.load(std::sync::atomic::Ordering::SeqCst) == subscription
        {
            *complete_from = Some(Instant::now());
        }
    }

    /// Room left before the set stops being trustworthy.
    pub fn has_room_for(&self, more: u64) -> bool {
        self.ids.entry_count() + more < self.capacity / 10 * 9
    }

    /// The subscription is down: announcements may be missed.
    pub fn lost(&self) {
        *self.complete_from.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether Redis surely holds no entry with this id. Near capacity the
    /// set may have dropped live ids, so nothing is sure any more.
    pub fn surely_absent(&self, id: u128) -> bool {
        if self.ids.entry_count() >= self.capacity / 10 * 9 {
            return false;
        }
        let complete = self
            .complete_from
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|from| Instant::now() >= from);
        complete && !self.ids.contains_key(&id)
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
        for record in payload.chunks_exact(RECORD_LEN) {
            let (id, millis) = record.split_at(16);
            let id = u128::from_be_bytes(id.try_into().unwrap_or_default());
            let millis = u32::from_be_bytes(millis.try_into().unwrap_or_default());
            self.ids.insert(id, millis.max(1));
        }
        payload.len() / RECORD_LEN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        presence.set_warmup(Duration::from_secs(60));
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
