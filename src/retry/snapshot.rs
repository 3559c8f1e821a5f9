//! Counters and the shared run-time state of a layer.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::backoff::Jitter;
use super::budget::BudgetState;
use super::cooldown::Cooldown;
use crate::GiveUpReason;

/// What a [`RetryAfterLayer`](super::RetryAfterLayer) and its services have done
/// so far, and where the shared state stands now.
///
/// Counters only grow; they cover every service the layer built.
///
/// # Examples
///
/// ```
/// use tower_llm_limits::retry::RetryAfterLayer;
///
/// let layer = RetryAfterLayer::anthropic();
/// let snap = layer.snapshot();
/// assert_eq!(snap.retries, 0);
/// assert_eq!(snap.cooldown_remaining, None);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct RetrySnapshot {
    /// Requests received (first attempts).
    pub requests: u64,
    /// Retries sent (attempts after the first).
    pub retries: u64,
    /// Requests given up, by the bound that stopped them.
    pub give_ups: GiveUps,
    /// Retries of an attempt that failed after it may have reached the
    /// server (see [`AfterSend`](super::AfterSend)): the server may have
    /// done the work more than once. Always 0 under [`AfterSend::Fail`](super::AfterSend::Fail).
    pub replays_after_send: u64,
    /// Requests that needed a retry but whose body could not be kept
    /// (returned as is, or as [`Error::NotReplayable`](crate::Error::NotReplayable)).
    pub not_replayable: u64,
    /// Requests answered at once with
    /// [`Error::RetryAfterTooLong`](crate::Error::RetryAfterTooLong).
    pub retry_after_too_long: u64,
    /// Requests failed with [`Error::SpendLimitReached`](crate::Error::SpendLimitReached).
    pub spend_limit_reached: u64,
    /// Error bodies not read within
    /// [`error_body_timeout`](super::RetryAfterBuilder::error_body_timeout):
    /// the response was judged without its body.
    pub error_body_timeouts: u64,
    /// Time left in the shared cooldown, if one is running.
    pub cooldown_remaining: Option<Duration>,
    /// Retries the budget would allow now; `None` without a budget.
    pub budget_balance: Option<u64>,
}

/// Requests given up, by [`GiveUpReason`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct GiveUps {
    /// Stopped by the maximum of retries.
    pub max_retries: u64,
    /// Stopped by the request's deadline.
    pub deadline: u64,
    /// Stopped by the retry budget.
    pub budget: u64,
    /// Not replayed because the failed attempt may have reached the server
    /// ([`AfterSend::Fail`](super::AfterSend::Fail)).
    pub sent: u64,
}

impl GiveUps {
    /// The count for one reason.
    pub fn get(&self, reason: GiveUpReason) -> u64 {
        match reason {
            GiveUpReason::MaxRetries => self.max_retries,
            GiveUpReason::Deadline => self.deadline,
            GiveUpReason::Budget => self.budget,
            GiveUpReason::Sent => self.sent,
        }
    }

    /// All give-ups.
    pub fn total(&self) -> u64 {
        self.max_retries + self.deadline + self.budget + self.sent
    }
}

/// Immutable configuration, built once by the builder.
pub(crate) struct Config {
    pub(crate) max_retries: u32,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) max_server_delay: Duration,
    pub(crate) deadline: Option<Duration>,
    pub(crate) buffer_limit: usize,
    pub(crate) error_body_timeout: Duration,
    pub(crate) after_send: super::AfterSend,
    pub(crate) jitter: Arc<dyn Jitter>,
    /// Decides which inner errors are transient.
    pub(crate) classifier: crate::classify::Classifier,
    /// What reset instants and HTTP-date `retry-after`s are read against.
    pub(crate) wall_clock: crate::clock::WallClock,
    /// What the caller gets on a give-up with a response.
    pub(crate) give_up: super::GiveUpPolicy,
    /// The `on_retry` callback, and metrics.
    pub(crate) hooks: crate::observe::RetryHooks,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("max_retries", &self.max_retries)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("max_server_delay", &self.max_server_delay)
            .field("deadline", &self.deadline)
            .field("buffer_limit", &self.buffer_limit)
            .field("error_body_timeout", &self.error_body_timeout)
            .field("after_send", &self.after_send)
            .field("classifier", &self.classifier)
            .field("wall_clock", &self.wall_clock)
            .field("give_up", &self.give_up)
            .field("hooks", &self.hooks)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) give_up_max_retries: AtomicU64,
    pub(crate) give_up_deadline: AtomicU64,
    pub(crate) give_up_budget: AtomicU64,
    pub(crate) give_up_sent: AtomicU64,
    pub(crate) replays_after_send: AtomicU64,
    pub(crate) not_replayable: AtomicU64,
    pub(crate) too_long: AtomicU64,
    pub(crate) spend_limit: AtomicU64,
    pub(crate) error_body_timeouts: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn give_up(&self, reason: GiveUpReason) {
        Self::bump(match reason {
            GiveUpReason::Deadline => &self.give_up_deadline,
            GiveUpReason::Budget => &self.give_up_budget,
            GiveUpReason::MaxRetries => &self.give_up_max_retries,
            GiveUpReason::Sent => &self.give_up_sent,
        });
    }
}

/// Everything a layer's services share: configuration, cooldown, budget, counters.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) cooldown: Cooldown,
    pub(crate) budget: Option<BudgetState>,
    pub(crate) counters: Counters,
}

impl Shared {
    pub(crate) fn snapshot(&self) -> RetrySnapshot {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let now = Instant::now();
        RetrySnapshot {
            requests: load(&c.requests),
            retries: load(&c.retries),
            give_ups: GiveUps {
                max_retries: load(&c.give_up_max_retries),
                deadline: load(&c.give_up_deadline),
                budget: load(&c.give_up_budget),
                sent: load(&c.give_up_sent),
            },
            replays_after_send: load(&c.replays_after_send),
            not_replayable: load(&c.not_replayable),
            retry_after_too_long: load(&c.too_long),
            spend_limit_reached: load(&c.spend_limit),
            error_body_timeouts: load(&c.error_body_timeouts),
            cooldown_remaining: self.cooldown.remaining(now),
            budget_balance: self.budget.as_ref().map(|b| b.balance(now)),
        }
    }
}
