//! Busy polling while Redis lookups' replies are due (`redis.busy_poll`).
//!
//! A Redis-tier hit crosses two more process boundaries than a direct
//! query, and each crossing that finds the receiving thread asleep pays for
//! waking it: on a virtual machine that wake-up is often 20–60 µs, several
//! times what Redis spends on the lookup. While a lookup is in flight, a
//! poller task keeps the runtime's only worker thread turning over instead
//! of letting it sleep in `epoll_wait`: with nothing else runnable, a
//! yielded task makes the worker poll the I/O driver without blocking, so
//! the reply is picked up as soon as it lands. A spin ends when nothing is
//! in flight or after the configured limit, and only a lookup sent after
//! that starts another, so a slow or distant Redis costs at most the limit
//! per burst of lookups.
//!
//! Only with one worker thread: with more, a parked worker holds the I/O
//! driver while it sleeps, so spinning polls nothing and wakes idle
//! workers instead.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The poller's shared state; the poller task holds one reference and the
/// shared tier the other.
pub struct BusyPoll {
    limit: Duration,
    /// Lookups sent to Redis and not yet answered.
    in_flight: AtomicUsize,
    /// Signalled for every lookup sent (and on stop); the permit it leaves
    /// starts the next spin.
    lookup_sent: Notify,
    stopped: AtomicBool,
    /// Wall time spent spinning, in nanoseconds: an upper bound on the CPU
    /// the setting costs (other tasks run between the poller's turns).
    spun_nanos: AtomicU64,
    /// A spin is under way.
    spinning: AtomicBool,
}

impl BusyPoll {
    /// Starts the poller on the current runtime; `None` when `limit` is
    /// zero or the runtime has more than one worker thread.
    pub fn start(limit: Duration) -> Option<Arc<BusyPoll>> {
        if limit.is_zero() {
            return None;
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let workers = runtime.metrics().num_workers();
        if workers != 1 {
            tracing::warn!(
                workers,
                "redis.busy_poll is ignored: it needs worker_threads = 1"
            );
            return None;
        }
        let poll = Arc::new(BusyPoll {
            limit,
            in_flight: AtomicUsize::new(0),
            lookup_sent: Notify::new(),
            stopped: AtomicBool::new(false),
            spun_nanos: AtomicU64::new(0),
            spinning: AtomicBool::new(false),
        });
        runtime.spawn(poll.clone().run());
        Some(poll)
    }

    /// Marks a lookup as in flight until the returned guard is dropped
    /// (answered, failed or abandoned alike).
    pub fn awaiting_reply(&self) -> AwaitingReply<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.lookup_sent.notify_one();
        AwaitingReply(self)
    }

    /// Time spent spinning so far.
    pub fn spun(&self) -> Duration {
        Duration::from_nanos(self.spun_nanos.load(Ordering::Relaxed))
    }

    /// Ends the poller task.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.lookup_sent.notify_one();
    }

    async fn run(self: Arc<Self>) {
        loop {
            self.lookup_sent.notified().await;
            let began = Instant::now();
            self.spinning.store(true, Ordering::Relaxed);
            while self.in_flight.load(Ordering::Relaxed) > 0
                && !self.stopped.load(Ordering::Relaxed)
                && began.elapsed() < self.limit
            {
                // Deferred until the runtime has run what is ready and
                // polled the I/O driver without blocking.
                tokio::task::yield_now().await;
            }
            let spun = began.elapsed().as_nanos() as u64;
            self.spun_nanos.fetch_add(spun, Ordering::Relaxed);
            self.spinning.store(false, Ordering::Relaxed);
            if self.stopped.load(Ordering::Relaxed) {
                return;
            }
        }
    }
}

/// A lookup in flight, for as long as it lives.
pub struct AwaitingReply<'a>(&'a BusyPoll);

impl Drop for AwaitingReply<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits until the poller is (`true`) or is not (`false`) in a spin.
    async fn until_spinning(poll: &BusyPoll, spinning: bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while poll.spinning.load(Ordering::Relaxed) != spinning {
            assert!(
                Instant::now() < deadline,
                "spinning never became {spinning}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_poller_spins_while_a_reply_is_due_and_no_longer_than_its_limit() {
        assert!(BusyPoll::start(Duration::ZERO).is_none());
        let poll = BusyPoll::start(Duration::from_secs(10)).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(poll.spun(), Duration::ZERO, "nothing in flight, no spin");

        // Answered 10 ms into the spin: spun from the send to the answer.
        let sent = Instant::now();
        let reply = poll.awaiting_reply();
        until_spinning(&poll, true).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(reply);
        until_spinning(&poll, false).await;
        let answered = poll.spun();
        assert!(
            answered >= Duration::from_millis(10) && answered <= sent.elapsed(),
            "spun {answered:?} for a reply answered 10 ms into the spin"
        );
        poll.stop();

        // Never answered: spun for the limit, then not again while the
        // same lookup stays in flight.
        let poll = BusyPoll::start(Duration::from_millis(30)).unwrap();
        let _stuck = poll.awaiting_reply();
        until_spinning(&poll, true).await;
        until_spinning(&poll, false).await;
        let given_up = poll.spun();
        assert!(given_up >= Duration::from_millis(30), "spun {given_up:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(poll.spun(), given_up, "spun again for the same lookup");
        poll.stop();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn more_than_one_worker_thread_turns_it_off() {
        assert!(BusyPoll::start(Duration::from_micros(50)).is_none());
    }
}
