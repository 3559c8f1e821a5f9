//! Enforce (server) mode's answers: Anthropic-shaped 429s and the
//! `anthropic-ratelimit-*` headers on every response.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use tokio::time::Instant;

use super::ledger::BucketState;
use super::state::{dim_index, Charge, Denied, Shared};
use super::usage::ResponseBody;
use crate::headers::{insert_limit_headers, X_SHOULD_RETRY};
use crate::Dimension;

/// Token counts in `-remaining` headers are rounded to the nearest thousand,
/// as the API's are ("rounded to the nearest thousand", facts file, section 3).
fn round_thousands(v: u64) -> u64 {
    v.saturating_add(500) / 1_000 * 1_000
}

/// Time until a bucket is full again: its deficit refilled at limit per minute.
fn reset_in(state: &BucketState, limit: u64) -> Duration {
    let deficit = (state.capacity - state.available.max(0.0)).max(0.0);
    if limit == 0 || !deficit.is_finite() {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(deficit * 60.0 / limit as f64).unwrap_or(Duration::ZERO)
}

/// Writes the `anthropic-ratelimit-*` headers of a key's buckets: requests,
/// input tokens, output tokens, and the combined `tokens` (input + output, as
/// the API reports it when no workspace limit is lower).
pub(crate) fn insert_headers(shared: &Shared, charge: &Charge, headers: &mut HeaderMap) {
    let now = Instant::now();
    let Some(states) = shared.ledger.state(&charge.key, &charge.limits, now) else {
        return;
    };
    let wall = SystemTime::now();
    let mut known = [None; 3];
    for dimension in Dimension::ALL {
        let idx = dim_index(dimension);
        let Some(state) = states.get(idx) else {
            continue;
        };
        let Some(limit) = state.limit else {
            continue;
        };
        let available = if state.available.is_finite() {
            state.available.max(0.0).floor() as u64
        } else {
            limit
        };
        let remaining = match dimension {
            Dimension::Requests => available,
            _ => round_thousands(available),
        };
        let reset = reset_in(state, limit);
        insert_limit_headers(
            headers,
            dimension.header_name(),
            limit,
            remaining,
            wall + reset,
        );
        if let Some(slot) = known.get_mut(idx) {
            *slot = Some((limit, available, reset));
        }
    }
    if let [_, Some((il, ia, ir)), Some((ol, oa, or))] = known {
        insert_limit_headers(
            headers,
            "tokens",
            il.saturating_add(ol),
            round_thousands(ia.saturating_add(oa)),
            wall + ir.max(or),
        );
    }
}

/// A process-unique `req_…` identifier for the budget's own answers.
fn request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "req_budget{:012x}{:06x}",
        t & 0xffff_ffff_ffff,
        n & 0xff_ffff
    )
}

fn with_commas(v: u64) -> String {
    let digits = v.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn unit(d: Dimension) -> &'static str {
    match d {
        Dimension::Requests => "requests",
        Dimension::InputTokens => "input tokens",
        Dimension::OutputTokens => "output tokens",
    }
}

/// The 429 answer to a request the caller's budget cannot admit.
///
/// Body: `{"type":"error","error":{"type":"rate_limit_error","message":…},"request_id":"req_…"}`
/// (facts file, 4.1 and 4.2), with the same id in a `request-id` header.
/// Over budget now: `retry-after` in whole seconds rounded up and
/// `x-should-retry: true`. Never fits: no `retry-after` and
/// `x-should-retry: false` (retrying cannot help).
pub(crate) fn reject<B>(
    shared: &Shared,
    charge: &Charge,
    denied: Denied,
) -> Response<ResponseBody<B>> {
    let (dimension, limit, retry_in) = match denied {
        Denied::Exceeded {
            retry_in,
            dimension,
        } => {
            let limit = shared
                .ledger
                .state(&charge.key, &charge.limits, Instant::now())
                .and_then(|s| s.get(dim_index(dimension)).and_then(|b| b.limit))
                .or(charge.limits.get(dimension));
            (dimension, limit, Some(retry_in))
        }
        Denied::TooLarge {
            dimension, limit, ..
        } => (dimension, Some(limit), None),
    };
    let mut message = match limit {
        Some(limit) => format!(
            "This request would exceed the rate limit for your organization of {} {} per minute.",
            with_commas(limit),
            unit(dimension)
        ),
        None => format!(
            "This request would exceed the rate limit for your organization ({} per minute).",
            unit(dimension)
        ),
    };
    message.push_str(
        " For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response headers for current usage. Please reduce the prompt length or the maximum tokens requested, or try again later.",
    );
    let id = request_id();
    let body = serde_json::json!({
        "type": "error",
        "error": { "type": "rate_limit_error", "message": message },
        "request_id": id,
    });
    let bytes = Bytes::from(body.to_string());
    let mut response = Response::new(ResponseBody::full(bytes));
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::try_from(id) {
        headers.insert("request-id", v);
    }
    match retry_in {
        Some(retry_in) => {
            let secs = retry_in.as_secs() + u64::from(retry_in.subsec_nanos() > 0);
            headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
            headers.insert(X_SHOULD_RETRY, HeaderValue::from_static("true"));
        }
        None => {
            headers.insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
        }
    }
    insert_headers(shared, charge, headers);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_and_rounding() {
        assert_eq!(with_commas(30_000), "30,000");
        assert_eq!(with_commas(999), "999");
        assert_eq!(with_commas(2_000_000), "2,000,000");
        assert_eq!(round_thousands(29_999), 30_000);
        assert_eq!(round_thousands(29_499), 29_000);
        assert_eq!(round_thousands(29_500), 30_000);
        assert_eq!(round_thousands(0), 0);
        assert_eq!(round_thousands(u64::MAX), u64::MAX / 1_000 * 1_000);
    }
}
