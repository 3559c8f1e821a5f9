//! The retry budget shared by a layer's services.
//!
//! # Why a budget and not only a maximum of retries?
//!
//! A maximum of retries bounds one request, not the fleet: when the API is in
//! trouble, every request retrying four times makes five times the load on a
//! server that is already failing. A budget allows retries as a fraction of the
//! recent first attempts (plus a small floor per second, so a quiet client can
//! still retry): once a large part of the traffic is retries, further retries
//! are refused and the request fails fast. This is the model of
//! `tower::retry::budget::TpsBudget` (and Finagle's budgets before it).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Configuration of a retry budget: retries allowed as a ratio of recent first
/// attempts, plus a floor per second, over a sliding window.
///
/// The defaults are tower's: 20 % of the first attempts of the last 10 seconds,
/// plus 10 retries per second.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_llm_limits::retry::{RetryAfterLayer, RetryBudget};
///
/// // At most one retry per ten requests, and 2 per second for a quiet client.
/// let layer = RetryAfterLayer::builder()
///     .budget(RetryBudget::new(0.1, 2, Duration::from_secs(30)))
///     .build();
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    ratio: f32,
    min_per_sec: u32,
    ttl: Duration,
}

impl RetryBudget {
    /// A budget allowing `ratio` retries per first attempt (0.2 = one retry per
    /// five requests) plus `min_per_sec` retries per second, counted over the
    /// last `ttl`.
    ///
    /// Out-of-range values are clamped rather than refused: `ratio` to
    /// `0.0..=1000.0` (NaN counts as 0), `ttl` to 1–60 seconds (as tower's).
    pub fn new(ratio: f32, min_per_sec: u32, ttl: Duration) -> Self {
        let ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1000.0)
        };
        RetryBudget {
            ratio,
            min_per_sec: min_per_sec.min(i32::MAX as u32),
            ttl: ttl.clamp(Duration::from_secs(1), Duration::from_secs(60)),
        }
    }

    /// Retries allowed per first attempt.
    pub fn ratio(&self) -> f32 {
        self.ratio
    }

    /// Retries allowed per second regardless of traffic.
    pub fn min_per_sec(&self) -> u32 {
        self.min_per_sec
    }

    /// How long a first attempt counts towards the budget.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new(0.2, 10, Duration::from_secs(10))
    }
}

const SLOTS: usize = 10;
/// Fixed-point unit of the budget: a first attempt deposits `UNIT`, a retry
/// withdraws `UNIT / ratio`.
const UNIT: i64 = 1000;

/// Run-time state of a [`RetryBudget`]: a sliding window of ten slots.
///
/// A deposit inside the current slot is one atomic add (the common case, on
/// every request); moving the window and withdrawing take the lock.
#[derive(Debug)]
pub(crate) struct BudgetState {
    window: Mutex<Window>,
    /// Origin of `slot_end`.
    base: Instant,
    /// End of the current slot, in nanoseconds after `base`.
    slot_end: AtomicU64,
    /// Balance change in the current slot, not yet committed to `Window::slots`.
    current: AtomicI64,
    slot_len: Duration,
    deposit: i64,
    withdraw: i64,
    reserve: i64,
}

#[derive(Debug)]
struct Window {
    /// Committed slots; `slots[index]` is the one being written (through `current`).
    slots: [i64; SLOTS],
    index: usize,
    slot_start: Instant,
}

impl BudgetState {
    pub(crate) fn new(config: RetryBudget) -> Self {
        // Fixed point: a first attempt deposits UNIT, a retry withdraws UNIT / ratio.
        let (deposit, withdraw) = if config.ratio <= 0.0 {
            (0, UNIT)
        } else {
            let w = (UNIT as f64 / f64::from(config.ratio)).round().max(1.0);
            (UNIT, w as i64)
        };
        let reserve_retries = f64::from(config.min_per_sec) * config.ttl.as_secs_f64();
        let reserve = (reserve_retries * withdraw as f64).min(i64::MAX as f64 / 4.0) as i64;
        let now = Instant::now();
        let slot_len = config.ttl / SLOTS as u32;
        BudgetState {
            window: Mutex::new(Window {
                slots: [0; SLOTS],
                index: 0,
                slot_start: now,
            }),
            base: now,
            slot_end: AtomicU64::new(nanos(slot_len)),
            current: AtomicI64::new(0),
            slot_len,
            deposit,
            withdraw,
            reserve,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves the window forward to `now`, forgetting slots older than the TTL.
    fn expire(&self, w: &mut Window, now: Instant) {
        let elapsed = now.saturating_duration_since(w.slot_start);
        if elapsed < self.slot_len {
            return;
        }
        let steps = (elapsed.as_nanos() / self.slot_len.as_nanos().max(1)).min(SLOTS as u128 + 1);
        let steps = steps as usize;
        w.slots[w.index % SLOTS] = self.current.swap(0, Ordering::AcqRel);
        for i in 1..=steps.min(SLOTS) {
            w.slots[(w.index + i) % SLOTS] = 0;
        }
        w.index = (w.index + steps) % SLOTS;
        if steps > SLOTS {
            w.slot_start = now;
        } else {
            w.slot_start += self.slot_len * steps as u32;
        }
        let end = w.slot_start.saturating_duration_since(self.base) + self.slot_len;
        self.slot_end.store(nanos(end), Ordering::Release);
    }

    fn sum(&self, w: &Window) -> i64 {
        w.slots
            .iter()
            .fold(self.current.load(Ordering::Acquire), |acc, s| {
                acc.saturating_add(*s)
            })
            .saturating_add(self.reserve)
    }

    /// Records a first attempt.
    pub(crate) fn deposit(&self, now: Instant) {
        if self.deposit == 0 {
            return;
        }
        let t = nanos(now.saturating_duration_since(self.base));
        if t >= self.slot_end.load(Ordering::Acquire) {
            let mut w = self.lock();
            self.expire(&mut w, now);
        }
        // A deposit racing with `expire` may land in the next slot: harmless.
        self.current.fetch_add(self.deposit, Ordering::AcqRel);
    }

    /// Takes one retry from the budget, if there is one.
    pub(crate) fn withdraw(&self, now: Instant) -> bool {
        let mut w = self.lock();
        self.expire(&mut w, now);
        if self.sum(&w) >= self.withdraw {
            self.current.fetch_sub(self.withdraw, Ordering::AcqRel);
            true
        } else {
            false
        }
    }

    /// Retries the budget would allow now.
    pub(crate) fn balance(&self, now: Instant) -> u64 {
        let mut w = self.lock();
        self.expire(&mut w, now);
        let sum = self.sum(&w).max(0);
        u64::try_from(sum / self.withdraw.max(1)).unwrap_or(0)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[tokio::test(start_paused = true)]
    async fn empty_budget_refuses() {
        let b = BudgetState::new(RetryBudget::new(0.0, 0, secs(1)));
        assert!(!b.withdraw(Instant::now()));
        assert_eq!(b.balance(Instant::now()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_of_first_attempts() {
        let b = BudgetState::new(RetryBudget::new(0.5, 0, secs(10)));
        let now = Instant::now();
        for _ in 0..4 {
            b.deposit(now);
        }
        assert_eq!(b.balance(now), 2);
        assert!(b.withdraw(now));
        assert!(b.withdraw(now));
        assert!(!b.withdraw(now));
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire_after_the_ttl() {
        let b = BudgetState::new(RetryBudget::new(1.0, 0, secs(1)));
        b.deposit(Instant::now());
        time::advance(Duration::from_millis(900)).await;
        assert_eq!(b.balance(Instant::now()), 1);
        time::advance(Duration::from_millis(1200)).await;
        assert_eq!(b.balance(Instant::now()), 0);
        time::advance(secs(3600)).await;
        b.deposit(Instant::now());
        assert!(b.withdraw(Instant::now()));
        assert!(!b.withdraw(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn floor_per_second_is_the_reserve() {
        let b = BudgetState::new(RetryBudget::default());
        assert_eq!(b.balance(Instant::now()), 100);
        for _ in 0..100 {
            assert!(b.withdraw(Instant::now()));
        }
        assert!(!b.withdraw(Instant::now()));
        // The withdrawals leave the window after the TTL.
        time::advance(secs(11)).await;
        assert_eq!(b.balance(Instant::now()), 100);
    }

    #[test]
    fn config_is_clamped() {
        let c = RetryBudget::new(f32::NAN, u32::MAX, Duration::ZERO);
        assert_eq!(c.ratio(), 0.0);
        assert_eq!(c.ttl(), secs(1));
        let c = RetryBudget::new(5000.0, 1, secs(600));
        assert_eq!(c.ratio(), 1000.0);
        assert_eq!(c.ttl(), secs(60));
    }
}
