//! Admission policies beside the per-key FIFO: probing unknown limits,
//! learning the server's output-token rule, and letting a small request pass
//! a large waiting head within a bound.
//!
//! # Unknown limits
//!
//! When no limit is configured for a key's model class (nothing in any
//! dimension), the budget sends one request, the probe, and holds the rest in
//! line until that request's response head arrives: its
//! `anthropic-ratelimit-*` headers teach the limits before anything else is
//! sent, so there is never a blind burst. A probe whose response carries no
//! such header ends the holding (the server does not say its limits; nothing
//! is paced until one does); a probe that was never sent, or whose connection
//! failed, hands the role to the next request.
//!
//! The probe's headers also tell which output-token rule the server applies:
//! when the response head arrives, the probe is the only request of its
//! class in flight, so `limit - remaining` of `output-tokens` is what the
//! server holds for it. About its whole `max_tokens` held means the server
//! reserves `max_tokens` at admission ([`OutputMode::Reserve`]); about
//! nothing held means it counts output as it is generated
//! ([`OutputMode::Realtime`]). The key then paces to that rule.
//!
//! # Head of line
//!
//! Requests of one key are served in order of arrival. A request behind a
//! waiting head may still go first when the ledger admits it now and the
//! capacity it takes delays the head by little: the head's wait grows by the
//! time the limits refill what the request takes (`cost × 60 s / limit` in
//! the tightest dimension), and the requests that pass one head may delay it
//! by at most [`HEAD_DELAY_BOUND`] (2 s) in all. Once that is spent, everyone
//! waits for the head again, so nothing starves.

use std::time::Duration;

use super::ledger::Costs;
use super::limits::{Limits, OutputMode};
use crate::headers::LimitStatus;
use crate::Dimension;

/// The most that the requests passing one waiting head may delay its
/// admission, in all.
pub(crate) const HEAD_DELAY_BOUND: Duration = Duration::from_secs(2);

/// The smallest `max_tokens` whose probe can tell the output rules apart
/// (below it, a few tokens already generated would blur the reading).
const RULE_MIN_MAX_TOKENS: u64 = 16;

/// Where a key stands with its unknown limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Probe {
    /// Limits are configured, or were learned, or the server does not say them.
    #[default]
    Off,
    /// No limit known: the next request admitted is the probe.
    Needed,
    /// The probe is in flight: the others wait for its response head.
    InFlight,
}

impl Probe {
    /// The state of a new key with these configured limits.
    pub(crate) fn for_limits(limits: &Limits) -> Self {
        if Dimension::ALL.iter().all(|d| limits.get(*d).is_none()) {
            Probe::Needed
        } else {
            Probe::Off
        }
    }
}

/// How much the requests that passed the current head have delayed it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Passing {
    head: Option<usize>,
    delayed: Duration,
}

impl Passing {
    /// Whether a request that delays head `head` by `delay` may pass it now;
    /// if so, the delay is counted against the head's bound.
    pub(crate) fn allow(&mut self, head: usize, delay: Duration) -> bool {
        if self.head != Some(head) {
            self.head = Some(head);
            self.delayed = Duration::ZERO;
        }
        let total = self.delayed.saturating_add(delay);
        if total > HEAD_DELAY_BOUND {
            return false;
        }
        self.delayed = total;
        true
    }

    /// Gives back a delay counted by [`allow`](Self::allow) for a request
    /// that did not pass after all.
    pub(crate) fn give_back(&mut self, delay: Duration) {
        self.delayed = self.delayed.saturating_sub(delay);
    }
}

/// How long taking `costs` now delays a head that waits for capacity: the
/// refill time of the costs in the tightest dimension whose limit is known
/// (`limits[d]`, per minute). A dimension without a known limit is not paced
/// and adds no delay.
pub(crate) fn head_delay(costs: &Costs, limits: [Option<u64>; 3]) -> Duration {
    let minute = Duration::from_secs(60).as_nanos();
    Dimension::ALL
        .iter()
        .zip(limits)
        .filter_map(|(d, limit)| {
            let limit = u128::from(limit?).max(1);
            let nanos = u128::from(costs.get(*d)).saturating_mul(minute) / limit;
            Some(Duration::from_nanos(
                u64::try_from(nanos).unwrap_or(u64::MAX),
            ))
        })
        .max()
        .unwrap_or(Duration::ZERO)
}

/// The output rule a probe's response head shows: what the server holds for
/// the probe (`limit - remaining` of output tokens) against its `max_tokens`.
/// `None` when the head does not tell (no output-token header, or a
/// `max_tokens` too small to read).
pub(crate) fn output_rule(max_tokens: Option<u64>, status: &LimitStatus) -> Option<OutputMode> {
    let max_tokens = max_tokens.filter(|m| *m >= RULE_MIN_MAX_TOKENS)?;
    let held = status.limit?.saturating_sub(status.remaining?);
    if held.saturating_mul(2) >= max_tokens {
        Some(OutputMode::Reserve)
    } else {
        Some(OutputMode::Realtime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(limit: u64, remaining: u64) -> LimitStatus {
        LimitStatus {
            limit: Some(limit),
            remaining: Some(remaining),
            reset_in: None,
        }
    }

    #[test]
    fn probes_only_without_any_limit() {
        assert_eq!(Probe::for_limits(&Limits::new()), Probe::Needed);
        assert_eq!(Probe::for_limits(&Limits::new().rpm(50)), Probe::Off);
    }

    #[test]
    fn reads_the_output_rule() {
        let rule = |m, s| output_rule(Some(m), &s);
        assert_eq!(
            rule(4096, status(8000, 8000 - 4096)),
            Some(OutputMode::Reserve)
        );
        assert_eq!(rule(4096, status(8000, 8000)), Some(OutputMode::Realtime));
        assert_eq!(rule(4096, status(8000, 7990)), Some(OutputMode::Realtime));
        assert_eq!(rule(8, status(8000, 7992)), None);
        assert_eq!(output_rule(None, &status(8000, 0)), None);
        assert_eq!(output_rule(Some(4096), &LimitStatus::default()), None);
    }

    #[test]
    fn delay_is_refill_time_in_the_tightest_dimension() {
        let costs = Costs {
            requests: 1,
            input_tokens: 500,
            output_tokens: 100,
        };
        // 500 of 30,000 per minute: 1 s; 1 of 600 RPM: 0.1 s.
        let d = head_delay(&costs, [Some(600), Some(30_000), None]);
        assert_eq!(d, Duration::from_secs(1));
        assert_eq!(head_delay(&costs, [None, None, None]), Duration::ZERO);
    }

    #[test]
    fn passing_is_bounded_per_head() {
        let mut p = Passing::default();
        assert!(p.allow(1, Duration::from_millis(1500)));
        assert!(!p.allow(1, Duration::from_millis(600)));
        assert!(p.allow(1, Duration::from_millis(500)));
        assert!(!p.allow(1, Duration::from_millis(1)));
        // A new head has its own bound.
        assert!(p.allow(2, Duration::from_millis(1900)));
    }
}
