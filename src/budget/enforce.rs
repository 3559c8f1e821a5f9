//! Enforce (server) mode's answers: Anthropic-shaped 429s and the
//! `anthropic-ratelimit-*` headers on every response.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue, Response};

use super::answer::insert_rate_limit_headers;
use super::state::{dim_index, Charge, Denied, Shared};
use super::usage::ResponseBody;
use crate::headers::{is_rate_limit_header, X_SHOULD_RETRY};
use crate::wire::error::{insert_retry_after, rate_limit_message, ErrorBody, ErrorKind};

/// Writes the `anthropic-ratelimit-*` headers of a key's buckets: requests,
/// input tokens, output tokens, and the combined `tokens` (input + output, as
/// the API reports it when no workspace limit is lower).
///
/// The upstream's own rate-limit headers (`anthropic-ratelimit-*`,
/// `x-ratelimit-*`: the organization's limits) are removed first, so a caller
/// never sees them, not even for a dimension its budget does not limit.
pub(crate) fn insert_headers(shared: &Shared, charge: &Charge, headers: &mut HeaderMap) {
    let upstream: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_rate_limit_header(name))
        .cloned()
        .collect();
    for name in upstream {
        headers.remove(name);
    }
    if let Some(states) = shared.state_now(charge.key(), &charge.limits) {
        insert_rate_limit_headers(headers, &states, SystemTime::now());
    }
}

/// A process-unique `req_…` identifier for the budget's own answers.
pub(crate) fn request_id() -> String {
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

/// The 400 answer to a request the budget refuses to read further (a
/// `model` name longer than any model's): `invalid_request_error`, with a
/// `request-id`. Nothing was charged, so no rate-limit headers.
pub(crate) fn invalid_request<B>(message: &str) -> Response<ResponseBody<B>> {
    ErrorBody::new(ErrorKind::InvalidRequest, message)
        .with_request_id(&request_id())
        .into_response()
        .map(ResponseBody::full)
}

/// The 429 answer to a request the caller's budget cannot admit.
///
/// Body: `{"type":"error","error":{"type":"rate_limit_error","message":…},"request_id":"req_…"}`
/// with the same id in a `request-id` header.
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
                .state_now(charge.key(), &charge.limits)
                .and_then(|s| s.get(dim_index(dimension)).and_then(|b| b.limit))
                .or(charge.limits.get(dimension));
            (dimension, limit, Some(retry_in))
        }
        Denied::TooLarge {
            dimension, limit, ..
        } => (dimension, Some(limit), None),
    };
    let message = rate_limit_message(None, dimension, limit);
    let id = request_id();
    let mut response = ErrorBody::new(ErrorKind::RateLimit, &message)
        .with_request_id(&id)
        .into_response()
        .map(ResponseBody::full);
    let headers = response.headers_mut();
    match retry_in {
        Some(retry_in) => insert_retry_after(headers, retry_in),
        None => {
            headers.insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
        }
    }
    insert_headers(shared, charge, headers);
    response
}
