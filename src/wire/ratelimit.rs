//! The `anthropic-ratelimit-*` response headers, written as the API writes
//! them: one `limit` / `remaining` / `reset` set per limited dimension
//! (`requests`, `input-tokens`, `output-tokens`) and the combined `tokens`
//! set.
//!
//! The API's rounding: requests remaining are a whole count, tokens remaining
//! are rounded to the nearest thousand, and a reset (an RFC 3339 instant) is
//! rounded up to the next whole second, so a reset is never announced early.
//! The combined `tokens` set (input + output, as the API reports it when no
//! workspace limit is lower) is written only when both token limits are
//! known.
//!
//! A writer of these headers (a gateway's enforce mode, an emulator of the
//! API) describes each of its limits with a [`LimitState`] and calls
//! [`insert_rate_limit_headers`]; [`RateLimitSnapshot::from_headers`] reads
//! them back.
//!
//! [`RateLimitSnapshot::from_headers`]: crate::headers::RateLimitSnapshot::from_headers
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, UNIX_EPOCH};
//! use http::HeaderMap;
//! use tower_llm_limits::wire::ratelimit::{insert_rate_limit_headers, LimitState};
//!
//! let requests = LimitState { limit: 50, remaining: 49, reset_in: Duration::from_millis(1_200) };
//! let input = LimitState { limit: 30_000, remaining: 28_499, reset_in: Duration::from_secs(3) };
//! let mut headers = HeaderMap::new();
//! // Indexed as `Dimension::ALL`: requests, input tokens, output tokens.
//! insert_rate_limit_headers(&mut headers, &[Some(requests), Some(input), None], UNIX_EPOCH);
//!
//! assert_eq!(headers["anthropic-ratelimit-requests-remaining"], "49");
//! assert_eq!(headers["anthropic-ratelimit-requests-reset"], "1970-01-01T00:00:02Z");
//! assert_eq!(headers["anthropic-ratelimit-input-tokens-remaining"], "28000");
//! // The output-token limit is unknown: no combined `tokens` set.
//! assert!(headers.get("anthropic-ratelimit-tokens-limit").is_none());
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::headers::{format_rfc3339, rfc3339_bytes};
use crate::Dimension;

/// The longest reset written: a bucket deep in debt could otherwise overflow
/// the system time.
const MAX_RESET_IN: Duration = Duration::from_secs(100 * 365 * 86_400);

/// One limit as its `anthropic-ratelimit-<dimension>-*` headers report it,
/// before the API's rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    /// The limit per minute.
    pub limit: u64,
    /// Whole requests or tokens that could be charged now (zero while the
    /// limit is in debt). Token counts are written rounded to the nearest
    /// thousand.
    pub remaining: u64,
    /// Until the limit is fully replenished. Written as `now + reset_in`,
    /// rounded up to the second (capped at a century).
    pub reset_in: Duration,
}

/// Writes every `anthropic-ratelimit-*` header for the limits
/// `[requests, input tokens, output tokens]` (the order of
/// [`Dimension::ALL`]): one set per known limit, and the combined `tokens`
/// set (limits and remaining summed, the later reset) when both token limits
/// are known. Headers of a dimension with no known limit are left as they
/// are.
///
/// Resets are `now` plus each limit's `reset_in`, rounded up to the second.
pub fn insert_rate_limit_headers(
    headers: &mut HeaderMap,
    limits: &[Option<LimitState>; 3],
    now: SystemTime,
) {
    let mut tokens: Option<(u64, u64, SystemTime)> = None;
    let mut token_dims = 0;
    for (dimension, state) in Dimension::ALL.iter().zip(limits) {
        let Some(state) = state else { continue };
        let reset_in = state.reset_in.min(MAX_RESET_IN);
        let reset = ceil_second(now.checked_add(reset_in).unwrap_or(now));
        let remaining = match dimension {
            Dimension::Requests => state.remaining,
            _ => round_thousands(state.remaining),
        };
        insert_limit_headers(
            headers,
            dimension.header_name(),
            state.limit,
            remaining,
            reset,
        );
        if *dimension != Dimension::Requests {
            token_dims += 1;
            tokens = Some(match tokens {
                None => (state.limit, remaining, reset),
                Some((l, r, t)) => (
                    l.saturating_add(state.limit),
                    r.saturating_add(remaining),
                    t.max(reset),
                ),
            });
        }
    }
    if let (Some((limit, remaining, reset)), 2) = (tokens, token_dims) {
        insert_limit_headers(headers, "tokens", limit, remaining, reset);
    }
}

/// Writes `anthropic-ratelimit-{kind}-limit`, `-remaining` and `-reset` as the
/// API does (`kind`: `requests`, `tokens`, `input-tokens` or `output-tokens`).
/// Any other `kind` writes nothing.
pub(crate) fn insert_limit_headers(
    headers: &mut HeaderMap,
    kind: &str,
    limit: u64,
    remaining: u64,
    reset_at: SystemTime,
) {
    let Some([limit_name, remaining_name, reset_name]) = names(kind) else {
        return;
    };
    headers.insert(limit_name, HeaderValue::from(limit));
    headers.insert(remaining_name, HeaderValue::from(remaining));
    if let Some(reset) = reset_value(reset_at) {
        headers.insert(reset_name, reset);
    }
}

/// The `limit`, `remaining` and `reset` header names of one kind of limit.
fn names(kind: &str) -> Option<[HeaderName; 3]> {
    const fn set(
        limit: &'static str,
        remaining: &'static str,
        reset: &'static str,
    ) -> [HeaderName; 3] {
        [
            HeaderName::from_static(limit),
            HeaderName::from_static(remaining),
            HeaderName::from_static(reset),
        ]
    }
    const REQUESTS: [HeaderName; 3] = set(
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
    );
    const TOKENS: [HeaderName; 3] = set(
        "anthropic-ratelimit-tokens-limit",
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-reset",
    );
    const INPUT_TOKENS: [HeaderName; 3] = set(
        "anthropic-ratelimit-input-tokens-limit",
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-input-tokens-reset",
    );
    const OUTPUT_TOKENS: [HeaderName; 3] = set(
        "anthropic-ratelimit-output-tokens-limit",
        "anthropic-ratelimit-output-tokens-remaining",
        "anthropic-ratelimit-output-tokens-reset",
    );
    match kind {
        "requests" => Some(REQUESTS),
        "tokens" => Some(TOKENS),
        "input-tokens" => Some(INPUT_TOKENS),
        "output-tokens" => Some(OUTPUT_TOKENS),
        _ => None,
    }
}

/// How many recent reset instants keep their formatted value.
const RESET_SLOTS: usize = 8;

/// Formatted reset values by unix second, shared by every writer: a reset
/// is a whole second, so each one is formatted at most once per second.
static RESETS: Mutex<[Option<(u64, HeaderValue)>; RESET_SLOTS]> =
    Mutex::new([const { None }; RESET_SLOTS]);

/// The `reset` header value of an instant (a whole second), formatted once
/// per second and then shared.
fn reset_value(at: SystemTime) -> Option<HeaderValue> {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let slot = usize::try_from(secs % RESET_SLOTS as u64).unwrap_or(0);
    let mut cache = RESETS.lock().unwrap_or_else(PoisonError::into_inner);
    let entry = cache.get_mut(slot)?;
    if let Some((cached, value)) = entry {
        if *cached == secs {
            return Some(value.clone());
        }
    }
    let value = match rfc3339_bytes(secs) {
        Some(bytes) => HeaderValue::from_maybe_shared(Bytes::copy_from_slice(&bytes)).ok()?,
        None => HeaderValue::try_from(format_rfc3339(at)).ok()?,
    };
    *entry = Some((secs, value.clone()));
    Some(value)
}

fn round_thousands(tokens: u64) -> u64 {
    (tokens.saturating_add(500) / 1_000) * 1_000
}

/// Rounds a time up to the next whole second (a reset is never announced early).
fn ceil_second(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d.subsec_nanos() > 0 => UNIX_EPOCH
            .checked_add(Duration::from_secs(d.as_secs().saturating_add(1)))
            .unwrap_or(t),
        _ => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::parse_rfc3339;

    #[test]
    fn remaining_tokens_round_to_the_thousand() {
        assert_eq!(round_thousands(29_499), 29_000);
        assert_eq!(round_thousands(29_500), 30_000);
        assert_eq!(round_thousands(0), 0);
        assert_eq!(round_thousands(u64::MAX), u64::MAX / 1_000 * 1_000);
    }

    fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).and_then(|v| v.to_str().ok())
    }

    fn state(limit: u64, remaining: u64, reset_in_ms: u64) -> Option<LimitState> {
        Some(LimitState {
            limit,
            remaining,
            reset_in: Duration::from_millis(reset_in_ms),
        })
    }

    #[test]
    fn resets_round_up_to_the_second_and_tokens_combine() {
        let now = parse_rfc3339("2026-11-28T07:15:00.250Z").unwrap_or(UNIX_EPOCH);
        let limits = [
            state(50, 49, 360),
            state(30_000, 28_500, 3_000),
            state(8_000, 8_000, 0),
        ];
        let mut h = HeaderMap::new();
        insert_rate_limit_headers(&mut h, &limits, now);
        let get = |n: &str| header(&h, n);
        assert_eq!(get("anthropic-ratelimit-requests-limit"), Some("50"));
        assert_eq!(get("anthropic-ratelimit-requests-remaining"), Some("49"));
        // 07:15:00.610, rounded up.
        assert_eq!(
            get("anthropic-ratelimit-requests-reset"),
            Some("2026-11-28T07:15:01Z")
        );
        assert_eq!(
            get("anthropic-ratelimit-input-tokens-remaining"),
            Some("29000")
        );
        assert_eq!(
            get("anthropic-ratelimit-input-tokens-reset"),
            Some("2026-11-28T07:15:04Z")
        );
        // Full now: the reset is now, rounded up.
        assert_eq!(
            get("anthropic-ratelimit-output-tokens-reset"),
            Some("2026-11-28T07:15:01Z")
        );
        assert_eq!(get("anthropic-ratelimit-tokens-limit"), Some("38000"));
        assert_eq!(get("anthropic-ratelimit-tokens-remaining"), Some("37000"));
        assert_eq!(
            get("anthropic-ratelimit-tokens-reset"),
            Some("2026-11-28T07:15:04Z")
        );
    }

    #[test]
    fn a_whole_second_is_not_rounded() {
        let now = parse_rfc3339("2026-11-28T07:15:00Z").unwrap_or(UNIX_EPOCH);
        let mut h = HeaderMap::new();
        insert_rate_limit_headers(&mut h, &[state(50, 50, 2_000), None, None], now);
        assert_eq!(
            header(&h, "anthropic-ratelimit-requests-reset"),
            Some("2026-11-28T07:15:02Z")
        );
    }

    #[test]
    fn unknown_limits_write_nothing_and_one_token_limit_no_combined_set() {
        let mut h = HeaderMap::new();
        insert_rate_limit_headers(&mut h, &[None, None, state(8_000, 7_600, 0)], UNIX_EPOCH);
        assert!(h.get("anthropic-ratelimit-requests-limit").is_none());
        assert!(h.get("anthropic-ratelimit-input-tokens-limit").is_none());
        assert!(h.get("anthropic-ratelimit-tokens-limit").is_none());
        assert_eq!(
            header(&h, "anthropic-ratelimit-output-tokens-remaining"),
            Some("8000")
        );
    }

    #[test]
    fn a_huge_reset_is_capped_not_overflowed() {
        let limits = [
            state(1, 0, u64::MAX),
            Some(LimitState {
                limit: u64::MAX,
                remaining: u64::MAX,
                reset_in: Duration::MAX,
            }),
            state(u64::MAX, u64::MAX, 0),
        ];
        let mut h = HeaderMap::new();
        insert_rate_limit_headers(&mut h, &limits, UNIX_EPOCH);
        assert_eq!(
            header(&h, "anthropic-ratelimit-requests-reset"),
            header(&h, "anthropic-ratelimit-input-tokens-reset"),
        );
        assert!(header(&h, "anthropic-ratelimit-requests-reset")
            .is_some_and(|v| v.starts_with("2069-")));
        assert_eq!(
            header(&h, "anthropic-ratelimit-tokens-limit"),
            Some(u64::MAX.to_string().as_str())
        );
    }
}
