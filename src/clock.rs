//! The one clock every time-dependent part reads (SPEC: time is injectable).
//!
//! Wall time is derived from tokio's monotonic clock plus a start offset, so
//! a test that pauses tokio time (`tokio::time::pause`) moves timers *and*
//! `now_ms()` together, and [`Clock::advance`] can jump a whole running
//! server forward (invite expiry, key overlap, 24 h give-up) without waiting.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

#[derive(Debug)]
struct Inner {
    wall_at_start_ms: i64,
    start: Instant,
    /// Extra milliseconds added by `advance`; only tests move it.
    offset_ms: AtomicI64,
}

/// Cheap to clone; all clones share one timeline.
#[derive(Debug, Clone)]
pub struct Clock(Arc<Inner>);

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl Clock {
    /// The real clock, anchored at the system wall time now.
    pub fn system() -> Clock {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Clock::starting_at(wall)
    }

    /// A clock that reads `wall_ms` now and moves with tokio time from here.
    pub fn starting_at(wall_ms: i64) -> Clock {
        Clock(Arc::new(Inner {
            wall_at_start_ms: wall_ms,
            start: Instant::now(),
            offset_ms: AtomicI64::new(0),
        }))
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        let elapsed = self.0.start.elapsed().as_millis() as i64;
        self.0.wall_at_start_ms + elapsed + self.0.offset_ms.load(Ordering::Relaxed)
    }

    pub fn now_secs(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }

    /// Jump this timeline forward (tests only move time this way).
    pub fn advance(&self, by: Duration) {
        self.0
            .offset_ms
            .fetch_add(by.as_millis() as i64, Ordering::Relaxed);
    }

    /// Sleep until wall time `at_ms` on this clock. Because `advance` can
    /// jump, long sleeps are cut into slices and re-checked.
    pub async fn sleep_until_ms(&self, at_ms: i64) {
        const SLICE_MS: i64 = 1000;
        loop {
            let left = at_ms - self.now_ms();
            if left <= 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(left.min(SLICE_MS) as u64)).await;
        }
    }
}

/// RFC 3339 UTC text of a millisecond timestamp (SPEC §2: JSON times).
/// Milliseconds are kept: a key's `rotated_at` decides which events it may
/// verify, and truncating it to the second would refuse events signed
/// just before a rotation.
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paused_time_moves_the_wall_clock() {
        let clock = Clock::starting_at(1_000_000);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(clock.now_ms(), 1_005_000);
        clock.advance(Duration::from_secs(3600));
        assert_eq!(clock.now_ms(), 1_005_000 + 3_600_000);
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(1_764_000_000_123), "2025-11-24T16:00:00.123Z");
    }
}
