//! Single-flight: concurrent misses for one key send one query upstream.
//! The first miss leads; the others wait for its fill (up to a timeout, so
//! a slow or failed leader cannot stall them) and then look again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::FastMap;
use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Flights {
    in_flight: Mutex<FastMap<u128, Arc<Notify>>>,
}

/// Held by the leader of a key; dropping it (fill stored or abandoned)
/// wakes the followers.
#[derive(Debug)]
pub struct Leader {
    flights: Arc<Flights>,
    key: u128,
}

impl Drop for Leader {
    fn drop(&mut self) {
        let notify = self
            .flights
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }
}

impl Flights {
    /// Becomes the leader for `key`, or waits for the current leader to
    /// finish (at most `timeout`) and returns `None`.
    pub async fn lead_or_wait(self: &Arc<Self>, key: u128, timeout: Duration) -> Option<Leader> {
        let notify = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            match in_flight.get(&key) {
                Some(notify) => notify.clone(),
                None => {
                    in_flight.insert(key, Arc::new(Notify::new()));
                    return Some(Leader {
                        flights: self.clone(),
                        key,
                    });
                }
            }
        };
        let notified = notify.notified();
        tokio::pin!(notified);
        // Registered before re-checking, so a leader finishing in between
        // still wakes us.
        notified.as_mut().enable();
        let still_running = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .is_some_and(|n| Arc::ptr_eq(n, &notify));
        if still_running {
            let _ = tokio::time::timeout(timeout, notified).await;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_wait_for_the_leader() {
        let flights = Arc::new(Flights::default());
        let leader = flights
            .lead_or_wait(1, Duration::from_secs(5))
            .await
            .unwrap();
        let f = flights.clone();
        let follower =
            tokio::spawn(async move { f.lead_or_wait(1, Duration::from_secs(5)).await.is_none() });
        tokio::task::yield_now().await;
        drop(leader);
        assert!(follower.await.unwrap());
        // Once the leader is gone, the next miss leads again.
        assert!(flights
            .lead_or_wait(1, Duration::from_secs(5))
            .await
            .is_some());
    }

    #[tokio::test]
    async fn a_stuck_leader_does_not_stall_followers() {
        let flights = Arc::new(Flights::default());
        let _leader = flights
            .lead_or_wait(2, Duration::from_secs(5))
            .await
            .unwrap();
        let started = std::time::Instant::now();
        assert!(flights
            .lead_or_wait(2, Duration::from_millis(50))
            .await
            .is_none());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
