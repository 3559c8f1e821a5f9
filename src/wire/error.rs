//! The API's error answers: the error JSON, its error types, the 429 message
//! of a per-minute limit, `retry-after`, and JSON responses with a
//! `request-id`.
//!
//! Every error the Messages API returns has the body
//! `{"type":"error","error":{"type":"<error type>","message":"..."},"request_id":"req_..."}`;
//! the SDKs read `error.type` to pick their exception class.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use http::StatusCode;
//! use tower_llm_limits::wire::error::{insert_retry_after, ErrorBody, ErrorKind};
//!
//! let body = ErrorBody::new(ErrorKind::RateLimit, "Slow down.").with_request_id("req_1");
//! let mut response = body.into_response();
//! insert_retry_after(response.headers_mut(), Duration::from_millis(1_500));
//!
//! assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(response.headers()["retry-after"], "2");
//! assert_eq!(response.headers()["request-id"], "req_1");
//! assert_eq!(
//!     &response.body()[..],
//!     br#"{"type":"error","error":{"type":"rate_limit_error","message":"Slow down."},"request_id":"req_1"}"#,
//! );
//! ```

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use serde::{Serialize, Serializer};

use crate::headers::X_SHOULD_RETRY;
use crate::Dimension;

/// `request-id`: the id the API gives every answer (`req_...`).
pub const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");

/// The `error.type` of an error answer, with the status the API sends it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `invalid_request_error` (400): the request's format or content is wrong.
    InvalidRequest,
    /// `authentication_error` (401): the API key is missing or wrong.
    Authentication,
    /// `permission_error` (403): the key may not use this resource.
    Permission,
    /// `not_found_error` (404): no such resource.
    NotFound,
    /// `request_too_large` (413): the request exceeds the size limit (32 MB for Messages).
    RequestTooLarge,
    /// `rate_limit_error` (429): a rate limit was reached.
    RateLimit,
    /// `api_error` (500): an unexpected error inside the API.
    Api,
    /// `overloaded_error` (529): the API is temporarily overloaded.
    Overloaded,
}

impl ErrorKind {
    /// The `error.type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::Permission => "permission_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::RateLimit => "rate_limit_error",
            ErrorKind::Api => "api_error",
            ErrorKind::Overloaded => "overloaded_error",
        }
    }

    /// The status the API answers this error with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Authentication => StatusCode::UNAUTHORIZED,
            ErrorKind::Permission => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::RateLimit => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Api => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Overloaded => overloaded_status(),
        }
    }
}

/// 529, the status of `overloaded_error`.
fn overloaded_status() -> StatusCode {
    StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// The API's error JSON: `{"type":"error","error":{"type":..,"message":..},"request_id":..}`.
///
/// `request_id` is left out when not given, as the API's edge does for a
/// request it refuses before it reaches the API; `error.details.error_code`
/// is written only when given (the spend-limit 429 has
/// `enforced_spend_limit_reached`).
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody<'a> {
    #[serde(rename = "type")]
    tag: &'static str,
    error: ErrorObject<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

#[derive(Debug, Clone, Serialize)]
struct ErrorObject<'a> {
    #[serde(rename = "type")]
    kind: ErrorKind,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<ErrorDetails<'a>>,
}

#[derive(Debug, Clone, Serialize)]
struct ErrorDetails<'a> {
    error_code: &'a str,
}

impl<'a> ErrorBody<'a> {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: &'a str) -> Self {
        ErrorBody {
            tag: "error",
            error: ErrorObject {
                kind,
                message,
                details: None,
            },
            request_id: None,
        }
    }

    /// Sets `request_id` (the answer's `request-id` header should match).
    pub fn with_request_id(mut self, request_id: &'a str) -> Self {
        self.request_id = Some(request_id);
        self
    }

    /// Sets `error.details.error_code`.
    pub fn with_error_code(mut self, error_code: &'a str) -> Self {
        self.error.details = Some(ErrorDetails { error_code });
        self
    }

    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        self.error.kind
    }

    /// The JSON bytes.
    pub fn to_bytes(&self) -> Bytes {
        json_bytes(self)
    }

    /// The answer with the kind's usual status: see [`into_response_with`](Self::into_response_with).
    pub fn into_response(self) -> Response<Bytes> {
        let status = self.error.kind.status();
        self.into_response_with(status)
    }

    /// The answer with `status`: this body as JSON, `content-type:
    /// application/json`, and `request-id` when the body has one.
    pub fn into_response_with(self, status: StatusCode) -> Response<Bytes> {
        json_response(status, &self, self.request_id)
    }
}

/// A value serialised as JSON (empty if it cannot be: a `Serialize` that
/// fails, or a map whose keys are not strings).
fn json_bytes(body: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(body).unwrap_or_default())
}

/// A JSON answer: `body` serialised, `content-type: application/json`, and
/// `request-id` when given (a body that cannot be serialised is empty).
///
/// # Examples
///
/// ```
/// use http::StatusCode;
/// use tower_llm_limits::wire::error::json_response;
///
/// let response = json_response(StatusCode::OK, &serde_json::json!({"input_tokens": 3}), Some("req_1"));
/// assert_eq!(response.headers()["content-type"], "application/json");
/// assert_eq!(&response.body()[..], br#"{"input_tokens":3}"#);
/// ```
pub fn json_response(
    status: StatusCode,
    body: &impl Serialize,
    request_id: Option<&str>,
) -> Response<Bytes> {
    let mut response = Response::new(json_bytes(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(id) = request_id {
        insert_request_id(headers, id);
    }
    response
}

/// `request-id: id` (nothing if `id` is not a valid header value).
pub fn insert_request_id(headers: &mut HeaderMap, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        headers.insert(REQUEST_ID, v);
    }
}

/// Marks an answer as retryable after `retry_after`: `retry-after` in whole
/// seconds (see [`retry_after_secs`]) and `x-should-retry: true`.
pub fn insert_retry_after(headers: &mut HeaderMap, retry_after: Duration) {
    headers.insert(
        RETRY_AFTER,
        HeaderValue::from(retry_after_secs(retry_after)),
    );
    headers.insert(X_SHOULD_RETRY, HeaderValue::from_static("true"));
}

/// `retry-after` in whole seconds, as the API writes it: rounded up, at least 1.
///
/// ```
/// use std::time::Duration;
/// use tower_llm_limits::wire::error::retry_after_secs;
///
/// assert_eq!(retry_after_secs(Duration::from_millis(2_001)), 3);
/// assert_eq!(retry_after_secs(Duration::ZERO), 1);
/// ```
pub fn retry_after_secs(wait: Duration) -> u64 {
    let whole = wait
        .as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0));
    whole.max(1)
}

/// `1234567` -> `"1,234,567"`, as the API's messages write limits.
fn with_commas(n: u64) -> String {
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

/// The API's 429 message for a per-minute limit: "This request would exceed
/// the rate limit for your organization (`organization`) of 30,000 input
/// tokens per minute. For details, …". Without a known `limit` it says "of
/// your limit of".
///
/// ```
/// use tower_llm_limits::wire::error::rate_limit_message;
/// use tower_llm_limits::Dimension;
///
/// let m = rate_limit_message(Some("org"), Dimension::InputTokens, Some(30_000));
/// assert!(m.starts_with("This request would exceed the rate limit for your organization (org) of 30,000 input tokens per minute."));
/// ```
pub fn rate_limit_message(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_and_retry_after() {
        assert_eq!(with_commas(30_000), "30,000");
        assert_eq!(with_commas(999), "999");
        assert_eq!(with_commas(1_234_567), "1,234,567");
        assert_eq!(with_commas(u64::MAX), "18,446,744,073,709,551,615");
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2_001)), 3);
        assert_eq!(retry_after_secs(Duration::from_secs(20)), 20);
        assert_eq!(retry_after_secs(Duration::MAX), u64::MAX);
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
}
