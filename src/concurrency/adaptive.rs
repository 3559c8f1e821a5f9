//! The adaptive limit: slow start, additive increase, multiplicative decrease.
//!
//! A pure state machine: it is told what happened to each response (and when)
//! and answers with a new limit, so it is tested without any service around it.
//! The [module docs](super) explain which ideas come from Vector's adaptive
//! request concurrency and from Netflix's concurrency-limits, and why.

use std::fmt;
use std::time::Duration;

/// Tuning of the adaptive limit (built by [`ConcurrencyBuilder`](super::ConcurrencyBuilder)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AdaptiveConfig {
    pub(crate) min: usize,
    pub(crate) max: usize,
    pub(crate) initial: usize,
    pub(crate) increase: usize,
    pub(crate) decrease: f64,
    pub(crate) latency_tolerance: Option<f64>,
}

/// Why the limit moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// A window of successes in slow start: the limit doubled.
    SlowStart,
    /// A window of successes after the first drop: the limit grew additively.
    Increase,
    /// A drop signal: the limit was cut.
    Cut(Signal),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::SlowStart => f.write_str("slow start"),
            Reason::Increase => f.write_str("additive increase"),
            Reason::Cut(signal) => write!(f, "cut on {signal}"),
        }
    }
}

/// A sign that the upstream has more than it can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// `429`, `503` or `529`.
    Status(u16),
    /// The inner service failed with an error that looks like a timeout.
    Timeout,
    /// Time to the response head rose well above its baseline.
    Latency,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Signal::Status(code) => write!(f, "status {code}"),
            Signal::Timeout => f.write_str("timeout"),
            Signal::Latency => f.write_str("rising latency"),
        }
    }
}

/// What one request's response said about the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A response head that is not a drop signal, and how long it took.
    Success {
        /// Time from calling the inner service to the response head.
        head_latency: Duration,
    },
    /// A drop signal.
    Dropped(Signal),
    /// Nothing to learn (an inner error that is not a timeout).
    Neutral,
}

/// A change of the limit, for the caller to apply and trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Change {
    pub(crate) from: usize,
    pub(crate) to: usize,
    pub(crate) reason: Reason,
}

/// How many latency samples are needed before rising latency counts as a drop.
const MIN_LATENCY_SAMPLES: u32 = 8;
/// Weight of a new sample in the short-term latency average.
const SHORT_ALPHA: f64 = 0.3;
/// Weight of a slower sample in the baseline: the baseline follows a lasting
/// rise slowly (so the upstream's unloaded latency may change), a fall at once.
const BASELINE_RISE: f64 = 0.01;

/// The adaptive limit's state.
#[derive(Debug, Clone)]
pub(crate) struct Controller {
    cfg: AdaptiveConfig,
    /// True until the first drop signal: grow by doubling.
    slow_start: bool,
    /// Successes counted towards the next increase.
    successes: usize,
    /// Bumped on every cut; a request admitted in an older epoch cannot cut again.
    epoch: u64,
    /// Best recent time to the response head, in seconds.
    baseline: Option<f64>,
    /// Short-term average time to the response head, in seconds.
    short: Option<f64>,
    samples: u32,
    cuts: u64,
    increases: u64,
}

impl Controller {
    pub(crate) fn new(cfg: AdaptiveConfig) -> Self {
        Controller {
            cfg,
            slow_start: true,
            successes: 0,
            epoch: 0,
            baseline: None,
            short: None,
            samples: 0,
            cuts: 0,
            increases: 0,
        }
    }

    pub(crate) fn initial_limit(&self) -> usize {
        self.cfg.initial.clamp(self.cfg.min, self.cfg.max)
    }

    /// The current epoch: recorded in each permit when it is granted.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(crate) fn cuts(&self) -> u64 {
        self.cuts
    }

    pub(crate) fn increases(&self) -> u64 {
        self.increases
    }

    pub(crate) fn in_slow_start(&self) -> bool {
        self.slow_start
    }

    /// Learn from one outcome. `epoch` is the epoch the request was admitted in,
    /// `in_flight` the requests in flight counting this one, `limit` the current
    /// limit. Returns the change to apply, if any.
    /// Whether the time to the response head is a signal (a latency
    /// tolerance is set): without one, requests are not timed at all.
    pub(crate) fn uses_latency(&self) -> bool {
        self.cfg.latency_tolerance.is_some()
    }

    pub(crate) fn observe(
        &mut self,
        outcome: Outcome,
        epoch: u64,
        in_flight: usize,
        limit: usize,
    ) -> Option<Change> {
        let signal = match outcome {
            Outcome::Neutral => return None,
            Outcome::Dropped(signal) => Some(signal),
            Outcome::Success { head_latency } => self.sample(head_latency, epoch == self.epoch),
        };
        match signal {
            Some(signal) => self.cut(signal, epoch, limit),
            None => self.grow(in_flight, limit),
        }
    }

    /// Record a latency sample; `Some(Latency)` when it says the upstream is
    /// queueing. `current`: the request was admitted under the current limit
    /// (only those feed the short-term average, which restarts at each cut, so
    /// the queue built under the old limit does not cut the new one again).
    fn sample(&mut self, latency: Duration, current: bool) -> Option<Signal> {
        let s = latency.as_secs_f64();
        let short = match (self.short, current) {
            (Some(short), true) => Some(short + (s - short) * SHORT_ALPHA),
            (None, true) => Some(s),
            (short, false) => short,
        };
        self.short = short;
        let baseline = match self.baseline {
            Some(b) if s < b => s,
            Some(b) => b + (s - b) * BASELINE_RISE,
            None => s,
        };
        self.baseline = Some(baseline);
        self.samples = self.samples.saturating_add(1);
        let tolerance = self.cfg.latency_tolerance?;
        // A request from before the last cut is judged on its own sample (and
        // then ignored by `cut`, as a 429 from before the cut is).
        let judged = if current { short? } else { s };
        if self.samples >= MIN_LATENCY_SAMPLES && judged > baseline * tolerance {
            Some(Signal::Latency)
        } else {
            None
        }
    }

    fn cut(&mut self, signal: Signal, epoch: u64, limit: usize) -> Option<Change> {
        self.slow_start = false;
        self.successes = 0;
        if epoch != self.epoch {
            // Admitted before the last cut: part of the same burst. One cut per window.
            return None;
        }
        // The short-term latency restarts from the requests admitted under the new limit.
        self.short = None;
        let scaled = (limit as f64 * self.cfg.decrease).floor() as usize;
        let to = scaled.min(limit.saturating_sub(1)).max(self.cfg.min);
        if to == limit {
            return None;
        }
        self.epoch = self.epoch.wrapping_add(1);
        self.cuts = self.cuts.saturating_add(1);
        Some(Change {
            from: limit,
            to,
            reason: Reason::Cut(signal),
        })
    }

    fn grow(&mut self, in_flight: usize, limit: usize) -> Option<Change> {
        // Netflix's rule: do not grow a limit that is not being used.
        if in_flight.saturating_mul(2) < limit || limit >= self.cfg.max {
            return None;
        }
        self.successes = self.successes.saturating_add(1);
        if self.successes < limit {
            return None;
        }
        self.successes = 0;
        let (to, reason) = if self.slow_start {
            (limit.saturating_mul(2), Reason::SlowStart)
        } else {
            (limit.saturating_add(self.cfg.increase), Reason::Increase)
        };
        let to = to.min(self.cfg.max);
        self.increases = self.increases.saturating_add(1);
        Some(Change {
            from: limit,
            to,
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AdaptiveConfig {
        AdaptiveConfig {
            min: 1,
            max: 64,
            initial: 1,
            increase: 1,
            decrease: 0.9,
            latency_tolerance: Some(2.0),
        }
    }

    fn ok(ms: u64) -> Outcome {
        Outcome::Success {
            head_latency: Duration::from_millis(ms),
        }
    }

    /// Feed `n` successes at full use; apply changes; return the final limit.
    fn feed(c: &mut Controller, mut limit: usize, n: usize) -> usize {
        for _ in 0..n {
            if let Some(ch) = c.observe(ok(100), c.epoch(), limit, limit) {
                limit = ch.to;
            }
        }
        limit
    }

    #[test]
    fn slow_start_doubles_per_window() {
        let mut c = Controller::new(cfg());
        let mut limit = c.initial_limit();
        let mut seen = vec![limit];
        for _ in 0..6 {
            let before = limit;
            // A window is `limit` successes.
            limit = feed(&mut c, limit, before);
            seen.push(limit);
        }
        assert_eq!(seen, vec![1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(c.increases(), 6);
    }

    #[test]
    fn additive_after_first_drop() {
        let mut c = Controller::new(cfg());
        let mut limit = feed(&mut c, 1, 1 + 2 + 4 + 8); // 16
        assert_eq!(limit, 16);
        let ch = c.observe(Outcome::Dropped(Signal::Status(429)), c.epoch(), 16, 16);
        limit = ch.map(|c| c.to).unwrap_or(limit);
        assert_eq!(limit, 14);
        assert!(!c.in_slow_start());
        limit = feed(&mut c, limit, 14);
        assert_eq!(limit, 15);
        limit = feed(&mut c, limit, 15);
        assert_eq!(limit, 16);
    }

    #[test]
    fn one_cut_per_epoch() {
        let mut c = Controller::new(cfg());
        let e = c.epoch();
        let first = c.observe(Outcome::Dropped(Signal::Status(529)), e, 20, 20);
        assert_eq!(first.map(|c| c.to), Some(18));
        // The rest of the burst was admitted in the old epoch.
        for _ in 0..10 {
            assert_eq!(
                c.observe(Outcome::Dropped(Signal::Status(529)), e, 18, 18),
                None
            );
        }
        assert_eq!(c.cuts(), 1);
        // A request admitted after the cut may cut again.
        let again = c.observe(Outcome::Dropped(Signal::Timeout), c.epoch(), 18, 18);
        assert_eq!(again.map(|c| c.to), Some(16));
    }

    #[test]
    fn cut_never_goes_below_min_and_small_limits_still_move() {
        let mut c = Controller::new(AdaptiveConfig { min: 2, ..cfg() });
        let ch = c.observe(Outcome::Dropped(Signal::Status(429)), c.epoch(), 5, 5);
        assert_eq!(ch.map(|c| c.to), Some(4));
        let ch = c.observe(Outcome::Dropped(Signal::Status(429)), c.epoch(), 2, 2);
        assert_eq!(ch, None);
    }

    #[test]
    fn unused_limit_does_not_grow() {
        let mut c = Controller::new(AdaptiveConfig {
            initial: 10,
            ..cfg()
        });
        for _ in 0..100 {
            assert_eq!(c.observe(ok(100), 0, 4, 10), None);
        }
    }

    #[test]
    fn rising_head_latency_is_a_drop() {
        let mut c = Controller::new(AdaptiveConfig {
            initial: 8,
            ..cfg()
        });
        for _ in 0..20 {
            let _ = c.observe(ok(100), c.epoch(), 1, 8);
        }
        let mut cut = None;
        for _ in 0..10 {
            if let Some(ch) = c.observe(ok(400), c.epoch(), 8, 8) {
                cut = Some(ch);
                break;
            }
        }
        assert_eq!(cut.map(|c| c.reason), Some(Reason::Cut(Signal::Latency)));
    }

    #[test]
    fn slow_heads_from_before_a_cut_do_not_cut_again() {
        let mut c = Controller::new(AdaptiveConfig {
            initial: 10,
            ..cfg()
        });
        for _ in 0..20 {
            let _ = c.observe(ok(100), c.epoch(), 10, 10);
        }
        let old = c.epoch();
        let first = (0..10).find_map(|_| c.observe(ok(500), old, 10, 10));
        assert_eq!(first.map(|c| c.to), Some(9));
        // The queue built under the old limit drains: slow heads, old epoch.
        for _ in 0..20 {
            assert_eq!(c.observe(ok(500), old, 9, 9), None);
        }
        // Fast heads under the new limit: no further cut.
        for _ in 0..5 {
            let ch = c.observe(ok(110), c.epoch(), 9, 9);
            assert!(!matches!(ch.map(|c| c.reason), Some(Reason::Cut(_))));
        }
        assert_eq!(c.cuts(), 1);
    }

    #[test]
    fn latency_signal_can_be_disabled() {
        let mut c = Controller::new(AdaptiveConfig {
            initial: 8,
            latency_tolerance: None,
            ..cfg()
        });
        for _ in 0..20 {
            let _ = c.observe(ok(100), c.epoch(), 1, 8);
        }
        for _ in 0..50 {
            if let Some(ch) = c.observe(ok(900), c.epoch(), 8, 8) {
                assert!(!matches!(ch.reason, Reason::Cut(_)));
            }
        }
        assert_eq!(c.cuts(), 0);
    }

    #[test]
    fn neutral_changes_nothing() {
        let mut c = Controller::new(cfg());
        assert_eq!(c.observe(Outcome::Neutral, 0, 1, 1), None);
        assert!(c.in_slow_start());
    }
}
