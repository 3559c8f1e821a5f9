//! The wall clock that the server's absolute instants are read against: the
//! `anthropic-ratelimit-*-reset` times (RFC 3339) and an HTTP-date
//! `retry-after` become delays as `instant - now`.
//!
//! The default is the system clock. A simulation that runs a client and an
//! emulated server in one process under tokio's paused clock gives both the
//! same [`WallClock::following_tokio`]: the server writes its reset instants
//! and the client reads them on one clock that advances with virtual time,
//! so a delay read from a header does not depend on the sub-second phase of
//! the real clock (the API writes resets rounded up to the whole second, so
//! with the system clock that phase adds up to a second to each delay, a
//! different amount each run).
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, UNIX_EPOCH};
//! use tower_llm_limits::clock::WallClock;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let start = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
//! let clock = WallClock::following_tokio(start);
//! tokio::time::sleep(Duration::from_millis(1_500)).await; // virtual time
//! assert_eq!(clock.now(), start + Duration::from_millis(1_500));
//! # }
//! ```

use std::time::SystemTime;

use tokio::time::Instant;

/// A source of the current wall-clock time; cheap to clone (clones read the
/// same clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WallClock {
    anchor: Option<(SystemTime, Instant)>,
}

impl WallClock {
    /// The system clock, [`SystemTime::now`] (the default).
    pub const fn system() -> Self {
        WallClock { anchor: None }
    }

    /// A clock that reads `start` now and then advances with tokio's clock
    /// ([`tokio::time::Instant`]), paused or not: `start` plus the time
    /// tokio has let pass since this call. Create it inside the runtime
    /// whose clock it follows.
    pub fn following_tokio(start: SystemTime) -> Self {
        WallClock {
            anchor: Some((start, Instant::now())),
        }
    }

    /// The current time on this clock.
    pub fn now(&self) -> SystemTime {
        match self.anchor {
            None => SystemTime::now(),
            Some((start, at)) => {
                let elapsed = Instant::now().saturating_duration_since(at);
                start.checked_add(elapsed).unwrap_or(start)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn the_system_clock_is_the_default() {
        assert_eq!(WallClock::default(), WallClock::system());
        let before = SystemTime::now();
        let now = WallClock::system().now();
        assert!(now >= before);
    }

    #[tokio::test(start_paused = true)]
    async fn following_tokio_advances_with_virtual_time_only() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000);
        let clock = WallClock::following_tokio(start);
        let copy = clock;
        assert_eq!(clock.now(), start);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now(), start + Duration::from_secs(90));
        assert_eq!(copy.now(), clock.now());
    }
}
