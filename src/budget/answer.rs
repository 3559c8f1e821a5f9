//! The `anthropic-ratelimit-*` headers of a key's buckets in enforce mode:
//! the ledger's bucket snapshots mapped to the neutral
//! [`LimitState`] that [`wire::ratelimit`](crate::wire::ratelimit) writes.
//! The rest of the API's answers (error JSON, 429 message, `retry-after`) is
//! in [`wire::error`](crate::wire::error).

use std::time::{Duration, SystemTime};

use http::HeaderMap;

use super::ledger::BucketState;
use crate::wire::ratelimit::{self, LimitState};

/// Time until a bucket is full again: its deficit refilled at `limit` per minute.
fn time_to_full(state: &BucketState, limit: u64) -> Duration {
    if limit == 0 || !state.available.is_finite() || !state.capacity.is_finite() {
        return Duration::ZERO;
    }
    let missing = state.capacity - state.available;
    if missing <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(missing * 60.0 / limit as f64).unwrap_or(Duration::MAX)
}

/// Whole units available, rounded down, never negative.
fn floor_count(available: f64) -> u64 {
    if available.is_finite() && available > 0.0 {
        available as u64
    } else {
        0
    }
}

/// A bucket as the headers report it, if its limit is known.
fn limit_state(state: &BucketState) -> Option<LimitState> {
    let limit = state.limit?;
    Some(LimitState {
        limit,
        remaining: floor_count(state.available),
        reset_in: time_to_full(state, limit),
    })
}

/// Writes every `anthropic-ratelimit-*` header for the buckets
/// `[requests, input, output]` (see [`ratelimit::insert_rate_limit_headers`]
/// for the rounding and the combined `tokens` set).
///
/// Resets are `now` (the system clock, so a client computing `reset - now`
/// gets the bucket's real time to full even under tokio's paused clock) plus
/// the time to full, rounded up to the second.
pub(crate) fn insert_rate_limit_headers(
    headers: &mut HeaderMap,
    states: &[BucketState; 3],
    now: SystemTime,
) {
    ratelimit::insert_rate_limit_headers(headers, &states.each_ref().map(limit_state), now);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::parse_rfc3339;
    use std::time::UNIX_EPOCH;

    #[test]
    fn remaining_counts_floor_and_never_go_negative() {
        assert_eq!(floor_count(29_499.9), 29_499);
        assert_eq!(floor_count(-5.0), 0);
        assert_eq!(floor_count(f64::NAN), 0);
        assert_eq!(floor_count(f64::MAX), u64::MAX);
    }

    fn bucket(limit: Option<u64>, available: f64) -> BucketState {
        BucketState {
            limit,
            learned: false,
            available,
            capacity: limit.map_or(0.0, |l| l as f64),
        }
    }

    fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn headers_round_tokens_and_reset_up_to_the_second() {
        let now = parse_rfc3339("2026-11-28T07:15:00.250Z").unwrap_or(UNIX_EPOCH);
        let states = [
            bucket(Some(50), 49.7),
            // 1,500 of 30,000 missing: full in 3 s.
            bucket(Some(30_000), 28_500.0),
            bucket(Some(8_000), 8_000.0),
        ];
        let mut h = HeaderMap::new();
        insert_rate_limit_headers(&mut h, &states, now);
        let get = |n: &str| header(&h, n);
        assert_eq!(get("anthropic-ratelimit-requests-remaining"), Some("49"));
        assert_eq!(
            get("anthropic-ratelimit-input-tokens-remaining"),
            Some("29000")
        );
        assert_eq!(
            get("anthropic-ratelimit-input-tokens-reset"),
            Some("2026-11-28T07:15:04Z")
        );
        assert_eq!(get("anthropic-ratelimit-tokens-limit"), Some("38000"));
        assert_eq!(get("anthropic-ratelimit-tokens-remaining"), Some("37000"));
        assert_eq!(
            get("anthropic-ratelimit-tokens-reset"),
            Some("2026-11-28T07:15:04Z")
        );
    }

    fn any_f64() -> impl proptest::strategy::Strategy<Value = f64> {
        use proptest::prelude::*;
        prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            -1e6..1e6f64,
        ]
    }

    proptest::proptest! {
        /// Whatever state a ledger reports (NaN, infinities, debts, limits
        /// up to `u64::MAX`), the headers are written without a panic, and
        /// `remaining` never exceeds what is available.
        #[test]
        fn headers_never_panic(
            limits in proptest::array::uniform3(proptest::option::of(proptest::prelude::any::<u64>())),
            available in proptest::array::uniform3(any_f64()),
            capacity in proptest::array::uniform3(any_f64()),
            now_secs in 0..=i64::MAX as u64,
        ) {
            let mut states = [bucket(None, 0.0); 3];
            for (i, s) in states.iter_mut().enumerate() {
                *s = BucketState { limit: limits[i], learned: false, available: available[i], capacity: capacity[i] };
            }
            let now = UNIX_EPOCH.checked_add(Duration::from_secs(now_secs)).unwrap_or(UNIX_EPOCH);
            let mut h = HeaderMap::new();
            insert_rate_limit_headers(&mut h, &states, now);
            let remaining = header(&h, "anthropic-ratelimit-requests-remaining")
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(r) = remaining {
                proptest::prop_assert!(r == 0 || (r as f64) <= available[0]);
            }
        }
    }

    #[test]
    fn headers_skip_unknown_limits_and_survive_deep_debt() {
        let states = [
            bucket(None, 0.0),
            bucket(Some(1), -1e300),
            bucket(None, 0.0),
        ];
        let mut h = HeaderMap::new();
        insert_rate_limit_headers(&mut h, &states, UNIX_EPOCH);
        assert!(h.get("anthropic-ratelimit-requests-limit").is_none());
        assert!(h.get("anthropic-ratelimit-tokens-limit").is_none());
        assert_eq!(
            header(&h, "anthropic-ratelimit-input-tokens-remaining"),
            Some("0")
        );
        assert!(h.get("anthropic-ratelimit-input-tokens-reset").is_some());
    }
}
