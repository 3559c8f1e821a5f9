//! Counters the simulation reads: what the emulator really charged, per model class.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::config::Acceleration;
use tower_llm_limits::budget::Limits;

/// One second of a model class's traffic, for plots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SecondStats {
    /// Input tokens charged to ITPM by requests admitted in this second.
    pub input_tokens: u64,
    /// Output tokens produced in this second.
    pub output_tokens: u64,
    /// Requests admitted in this second.
    pub requests: u64,
    /// 429 rate-limit answers sent in this second.
    pub rate_limited: u64,
}

/// What happened to one model class (the key of the API's limits).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClassStats {
    /// Requests admitted (charged to RPM).
    pub requests_admitted: u64,
    /// 429 answers for rate limits (RPM, ITPM, OTPM, acceleration).
    pub rate_limited: u64,
    /// Of those, refused by the acceleration limit.
    pub acceleration_limited: u64,
    /// Spend-cap 429 answers.
    pub spend_limited: u64,
    /// Input tokens really charged to ITPM (uncached input, cache writes, and
    /// cache reads for classes where they count).
    pub input_tokens: u64,
    /// Output tokens really charged to OTPM (produced; after settlement).
    pub output_tokens: u64,
    /// Uncached input tokens reported in `usage.input_tokens`.
    pub uncached_input_tokens: u64,
    /// Tokens reported in `usage.cache_read_input_tokens`.
    pub cache_read_input_tokens: u64,
    /// Tokens reported in `usage.cache_creation_input_tokens`.
    pub cache_creation_input_tokens: u64,
    /// Injected `529 overloaded_error` answers.
    pub overloaded: u64,
    /// Injected `500 api_error` answers.
    pub server_errors: u64,
    /// Injected connection resets.
    pub connection_resets: u64,
    /// Injected slow answers.
    pub slow_responses: u64,
    /// Injected mid-stream `event: error`s.
    pub stream_errors: u64,
    /// Per second since the emulator was built: index `i` covers `[i, i + 1)` s.
    pub timeline: Vec<SecondStats>,
}

impl ClassStats {
    /// The least time in which limits `limits`, enforced over `window`, could
    /// have admitted what this class was charged: for each limit, the amount
    /// charged beyond the bucket's initial capacity (the buckets start full;
    /// capacity = the limit scaled to the window) divided by the refill rate
    /// (limit / 60 per second); the longest of the three. A lower bound on a
    /// run's duration that no client can beat, to compare strategies against.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_llm_limits::budget::Limits;
    /// use tower_llm_limits_emulator::ClassStats;
    ///
    /// let charged = ClassStats { requests_admitted: 10, input_tokens: 90_000, output_tokens: 1_000, ..Default::default() };
    /// // 90,000 input tokens under 30,000 ITPM: 30,000 at once, 60,000 more at 500 per second.
    /// let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    /// assert_eq!(charged.minimum_time(&limits, Duration::from_secs(60)), Duration::from_secs(120));
    /// ```
    pub fn minimum_time(&self, limits: &Limits, window: Duration) -> Duration {
        let window = window
            .clamp(Duration::from_nanos(1), Duration::from_secs(60))
            .as_secs_f64();
        [
            (limits.requests_per_minute, self.requests_admitted),
            (limits.input_tokens_per_minute, self.input_tokens),
            (limits.output_tokens_per_minute, self.output_tokens),
        ]
        .into_iter()
        .filter_map(|(limit, charged)| {
            let limit = limit.filter(|l| *l > 0)? as f64;
            let capacity = limit * window / 60.0;
            let beyond = (charged as f64 - capacity).max(0.0);
            Duration::try_from_secs_f64(beyond * 60.0 / limit).ok()
        })
        .max()
        .unwrap_or(Duration::ZERO)
    }
}

/// The `count_tokens` endpoint's counters (its own limiter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CountTokensStats {
    /// Requests answered.
    pub requests_admitted: u64,
    /// 429 answers.
    pub rate_limited: u64,
}

/// A snapshot of the emulator's counters: [`Emulator::stats`](super::Emulator::stats).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EmulatorStats {
    /// Per model class (see [`Emulator::class_of`](super::Emulator::class_of)).
    pub classes: BTreeMap<String, ClassStats>,
    /// The `count_tokens` endpoint.
    pub count_tokens: CountTokensStats,
    /// Requests answered `400`, `404`, `405` or `413`.
    pub invalid_requests: u64,
    /// Time since the emulator was built (tokio's clock).
    pub elapsed: Duration,
}

impl EmulatorStats {
    /// The sum over every model class (its timeline is the per-second sum).
    pub fn total(&self) -> ClassStats {
        let mut t = ClassStats::default();
        for c in self.classes.values() {
            t.requests_admitted += c.requests_admitted;
            t.rate_limited += c.rate_limited;
            t.acceleration_limited += c.acceleration_limited;
            t.spend_limited += c.spend_limited;
            t.input_tokens += c.input_tokens;
            t.output_tokens += c.output_tokens;
            t.uncached_input_tokens += c.uncached_input_tokens;
            t.cache_read_input_tokens += c.cache_read_input_tokens;
            t.cache_creation_input_tokens += c.cache_creation_input_tokens;
            t.overloaded += c.overloaded;
            t.server_errors += c.server_errors;
            t.connection_resets += c.connection_resets;
            t.slow_responses += c.slow_responses;
            t.stream_errors += c.stream_errors;
            if t.timeline.len() < c.timeline.len() {
                t.timeline.resize(c.timeline.len(), SecondStats::default());
            }
            for (sum, s) in t.timeline.iter_mut().zip(&c.timeline) {
                sum.input_tokens += s.input_tokens;
                sum.output_tokens += s.output_tokens;
                sum.requests += s.requests;
                sum.rate_limited += s.rate_limited;
            }
        }
        t
    }
}

/// The counters behind the lock.
#[derive(Debug)]
pub(crate) struct StatsInner {
    pub(crate) start: Instant,
    pub(crate) classes: BTreeMap<String, ClassStats>,
    pub(crate) count_tokens: CountTokensStats,
    pub(crate) invalid_requests: u64,
}

impl StatsInner {
    pub(crate) fn new(start: Instant) -> Self {
        StatsInner {
            start,
            classes: BTreeMap::new(),
            count_tokens: CountTokensStats::default(),
            invalid_requests: 0,
        }
    }

    pub(crate) fn class(&mut self, class: &str) -> &mut ClassStats {
        self.classes.entry(class.to_string()).or_default()
    }

    fn second_index(&self, now: Instant) -> usize {
        usize::try_from(now.saturating_duration_since(self.start).as_secs()).unwrap_or(usize::MAX)
    }

    /// Updates the class's timeline slot for `now`.
    pub(crate) fn at_second(
        &mut self,
        class: &str,
        now: Instant,
        update: impl FnOnce(&mut SecondStats),
    ) {
        // Bounded: one slot per second of the run (a day is 86,400 slots).
        let i = self.second_index(now).min(10_000_000);
        let timeline = &mut self.class(class).timeline;
        if timeline.len() <= i {
            timeline.resize(i + 1, SecondStats::default());
        }
        if let Some(slot) = timeline.get_mut(i) {
            update(slot);
        }
    }

    /// Whether admitting `cost` more tokens now would be a jump above the
    /// acceleration limit.
    pub(crate) fn accelerating(
        &self,
        class: &str,
        acc: &Acceleration,
        cost: u64,
        now: Instant,
    ) -> bool {
        let Some(stats) = self.classes.get(class) else {
            return cost > acc.min_tokens;
        };
        let now_s = self.second_index(now);
        let window = usize::try_from(acc.window.as_secs().max(1)).unwrap_or(usize::MAX);
        let baseline = usize::try_from(acc.baseline.as_secs().max(1)).unwrap_or(usize::MAX);
        let tokens = |s: &SecondStats| s.input_tokens.saturating_add(s.output_tokens);
        let sum = |from: usize, to: usize| -> u64 {
            // seconds in [from, to]
            stats
                .timeline
                .iter()
                .enumerate()
                .skip(from)
                .take(to.saturating_sub(from).saturating_add(1))
                .map(|(_, s)| tokens(s))
                .fold(0u64, u64::saturating_add)
        };
        let recent_from = now_s.saturating_sub(window - 1);
        let recent = sum(recent_from, now_s).saturating_add(cost);
        if recent <= acc.min_tokens {
            return false;
        }
        // Seconds before the emulator started count as zero usage.
        let base_total = if recent_from == 0 {
            0
        } else {
            sum(recent_from.saturating_sub(baseline), recent_from - 1)
        };
        let average_per_window = base_total as f64 / baseline as f64 * window as f64;
        let factor = if acc.factor.is_finite() {
            acc.factor.max(0.0)
        } else {
            f64::INFINITY
        };
        recent as f64 > factor * average_per_window
    }

    pub(crate) fn snapshot(&self, now: Instant) -> EmulatorStats {
        EmulatorStats {
            classes: self.classes.clone(),
            count_tokens: self.count_tokens,
            invalid_requests: self.invalid_requests,
            elapsed: now.saturating_duration_since(self.start),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn acceleration_compares_recent_to_baseline() {
        let start = Instant::now();
        let mut s = StatsInner::new(start);
        let acc = Acceleration::new(2.0, 100);
        // A steady 100 tokens per second for 70 s.
        for sec in 0..70u64 {
            s.at_second("c", start + Duration::from_secs(sec), |x| {
                x.input_tokens += 100
            });
        }
        let now = start + Duration::from_secs(70);
        // Last 10 s hold 900 (seconds 61..=69) + this request; baseline average is 1,000 per 10 s.
        assert!(!s.accelerating("c", &acc, 1_000, now));
        assert!(s.accelerating("c", &acc, 1_200, now));
        // Small usage is always allowed.
        assert!(!s.accelerating("new", &acc, 100, now));
        assert!(s.accelerating("new", &acc, 101, now));
    }

    #[tokio::test(start_paused = true)]
    async fn totals_add_up() {
        let start = Instant::now();
        let mut s = StatsInner::new(start);
        s.class("a").input_tokens = 5;
        s.class("b").input_tokens = 7;
        s.at_second("a", start, |x| x.requests += 1);
        s.at_second("b", start + Duration::from_secs(2), |x| x.requests += 1);
        let snap = s.snapshot(start + Duration::from_secs(3));
        let t = snap.total();
        assert_eq!(t.input_tokens, 12);
        assert_eq!(
            t.timeline.iter().map(|x| x.requests).collect::<Vec<_>>(),
            vec![1, 0, 1]
        );
        assert_eq!(snap.elapsed, Duration::from_secs(3));
    }
}
