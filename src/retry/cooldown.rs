//! The shared cooldown: the instant until which no request may be sent.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

/// One instant, shared by every service of a layer, before which no attempt is
/// sent. Lock-free: reading it on the fast path is one atomic load.
#[derive(Debug)]
pub(crate) struct Cooldown {
    /// Origin of the stored offsets.
    base: Instant,
    /// Nanoseconds after `base` until which nobody sends; 0 = never set.
    until: AtomicU64,
    /// The status that set the latest `until`.
    status: AtomicU16,
}

impl Cooldown {
    pub(crate) fn new() -> Self {
        Cooldown {
            base: Instant::now(),
            until: AtomicU64::new(0),
            status: AtomicU16::new(StatusCode::TOO_MANY_REQUESTS.as_u16()),
        }
    }

    /// The end of the cooldown and the status that set it, if one was ever set
    /// (it may lie in the past).
    pub(crate) fn get(&self) -> Option<(Instant, StatusCode)> {
        let nanos = self.until.load(Ordering::Acquire);
        if nanos == 0 {
            return None;
        }
        let status = StatusCode::from_u16(self.status.load(Ordering::Relaxed))
            .unwrap_or(StatusCode::TOO_MANY_REQUESTS);
        Some((self.base + Duration::from_nanos(nanos), status))
    }

    /// Time left at `now`, if any.
    pub(crate) fn remaining(&self, now: Instant) -> Option<Duration> {
        self.get()
            .map(|(until, _)| until.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// Ends the cooldown now: the next attempt goes without waiting.
    pub(crate) fn reset(&self) {
        self.until.store(0, Ordering::Release);
    }

    /// Pushes the cooldown to `until` unless it already ends later.
    pub(crate) fn extend(&self, until: Instant, status: StatusCode) {
        let nanos = until.saturating_duration_since(self.base).as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX).max(1);
        let previous = self.until.fetch_max(nanos, Ordering::AcqRel);
        if previous < nanos {
            self.status.store(status.as_u16(), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn keeps_the_latest_instant() {
        let c = Cooldown::new();
        let now = Instant::now();
        assert_eq!(c.get(), None);
        assert_eq!(c.remaining(now), None);
        c.extend(now + Duration::from_secs(5), StatusCode::TOO_MANY_REQUESTS);
        c.extend(
            now + Duration::from_secs(2),
            StatusCode::SERVICE_UNAVAILABLE,
        );
        assert_eq!(
            c.get(),
            Some((now + Duration::from_secs(5), StatusCode::TOO_MANY_REQUESTS))
        );
        c.extend(
            now + Duration::from_secs(9),
            StatusCode::from_u16(529).unwrap(),
        );
        assert_eq!(c.remaining(now), Some(Duration::from_secs(9)));
        assert_eq!(c.get().map(|(_, s)| s.as_u16()), Some(529));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(c.remaining(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn reset_ends_it_and_a_later_one_starts_afresh() {
        let c = Cooldown::new();
        let now = Instant::now();
        c.extend(now + Duration::from_secs(60), StatusCode::TOO_MANY_REQUESTS);
        c.reset();
        assert_eq!(c.get(), None);
        c.extend(now + Duration::from_secs(2), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(c.remaining(now), Some(Duration::from_secs(2)));
    }
}
