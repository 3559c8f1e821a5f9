//! Building the API's answers: error JSON, the message JSON, SSE events, ids, headers.

use std::time::SystemTime;

use bytes::Bytes;
use http::{Response, StatusCode};
use serde::Serialize;

use super::body::EmulatorBody;
use super::cache::CacheOutcome;
use super::rng::Rng;
use tower_llm_limits::headers::format_rfc3339;
use tower_llm_limits::wire::error::{self, ErrorBody, ErrorKind};
pub(crate) use tower_llm_limits::wire::error::{insert_request_id, insert_retry_after};
pub(crate) use tower_llm_limits::wire::ratelimit::insert_rate_limit_headers;
pub(crate) use tower_llm_limits::wire::sse::insert_stream_headers as sse_headers;
use tower_llm_limits::wire::sse::json_event;
use tower_llm_limits::wire::{CacheCreation, Usage, UsageDelta};
use tower_llm_limits::Dimension;

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

/// A JSON answer with `request-id` (when given) and `content-type: application/json`.
pub(crate) fn json_response(
    status: StatusCode,
    body: &impl Serialize,
    request_id: Option<&str>,
) -> Response<EmulatorBody> {
    error::json_response(status, body, request_id).map(EmulatorBody::full)
}

/// An error answer in the API's shape.
pub(crate) fn error_response(
    status: StatusCode,
    kind: ErrorKind,
    message: &str,
    request_id: Option<&str>,
) -> Response<EmulatorBody> {
    let body = ErrorBody::new(kind, message);
    let body = match request_id {
        Some(id) => body.with_request_id(id),
        None => body,
    };
    body.into_response_with(status).map(EmulatorBody::full)
}

/// The 429 message of a per-minute limit, with the API's closing sentence
/// and "emulator" as the organization.
pub(crate) fn rate_limit_message(dimension: Dimension, limit: Option<u64>) -> String {
    let mut message = error::rate_limit_message(Some("emulator"), dimension, limit);
    message.push_str(
        " You may also contact sales at https://www.anthropic.com/contact-sales \
         to discuss your options for a rate limit increase.",
    );
    message
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

/// What a message's `usage` reports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UsageReport {
    pub(crate) cache: CacheOutcome,
    pub(crate) output_tokens: u64,
}

/// The full `usage` object: the counters and the API's `service_tier`.
#[derive(Debug, Serialize)]
struct FullUsage {
    #[serde(flatten)]
    usage: Usage,
    service_tier: &'static str,
}

impl UsageReport {
    /// The full `usage` object (non-streaming answers and `message_start`).
    fn full(&self) -> FullUsage {
        FullUsage {
            usage: Usage {
                input_tokens: self.cache.uncached,
                output_tokens: self.output_tokens,
                cache_creation_input_tokens: self.cache.written(),
                cache_read_input_tokens: self.cache.read,
                cache_creation: Some(CacheCreation {
                    ephemeral_5m_input_tokens: self.cache.write_5m,
                    ephemeral_1h_input_tokens: self.cache.write_1h,
                }),
            },
            service_tier: "standard",
        }
    }

    /// The cumulative `usage` of `message_delta`: every count restated.
    fn delta(&self) -> UsageDelta {
        UsageDelta::from(self.full().usage)
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

/// One SSE event: `event: <name>\ndata: <json>\n\n` (the emulator's own
/// event types always serialise; were one not to, nothing would be sent).
fn sse_event(name: &str, data: &impl Serialize) -> Bytes {
    json_event(name, data).unwrap_or_default()
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
    usage: UsageDelta,
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

/// The mid-stream error event: an `overloaded_error`, which the API can send
/// after a 200 has begun.
pub(crate) fn sse_error() -> Bytes {
    sse_event(
        "error",
        &ErrorBody::new(ErrorKind::Overloaded, "Overloaded"),
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
    use crate::tokens::count_text;
    use std::time::{Duration, UNIX_EPOCH};

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
    fn spend_limit_resumes_on_the_first_of_next_month() {
        let msg = spend_limit_message(UNIX_EPOCH + Duration::from_secs(1_796_083_200)); // 2026-12-01
        assert!(msg.ends_with("2027-01-01 at 00:00 UTC."), "{msg}");
    }
}
