//! What is retried, and after how long.
//!
//! Pure functions, so every rule is tested on its own; the response future
//! applies them in this order:
//!
//! 1. A response below 400 is returned. For 400 and above, `x-should-retry:
//!    true`/`false` decides when present; otherwise 408, 409, 429 and 500–599
//!    are retried and every other status is returned as is.
//! 2. A 429 without `retry-after-ms`/`retry-after` has its error body read
//!    (at most [`ERROR_BODY_LIMIT`]): the spend-cap 429 fails at once with
//!    [`Error::SpendLimitReached`](crate::Error::SpendLimitReached).
//! 3. The delay is the first of: `retry-after-ms`, `retry-after`, the reset of
//!    an exhausted `anthropic-ratelimit-*` limit, full-jitter backoff.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

use crate::classify::{Class, Classifier};
use crate::headers::RateLimitSnapshot;
use crate::{BoxError, Error};

/// Largest error body read to look for the spend-cap code.
pub(crate) const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Whether a status is retried when the server gives no `x-should-retry`.
pub(crate) fn is_retryable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 409 | 429 | 500..=599)
}

/// Whether a status names a limit that every request shares (it sets the cooldown).
pub(crate) fn sets_cooldown(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 529)
}

/// The retry-relevant reading of a response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ResponseVerdict {
    /// Whether the status asks for a retry (after `x-should-retry`).
    pub(crate) retry: bool,
    /// The delay the server names: `retry-after-ms`, `retry-after`, or the
    /// reset of an exhausted limit.
    pub(crate) server_delay: Option<Duration>,
    /// Whether the error body must be read for the spend-cap code.
    pub(crate) check_spend_cap: bool,
}

/// Reads the status and headers of a response, the headers' instants
/// against `now`. `None` for a response below 400, which is returned without
/// looking at its headers.
pub(crate) fn judge_response(
    status: StatusCode,
    headers: &HeaderMap,
    now: impl FnOnce() -> SystemTime,
) -> Option<ResponseVerdict> {
    if status.as_u16() < 400 {
        return None;
    }
    // The clock is read only for an error answer: a success costs no read.
    let snapshot = RateLimitSnapshot::from_headers_at(headers, now());
    let retry = snapshot
        .should_retry
        .unwrap_or_else(|| is_retryable_status(status));
    let check_spend_cap = status == StatusCode::TOO_MANY_REQUESTS && snapshot.retry_after.is_none();
    Some(ResponseVerdict {
        retry,
        server_delay: snapshot.retry_after.or_else(|| snapshot.exhausted_reset()),
        check_spend_cap,
    })
}

/// Whether an error body is the monthly spend-cap 429
/// (`error.details.error_code == "enforced_spend_limit_reached"`).
pub(crate) fn is_spend_limit_body(body: &[u8]) -> bool {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    value
        .pointer("/error/details/error_code")
        .and_then(serde_json::Value::as_str)
        == Some("enforced_spend_limit_reached")
}

/// What to do with an inner error (no response).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorVerdict {
    /// Not transient: returned as is.
    Fatal,
    /// Retried after full-jitter backoff.
    Backoff,
    /// Retried after this delay (a budget's `retry_in`).
    After(Duration),
}

/// Whether an attempt that failed with `err` (no response) may have reached
/// the server, so that sending it again may make the server do the work twice.
///
/// The attempt was *sent*: the inner service's `call` was made and its
/// future polled, and it failed without a response head. Only an error that
/// shows the request could not have left counts as unsent: a local refusal
/// by this crate's inner layers ([`Error::BudgetExceeded`],
/// [`Error::Overloaded`]), or a connection that was never established
/// ([`classify::never_connected`](crate::classify::never_connected)). A
/// reset, a broken pipe, a timeout, or an error of unknown type may have
/// come after the request's bytes were written: sent.
pub(crate) fn may_have_been_sent(err: &BoxError) -> bool {
    match err.downcast_ref::<Error>() {
        Some(Error::BudgetExceeded { .. } | Error::Overloaded { .. }) => false,
        _ => !crate::classify::never_connected(&**err),
    }
}

/// Classifies an inner error.
///
/// This crate's own errors from inner layers: `BudgetExceeded` is retried
/// after its `retry_in`; the others
/// (`Overloaded`, `RequestTooLarge`, `SpendLimitReached`, `NotReplayable`,
/// `Body`, and the verdicts of a nested retry layer) are not. `Overloaded`
/// is local back-pressure (the concurrency queue is full), not a failure of
/// the server: retrying it would only add to the queue and spend the retry
/// budget that server failures need.
///
/// Foreign errors happen before any response. The classifier decides by type
/// (its hook first): only [`Class::Permanent`] is returned as is. Timeouts,
/// connection errors and errors of unknown type are retried after backoff, as
/// Anthropic's SDKs retry every connection-level failure.
pub(crate) fn judge_error(err: &BoxError, classifier: &Classifier) -> ErrorVerdict {
    match err.downcast_ref::<Error>() {
        None => match classifier.classify(&**err) {
            Class::Permanent => ErrorVerdict::Fatal,
            Class::Timeout | Class::Connection | Class::Unknown => ErrorVerdict::Backoff,
        },
        Some(Error::BudgetExceeded { retry_in, .. }) => ErrorVerdict::After(*retry_in),
        Some(_) => ErrorVerdict::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dimension, GiveUpReason};
    use http::HeaderValue;

    fn judge_response(status: StatusCode, headers: &HeaderMap) -> Option<ResponseVerdict> {
        super::judge_response(status, headers, SystemTime::now)
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn retryable_statuses() {
        for s in [408, 409, 429, 500, 502, 503, 504, 529, 599] {
            assert!(is_retryable_status(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [200, 301, 400, 401, 402, 403, 404, 413, 422, 499] {
            assert!(
                !is_retryable_status(StatusCode::from_u16(s).unwrap()),
                "{s}"
            );
        }
    }

    #[test]
    fn should_retry_header_overrides_the_status() {
        let v = judge_response(
            StatusCode::BAD_REQUEST,
            &headers(&[("x-should-retry", "true")]),
        );
        assert!(v.is_some_and(|v| v.retry));
        let v = judge_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &headers(&[("x-should-retry", "false")]),
        );
        assert!(v.is_some_and(|v| !v.retry));
        assert_eq!(
            judge_response(StatusCode::OK, &headers(&[("x-should-retry", "true")])),
            None
        );
    }

    #[test]
    fn delay_order() {
        let both = headers(&[("retry-after-ms", "1500"), ("retry-after", "7")]);
        let v = judge_response(StatusCode::TOO_MANY_REQUESTS, &both);
        assert_eq!(
            v.and_then(|v| v.server_delay),
            Some(Duration::from_millis(1500))
        );
        let secs = headers(&[("retry-after", "7")]);
        let v = judge_response(StatusCode::TOO_MANY_REQUESTS, &secs);
        assert_eq!(v.and_then(|v| v.server_delay), Some(Duration::from_secs(7)));
        assert!(v.is_some_and(|v| !v.check_spend_cap));
        let none = judge_response(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new());
        assert!(none.is_some_and(|v| v.check_spend_cap && v.server_delay.is_none()));
    }

    #[test]
    fn an_exhausted_reset_is_read_against_the_given_now() {
        let h = headers(&[
            ("anthropic-ratelimit-input-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2026-11-28T07:15:04Z",
            ),
        ]);
        let now = crate::headers::parse_rfc3339("2026-11-28T07:15:00.250Z");
        let v = now
            .and_then(|now| super::judge_response(StatusCode::from_u16(529).unwrap(), &h, || now));
        assert_eq!(
            v.and_then(|v| v.server_delay),
            Some(Duration::from_millis(3_750))
        );
    }

    #[test]
    fn spend_cap_body() {
        let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your API usage limits","details":{"error_code":"enforced_spend_limit_reached"}},"request_id":"req_1"}"#;
        assert!(is_spend_limit_body(body));
        let itpm = br#"{"type":"error","error":{"type":"rate_limit_error","message":"enforced_spend_limit_reached"}}"#;
        assert!(!is_spend_limit_body(itpm));
        assert!(!is_spend_limit_body(b"not json"));
        assert!(!is_spend_limit_body(b""));
    }

    fn judge_error_default(err: &BoxError) -> ErrorVerdict {
        judge_error(err, &Classifier::new())
    }

    #[test]
    fn foreign_errors_are_retried_unless_the_hook_says_permanent() {
        let plain = Classifier::new();
        let timeout: BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut));
        let refused: BoxError =
            Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let unknown: BoxError = "something else".into();
        for err in [&timeout, &refused, &unknown] {
            assert_eq!(judge_error(err, &plain), ErrorVerdict::Backoff, "{err}");
        }
        let hook = Classifier::with_hook(|e| {
            (e.to_string() == "something else").then_some(Class::Permanent)
        });
        assert_eq!(judge_error(&unknown, &hook), ErrorVerdict::Fatal);
        assert_eq!(judge_error(&refused, &hook), ErrorVerdict::Backoff);
        // The crate's own verdicts come before the hook.
        let never = Classifier::with_hook(|_| Some(Class::Permanent));
        let exceeded: BoxError = Box::new(Error::BudgetExceeded {
            retry_in: Duration::from_secs(1),
            dimension: crate::Dimension::Requests,
        });
        assert_eq!(
            judge_error(&exceeded, &never),
            ErrorVerdict::After(Duration::from_secs(1))
        );
    }

    #[test]
    fn error_classes() {
        let e = |err: Error| -> BoxError { Box::new(err) };
        assert_eq!(
            judge_error_default(&"connection reset".into()),
            ErrorVerdict::Backoff
        );
        assert_eq!(
            judge_error_default(&e(Error::BudgetExceeded {
                retry_in: Duration::from_secs(3),
                dimension: Dimension::InputTokens
            })),
            ErrorVerdict::After(Duration::from_secs(3))
        );
        for fatal in [
            Error::Overloaded { waiting: 1 },
            Error::SpendLimitReached,
            Error::RequestTooLarge {
                dimension: Dimension::InputTokens,
                cost: 10,
                limit: 5,
            },
            Error::NotReplayable {
                status: None,
                source: None,
            },
            Error::RetriesExhausted {
                attempts: 2,
                waited: Duration::ZERO,
                last_status: None,
                reason: GiveUpReason::MaxRetries,
                source: None,
                response: None,
            },
        ] {
            assert_eq!(judge_error_default(&e(fatal)), ErrorVerdict::Fatal);
        }
    }
}
