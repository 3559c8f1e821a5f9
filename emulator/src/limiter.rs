//! The emulator's rate limiter ([`RateLimiter`]): the API's rules, written for
//! the server side and apart from the client's ledger, so that a simulation
//! compares two independent pieces of code.
//!
//! # The rules
//!
//! - Per key (a model class, or the `count_tokens` endpoint) and per
//!   dimension (requests, input tokens, output tokens) one token bucket: its
//!   capacity is "continuously replenished up to your maximum limit, rather
//!   than being reset at fixed intervals", at the limit per minute.
//! - The capacity is the limit, or its share of a shorter enforcement window
//!   ("60 RPM might be enforced as 1 request per second": capacity 1).
//! - A request is admitted when every dimension can take its cost, and then
//!   it is charged in all three; a refused request is charged nothing.
//! - A cost above a short window's capacity (but within the limit per minute)
//!   waits for a full bucket, is then admitted and leaves the bucket in debt:
//!   over a minute the rate still stays within the limit.
//! - A cost above the whole limit per minute can never be admitted.
//! - Output is charged as it is produced, or reserved at admission and
//!   refunded or charged to the truth at the end (the emulator's service
//!   decides which); a charge after admission may leave a bucket in debt,
//!   a refund never fills it above its capacity.
//! - A refused request learns which limit refused it and how long until it
//!   would fit (the `retry-after` of the 429); every answer reports each
//!   bucket's limit, what remains and when it is full again (the
//!   `anthropic-ratelimit-*` headers).
//!
//! # Representation: the instant a bucket is full again
//!
//! The client's ledger keeps a level and the time it was last refilled. This
//! limiter keeps one number per bucket instead: the instant at which
//! everything charged to it will have been refilled (`full_at`). The level is
//! derived from it, `capacity - max(full_at - now, 0) * rate`, so there is
//! no refill step to forget and no clamping to get wrong: a bucket is full
//! whenever `full_at <= now`. A charge moves `full_at` to its refill time
//! after the later of `full_at` and `now`, a refund earlier.
//!
//! Time is measured in *ticks*: nanoseconds since the limiter was made,
//! multiplied by the bucket's limit per minute. A token then refills in
//! exactly 60,000,000,000 ticks whatever the limit, so costs, capacities and
//! instants are all whole numbers of ticks and nothing is rounded until a
//! wait is turned back into nanoseconds, rounded up (a client that waits
//! that long fits). `u128` ticks hold a limit of `u64::MAX` for ten years.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use tower_llm_limits::budget::Limits;
use tower_llm_limits::Dimension;

/// Ticks per token: one minute in nanoseconds (see the module docs).
const TICKS_PER_TOKEN: u128 = 60_000_000_000;

/// The longest enforcement window, and the default: one minute.
const MINUTE: Duration = Duration::from_secs(60);

/// The `retry-after` of a request that can never fit: the API answers it
/// with a 429 too ("reduce the prompt length or the maximum tokens
/// requested"), and waiting a whole minute is the most a limit can ask.
pub(crate) const NEVER_FITS_RETRY_AFTER: Duration = MINUTE;

/// The error of [`EmulatorBuilder::build`](super::EmulatorBuilder::build): the
/// enforcement window must be longer than zero and at most 60 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidWindow {
    window: Duration,
}

impl InvalidWindow {
    /// The window that was refused.
    pub fn window(&self) -> Duration {
        self.window
    }
}

impl fmt::Display for InvalidWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid enforcement window {:?}: it must be longer than zero and at most 60 s",
            self.window
        )
    }
}

impl std::error::Error for InvalidWindow {}

/// What one request costs at admission, per dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestCost {
    /// Requests (1 for a request).
    pub requests: u64,
    /// Input tokens charged to ITPM.
    pub input_tokens: u64,
    /// Output tokens charged to OTPM at admission (`max_tokens` when
    /// reserved, the first token when charged as produced).
    pub output_tokens: u64,
}

impl RequestCost {
    fn of(&self, dimension: Dimension) -> u64 {
        match dimension {
            Dimension::Requests => self.requests,
            Dimension::InputTokens => self.input_tokens,
            Dimension::OutputTokens => self.output_tokens,
        }
    }
}

/// The limiter's answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Charged in every dimension.
    Admitted,
    /// Charged nothing; it fits after `wait` if nothing else is charged
    /// meanwhile.
    Wait {
        /// The limit it waits for longest (the first of requests, input,
        /// output on a tie).
        dimension: Dimension,
        /// How long, rounded up to the nanosecond.
        wait: Duration,
    },
    /// Charged nothing; its cost is above the whole limit per minute, so it
    /// never fits (whatever it would wait for in another dimension).
    Never {
        /// The first such limit, in the order requests, input, output.
        dimension: Dimension,
    },
}

impl Verdict {
    /// The limit that refused the request and the `retry-after` to announce
    /// (the wait; 60 s for a request that never fits, the longest any limit
    /// asks), or `None` if it was admitted.
    pub fn refusal(&self) -> Option<(Dimension, Duration)> {
        match *self {
            Verdict::Admitted => None,
            Verdict::Wait { dimension, wait } => Some((dimension, wait)),
            Verdict::Never { dimension } => Some((dimension, NEVER_FITS_RETRY_AFTER)),
        }
    }
}

/// One bucket as the `anthropic-ratelimit-<dimension>-*` headers report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    /// The limit per minute.
    pub limit: u64,
    /// Whole tokens (or requests) that could be charged now: rounded down,
    /// zero while the bucket is in debt.
    pub remaining: u64,
    /// Until the bucket is full again (rounded up to the nanosecond).
    pub reset_in: Duration,
}

/// Whether a cost fits a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    Now,
    /// After this many ticks.
    After(u128),
    /// Above the whole limit per minute.
    Never,
}

/// One bucket: its limit and the tick at which it is full again.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    limit: u64,
    full_at: u128,
}

impl Bucket {
    /// The bucket's capacity in ticks: the window's share of the limit.
    fn capacity(&self, window: Duration) -> u128 {
        window.as_nanos().saturating_mul(u128::from(self.limit))
    }

    /// `now` in this bucket's ticks.
    fn ticks(&self, nanos: u128) -> u128 {
        nanos.saturating_mul(u128::from(self.limit))
    }

    /// Ticks still to refill before the bucket is full (its debt to a full bucket).
    fn backlog(&self, nanos: u128) -> u128 {
        self.full_at.saturating_sub(self.ticks(nanos))
    }

    /// Whether `cost` fits now, after some ticks, or never.
    fn fit(&self, cost: u64, nanos: u128, window: Duration) -> Fit {
        if cost == 0 {
            return Fit::Now;
        }
        if cost > self.limit {
            return Fit::Never;
        }
        let capacity = self.capacity(window);
        // A cost above the window's capacity needs a full bucket.
        let needed = tokens_to_ticks(cost).min(capacity);
        let after = self.backlog(nanos).saturating_add(needed);
        if after > capacity {
            Fit::After(after - capacity)
        } else {
            Fit::Now
        }
    }

    fn charge(&mut self, tokens: u64, nanos: u128) {
        // With a zero limit no tick ever passes and nothing is ever admitted
        // that costs anything: there is nothing to charge.
        if self.limit == 0 {
            return;
        }
        let now = self.ticks(nanos);
        self.full_at = self
            .full_at
            .max(now)
            .saturating_add(tokens_to_ticks(tokens));
    }

    fn refund(&mut self, tokens: u64) {
        // A `full_at` in the past is a full bucket, whichever instant it
        // names: a refund cannot fill a bucket above its capacity.
        self.full_at = self.full_at.saturating_sub(tokens_to_ticks(tokens));
    }

    fn headroom(&self, nanos: u128, window: Duration) -> Headroom {
        let backlog = self.backlog(nanos);
        let left = self.capacity(window).saturating_sub(backlog);
        Headroom {
            limit: self.limit,
            remaining: u64::try_from(left / TICKS_PER_TOKEN).unwrap_or(u64::MAX),
            reset_in: ticks_to_duration(backlog, self.limit),
        }
    }
}

fn tokens_to_ticks(tokens: u64) -> u128 {
    u128::from(tokens).saturating_mul(TICKS_PER_TOKEN)
}

/// A number of ticks of a bucket with `limit` as a duration, rounded up to
/// the nanosecond (zero for a zero limit, whose ticks never pass).
fn ticks_to_duration(ticks: u128, limit: u64) -> Duration {
    if limit == 0 {
        return Duration::ZERO;
    }
    let nanos = ticks.div_ceil(u128::from(limit));
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
    // Below 10^9: fits in u32.
    let sub = u32::try_from(nanos % 1_000_000_000).unwrap_or(0);
    Duration::new(secs, sub)
}

/// A key's three buckets, in [`Dimension::ALL`] order; `None` for a
/// dimension without a limit.
type Buckets = [Option<Bucket>; 3];

fn slot(dimension: Dimension) -> usize {
    match dimension {
        Dimension::Requests => 0,
        Dimension::InputTokens => 1,
        Dimension::OutputTokens => 2,
    }
}

/// The emulator's rate limiter: per key (a model class, say) and per limit
/// one token bucket, refilled continuously at the limit per minute up to its
/// capacity, as the [`Emulator`](super::Emulator) enforces the API's limits.
///
/// A reference implementation of the API's rules for the server side, kept
/// apart from the budget's ledger so that each can be checked against the
/// other:
///
/// - capacity is the limit, or its share of a shorter enforcement window;
///   a new bucket starts full;
/// - [`admit`](Self::admit) charges a request in all three dimensions at
///   once, or charges nothing and says how long until it fits (exact to the
///   nanosecond, rounded up) or that it never does (a cost above the whole
///   limit per minute); a cost above a short window's capacity is admitted
///   on a full bucket and leaves it in debt;
/// - [`charge`](Self::charge) and [`refund`](Self::refund) correct a
///   dimension after admission (output as it is produced, the unused part of
///   a reservation); a charge may leave a bucket in debt, a refund never
///   fills it above its capacity;
/// - [`headroom`](Self::headroom) reports each bucket as the
///   `anthropic-ratelimit-*` headers do.
///
/// Each bucket is kept as the instant at which it will be full again, in
/// nanoseconds scaled by its limit, so that a token is a whole number of
/// time units whatever the limit and nothing is rounded until a wait is
/// reported. A key's limits are fixed when it first admits a request (the
/// emulator's limits are configuration). Instants before the limiter was
/// made count as the instant it was made.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tokio::time::Instant;
/// use tower_llm_limits::budget::Limits;
/// use tower_llm_limits_emulator::{RateLimiter, RequestCost, Verdict};
/// use tower_llm_limits::Dimension;
///
/// let limiter = RateLimiter::per_minute();
/// let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
/// let now = Instant::now();
/// let cost = RequestCost { requests: 1, input_tokens: 20_000, output_tokens: 1 };
/// assert_eq!(limiter.admit("sonnet", &limits, cost, now), Verdict::Admitted);
/// // 10,000 input tokens short, at 500 per second.
/// assert_eq!(
///     limiter.admit("sonnet", &limits, cost, now),
///     Verdict::Wait { dimension: Dimension::InputTokens, wait: Duration::from_secs(20) }
/// );
/// // Output produced by the first answer, charged as it streams.
/// limiter.charge(&"sonnet", Dimension::OutputTokens, 499, now);
/// let [requests, input, output] = limiter.headroom(&"sonnet", now).unwrap();
/// assert_eq!(requests.unwrap().remaining, 49);
/// assert_eq!(input.unwrap().remaining, 10_000);
/// assert_eq!(output.unwrap().remaining, 7_500);
/// assert_eq!(output.unwrap().reset_in, Duration::from_millis(3_750));
/// ```
pub struct RateLimiter<K> {
    window: Duration,
    epoch: Instant,
    keys: Mutex<HashMap<K, Buckets>>,
}

impl<K> fmt::Debug for RateLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq> RateLimiter<K> {
    /// A limiter enforcing each limit over the whole minute (capacity = the
    /// limit), its clock starting now.
    pub fn per_minute() -> Self {
        RateLimiter {
            window: MINUTE,
            epoch: Instant::now(),
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// A limiter enforcing each limit over a shorter `window` (capacity =
    /// the window's share of the limit; the refill rate is unchanged), its
    /// clock starting now.
    ///
    /// # Errors
    ///
    /// [`InvalidWindow`] if the window is zero or longer than 60 s.
    pub fn with_window(window: Duration) -> Result<Self, InvalidWindow> {
        if window.is_zero() || window > MINUTE {
            return Err(InvalidWindow { window });
        }
        Ok(RateLimiter {
            window,
            ..RateLimiter::per_minute()
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Buckets>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Nanoseconds since the limiter was made (zero for an earlier instant).
    fn nanos(&self, now: Instant) -> u128 {
        now.saturating_duration_since(self.epoch).as_nanos()
    }

    /// Admits `cost` under `limits` in all three dimensions at once, or
    /// charges nothing and says why (see [`Verdict`]).
    pub fn admit(&self, key: K, limits: &Limits, cost: RequestCost, now: Instant) -> Verdict {
        let nanos = self.nanos(now);
        let mut keys = self.lock();
        let buckets = keys.entry(key).or_insert_with(|| {
            Dimension::ALL.map(|d| limits.get(d).map(|limit| Bucket { limit, full_at: 0 }))
        });
        let verdict = self.verdict(buckets, cost, nanos);
        if verdict == Verdict::Admitted {
            for dimension in Dimension::ALL {
                if let Some(bucket) = &mut buckets[slot(dimension)] {
                    bucket.charge(cost.of(dimension), nanos);
                }
            }
        }
        verdict
    }

    /// The verdict for `cost` against `buckets`, charging nothing.
    fn verdict(&self, buckets: &Buckets, cost: RequestCost, nanos: u128) -> Verdict {
        let mut longest: Option<(Dimension, Duration)> = None;
        for dimension in Dimension::ALL {
            let Some(bucket) = &buckets[slot(dimension)] else {
                continue;
            };
            match bucket.fit(cost.of(dimension), nanos, self.window) {
                Fit::Never => return Verdict::Never { dimension },
                Fit::Now => {}
                Fit::After(ticks) => {
                    let wait = ticks_to_duration(ticks, bucket.limit);
                    if longest.is_none_or(|(_, w)| wait > w) {
                        longest = Some((dimension, wait));
                    }
                }
            }
        }
        match longest {
            Some((dimension, wait)) => Verdict::Wait { dimension, wait },
            None => Verdict::Admitted,
        }
    }

    /// Charges `tokens` more in one dimension of an admitted key (output as
    /// it is produced, or beyond a reservation): may leave the bucket in debt.
    pub fn charge(&self, key: &K, dimension: Dimension, tokens: u64, now: Instant) {
        self.update(key, dimension, now, |bucket, nanos| {
            bucket.charge(tokens, nanos);
        });
    }

    /// Gives back `tokens` in one dimension of an admitted key (the unused
    /// part of a reservation), never above the bucket's capacity.
    pub fn refund(&self, key: &K, dimension: Dimension, tokens: u64, now: Instant) {
        self.update(key, dimension, now, |bucket, _| bucket.refund(tokens));
    }

    fn update(
        &self,
        key: &K,
        dimension: Dimension,
        now: Instant,
        f: impl FnOnce(&mut Bucket, u128),
    ) {
        let nanos = self.nanos(now);
        if let Some(Some(bucket)) = self.lock().get_mut(key).map(|b| &mut b[slot(dimension)]) {
            f(bucket, nanos);
        }
    }

    /// Each bucket of `key` as the headers report it, in [`Dimension::ALL`]
    /// order (`None` for a dimension without a limit); `None` if the key has
    /// not been asked to admit anything yet.
    pub fn headroom(&self, key: &K, now: Instant) -> Option<[Option<Headroom>; 3]> {
        let nanos = self.nanos(now);
        let keys = self.lock();
        let buckets = keys.get(key)?;
        Some(buckets.map(|b| b.map(|bucket| bucket.headroom(nanos, self.window))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn request(input_tokens: u64, output_tokens: u64) -> RequestCost {
        RequestCost {
            requests: 1,
            input_tokens,
            output_tokens,
        }
    }

    fn wait(dimension: Dimension, wait: Duration) -> Verdict {
        Verdict::Wait { dimension, wait }
    }

    /// A limiter over the whole minute and the instant it started.
    fn minute() -> (RateLimiter<&'static str>, Instant) {
        let limiter = RateLimiter::per_minute();
        let t0 = limiter.epoch;
        (limiter, t0)
    }

    fn remaining(limiter: &RateLimiter<&'static str>, d: Dimension, now: Instant) -> u64 {
        limiter.headroom(&"k", now).unwrap()[slot(d)]
            .unwrap()
            .remaining
    }

    #[test]
    fn a_new_bucket_is_full_and_a_refused_request_is_charged_nothing() {
        let (limiter, t0) = minute();
        let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
        assert_eq!(limiter.headroom(&"k", t0), None);
        let cost = request(20_000, 1_000);
        assert_eq!(limiter.admit("k", &limits, cost, t0), Verdict::Admitted);
        assert_eq!(remaining(&limiter, Dimension::Requests, t0), 49);
        assert_eq!(remaining(&limiter, Dimension::InputTokens, t0), 10_000);
        assert_eq!(remaining(&limiter, Dimension::OutputTokens, t0), 7_000);
        // 10,000 input tokens short at 500 per second: 20 s.
        let refused = limiter.admit("k", &limits, cost, t0);
        assert_eq!(refused, wait(Dimension::InputTokens, 20 * SEC));
        assert_eq!(refused.refusal(), Some((Dimension::InputTokens, 20 * SEC)));
        // Nothing was charged by the refusal, in any dimension.
        assert_eq!(remaining(&limiter, Dimension::Requests, t0), 49);
        assert_eq!(remaining(&limiter, Dimension::OutputTokens, t0), 7_000);
        // Exactly at the announced wait it fits, a nanosecond earlier it does not.
        let early = t0 + 20 * SEC - Duration::from_nanos(1);
        assert_eq!(
            limiter.admit("k", &limits, cost, early),
            wait(Dimension::InputTokens, Duration::from_nanos(1))
        );
        assert_eq!(
            limiter.admit("k", &limits, cost, t0 + 20 * SEC),
            Verdict::Admitted
        );
    }

    #[test]
    fn refill_is_continuous_and_stops_at_capacity() {
        let (limiter, t0) = minute();
        let limits = Limits::new().rpm(60).itpm(6_000).otpm(6_000);
        assert_eq!(
            limiter.admit("k", &limits, request(6_000, 0), t0),
            Verdict::Admitted
        );
        // 100 tokens per second, a token every 10 ms: nothing is reset at
        // fixed intervals.
        assert_eq!(remaining(&limiter, Dimension::InputTokens, t0), 0);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(remaining(&limiter, Dimension::InputTokens, at(9)), 0);
        assert_eq!(remaining(&limiter, Dimension::InputTokens, at(10)), 1);
        assert_eq!(
            remaining(&limiter, Dimension::InputTokens, at(15_005)),
            1_500
        );
        let headroom = limiter.headroom(&"k", at(15_000)).unwrap()[1].unwrap();
        assert_eq!(headroom.reset_in, Duration::from_secs(45));
        // Full after a minute, and never above it however long it waits.
        assert_eq!(
            remaining(&limiter, Dimension::InputTokens, at(60_000)),
            6_000
        );
        let later = t0 + Duration::from_secs(3_600);
        assert_eq!(remaining(&limiter, Dimension::InputTokens, later), 6_000);
        let full = limiter.headroom(&"k", later).unwrap()[1].unwrap();
        assert_eq!(full.reset_in, Duration::ZERO);
        assert_eq!(
            limiter.admit("k", &limits, request(6_000, 0), later),
            Verdict::Admitted
        );
        assert_eq!(
            limiter.admit("k", &limits, request(1, 0), later),
            wait(Dimension::InputTokens, Duration::from_millis(10))
        );
    }

    #[test]
    fn the_longest_wait_names_the_limit_and_a_tie_goes_to_the_first() {
        let (limiter, t0) = minute();
        // Input refills 1,000 per second, output 100 per second.
        let limits = Limits::new().rpm(1_000).itpm(60_000).otpm(6_000);
        let cost = request(60_000, 6_000);
        assert_eq!(limiter.admit("k", &limits, cost, t0), Verdict::Admitted);
        assert_eq!(
            limiter.admit("k", &limits, request(1_000, 500), t0),
            wait(Dimension::OutputTokens, 5 * SEC)
        );
        assert_eq!(
            limiter.admit("k", &limits, request(2_000, 100), t0),
            wait(Dimension::InputTokens, 2 * SEC)
        );
        // Both wait one second: requests, input, output is the order.
        assert_eq!(
            limiter.admit("k", &limits, request(1_000, 100), t0),
            wait(Dimension::InputTokens, SEC)
        );
    }

    #[test]
    fn a_short_window_spreads_the_minute() {
        // 60 RPM enforced as 1 request per second.
        let limiter = RateLimiter::with_window(SEC).unwrap();
        let t0 = limiter.epoch;
        let limits = Limits::new().rpm(60).itpm(30_000).otpm(1_000_000);
        assert_eq!(
            limiter.admit("k", &limits, request(10, 10), t0),
            Verdict::Admitted
        );
        assert_eq!(
            limiter.admit("k", &limits, request(10, 10), t0),
            wait(Dimension::Requests, SEC)
        );
        assert_eq!(
            limiter.admit("k", &limits, request(10, 10), t0 + SEC),
            Verdict::Admitted
        );
        // 5,000 input tokens against a capacity of 500 (30,000 ITPM over 1 s):
        // within the limit per minute, so it needs a full bucket (it is full
        // again: the 20 tokens charged refilled in 40 ms), is admitted and
        // leaves a debt.
        assert_eq!(
            limiter.admit("k", &limits, request(5_000, 10), t0 + 2 * SEC),
            Verdict::Admitted
        );
        let headroom = limiter.headroom(&"k", t0 + 2 * SEC).unwrap()[1].unwrap();
        assert_eq!((headroom.limit, headroom.remaining), (30_000, 0));
        // 5,000 to refill at 500 per second.
        assert_eq!(headroom.reset_in, 10 * SEC);
        // A second later the bucket is 4,000 below empty: the next token
        // waits for 4,001 at 500 per second.
        assert_eq!(
            limiter.admit("k", &limits, request(1, 0), t0 + 3 * SEC),
            wait(Dimension::InputTokens, Duration::from_millis(8_002))
        );
    }

    #[test]
    fn a_fractional_window_capacity_waits_for_a_full_bucket() {
        // 50 RPM over 1 s: capacity 5/6 of a request, one every 1.2 s.
        let limiter = RateLimiter::with_window(SEC).unwrap();
        let t0 = limiter.epoch;
        let limits = Limits::new().rpm(50);
        let one = RequestCost {
            requests: 1,
            ..RequestCost::default()
        };
        assert_eq!(limiter.admit("k", &limits, one, t0), Verdict::Admitted);
        assert_eq!(
            limiter.admit("k", &limits, one, t0),
            wait(Dimension::Requests, Duration::from_millis(1_200))
        );
        let then = t0 + Duration::from_millis(1_200);
        assert_eq!(limiter.admit("k", &limits, one, then), Verdict::Admitted);
    }

    #[test]
    fn windows_are_checked() {
        for bad in [Duration::ZERO, Duration::from_secs(61)] {
            let error = RateLimiter::<()>::with_window(bad).unwrap_err();
            assert_eq!(error.window(), bad);
            assert!(error.to_string().contains("at most 60 s"), "{error}");
        }
        assert!(RateLimiter::<()>::with_window(MINUTE).is_ok());
        assert!(RateLimiter::<()>::with_window(Duration::from_nanos(1)).is_ok());
    }

    #[test]
    fn a_cost_above_the_limit_never_fits() {
        let (limiter, t0) = minute();
        let limits = Limits::new().rpm(1).itpm(1_000).otpm(1_000);
        assert_eq!(
            limiter.admit("k", &limits, request(1_001, 1), t0),
            Verdict::Never {
                dimension: Dimension::InputTokens
            }
        );
        assert_eq!(
            limiter.admit("k", &limits, request(1_001, 1), t0).refusal(),
            Some((Dimension::InputTokens, NEVER_FITS_RETRY_AFTER))
        );
        assert_eq!(
            limiter.admit("k", &limits, request(1_000, 1), t0),
            Verdict::Admitted
        );
        // "Never" wins over a wait in an earlier dimension (requests is empty now).
        assert_eq!(
            limiter.admit("k", &limits, request(1, 1_001), t0),
            Verdict::Never {
                dimension: Dimension::OutputTokens
            }
        );
        // A zero limit refuses any cost for ever, and a zero cost passes it.
        let (limiter, t0) = minute();
        let limits = Limits::new().rpm(10).itpm(0).otpm(1_000);
        assert_eq!(
            limiter.admit("k", &limits, request(1, 1), t0),
            Verdict::Never {
                dimension: Dimension::InputTokens
            }
        );
        assert_eq!(
            limiter.admit("k", &limits, request(0, 1), t0),
            Verdict::Admitted
        );
        limiter.charge(&"k", Dimension::InputTokens, 5, t0);
        let input = limiter.headroom(&"k", t0).unwrap()[1].unwrap();
        assert_eq!(
            (input.limit, input.remaining, input.reset_in),
            (0, 0, Duration::ZERO)
        );
    }

    #[test]
    fn reserve_mode_holds_max_tokens_until_refunded() {
        let (limiter, t0) = minute();
        let limits = Limits::new().rpm(1_000).itpm(1_000_000).otpm(1_000);
        assert_eq!(
            limiter.admit("k", &limits, request(10, 800), t0),
            Verdict::Admitted
        );
        // 200 left, 600 more needed at 1,000 per minute.
        assert_eq!(
            limiter.admit("k", &limits, request(10, 800), t0),
            wait(Dimension::OutputTokens, 36 * SEC)
        );
        // The first answer produced 80: the rest of its reservation comes back.
        limiter.refund(&"k", Dimension::OutputTokens, 720, t0);
        assert_eq!(remaining(&limiter, Dimension::OutputTokens, t0), 920);
        assert_eq!(
            limiter.admit("k", &limits, request(10, 800), t0),
            Verdict::Admitted
        );
        // A refund never fills a bucket above its capacity.
        let later = t0 + 2 * MINUTE;
        limiter.refund(&"k", Dimension::OutputTokens, 800, later);
        assert_eq!(remaining(&limiter, Dimension::OutputTokens, later), 1_000);
        assert_eq!(
            limiter.admit("k", &limits, request(10, 1_000), later),
            Verdict::Admitted
        );
        assert_eq!(
            limiter.admit("k", &limits, request(10, 1), later),
            wait(Dimension::OutputTokens, Duration::from_millis(60))
        );
    }

    #[test]
    fn realtime_mode_charges_output_as_produced_into_debt() {
        let (limiter, t0) = minute();
        let limits = Limits::new().rpm(1_000).itpm(1_000_000).otpm(1_000);
        // Admission needs the first token only.
        assert_eq!(
            limiter.admit("k", &limits, request(10, 1), t0),
            Verdict::Admitted
        );
        assert_eq!(
            limiter.admit("k", &limits, request(10, 1), t0),
            Verdict::Admitted
        );
        // Answers in flight overdraw the bucket: 1,500 more produced.
        for _ in 0..15 {
            limiter.charge(&"k", Dimension::OutputTokens, 100, t0);
        }
        let output = limiter.headroom(&"k", t0).unwrap()[2].unwrap();
        assert_eq!(output.remaining, 0);
        // 1,502 charged refill in 90.12 s.
        assert_eq!(output.reset_in, Duration::from_millis(90_120));
        // The debt (502) and the next first token refill in 30.18 s.
        assert_eq!(
            limiter.admit("k", &limits, request(10, 1), t0),
            wait(Dimension::OutputTokens, Duration::from_millis(30_180))
        );
        let then = t0 + Duration::from_millis(30_180);
        assert_eq!(
            limiter.admit("k", &limits, request(10, 1), then),
            Verdict::Admitted
        );
    }

    #[test]
    fn keys_and_unlimited_dimensions_are_independent() {
        let (limiter, t0) = minute();
        let rpm_only = Limits::new().rpm(1);
        assert_eq!(
            limiter.admit("a", &rpm_only, request(u64::MAX, u64::MAX), t0),
            Verdict::Admitted
        );
        let a = limiter.headroom(&"a", t0).unwrap();
        assert_eq!(a[1], None);
        assert_eq!(a[2], None);
        assert_eq!(
            a[0],
            Some(Headroom {
                limit: 1,
                remaining: 0,
                reset_in: MINUTE
            })
        );
        assert_eq!(limiter.headroom(&"b", t0), None);
        assert_eq!(
            limiter.admit("b", &rpm_only, request(1, 1), t0),
            Verdict::Admitted
        );
        // Charges to a key or a dimension the limiter does not hold are ignored.
        limiter.charge(&"c", Dimension::Requests, 1, t0);
        limiter.charge(&"a", Dimension::InputTokens, 1, t0);
        assert_eq!(limiter.headroom(&"c", t0), None);
        assert_eq!(limiter.headroom(&"a", t0).unwrap()[1], None);
    }

    #[test]
    fn huge_costs_and_far_clocks_saturate() {
        let (limiter, t0) = minute();
        let limits = Limits::new().rpm(u64::MAX).itpm(u64::MAX).otpm(1);
        assert_eq!(
            limiter.admit("k", &limits, request(u64::MAX, 1), t0),
            Verdict::Admitted
        );
        limiter.charge(&"k", Dimension::OutputTokens, u64::MAX, t0);
        let far = t0 + Duration::from_secs(10 * 365 * 86_400);
        let headroom = limiter.headroom(&"k", far).unwrap();
        assert_eq!(headroom[1].unwrap().remaining, u64::MAX);
        // The output debt outlives any clock: it is reported, not wrapped.
        let output = headroom[2].unwrap();
        assert_eq!(output.remaining, 0);
        assert!(output.reset_in > Duration::from_secs(1_000 * 365 * 86_400));
        assert!(matches!(
            limiter.admit("k", &limits, request(1, 1), far),
            Verdict::Wait {
                dimension: Dimension::OutputTokens,
                ..
            }
        ));
    }
}
