//! Exponential backoff with full jitter, and the injectable random source.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::mix::{splitmix64, GOLDEN_GAMMA};

/// A source of uniform random numbers in `[0, 1)`, used to spread backoff delays.
///
/// The retry layer draws one number per backoff delay (full jitter: the delay is
/// the number times the exponential bound). Inject your own to make tests
/// deterministic; any `Fn() -> f64 + Send + Sync + 'static` closure is a `Jitter`.
/// Values outside `[0, 1)` (and NaN) are clamped, never trusted: NaN and
/// negatives count as 0, values of 1 or more as just below 1.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_llm_limits::retry::RetryAfterLayer;
///
/// // Always wait half of the exponential bound: 250 ms, 500 ms, 1 s, ...
/// let layer = RetryAfterLayer::builder().jitter(|| 0.5).build();
/// # let _ = layer;
/// ```
pub trait Jitter: Send + Sync + 'static {
    /// The next number, expected in `[0, 1)`.
    fn sample(&self) -> f64;
}

impl<F> Jitter for F
where
    F: Fn() -> f64 + Send + Sync + 'static,
{
    fn sample(&self) -> f64 {
        self()
    }
}

/// The default [`Jitter`]: a small, fast, lock-free splitmix64 generator.
///
/// Seeded from [`RandomState`] (the standard library's per-process random
/// keys), so two processes do not back off in step. Not cryptographic, and
/// it does not need to be: it only spreads retries in time.
pub(crate) struct FastRng {
    state: AtomicU64,
}

impl FastRng {
    /// A generator seeded from the process's random hash keys.
    pub(crate) fn new() -> Self {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(GOLDEN_GAMMA);
        Self::with_seed(hasher.finish())
    }

    /// A generator with a fixed seed: the same seed gives the same sequence.
    pub(crate) fn with_seed(seed: u64) -> Self {
        FastRng {
            state: AtomicU64::new(seed),
        }
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&self) -> u64 {
        splitmix64(
            self.state
                .fetch_add(GOLDEN_GAMMA, Ordering::Relaxed)
                .wrapping_add(GOLDEN_GAMMA),
        )
    }
}

impl Default for FastRng {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for FastRng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FastRng").finish_non_exhaustive()
    }
}

impl Jitter for FastRng {
    fn sample(&self) -> f64 {
        // 53 high bits -> a double in [0, 1).
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Clamps a sample into `[0, 1)`; NaN and negatives become 0.
pub(crate) fn clamp_unit(x: f64) -> f64 {
    if x.is_nan() || x <= 0.0 {
        0.0
    } else if x >= 1.0 {
        1.0 - f64::EPSILON
    } else {
        x
    }
}

/// The exponential bound for the `retry`-th retry (0 for the first):
/// `min(max, initial * 2^retry)`, without overflow.
pub(crate) fn exponential_bound(initial: Duration, max: Duration, retry: u32) -> Duration {
    let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
    initial.checked_mul(factor).unwrap_or(max).min(max)
}

/// Full-jitter backoff: a uniform draw in `[0, bound)` (0 when the bound is 0).
pub(crate) fn full_jitter(initial: Duration, max: Duration, retry: u32, sample: f64) -> Duration {
    let bound = exponential_bound(initial, max, retry);
    // Rounding may reach the bound itself; stay strictly below it.
    bound
        .mul_f64(clamp_unit(sample))
        .min(bound.saturating_sub(Duration::from_nanos(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn bound_doubles_up_to_the_cap() {
        let bounds: Vec<_> = (0..7)
            .map(|n| exponential_bound(MS(500), Duration::from_secs(8), n))
            .collect();
        assert_eq!(
            bounds,
            [
                MS(500),
                MS(1000),
                MS(2000),
                MS(4000),
                MS(8000),
                MS(8000),
                MS(8000)
            ]
        );
        assert_eq!(
            exponential_bound(MS(500), Duration::from_secs(8), u32::MAX),
            Duration::from_secs(8)
        );
    }

    #[test]
    fn jitter_scales_the_bound() {
        assert_eq!(full_jitter(MS(500), MS(8000), 1, 0.5), MS(500));
        assert_eq!(full_jitter(MS(500), MS(8000), 1, f64::NAN), Duration::ZERO);
        assert!(full_jitter(MS(500), MS(8000), 1, 7.0) < MS(1000));
    }

    #[test]
    fn fast_rng_is_uniform_enough_and_seeded() {
        let a = FastRng::with_seed(7);
        let b = FastRng::with_seed(7);
        let xs: Vec<f64> = (0..10_000).map(|_| a.sample()).collect();
        let ys: Vec<f64> = (0..10_000).map(|_| b.sample()).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
        let low = xs.iter().filter(|x| **x < 0.1).count();
        assert!((800..1200).contains(&low), "{low} below 0.1");
        assert_ne!(FastRng::new().next_u64(), FastRng::new().next_u64());
    }

    proptest! {
        #[test]
        fn backoff_never_exceeds_max_nor_panics(
            initial in 0u64..u64::MAX, max in 0u64..u64::MAX, retry in any::<u32>(), sample in any::<f64>()
        ) {
            let (initial, max) = (Duration::from_nanos(initial), Duration::from_nanos(max));
            let d = full_jitter(initial, max, retry, sample);
            prop_assert!(d <= max);
        }
    }
}
