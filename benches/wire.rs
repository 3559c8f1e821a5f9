//! Reading a response as it passes: the usage scanners (JSON and event
//! stream) and the rate-limit headers, each against a baseline in the same run.
//!
//! Run: `cargo bench --bench wire -- --warm-up-time 1 --measurement-time 3`
//!
//! - `scan_json_64KB/*`: [`UsageScanner`] over a 64 KB Messages answer in
//!   16 KB chunks, against `serde_json` skipping the same bytes
//!   (`IgnoredAny`) and a `memchr` count of its quotes (the floor of any
//!   scanner that must find string ends).
//! - `scan_sse_64KB/*`: [`StreamUsage`] over a 64 KB event stream (one
//!   `message_start`, text deltas, one `message_delta`) in 16 KB chunks,
//!   against a `memchr` count of its newlines (the floor of any line reader).
//! - `scan_json_300B/*`: a 300-byte answer, whole.
//! - `headers/*`: reading the 12 `anthropic-ratelimit-*` headers of an answer
//!   with [`RateLimitSnapshot::from_headers_at`] (the same answer again, and
//!   answers as real traffic has them: each `remaining` different, a reset
//!   that changes about once a second), and writing them with
//!   [`insert_rate_limit_headers`], against cloning the same header map.

use std::hint::black_box;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::HeaderMap;
use tower_llm_limits::headers::RateLimitSnapshot;
use tower_llm_limits::wire::json::UsageScanner;
use tower_llm_limits::wire::ratelimit::{insert_rate_limit_headers, LimitState};
use tower_llm_limits::wire::sse::json_event;
use tower_llm_limits::wire::StreamUsage;

const CHUNK: usize = 16 * 1024;

/// Prose with some escapes and non-ASCII, as model text has.
fn text(len: usize) -> String {
    let words = [
        "the",
        "model",
        "answers",
        "with",
        "tokens",
        "quoted \"here\"",
        "naïve",
        "line\nbreak",
        "rate",
        "limit",
        "über",
        "bucket",
    ];
    let mut out = String::with_capacity(len + 16);
    let mut i = 0usize;
    while out.len() < len {
        out.push_str(words[i % words.len()]);
        out.push(' ');
        i = i.wrapping_mul(7).wrapping_add(3);
    }
    out
}

fn json_answer(text_len: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": text(text_len)}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": 2095, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": 503}
    }))
    .unwrap_or_default()
}

fn sse_answer(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 1024);
    let start = serde_json::json!({"type": "message_start", "message": {
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [], "usage": {"input_tokens": 2095, "output_tokens": 1}}});
    out.extend_from_slice(&json_event("message_start", &start).unwrap_or_default());
    let mut n = 0usize;
    while out.len() < len {
        let delta = serde_json::json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": text(40 + n % 60)}});
        out.extend_from_slice(&json_event("content_block_delta", &delta).unwrap_or_default());
        n += 1;
    }
    let end = serde_json::json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 503}});
    out.extend_from_slice(&json_event("message_delta", &end).unwrap_or_default());
    out.extend_from_slice(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    out
}

fn scan_json(body: &[u8]) -> u64 {
    let mut s = UsageScanner::new();
    for chunk in body.chunks(CHUNK) {
        s.push(chunk);
    }
    s.usage().map_or(0, |u| u.output_tokens)
}

fn scan_sse(body: &[u8]) -> u64 {
    let mut s = StreamUsage::new();
    for chunk in body.chunks(CHUNK) {
        s.push(chunk);
    }
    s.finish();
    s.usage().output_tokens
}

fn scanners(c: &mut Criterion) {
    let json = json_answer(64 * 1024);
    assert_eq!(scan_json(&json), 503);
    let mut g = c.benchmark_group("scan_json_64KB");
    g.throughput(Throughput::Bytes(json.len() as u64));
    g.bench_function("usage_scanner", |b| b.iter(|| scan_json(black_box(&json))));
    g.bench_function("serde_json_ignored_any", |b| {
        b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&json)).is_ok())
    });
    g.bench_function("memchr_count_quotes", |b| {
        b.iter(|| memchr::memchr_iter(b'"', black_box(&json)).count())
    });
    g.finish();

    let sse = sse_answer(64 * 1024);
    assert_eq!(scan_sse(&sse), 503);
    let mut g = c.benchmark_group("scan_sse_64KB");
    g.throughput(Throughput::Bytes(sse.len() as u64));
    g.bench_function("stream_usage", |b| b.iter(|| scan_sse(black_box(&sse))));
    g.bench_function("memchr_count_newlines", |b| {
        b.iter(|| memchr::memchr_iter(b'\n', black_box(&sse)).count())
    });
    g.finish();

    let small = json_answer(60);
    let mut g = c.benchmark_group(format!("scan_json_{}B", small.len()));
    g.throughput(Throughput::Bytes(small.len() as u64));
    g.bench_function("usage_scanner", |b| b.iter(|| scan_json(black_box(&small))));
    // The whole answer in one frame, as the budget reads it: from its end.
    assert_eq!(scan_json_whole(&small), 503);
    g.bench_function("usage_scanner_whole", |b| {
        b.iter(|| scan_json_whole(black_box(&small)))
    });
    g.bench_function("serde_json_ignored_any", |b| {
        b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&small)).is_ok())
    });
    g.finish();
}

/// A JSON answer that arrives in one frame: `push_last` on the whole body.
fn scan_json_whole(body: &[u8]) -> u64 {
    let mut s = UsageScanner::new();
    s.push_last(body);
    s.usage().map_or(0, |u| u.output_tokens)
}

fn limits() -> [Option<LimitState>; 3] {
    let s = |limit, remaining, ms| {
        Some(LimitState {
            limit,
            remaining,
            reset_in: Duration::from_millis(ms),
        })
    };
    [
        s(4_000, 3_999, 15),
        s(2_000_000, 1_998_000, 60),
        s(400_000, 399_000, 150),
    ]
}

/// An answer's headers: the 12 rate-limit headers among the usual others.
fn answer_headers(now: SystemTime) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in [
        ("date", "Wed, 02 Dec 2026 00:00:00 GMT"),
        ("content-type", "application/json"),
        ("content-length", "300"),
        ("request-id", "req_011CSHoEeqs5C35K2UUqR7Fy"),
        (
            "anthropic-organization-id",
            "387d5d70-5e1b-4ba8-9a6a-c1e3b4a5b6c7",
        ),
        ("via", "1.1 google"),
        ("cf-cache-status", "DYNAMIC"),
        ("server", "cloudflare"),
    ] {
        h.insert(name, http::HeaderValue::from_static(value));
    }
    insert_rate_limit_headers(&mut h, &limits(), now);
    h
}

fn headers(c: &mut Criterion) {
    let now = UNIX_EPOCH + Duration::from_secs(1_795_850_100);
    let h = answer_headers(now);
    assert_eq!(
        RateLimitSnapshot::from_headers_at(&h, now).requests.limit,
        Some(4_000)
    );
    let mut g = c.benchmark_group("headers");
    g.bench_function("clone_header_map", |b| b.iter(|| black_box(&h).clone()));
    g.bench_function("read_snapshot", |b| {
        b.iter(|| RateLimitSnapshot::from_headers_at(black_box(&h), now))
    });
    // Real traffic: each answer's `remaining` values differ, the limits stay,
    // and a reset changes about once a second (here every 16 answers).
    let answers: Vec<HeaderMap> = (0..64u64)
        .map(|i| {
            let at = now + Duration::from_secs(i / 16);
            let mut h = answer_headers(at);
            // One request less, or a thousand tokens less, each answer.
            let mut changing = limits();
            for (d, l) in changing.iter_mut().enumerate() {
                if let Some(l) = l {
                    let step = if d == 0 { 1 } else { 1_000 };
                    l.remaining = l.remaining.saturating_sub((i + 1) * step);
                }
            }
            insert_rate_limit_headers(&mut h, &changing, at);
            h
        })
        .collect();
    let mut next = 0;
    g.bench_function("read_snapshot_changing", |b| {
        b.iter(|| {
            next = (next + 1) % answers.len();
            RateLimitSnapshot::from_headers_at(black_box(&answers[next]), now)
        })
    });
    g.bench_function("write_12", |b| {
        let limits = limits();
        b.iter(|| {
            let mut out = HeaderMap::with_capacity(16);
            insert_rate_limit_headers(&mut out, black_box(&limits), now);
            out
        })
    });
    g.finish();
}

criterion_group!(benches, scanners, headers);
criterion_main!(benches);
