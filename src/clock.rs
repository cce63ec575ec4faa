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
    /// Wakes sleepers when `advance` jumps, so they re-check the time.
    advanced: tokio::sync::Notify,
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
            advanced: tokio::sync::Notify::new(),
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
        self.0.advanced.notify_waiters();
    }

    /// Sleep until wall time `at_ms` on this clock, waking early to
    /// re-check when [`Clock::advance`] jumps.
    pub async fn sleep_until_ms(&self, at_ms: i64) {
        loop {
            // Registered before reading the time, so a jump in between is seen.
            let mut advanced = std::pin::pin!(self.0.advanced.notified());
            advanced.as_mut().enable();
            let left = at_ms - self.now_ms();
            if left <= 0 {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(left as u64)) => {}
                _ = advanced => {}
            }
        }
    }
}

/// 9999-12-31T23:59:59.999Z, the last instant RFC 3339 can write.
const RFC3339_MS_MAX: i64 = 253_402_300_799_999;

/// RFC 3339 UTC text of a millisecond timestamp (SPEC §2: JSON times).
/// Milliseconds are kept: a key's `rotated_at` decides which events it may
/// verify, and truncating it to the second would refuse events signed
/// just before a rotation.
///
/// Any i64 is taken: times before 1970 or after 9999 (which RFC 3339's
/// four-digit year cannot write, and which stored peer data may hold) are
/// clamped to the first or last instant it can write, never a panic.
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.clamp(0, RFC3339_MS_MAX) as u64);
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

    #[tokio::test(start_paused = true)]
    async fn sleepers_wake_when_the_clock_jumps() {
        let clock = Clock::starting_at(0);
        let c = clock.clone();
        let sleeper = tokio::spawn(async move { c.sleep_until_ms(86_400_000).await });
        tokio::task::yield_now().await;
        clock.advance(Duration::from_secs(86_400));
        tokio::time::timeout(Duration::from_millis(10), sleeper)
            .await
            .expect("woken by advance")
            .unwrap();
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(1_764_000_000_123), "2025-11-24T16:00:00.123Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(i64::MIN), "1970-01-01T00:00:00.000Z");
    }

    proptest::proptest! {
        #[test]
        fn rfc3339_takes_every_i64(ms in proptest::num::i64::ANY) {
            let text = rfc3339(ms);
            let back = humantime::parse_rfc3339(&text).unwrap();
            let back_ms = back.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
            proptest::prop_assert_eq!(back_ms, ms.clamp(0, RFC3339_MS_MAX));
        }
    }
}
