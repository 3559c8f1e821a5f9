//! Estimator throughput on a ~200 KB Messages request of text, against
//! `serde_json::from_slice::<Value>` on the same bytes as the baseline.
//!
//! Run: `cargo bench --bench estimate -- --warm-up-time 1 --measurement-time 3`

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

fn bench(c: &mut Criterion) {
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
