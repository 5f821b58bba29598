//! A cheap clock for checks measured in milliseconds or more.
//!
//! `std::time::Instant::now` reads the TSC, which on a virtual machine costs
//! tens of nanoseconds; the hot path asked it several times per query for
//! leases and expiries of seconds. The coarse monotonic clock is read from
//! memory the kernel updates every tick (1-10 ms).

/// The most a coarse reading lags the true time: one kernel tick (HZ is at
/// least 100). A check that must not pass early allows for it.
pub const COARSE_SLACK_MS: u64 = 10;

/// Milliseconds since an arbitrary fixed point (boot), monotonic, at most
/// `COARSE_SLACK_MS` behind the true time.
pub fn coarse_ms() -> u64 {
    let now = coarsetime::Instant::now_without_cache_update();
    coarsetime::Duration::from_ticks(now.as_ticks()).as_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clock_follows_the_precise_one() {
        let (coarse, precise) = (coarse_ms(), std::time::Instant::now());
        std::thread::sleep(std::time::Duration::from_millis(50));
        let coarse = coarse_ms() - coarse;
        let precise = precise.elapsed().as_millis() as u64;
        assert!(
            coarse + COARSE_SLACK_MS >= precise,
            "{coarse} ms against {precise} ms"
        );
        assert!(
            coarse <= precise + COARSE_SLACK_MS,
            "{coarse} ms against {precise} ms"
        );
    }
}
