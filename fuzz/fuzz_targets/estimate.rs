//! The estimator over arbitrary request bodies and heads.
//!
//! Input: the request body. Its first byte also picks the head (with or
//! without `content-length`, any method) and the usage fed back.
//!
//! Asserts: no panic; the estimate is bounded by a linear function of the
//! body's length; estimating the same body again (after feeding back a
//! usage, so the prompt cache and calibration are exercised) stays bounded
//! too; an unbuffered estimate is a fallback.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tower_llm_limits::estimate::{AnthropicEstimator, TokenEstimator};
use tower_llm_limits::wire::Usage;

/// One estimator for the whole run, as a gateway keeps one: its tables
/// (prompt cache, calibration, pending records) must stay bounded.
fn estimator() -> &'static AnthropicEstimator {
    static E: OnceLock<AnthropicEstimator> = OnceLock::new();
    E.get_or_init(AnthropicEstimator::new)
}

fn bound(len: u64) -> u64 {
    // Text at most 2 tokens a byte (calibration factors are capped well
    // below), 1,600 tokens an image of at least 40 bytes, a PDF capped at
    // 600 pages of 4,600 tokens; the calibration factor at most 10.
    10 * (10 + 2 * len + 1_600 * (len / 40 + 1) + 600 * 4_600)
}

fuzz_target!(|data: &[u8]| {
    let control = data.first().copied().unwrap_or(0);
    let mut head = http::Request::builder().uri("/v1/messages");
    head = head.method(if control & 1 == 0 { "POST" } else { "GET" });
    if control & 2 != 0 {
        head = head.header("content-length", data.len().to_string());
    }
    let Ok(request) = head.body(()) else { return };
    let (parts, ()) = request.into_parts();
    let estimator = estimator();
    let len = data.len() as u64;

    let e = estimator.estimate(&parts, data);
    assert!(
        e.input_tokens <= bound(len),
        "{} tokens for {len} bytes",
        e.input_tokens
    );
    let usage = Usage {
        input_tokens: e.raw_input_tokens / u64::from(control % 4 + 1),
        cache_creation_input_tokens: u64::from(control & 4 != 0) * 1_200,
        cache_read_input_tokens: u64::from(control & 8 != 0) * e.cache_read_tokens,
        output_tokens: 1,
        ..Usage::default()
    };
    estimator.observe(&e, &usage);
    let again = estimator.estimate(&parts, data);
    assert!(again.input_tokens <= bound(len));

    let unbuffered = estimator.estimate_unbuffered(&parts, Some(len));
    assert!(unbuffered.fallback);
    let _ = estimator.snapshot();
});
