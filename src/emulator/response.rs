//! Building the API's answers: error JSON, the message JSON, SSE events, ids, headers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use serde::Serialize;

use super::body::EmulatorBody;
use super::cache::CacheOutcome;
use super::rng::Rng;
use crate::budget::ledger::BucketState;
use crate::headers::{format_rfc3339, insert_limit_headers, X_SHOULD_RETRY};
use crate::Dimension;

const ID_ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// An id like the API's (`req_011CSHoEeqs5C35K2UUqR7Fy`): a prefix and 24 base-62 characters.
pub(crate) fn random_id(prefix: &str, rng: &mut Rng) -> String {
    let mut id = String::with_capacity(prefix.len() + 24);
    id.push_str(prefix);
    id.push_str("011C");
    for _ in 0..20 {
        let i = usize::try_from(rng.below(ID_ALPHABET.len() as u64)).unwrap_or(0);
        id.push(char::from(*ID_ALPHABET.get(i).unwrap_or(&b'0')));
    }
    id
}

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

/// A JSON answer with `request-id` (when given) and `content-type: application/json`.
pub(crate) fn json_response(
    status: StatusCode,
    body: &impl Serialize,
    request_id: Option<&str>,
) -> Response<EmulatorBody> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(EmulatorBody::full(Bytes::from(bytes)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(id) = request_id {
        insert_request_id(headers, id);
    }
    response
}

/// An error answer in the API's shape.
pub(crate) fn error_response(
    status: StatusCode,
    kind: &str,
    message: &str,
    request_id: Option<&str>,
) -> Response<EmulatorBody> {
    json_response(
        status,
        &error_json(kind, message, request_id, None),
        request_id,
    )
}

pub(crate) fn insert_request_id(headers: &mut HeaderMap, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        headers.insert("request-id", v);
    }
}

/// The headers of a streamed answer.
pub(crate) fn sse_headers(headers: &mut HeaderMap) {
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

/// Marks a 429 as retryable after `retry_after` (integer seconds, rounded up, at least 1).
pub(crate) fn insert_retry_after(headers: &mut HeaderMap, retry_after: Duration) {
    headers.insert(
        RETRY_AFTER,
        HeaderValue::from(retry_after_secs(retry_after)),
    );
    headers.insert(X_SHOULD_RETRY, HeaderValue::from_static("true"));
}

/// `retry-after` in whole seconds: rounded up, at least 1.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    let whole = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
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

/// The 429 message of a per-minute limit (facts file 4.2).
pub(crate) fn rate_limit_message(dimension: Dimension, limit: Option<u64>) -> String {
    let what = match dimension {
        Dimension::Requests => "requests per minute",
        Dimension::InputTokens => "input tokens per minute",
        Dimension::OutputTokens => "output tokens per minute",
    };
    let limit = limit.map_or_else(|| "your limit".to_string(), with_commas);
    format!(
        "This request would exceed the rate limit for your organization (emulator) of {limit} {what}. \
         For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response \
         headers for current usage. Please reduce the prompt length or the maximum tokens requested, \
         or try again later. You may also contact sales at https://www.anthropic.com/contact-sales \
         to discuss your options for a rate limit increase."
    )
}

/// The 429 message of the acceleration limit.
pub(crate) const ACCELERATION_MESSAGE: &str = "This request was rate limited because your organization's usage \
     increased sharply (acceleration limit). To avoid hitting acceleration limits, ramp up your traffic \
     gradually and maintain consistent usage patterns.";

/// The spend-cap 429 body's message: access resumes on the first of next month.
pub(crate) fn spend_limit_message(now: SystemTime) -> String {
    let stamp = format_rfc3339(now);
    let year: u32 = stamp.get(0..4).and_then(|s| s.parse().ok()).unwrap_or(1970);
    let month: u32 = stamp.get(5..7).and_then(|s| s.parse().ok()).unwrap_or(1);
    let (year, month) = if month >= 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    format!(
        "You have reached your API usage limits: your organization's monthly spend limit. \
         You will regain access on {year:04}-{month:02}-01 at 00:00 UTC."
    )
}

/// Rounds a time up to the next whole second (a reset is never announced early).
fn ceil_second(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d.subsec_nanos() > 0 => UNIX_EPOCH + Duration::from_secs(d.as_secs() + 1),
        _ => t,
    }
}

/// Time until a bucket is full again.
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

/// Writes every `anthropic-ratelimit-*` header for the buckets `[requests, input, output]`.
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

/// What a message's `usage` reports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UsageReport {
    pub(crate) cache: CacheOutcome,
    pub(crate) output_tokens: u64,
}

#[derive(Debug, Serialize)]
struct FullUsage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    cache_creation: CacheCreation,
    output_tokens: u64,
    service_tier: &'static str,
}

#[derive(Debug, Serialize)]
struct CacheCreation {
    ephemeral_5m_input_tokens: u64,
    ephemeral_1h_input_tokens: u64,
}

#[derive(Debug, Serialize)]
struct DeltaUsage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    output_tokens: u64,
}

impl UsageReport {
    /// The full `usage` object (non-streaming answers and `message_start`).
    fn full(&self) -> FullUsage {
        FullUsage {
            input_tokens: self.cache.uncached,
            cache_creation_input_tokens: self.cache.written(),
            cache_read_input_tokens: self.cache.read,
            cache_creation: CacheCreation {
                ephemeral_5m_input_tokens: self.cache.write_5m,
                ephemeral_1h_input_tokens: self.cache.write_1h,
            },
            output_tokens: self.output_tokens,
            service_tier: "standard",
        }
    }

    /// The cumulative `usage` of `message_delta`.
    fn delta(&self) -> DeltaUsage {
        DeltaUsage {
            input_tokens: self.cache.uncached,
            cache_creation_input_tokens: self.cache.written(),
            cache_read_input_tokens: self.cache.read,
            output_tokens: self.output_tokens,
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Message<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<TextBlock<'a>>,
    stop_reason: Option<&'a str>,
    stop_sequence: Option<&'a str>,
    usage: FullUsage,
}

#[derive(Debug, Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

/// The message object of a non-streaming answer.
pub(crate) fn message_json<'a>(
    id: &'a str,
    model: &'a str,
    text: &'a str,
    stop_reason: &'a str,
    usage: &UsageReport,
) -> Message<'a> {
    Message {
        id,
        kind: "message",
        role: "assistant",
        model,
        content: vec![TextBlock { kind: "text", text }],
        stop_reason: Some(stop_reason),
        stop_sequence: None,
        usage: usage.full(),
    }
}

/// One SSE event: `event: <name>\ndata: <json>\n\n`.
pub(crate) fn sse_event(name: &str, data: &impl Serialize) -> Bytes {
    let data = serde_json::to_string(data).unwrap_or_default();
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

#[derive(Debug, Serialize)]
struct MessageStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: Message<'a>,
}

#[derive(Debug, Serialize)]
struct ContentBlockStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
    content_block: TextBlock<'a>,
}

#[derive(Debug, Serialize)]
struct TypeOnly {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Debug, Serialize)]
struct ContentBlockDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
    delta: TextBlock<'a>,
}

#[derive(Debug, Serialize)]
struct ContentBlockStop {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
}

#[derive(Debug, Serialize)]
struct MessageDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    delta: StopDelta<'a>,
    usage: DeltaUsage,
}

#[derive(Debug, Serialize)]
struct StopDelta<'a> {
    stop_reason: &'a str,
    stop_sequence: Option<&'a str>,
}

/// The opening events of a stream: `message_start`, `content_block_start`, `ping`.
pub(crate) fn sse_opening(id: &str, model: &str, usage: &UsageReport) -> Bytes {
    let start = MessageStart {
        kind: "message_start",
        message: Message {
            id,
            kind: "message",
            role: "assistant",
            model,
            content: Vec::new(),
            stop_reason: None,
            stop_sequence: None,
            usage: usage.full(),
        },
    };
    let block = ContentBlockStart {
        kind: "content_block_start",
        index: 0,
        content_block: TextBlock {
            kind: "text",
            text: "",
        },
    };
    let mut out = Vec::new();
    out.extend_from_slice(&sse_event("message_start", &start));
    out.extend_from_slice(&sse_event("content_block_start", &block));
    out.extend_from_slice(&sse_event("ping", &TypeOnly { kind: "ping" }));
    Bytes::from(out)
}

/// One `content_block_delta` with a `text_delta`.
pub(crate) fn sse_text_delta(text: &str) -> Bytes {
    sse_event(
        "content_block_delta",
        &ContentBlockDelta {
            kind: "content_block_delta",
            index: 0,
            delta: TextBlock {
                kind: "text_delta",
                text,
            },
        },
    )
}

/// The closing events: `content_block_stop`, `message_delta` (cumulative usage), `message_stop`.
pub(crate) fn sse_closing(stop_reason: &str, usage: &UsageReport) -> Bytes {
    let mut out = Vec::new();
    out.extend_from_slice(&sse_event(
        "content_block_stop",
        &ContentBlockStop {
            kind: "content_block_stop",
            index: 0,
        },
    ));
    out.extend_from_slice(&sse_event(
        "message_delta",
        &MessageDelta {
            kind: "message_delta",
            delta: StopDelta {
                stop_reason,
                stop_sequence: None,
            },
            usage: usage.delta(),
        },
    ));
    out.extend_from_slice(&sse_event(
        "message_stop",
        &TypeOnly {
            kind: "message_stop",
        },
    ));
    Bytes::from(out)
}

/// The mid-stream error event (facts file 6).
pub(crate) fn sse_error() -> Bytes {
    sse_event(
        "error",
        &error_json("overloaded_error", "Overloaded", None, None),
    )
}

/// Words of at most four letters: each is exactly one token under the counter's rule.
const WORDS: [&str; 32] = [
    "the", "rate", "lim", "bug", "tok", "lane", "wait", "send", "byte", "flow", "gate", "pace",
    "bur", "cap", "fill", "drip", "load", "mind", "key", "slot", "time", "tick", "hold", "yes",
    "ok", "run", "ask", "do", "go", "new", "old", "far",
];

/// Generates the answer: `n` one-token words, in chunks of `per_delta` words.
/// Each chunk but the first starts with a space, so the chunks concatenate to
/// the whole text.
pub(crate) fn generate_text(rng: &mut Rng, n: u64, per_delta: u64) -> Vec<String> {
    let per_delta = per_delta.max(1);
    let mut chunks = Vec::new();
    let mut current = String::new();
    let mut in_chunk = 0;
    for i in 0..n {
        let w = WORDS
            .get(usize::try_from(rng.below(WORDS.len() as u64)).unwrap_or(0))
            .copied()
            .unwrap_or("ok");
        if i > 0 {
            current.push(' ');
        }
        current.push_str(w);
        in_chunk += 1;
        if in_chunk == per_delta {
            chunks.push(std::mem::take(&mut current));
            in_chunk = 0;
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::tokens::count_text;

    #[test]
    fn generated_text_counts_as_asked() {
        let mut rng = Rng::new(5);
        for n in [1u64, 2, 7, 8, 9, 100, 1001] {
            let chunks = generate_text(&mut rng, n, 8);
            assert_eq!(chunks.len() as u64, n.div_ceil(8));
            let text: String = chunks.concat();
            assert_eq!(count_text(&text), n, "{text}");
            assert!(!text.starts_with(' ') && !text.ends_with(' '));
        }
    }

    #[test]
    fn ids_look_like_the_api() {
        let mut rng = Rng::new(1);
        let id = random_id("req_", &mut rng);
        assert_eq!(id.len(), 28);
        assert!(id.starts_with("req_011C"));
        assert!(id[4..].chars().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn small_helpers() {
        assert_eq!(with_commas(30_000), "30,000");
        assert_eq!(with_commas(999), "999");
        assert_eq!(with_commas(1_234_567), "1,234,567");
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2_001)), 3);
        assert_eq!(retry_after_secs(Duration::from_secs(20)), 20);
        assert_eq!(round_thousands(29_499.9), 29_000);
        assert_eq!(round_thousands(29_500.0), 30_000);
        assert_eq!(round_thousands(-5.0), 0);
        let msg = spend_limit_message(UNIX_EPOCH + Duration::from_secs(1_796_083_200)); // 2026-12-01
        assert!(msg.ends_with("2027-01-01 at 00:00 UTC."), "{msg}");
    }
}
