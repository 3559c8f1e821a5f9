//! Estimator throughput on a ~200 KB Messages request of text, against
//! `serde_json::from_slice::<Value>` on the same bytes as the baseline; and
//! the cost of one estimate of a small request (the preset bench's) and of a
//! realistic one (a few KB: a system prompt, tools, a multi-turn
//! conversation with a tool call, a `cache_control` breakpoint).
//!
//! Run: `cargo bench --bench estimate -- --warm-up-time 1 --measurement-time 3`
//!
//! `ESTIMATE_PROFILE=<small|realistic|large>[:<estimates>]` only estimates
//! that request so many times (default 20,000), for
//! `valgrind --tool=callgrind target/release/deps/estimate-*`: the
//! instructions per estimate are the total's difference between two counts
//! over the count's difference.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Value};
use tower_llm_limits::estimate::{AnthropicEstimator, TokenEstimator};

/// Deterministic prose: words, punctuation, quotes and line breaks (escaped
/// in JSON as `\n` and `\"`), a little non-ASCII.
fn prose(seed: &mut u64, len: usize) -> String {
    const WORDS: &[&str] = &[
        "the",
        "budget",
        "estimates",
        "tokens",
        "before",
        "a",
        "request",
        "is",
        "sent",
        "server",
        "charges",
        "uncached",
        "input",
        "per",
        "minute",
        "and",
        "café",
        "while",
        "\"quoted\"",
        "limits",
        "are",
        "learned",
        "from",
        "headers",
        "of",
        "responses",
    ];
    let mut s = String::with_capacity(len + 16);
    let mut line = 0;
    while s.len() < len {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let w = WORDS[((*seed >> 33) as usize) % WORDS.len()];
        s.push_str(w);
        line += w.len() + 1;
        if line > 80 {
            s.push_str(".\n");
            line = 0;
        } else {
            s.push(' ');
        }
    }
    s
}

fn request() -> Vec<u8> {
    let mut seed = 42;
    let mut messages = Vec::new();
    for i in 0..100 {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        let content = if i % 3 == 0 {
            json!(prose(&mut seed, 2000))
        } else {
            json!([{"type": "text", "text": prose(&mut seed, 2000)}])
        };
        messages.push(json!({"role": role, "content": content}));
    }
    let body = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 4096,
        "system": prose(&mut seed, 4000),
        "messages": messages,
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// The preset bench's request (`benches/preset.rs`).
const SMALL: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Summarise the attached report in three bullet points, keeping every figure."}]}"#;

/// A realistic request of a few KB: a system prompt with a `cache_control`
/// breakpoint, two tools, and a conversation of six turns with a tool call
/// and its result, the last user turn marked for caching too.
fn realistic() -> Vec<u8> {
    let mut seed = 7;
    let weather = json!({
        "name": "get_weather",
        "description": "Get the current weather in a given location, in the units asked for.",
        "input_schema": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
            },
            "required": ["location"]
        }
    });
    let search = json!({
        "name": "search_docs",
        "description": "Search the internal documentation and return the five best passages.",
        "input_schema": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["query"]
        }
    });
    let body = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 2048,
        "system": [{"type": "text", "text": prose(&mut seed, 1500),
                    "cache_control": {"type": "ephemeral"}}],
        "tools": [weather, search],
        "messages": [
            {"role": "user", "content": prose(&mut seed, 400)},
            {"role": "assistant", "content": [
                {"type": "text", "text": prose(&mut seed, 200)},
                {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9",
                 "name": "search_docs", "input": {"query": "rate limits per minute", "limit": 5}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                 "content": [{"type": "text", "text": prose(&mut seed, 900)}]}
            ]},
            {"role": "assistant", "content": [{"type": "text", "text": prose(&mut seed, 500)}]},
            {"role": "user", "content": [{"type": "text", "text": prose(&mut seed, 300),
                                          "cache_control": {"type": "ephemeral"}}]}
        ]
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// `ESTIMATE_PROFILE`: estimates one request many times (see the module docs).
fn profile(spec: &str) {
    let (name, n) = match spec.split_once(':') {
        Some((name, n)) => (name, n.parse().unwrap_or(20_000)),
        None => (spec, 20_000),
    };
    let body = match name {
        "small" => SMALL.as_bytes().to_vec(),
        "realistic" => realistic(),
        "large" => request(),
        other => panic!("ESTIMATE_PROFILE: unknown request {other:?}"),
    };
    let (parts, ()) = http::Request::post("/v1/messages")
        .body(())
        .map(|r| r.into_parts())
        .unwrap_or_else(|_| http::Request::new(()).into_parts());
    let estimator = AnthropicEstimator::new();
    let mut sum = 0u64;
    for _ in 0..n {
        let e = estimator.estimate(&parts, black_box(&body));
        assert!(!e.fallback);
        sum = sum.wrapping_add(e.input_tokens);
    }
    eprintln!(
        "{name}: {} bytes, {n} estimates, checksum {sum}",
        body.len()
    );
}

fn bench(c: &mut Criterion) {
    if let Ok(spec) = std::env::var("ESTIMATE_PROFILE") {
        profile(&spec);
        return;
    }
    let body = request();
    let (parts, ()) = http::Request::post("/v1/messages")
        .body(())
        .map(|r| r.into_parts())
        .unwrap_or_else(|_| http::Request::new(()).into_parts());
    let estimator = AnthropicEstimator::new();
    assert!(!estimator.estimate(&parts, &body).fallback);

    let mut g = c.benchmark_group(format!("estimate_{}KB_text", body.len() / 1024));
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("anthropic_estimator", |b| {
        b.iter(|| estimator.estimate(&parts, black_box(&body)))
    });
    g.bench_function("serde_json_value_baseline", |b| {
        b.iter(|| serde_json::from_slice::<Value>(black_box(&body)).map(|v| v.is_object()))
    });
    g.finish();

    let small = SMALL.as_bytes();
    let real = realistic();
    let mut g = c.benchmark_group("estimate_one");
    g.bench_function(format!("small_{}B", small.len()), |b| {
        b.iter(|| estimator.estimate(&parts, black_box(small)))
    });
    g.bench_function(format!("realistic_{}B", real.len()), |b| {
        b.iter(|| estimator.estimate(&parts, black_box(&real)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
