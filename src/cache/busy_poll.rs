//! Busy polling while a Redis lookup's reply is due (`redis.busy_poll`).
//!
//! A Redis-tier hit crosses two more process boundaries than a direct
//! query, and each crossing that finds the receiving thread asleep pays for
//! waking it: on a virtual machine that wake-up is often 20–60 µs, several
//! times what Redis spends on the lookup. While a lookup is in flight, a
//! poller task keeps its worker thread turning the runtime over (each turn
//! polls the I/O driver without blocking) instead of letting it sleep in
//! `epoll_wait`, so the reply is picked up as soon as it lands. The poller
//! gives up after the configured limit per lookup sent, so a slow or
//! distant Redis costs at most that much CPU per lookup, and it sleeps
//! whenever no lookup is in flight.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

pub struct BusyPoll {
    limit: Duration,
    in_flight: AtomicUsize,
    sent: Notify,
    stopped: AtomicBool,
    /// Time spent polling, in microseconds: the CPU the setting costs.
    polled_micros: AtomicU64,
}

impl BusyPoll {
    /// Starts the poller on `runtime`; `None` when `limit` is zero (off).
    pub fn start(limit: Duration, runtime: &tokio::runtime::Handle) -> Option<Arc<BusyPoll>> {
        if limit.is_zero() {
            return None;
        }
        let poll = Arc::new(BusyPoll {
            limit,
            in_flight: AtomicUsize::new(0),
            sent: Notify::new(),
            stopped: AtomicBool::new(false),
            polled_micros: AtomicU64::new(0),
        });
        runtime.spawn(poll.clone().run());
        Some(poll)
    }

    /// Marks a lookup as in flight until the returned guard is dropped
    /// (answered, failed or abandoned alike).
    pub fn awaiting_reply(&self) -> AwaitingReply<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.sent.notify_one();
        AwaitingReply(self)
    }

    pub fn polled(&self) -> Duration {
        Duration::from_micros(self.polled_micros.load(Ordering::Relaxed))
    }

    /// Ends the poller task.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.sent.notify_one();
    }

    async fn run(self: Arc<Self>) {
        loop {
            // One stored permit per burst of sends: a lookup sent during a
            // spin starts another spin, one that found nothing to wait for
            // costs one turn.
            self.sent.notified().await;
            if self.stopped.load(Ordering::Relaxed) {
                return;
            }
            let began = Instant::now();
            while self.in_flight.load(Ordering::Relaxed) > 0 && began.elapsed() < self.limit {
                // Yielding defers this task until the runtime has run what
                // is ready and polled the I/O driver without blocking.
                tokio::task::yield_now().await;
            }
            let polled = began.elapsed().as_micros() as u64;
            self.polled_micros.fetch_add(polled, Ordering::Relaxed);
        }
    }
}

pub struct AwaitingReply<'a>(&'a BusyPoll);

impl Drop for AwaitingReply<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Handle {
        tokio::runtime::Handle::current()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_poller_polls_while_a_reply_is_due_and_for_no_longer_than_its_limit() {
        assert!(BusyPoll::start(Duration::ZERO, &runtime()).is_none());
        let poll = BusyPoll::start(Duration::from_millis(30), &runtime()).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            poll.polled(),
            Duration::ZERO,
            "nothing in flight, nothing polled"
        );

        // A reply answered after 10 ms: polled until then.
        let reply = poll.awaiting_reply();
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(reply);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let answered = poll.polled();
        assert!(
            answered >= Duration::from_millis(9) && answered < Duration::from_millis(30),
            "polled {answered:?} for a reply due 10 ms"
        );

        // A reply that never comes: polled for the limit, then not again
        // until another lookup is sent.
        let _stuck = poll.awaiting_reply();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let given_up = poll.polled() - answered;
        assert!(
            given_up >= Duration::from_millis(30) && given_up < Duration::from_millis(60),
            "polled {given_up:?} with a limit of 30 ms"
        );
        poll.stop();
    }
}
