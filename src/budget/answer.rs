//! Anthropic-shaped answers, shared by enforce mode and the emulator: the
//! error JSON, the 429 message, `retry-after` and the
//! `anthropic-ratelimit-*` headers of a key's buckets (facts file, sections
//! 3, 4.1 and 4.2).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue};
use serde::Serialize;

use super::ledger::BucketState;
use crate::headers::{insert_limit_headers, X_SHOULD_RETRY};
use crate::Dimension;

/// The API's error JSON: `{"type":"error","error":{"type":..,"message":..},"request_id":..}`.
#[derive(Debug, Serialize)]
pub(crate) struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorObject<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct ErrorObject<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<ErrorDetails<'a>>,
}

#[derive(Debug, Serialize)]
struct ErrorDetails<'a> {
    error_code: &'a str,
}

/// The error body; `error_code` goes in `error.details` (the spend-cap 429).
pub(crate) fn error_json<'a>(
    kind: &'a str,
    message: &'a str,
    request_id: Option<&'a str>,
    error_code: Option<&'a str>,
) -> ErrorBody<'a> {
    ErrorBody {
        kind: "error",
        error: ErrorObject {
            kind,
            message,
            details: error_code.map(|error_code| ErrorDetails { error_code }),
        },
        request_id,
    }
}

/// A value serialised as JSON (empty if it cannot be, which the crate's own
/// answer types never are).
pub(crate) fn json_bytes(body: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(body).unwrap_or_default())
}

/// `content-type: application/json`, and `request-id` when given.
pub(crate) fn insert_json_headers(headers: &mut HeaderMap, request_id: Option<&str>) {
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(id) = request_id {
        insert_request_id(headers, id);
    }
}

/// `request-id: id` (nothing if `id` is not a valid header value).
pub(crate) fn insert_request_id(headers: &mut HeaderMap, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        headers.insert("request-id", v);
    }
}

/// Marks a 429 as retryable after `retry_after` (integer seconds, rounded up,
/// at least 1) with `x-should-retry: true`.
pub(crate) fn insert_retry_after(headers: &mut HeaderMap, retry_after: Duration) {
    headers.insert(
        RETRY_AFTER,
        HeaderValue::from(retry_after_secs(retry_after)),
    );
    headers.insert(X_SHOULD_RETRY, HeaderValue::from_static("true"));
}

/// `retry-after` in whole seconds: rounded up, at least 1.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    let whole = wait
        .as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0));
    whole.max(1)
}

/// `1234567` -> `"1,234,567"`, as the API's messages write limits.
pub(crate) fn with_commas(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The 429 message of a per-minute limit (facts file 4.2):
/// "This request would exceed the rate limit for your organization
/// (`organization`) of 30,000 input tokens per minute. For details, …".
pub(crate) fn rate_limit_message(
    organization: Option<&str>,
    dimension: Dimension,
    limit: Option<u64>,
) -> String {
    let what = match dimension {
        Dimension::Requests => "requests per minute",
        Dimension::InputTokens => "input tokens per minute",
        Dimension::OutputTokens => "output tokens per minute",
    };
    let organization = organization.map_or_else(String::new, |o| format!(" ({o})"));
    let limit = limit.map_or_else(|| "your limit of".to_string(), with_commas);
    format!(
        "This request would exceed the rate limit for your organization{organization} of {limit} {what}. \
         For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response \
         headers for current usage. Please reduce the prompt length or the maximum tokens requested, \
         or try again later."
    )
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

/// Tokens remaining as the API reports them: "rounded to the nearest
/// thousand" (the rate-limits page), never negative.
pub(crate) fn round_thousands(available: f64) -> u64 {
    if available.is_finite() && available > 0.0 {
        ((available as u64).saturating_add(500) / 1_000) * 1_000
    } else {
        0
    }
}

fn floor_count(available: f64) -> u64 {
    if available.is_finite() && available > 0.0 {
        available as u64
    } else {
        0
    }
}

/// Writes every `anthropic-ratelimit-*` header for the buckets
/// `[requests, input, output]`: one set per bucket with a known limit, and
/// the combined `tokens` set (input + output, as the API reports it when no
/// workspace limit is lower) when both token limits are known.
///
/// Resets are `now` (the system clock, so a client computing `reset - now`
/// gets the bucket's real time to full even under tokio's paused clock) plus
/// the time to full, rounded up to the second.
pub(crate) fn insert_rate_limit_headers(
    headers: &mut HeaderMap,
    states: &[BucketState; 3],
    now: SystemTime,
) {
    let mut tokens: Option<(u64, u64, SystemTime)> = None;
    let mut token_dims = 0;
    for (dimension, state) in Dimension::ALL.iter().zip(states) {
        let Some(limit) = state.limit else { continue };
        // A bucket deep in debt could overflow the system time: cap at a century.
        let to_full = time_to_full(state, limit).min(Duration::from_secs(100 * 365 * 86_400));
        let reset = ceil_second(now.checked_add(to_full).unwrap_or(now));
        let remaining = match dimension {
            Dimension::Requests => floor_count(state.available),
            _ => round_thousands(state.available),
        };
        insert_limit_headers(headers, dimension.header_name(), limit, remaining, reset);
        if *dimension != Dimension::Requests {
            token_dims += 1;
            tokens = Some(match tokens {
                None => (limit, remaining, reset),
                Some((l, r, t)) => (
                    l.saturating_add(limit),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::parse_rfc3339;

    #[test]
    fn commas_rounding_and_retry_after() {
        assert_eq!(with_commas(30_000), "30,000");
        assert_eq!(with_commas(999), "999");
        assert_eq!(with_commas(1_234_567), "1,234,567");
        assert_eq!(with_commas(u64::MAX), "18,446,744,073,709,551,615");
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2_001)), 3);
        assert_eq!(retry_after_secs(Duration::from_secs(20)), 20);
        assert_eq!(retry_after_secs(Duration::MAX), u64::MAX);
        assert_eq!(round_thousands(29_499.9), 29_000);
        assert_eq!(round_thousands(29_500.0), 30_000);
        assert_eq!(round_thousands(-5.0), 0);
        assert_eq!(round_thousands(f64::NAN), 0);
        assert_eq!(round_thousands(f64::MAX), u64::MAX / 1_000 * 1_000);
    }

    #[test]
    fn message_names_the_limit_and_the_organization() {
        let m = rate_limit_message(Some("emulator"), Dimension::InputTokens, Some(30_000));
        assert!(
            m.starts_with("This request would exceed the rate limit for your organization (emulator) of 30,000 input tokens per minute. "),
            "{m}"
        );
        let m = rate_limit_message(None, Dimension::Requests, None);
        assert!(
            m.starts_with("This request would exceed the rate limit for your organization of your limit of requests per minute. "),
            "{m}"
        );
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
