//! The wire module through its public API: the usage readers (event stream
//! and JSON) at every chunking, the SSE decoder against its encoder, the JSON
//! scanner on arbitrary bytes, and the error bodies.

use proptest::prelude::*;
use tower_llm_limits::wire::error::{ErrorBody, ErrorKind};
use tower_llm_limits::wire::json::{Scanner, UsageScanner};
use tower_llm_limits::wire::sse::{json_event, SseDecoder, SseEvent};
use tower_llm_limits::wire::{usage_of, CacheCreation, StreamEnd, StreamUsage, Usage, UsageDelta};

const STREAM: &str = "event: message_start\r\n\
data: {\"type\": \"message_start\", \"message\": {\"id\": \"msg_1\", \"type\": \"message\", \"role\": \"assistant\", \"content\": [], \"model\": \"claude-sonnet-4-5\", \"stop_reason\": null, \"stop_sequence\": null, \"usage\": {\"input_tokens\": 25, \"cache_creation_input_tokens\": 7, \"cache_read_input_tokens\": 100, \"output_tokens\": 1}}}\r\n\
\r\n\
event: content_block_start\n\
data: {\"type\": \"content_block_start\", \"index\": 0, \"content_block\": {\"type\": \"text\", \"text\": \"\"}}\n\
\n\
event: ping\n\
data: {\"type\": \"ping\"}\n\
\n\
event: content_block_delta\n\
data: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"usage: {\\\"output_tokens\\\": 999}\"}}\n\
\n\
event: content_block_stop\r\
data: {\"type\": \"content_block_stop\", \"index\": 0}\r\
\r\
event: message_delta\n\
data: {\"type\": \"message_delta\", \"delta\": {\"stop_reason\": \"end_turn\", \"stop_sequence\":null}, \"usage\": {\"output_tokens\": 15}}\n\
\n\
event: message_stop\n\
data: {\"type\": \"message_stop\"}\n\
\n";

fn stream_usage() -> Usage {
    Usage {
        input_tokens: 25,
        output_tokens: 15,
        cache_creation_input_tokens: 7,
        cache_read_input_tokens: 100,
        cache_creation: None,
    }
}

const BODY: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5",
 "content":[{"type":"text","text":"the \"usage\": {\"input_tokens\": 9} of it"},
  {"type":"tool_use","id":"t","name":"n","input":{"usage":{"input_tokens":77}}}],
 "stop_reason":"end_turn","stop_sequence":null,
 "usage" : {"input_tokens":12,"cache_creation_input_tokens":3,"cache_read_input_tokens":4,
  "cache_creation":{"ephemeral_5m_input_tokens":3,"ephemeral_1h_input_tokens":0},
  "output_tokens":34,"service_tier":"standard","server_tool_use":null}}"#;

fn body_usage() -> Usage {
    Usage {
        input_tokens: 12,
        output_tokens: 34,
        cache_creation_input_tokens: 3,
        cache_read_input_tokens: 4,
        cache_creation: Some(CacheCreation {
            ephemeral_5m_input_tokens: 3,
            ephemeral_1h_input_tokens: 0,
        }),
    }
}

fn read_stream(chunks: impl IntoIterator<Item = Vec<u8>>) -> StreamUsage {
    let mut s = StreamUsage::new();
    for c in chunks {
        s.push(&c);
    }
    s
}

fn read_json(chunks: impl IntoIterator<Item = Vec<u8>>) -> Option<Usage> {
    let mut s = UsageScanner::new();
    for c in chunks {
        s.push(&c);
    }
    s.usage()
}

/// `bytes` cut at the given sizes (cycled), every byte exactly once.
fn chunked(bytes: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    for n in sizes.iter().cycle() {
        if i >= bytes.len() {
            break;
        }
        let end = (i + n.max(&1)).min(bytes.len());
        out.push(bytes[i..end].to_vec());
        i = end;
    }
    out
}

#[test]
fn stream_usage_whole_split_anywhere_and_byte_by_byte() {
    let bytes = STREAM.as_bytes();
    let s = read_stream([bytes.to_vec()]);
    assert_eq!(s.usage(), stream_usage());
    assert!(s.started());
    assert_eq!(s.end(), Some(StreamEnd::Stopped));
    for i in 0..=bytes.len() {
        let (a, b) = bytes.split_at(i);
        let s = read_stream([a.to_vec(), b.to_vec()]);
        assert_eq!(s.usage(), stream_usage(), "split at {i}");
        assert_eq!(s.end(), Some(StreamEnd::Stopped), "split at {i}");
    }
    let s = read_stream(bytes.iter().map(|b| vec![*b]));
    assert_eq!(s.usage(), stream_usage());
    assert_eq!(s.end(), Some(StreamEnd::Stopped));
}

#[test]
fn stream_error_event_keeps_what_was_said() {
    let stream = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":40,\"output_tokens\":1}}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":9}}\n\n\
event: error\n\
data: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n";
    let s = read_stream([stream.as_bytes().to_vec()]);
    assert_eq!(s.end(), Some(StreamEnd::Errored));
    assert_eq!((s.usage().input_tokens, s.usage().output_tokens), (40, 9));
}

#[test]
fn stream_unnamed_events_and_final_event_without_blank_line() {
    let stream = "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n\
: a comment\n\
data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":4,\"input_tokens\":5}}";
    let mut s = read_stream([stream.as_bytes().to_vec()]);
    assert_eq!(s.usage().output_tokens, 1);
    s.finish();
    assert_eq!((s.usage().output_tokens, s.usage().input_tokens), (4, 5));
    assert_eq!(s.end(), None);
}

#[test]
fn stream_long_lines_are_skipped() {
    let long = "x".repeat(tower_llm_limits::wire::MAX_USAGE_EVENT * 3);
    let stream = format!(
        "event: content_block_delta\ndata: {{\"text\":\"{long}\"}}\n\n\
data: {{\"type\":\"message_delta\",\"usage\":{{\"output_tokens\":\"{long}\"}}}}\n\n\
event: message_delta\ndata: {{\"type\":\"message_delta\",\"usage\":{{\"output_tokens\":8}}}}\n\n"
    );
    let s = read_stream(chunked(stream.as_bytes(), &[1000]));
    assert_eq!(s.usage().output_tokens, 8);
}

#[test]
fn json_usage_at_every_split_point() {
    let bytes = BODY.as_bytes();
    for i in 0..=bytes.len() {
        let (a, b) = bytes.split_at(i);
        assert_eq!(
            read_json([a.to_vec(), b.to_vec()]),
            Some(body_usage()),
            "split at {i}"
        );
    }
    assert_eq!(usage_of(BODY.as_bytes()), Some(body_usage()));
    assert_eq!(usage_of(STREAM.as_bytes()), Some(stream_usage()));
}

#[test]
fn json_without_usage_or_not_json() {
    for body in [
        r#"{"type":"error","error":{"type":"overloaded_error","message":"usage"}}"#,
        "not json at all \"usage\": {\"input_tokens\": 1}",
        r#"{"usage": 5}"#,
        "",
    ] {
        assert_eq!(read_json([body.as_bytes().to_vec()]), None, "{body}");
        assert_eq!(usage_of(body.as_bytes()), None, "{body}");
    }
}

#[test]
fn usage_round_trips_and_applies_deltas() {
    let json = serde_json::to_string(&body_usage()).unwrap_or_default();
    assert_eq!(
        json,
        r#"{"input_tokens":12,"cache_creation_input_tokens":3,"cache_read_input_tokens":4,"cache_creation":{"ephemeral_5m_input_tokens":3,"ephemeral_1h_input_tokens":0},"output_tokens":34}"#
    );
    assert_eq!(
        serde_json::from_str::<Usage>(&json).ok(),
        Some(body_usage())
    );
    assert_eq!(
        serde_json::from_str::<Usage>("{}").ok(),
        Some(Usage::default())
    );

    let mut u = body_usage();
    u.apply(&UsageDelta {
        output_tokens: Some(50),
        ..UsageDelta::default()
    });
    assert_eq!((u.input_tokens, u.output_tokens), (12, 50));
    assert_eq!(u.charged_input_tokens(false), 15);
    assert_eq!(u.charged_input_tokens(true), 19);
    let delta = serde_json::to_string(&UsageDelta {
        output_tokens: Some(1),
        ..UsageDelta::default()
    })
    .unwrap_or_default();
    assert_eq!(delta, r#"{"output_tokens":1}"#);
}

#[test]
fn error_bodies_have_the_api_shape() {
    let kinds = [
        (ErrorKind::InvalidRequest, "invalid_request_error", 400),
        (ErrorKind::Authentication, "authentication_error", 401),
        (ErrorKind::Permission, "permission_error", 403),
        (ErrorKind::NotFound, "not_found_error", 404),
        (ErrorKind::RequestTooLarge, "request_too_large", 413),
        (ErrorKind::RateLimit, "rate_limit_error", 429),
        (ErrorKind::Api, "api_error", 500),
        (ErrorKind::Overloaded, "overloaded_error", 529),
    ];
    for (kind, name, status) in kinds {
        let response = ErrorBody::new(kind, "m").into_response();
        assert_eq!(response.status().as_u16(), status);
        assert!(response.headers().get("request-id").is_none());
        let v: serde_json::Value = serde_json::from_slice(response.body()).unwrap_or_default();
        assert_eq!(
            v,
            serde_json::json!({"type": "error", "error": {"type": name, "message": "m"}})
        );
    }
    let body = ErrorBody::new(ErrorKind::RateLimit, "spent")
        .with_request_id("req_9")
        .with_error_code("enforced_spend_limit_reached");
    let v: serde_json::Value = serde_json::from_slice(&body.to_bytes()).unwrap_or_default();
    assert_eq!(
        v["error"]["details"]["error_code"],
        "enforced_spend_limit_reached"
    );
    assert_eq!(v["request_id"], "req_9");
}

#[test]
fn json_events_decode_to_what_was_encoded() {
    let bytes = json_event("message_stop", &serde_json::json!({"type": "message_stop"}))
        .unwrap_or_default();
    let mut d = SseDecoder::new();
    d.push(&bytes);
    assert_eq!(
        d.next_event(),
        Some(SseEvent::new("message_stop", r#"{"type":"message_stop"}"#))
    );
}

fn event_strategy() -> impl Strategy<Value = SseEvent> {
    // Names and ids without line breaks; data without CR (a lone CR reads
    // back as LF), with LFs for multi-line data; any other character.
    let name = proptest::option::of("[a-z_]{1,12}");
    let id = proptest::option::of("[ -~]{0,8}");
    let data = "([^\r]|\n){0,40}";
    let retry = proptest::option::of(0u64..100_000);
    (name, data, id, retry).prop_map(|(event, data, id, retry)| SseEvent {
        event,
        data,
        id,
        retry,
    })
}

proptest! {
    /// Encode, cut anywhere, decode: the same events.
    #[test]
    fn sse_encode_split_decode(
        events in proptest::collection::vec(event_strategy(), 0..8),
        sizes in proptest::collection::vec(1usize..40, 1..20),
        crlf in any::<bool>(),
    ) {
        let mut bytes = Vec::new();
        for e in &events {
            bytes.extend_from_slice(&e.to_bytes());
        }
        if crlf {
            let text = String::from_utf8(bytes).unwrap_or_default();
            bytes = text.replace('\n', "\r\n").into_bytes();
        }
        let mut d = SseDecoder::new();
        let mut out = Vec::new();
        for chunk in chunked(&bytes, &sizes) {
            d.push(&chunk);
            out.extend(std::iter::from_fn(|| d.next_event()));
        }
        d.finish();
        out.extend(std::iter::from_fn(|| d.next_event()));
        prop_assert_eq!(out, events);
    }

    /// The settlement's readers give the same usage at any chunking.
    #[test]
    fn usage_readers_are_chunk_independent(sizes in proptest::collection::vec(1usize..64, 1..200)) {
        let s = read_stream(chunked(STREAM.as_bytes(), &sizes));
        prop_assert_eq!(s.usage(), stream_usage());
        prop_assert_eq!(s.end(), Some(StreamEnd::Stopped));
        prop_assert_eq!(read_json(chunked(BODY.as_bytes(), &sizes)), Some(body_usage()));
    }

    /// Arbitrary bytes, whole or chunked: no reader panics or loops, and a
    /// JSON usage reader's verdict does not depend on the chunking.
    #[test]
    fn readers_never_panic_on_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        sizes in proptest::collection::vec(1usize..32, 1..10),
    ) {
        let whole = read_json([bytes.clone()]);
        prop_assert_eq!(read_json(chunked(&bytes, &sizes)), whole);
        let mut s = read_stream(chunked(&bytes, &sizes));
        s.finish();
        let _ = usage_of(&bytes);
        let mut sc = Scanner::new(&bytes);
        let _ = sc.skip_value(None);
        prop_assert!(sc.position() <= bytes.len() + 1);
    }

    /// JSON-looking noise: strings, escapes, brackets and the `usage` key in
    /// any order. The scanner ends in Ok or Err, never a panic.
    #[test]
    fn scanner_walks_json_like_noise(
        pieces in proptest::collection::vec(
            prop_oneof![
                Just("{"), Just("}"), Just("["), Just("]"), Just(","), Just(":"),
                Just("\"usage\""), Just("\"a\\\"b\""), Just("\\u00e9"), Just("12"),
                Just("true"), Just(" "), Just("\"é\""), Just("\""),
            ],
            0..64,
        ),
        sizes in proptest::collection::vec(1usize..16, 1..8),
    ) {
        let text: String = pieces.concat();
        let bytes = text.as_bytes();
        let mut sc = Scanner::new(bytes);
        let mut chars = tower_llm_limits::wire::json::Chars::default();
        let _ = sc.skip_value(Some(&mut chars));
        let _ = Scanner::new(bytes).u64_value();
        let _ = Scanner::new(bytes).key();
        prop_assert_eq!(read_json(chunked(bytes, &sizes)), read_json([bytes.to_vec()]));
    }
}
