//! The Anthropic estimator from the outside: block types, media headers, PDF
//! pages, prompt cache (paused clock), calibration, fallbacks, properties.

use std::time::Duration;

use http::request::Parts;
use proptest::prelude::*;
use serde_json::{json, Value};
use tower_llm_limits::estimate::{AnthropicEstimator, CalibrationConfig, Estimate, TokenEstimator};
use tower_llm_limits::wire::Usage;

fn parts() -> Parts {
    http::Request::post("/v1/messages")
        .body(())
        .map(|r| r.into_parts().0)
        .unwrap_or_else(|_| http::Request::new(()).into_parts().0)
}

fn est(e: &AnthropicEstimator, body: &Value) -> Estimate {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    e.estimate(&parts(), &bytes)
}

fn raw(body: &Value) -> u64 {
    let e = est(&AnthropicEstimator::new(), body);
    assert!(!e.fallback, "unexpected fallback for {body}");
    e.raw_input_tokens
}

/// A small standard base64 encoder, so tests build their own image data.
fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b0 = chunk[0];
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let v = (u32::from(b0) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    v.extend_from_slice(&13u32.to_be_bytes());
    v.extend_from_slice(b"IHDR");
    v.extend_from_slice(&w.to_be_bytes());
    v.extend_from_slice(&h.to_be_bytes());
    v.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
    v.extend_from_slice(&[0u8; 64]);
    v
}

fn gif(w: u16, h: u16) -> Vec<u8> {
    let mut v = b"GIF89a".to_vec();
    v.extend_from_slice(&w.to_le_bytes());
    v.extend_from_slice(&h.to_le_bytes());
    v.extend_from_slice(&[0xf7, 0, 0]);
    v.extend_from_slice(&[0u8; 32]);
    v
}

/// A JPEG with an APP0 segment and a large APP1 (EXIF-like) segment before
/// the frame header, so the parser must walk segments to find SOF.
fn jpeg(w: u16, h: u16, sof: u8) -> Vec<u8> {
    let mut v = vec![0xff, 0xd8];
    v.extend_from_slice(&[0xff, 0xe0, 0x00, 0x10]);
    v.extend_from_slice(b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
    let app1 = vec![0x5au8; 5000];
    v.extend_from_slice(&[0xff, 0xe1]);
    v.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    v.extend_from_slice(&app1);
    // DHT before the frame header (0xc4 is not a SOF).
    v.extend_from_slice(&[0xff, 0xc4, 0x00, 0x04, 0x00, 0x00]);
    v.extend_from_slice(&[0xff, sof, 0x00, 0x11, 0x08]);
    v.extend_from_slice(&h.to_be_bytes());
    v.extend_from_slice(&w.to_be_bytes());
    v.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
    v.extend_from_slice(&[0xff, 0xda, 0x00, 0x02]);
    v.extend_from_slice(&[0xff, 0xd9]);
    v
}

fn riff(chunk: &[u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut v = b"RIFF".to_vec();
    v.extend_from_slice(&((payload.len() + 12) as u32).to_le_bytes());
    v.extend_from_slice(b"WEBP");
    v.extend_from_slice(chunk);
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v.extend_from_slice(&[0u8; 16]);
    v
}

fn webp_vp8(w: u16, h: u16) -> Vec<u8> {
    let mut p = vec![0x30, 0x01, 0x00, 0x9d, 0x01, 0x2a];
    p.extend_from_slice(&w.to_le_bytes());
    p.extend_from_slice(&h.to_le_bytes());
    riff(b"VP8 ", &p)
}

fn webp_vp8l(w: u32, h: u32) -> Vec<u8> {
    let bits = (w - 1) | ((h - 1) << 14);
    let mut p = vec![0x2f];
    p.extend_from_slice(&bits.to_le_bytes());
    riff(b"VP8L", &p)
}

fn webp_vp8x(w: u32, h: u32) -> Vec<u8> {
    let mut p = vec![0x10, 0, 0, 0];
    p.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
    p.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
    riff(b"VP8X", &p)
}

fn pdf(pages: usize) -> Vec<u8> {
    let mut s = String::from("%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n");
    s.push_str(&format!(
        "2 0 obj\n<< /Type /Pages /Kids [] /Count {pages} >>\nendobj\n"
    ));
    for i in 0..pages {
        s.push_str(&format!(
            "{} 0 obj\n<</Type/Page /Parent 2 0 R /MediaBox [0 0 612 792]>>\nendobj\n",
            i + 3
        ));
    }
    s.push_str("%%EOF\n");
    s.into_bytes()
}

fn user(content: Value) -> Value {
    json!({"model": "claude-sonnet-4-5", "max_tokens": 64,
           "messages": [{"role": "user", "content": content}]})
}

fn image_block(data: &[u8], media: &str) -> Value {
    json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": b64(data)}})
}

/// What `text` costs as a message's string content.
fn text_cost(text: &str) -> u64 {
    raw(&user(json!(text))) - raw(&user(json!("")))
}

/// Tokens `o200k_base` counts in `text` (the reference the estimator's text
/// model was fitted against).
fn reference_tokens(text: &str) -> u64 {
    match tiktoken_rs::o200k_base() {
        Ok(bpe) => bpe.encode_ordinary(text).len() as u64,
        Err(e) => panic!("o200k_base: {e}"),
    }
}

/// `a` and `b` differ by at most one token (each estimate is rounded up).
fn near(a: u64, b: u64) -> bool {
    a.abs_diff(b) <= 1
}

/// Some prose of about `len` bytes.
fn prose(len: usize) -> String {
    let words = [
        "the", "budget", "waits", "for", "room,", "then", "sends", "a", "request.", "Tokens",
    ];
    let mut s = String::new();
    let mut i = 7usize;
    while s.len() < len {
        i = (i * 31 + 17) % 101;
        s.push_str(words[i % words.len()]);
        s.push(if i % 13 == 0 { '\n' } else { ' ' });
    }
    s
}

/// Tokens of a body with one user message holding `blocks`, minus the same
/// body with no blocks: what the blocks cost.
fn block_cost(blocks: Value) -> u64 {
    raw(&user(blocks)) - raw(&user(json!([])))
}

#[test]
fn string_content_is_estimated_near_a_real_tokenizer() {
    // Text at the reference tokenizer's count times the default scale 1.3,
    // + 5 per message, + 10 per request.
    let text = prose(2000);
    let e = est(&AnthropicEstimator::new(), &user(json!(text)));
    let expected = reference_tokens(&text) as f64 * 1.3;
    let got = (e.raw_input_tokens - 15) as f64;
    assert!((got / expected - 1.0).abs() < 0.1, "{got} vs {expected}");
    assert_eq!(e.input_tokens, e.raw_input_tokens);
    assert_eq!(e.model.as_deref(), Some("claude-sonnet-4-5"));
    assert_eq!(e.max_tokens, Some(64));
    assert!(!e.stream);
    assert!(!e.fallback);
}

#[test]
fn newer_tokenizer_models_cost_30_percent_more_text() {
    let mut body = user(json!(prose(2000)));
    let base = raw(&body) - 15;
    body["model"] = json!("claude-opus-4-7");
    let newer = raw(&body) - 15;
    assert!(
        near(newer, (base as f64 * 1.3).round() as u64),
        "{newer} vs {base}"
    );
    body["model"] = json!("claude-3-7-sonnet-20250219");
    assert_eq!(raw(&body) - 15, base);
}

#[test]
fn every_block_type_counts_its_text() {
    let t = prose(700);
    let cost = text_cost(&t);
    let cases = [
        ("text", json!([{"type": "text", "text": t}])),
        (
            "thinking",
            json!([{"type": "thinking", "thinking": t, "signature": "x".repeat(5000)}]),
        ),
        (
            "redacted_thinking",
            json!([{"type": "redacted_thinking", "data": t}]),
        ),
        (
            "tool_result string",
            json!([{"type": "tool_result", "tool_use_id": "", "content": t}]),
        ),
        (
            "tool_result blocks",
            json!([{"type": "tool_result", "tool_use_id": "", "content": [{"type": "text", "text": t}]}]),
        ),
        (
            "document text",
            json!([{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": t}}]),
        ),
        (
            "document content",
            json!([{"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": t}]}}]),
        ),
    ];
    for (name, blocks) in cases {
        let empty = blocks.to_string().replace(&t, "");
        let empty: Value = serde_json::from_str(&empty).unwrap_or(Value::Null);
        let d = block_cost(blocks) - block_cost(empty);
        assert!(d.abs_diff(cost) <= 2, "{name}: {d} vs {cost}");
    }
}

#[test]
fn tool_use_counts_name_and_input_json() {
    // Input counted as written, quotes and braces too.
    let q = prose(700);
    let with = json!([{"type": "tool_use", "id": "", "name": "", "input": {"q": q}}]);
    let without = json!([{"type": "tool_use", "id": "", "name": "", "input": {}}]);
    let d = block_cost(with) - block_cost(without);
    let written = serde_json::to_string(&json!({"q": q})).unwrap_or_default();
    let expected = text_cost(&written) - text_cost("{}");
    assert!(d.abs_diff(expected) <= 2, "{d} vs {expected}");
    let name = prose(350);
    let named = json!([{"type": "tool_use", "id": "", "name": name, "input": {}}]);
    let unnamed = json!([{"type": "tool_use", "id": "", "name": "", "input": {}}]);
    let d = block_cost(named) - block_cost(unnamed);
    assert!(d.abs_diff(text_cost(&name)) <= 2, "{d}");
}

#[test]
fn system_as_string_or_blocks_costs_the_same() {
    let s = prose(350);
    let mut a = user(json!("hi"));
    a["system"] = json!(s);
    let mut b = user(json!("hi"));
    b["system"] = json!([{"type": "text", "text": s}]);
    assert_eq!(raw(&a), raw(&b));
    assert!(near(raw(&a) - raw(&user(json!("hi"))), text_cost(&s)));
}

#[test]
fn tools_count_name_description_schema_and_overhead() {
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}});
    let schema_text = serde_json::to_string(&schema).unwrap_or_default();
    let (name, description) = (prose(35), prose(350));
    let mut body = user(json!("hi"));
    body["tools"] = json!([{"name": name, "description": description, "input_schema": schema}]);
    let d = raw(&body) - raw(&user(json!("hi")));
    // 530 for the tool-use system prompt + name, description and schema as text.
    let expected = 530 + text_cost(&name) + text_cost(&description) + text_cost(&schema_text);
    assert!(d.abs_diff(expected) <= 3, "{d} vs {expected}");
    // No tools, no overhead.
    let mut empty = user(json!("hi"));
    empty["tools"] = json!([]);
    assert_eq!(raw(&empty), raw(&user(json!("hi"))));
}

#[test]
fn png_image_costs_w_times_h_over_750() {
    assert_eq!(
        block_cost(json!([image_block(&png(1000, 1000), "image/png")])),
        1334
    );
    assert_eq!(
        block_cost(json!([image_block(&png(200, 100), "image/png")])),
        27
    );
}

#[test]
fn large_image_is_scaled_down_by_the_documented_rule() {
    // Long edge 4000 -> 1568: 1568 x 392 / 750 = 820.
    assert_eq!(
        block_cost(json!([image_block(&png(4000, 1000), "image/png")])),
        820
    );
    // Square and huge: capped at ~1600 tokens.
    assert_eq!(
        block_cost(json!([image_block(&png(5000, 5000), "image/png")])),
        1600
    );
}

#[test]
fn jpeg_dimensions_come_from_the_sof_marker() {
    for sof in [0xc0, 0xc2] {
        let cost = block_cost(json!([image_block(&jpeg(600, 450, sof), "image/jpeg")]));
        assert_eq!(cost, 360, "SOF {sof:#x}");
    }
    // The same JPEG with its base64 slashes escaped as \/ (some encoders do).
    let data = b64(&jpeg(600, 450, 0xc0));
    let body = serde_json::to_string(&user(json!([
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": data}}
    ])))
    .unwrap_or_default()
    .replace('/', "\\/");
    let e = AnthropicEstimator::new().estimate(&parts(), body.as_bytes());
    assert!(!e.fallback);
    assert_eq!(e.raw_input_tokens, raw(&user(json!([]))) + 360);
}

#[test]
fn gif_dimensions_come_from_the_screen_descriptor() {
    assert_eq!(
        block_cost(json!([image_block(&gif(300, 250), "image/gif")])),
        100
    );
}

#[test]
fn webp_dimensions_for_lossy_lossless_and_extended() {
    assert_eq!(
        block_cost(json!([image_block(&webp_vp8(750, 100), "image/webp")])),
        100
    );
    assert_eq!(
        block_cost(json!([image_block(&webp_vp8l(750, 200), "image/webp")])),
        200
    );
    assert_eq!(
        block_cost(json!([image_block(&webp_vp8x(1500, 100), "image/webp")])),
        200
    );
}

#[test]
fn image_by_url_or_unreadable_costs_the_bound() {
    let url =
        json!([{"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]);
    assert_eq!(block_cost(url), 1600);
    let garbage = json!([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]);
    assert_eq!(block_cost(garbage), 1600);
}

#[test]
fn image_inside_tool_result_is_counted() {
    let blocks = json!([{"type": "tool_result", "tool_use_id": "",
        "content": [image_block(&png(1000, 1000), "image/png")]}]);
    let without = json!([{"type": "tool_result", "tool_use_id": "", "content": []}]);
    assert_eq!(block_cost(blocks) - block_cost(without), 1334);
}

fn pdf_block(data: &[u8]) -> Value {
    json!([{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": b64(data)}}])
}

#[test]
fn pdf_costs_pages_times_text_and_image() {
    let empty = json!([{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": ""}}]);
    let base = block_cost(empty.clone());
    // An empty PDF is still charged one page.
    assert_eq!(base, 4600);
    assert_eq!(block_cost(pdf_block(&pdf(3))), 3 * 4600);
    assert_eq!(block_cost(pdf_block(&pdf(12))), 12 * 4600);
}

#[test]
fn pdf_without_visible_pages_is_charged_by_size() {
    // Compressed object streams hide the page objects: 1 page per 32 KiB.
    let mut data = b"%PDF-1.7\n".to_vec();
    data.resize(100 * 1024, b'x');
    assert_eq!(block_cost(pdf_block(&data)), 4 * 4600);
}

#[test]
fn pdf_by_url_costs_the_documented_bound() {
    let url = json!([{"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}]);
    assert_eq!(block_cost(url), 10 * 4600);
    let e = AnthropicEstimator::builder().pdf_unknown_pages(2).build();
    let v = est(
        &e,
        &user(json!([{"type": "document", "source": {"type": "file", "file_id": "f"}}])),
    );
    assert_eq!(v.raw_input_tokens, 2 * 4600 + 15);
}

#[test]
fn unicode_and_escapes_are_counted_as_characters() {
    // CJK text near the reference tokenizer's count (times 1.3).
    let cjk = "我们今天发送请求，服务器每分钟限制令牌。".repeat(10);
    let got = (raw(&user(json!(cjk))) - 15) as f64;
    let expected = reference_tokens(&cjk) as f64 * 1.3;
    assert!((got / expected - 1.0).abs() < 0.25, "{got} vs {expected}");
    // Escaped forms of the same text cost the same.
    let plain = r#"{"model":"m","messages":[{"role":"user","content":"aa b é"}]}"#;
    let escaped = r#"{"model":"m","messages":[{"role":"user","content":"a\u0061 b \u00e9"}]}"#;
    let e = AnthropicEstimator::new();
    assert_eq!(
        e.estimate(&parts(), plain.as_bytes()).raw_input_tokens,
        e.estimate(&parts(), escaped.as_bytes()).raw_input_tokens
    );
}

#[test]
fn stream_and_escaped_model_are_read() {
    let body = br#"{"stream": true, "model": "claude-\u0073onnet-4-5", "max_tokens": 1.5,
        "messages": [{"role": "user", "content": "x"}]}"#;
    let e = AnthropicEstimator::new().estimate(&parts(), body);
    assert!(e.stream);
    assert_eq!(e.model.as_deref(), Some("claude-sonnet-4-5"));
    assert_eq!(e.max_tokens, None);
}

#[test]
fn garbage_gets_a_length_bound_and_is_counted() {
    let e = AnthropicEstimator::new();
    let cases: [&[u8]; 7] = [
        b"not json at all",
        b"[1,2,3]",
        b"\"a string\"",
        br#"{"model":"claude-sonnet-4-5"}"#,
        br#"{"model":"claude-sonnet-4-5","messages":"nope"}"#,
        br#"{"model":"claude-sonnet-4-5","max_tokens":9,"messages":[{"role":"user","content":"#,
        b"",
    ];
    for body in cases {
        let v = e.estimate(&parts(), body);
        assert!(v.fallback, "{:?}", String::from_utf8_lossy(body));
        assert_eq!(v.input_tokens, (body.len() as u64).div_ceil(2));
    }
    // What was read before the body broke is kept (the budget keys by model).
    let v = e.estimate(&parts(), cases[5]);
    assert_eq!(v.model.as_deref(), Some("claude-sonnet-4-5"));
    assert_eq!(v.max_tokens, Some(9));
    let snap = e.snapshot();
    assert_eq!(snap.fallbacks, 8);
    assert_eq!(snap.estimates, 8);
}

#[test]
fn fallback_is_capped_and_configurable() {
    let e = AnthropicEstimator::builder().fallback(4.0, 100).build();
    assert_eq!(e.estimate(&parts(), b"xxxxxxxx").input_tokens, 2);
    assert_eq!(e.estimate(&parts(), &[b'x'; 4000]).input_tokens, 100);
}

#[test]
fn unbuffered_uses_length_then_content_length_then_cap() {
    let e = AnthropicEstimator::new();
    let v = e.estimate_unbuffered(&parts(), Some(1000));
    assert!(v.fallback);
    assert_eq!(v.input_tokens, 500);
    let (with_len, ()) = http::Request::post("/v1/messages")
        .header("content-length", "4000")
        .body(())
        .map(|r| r.into_parts())
        .unwrap_or_else(|_| http::Request::new(()).into_parts());
    assert_eq!(e.estimate_unbuffered(&with_len, None).input_tokens, 2000);
    assert_eq!(
        e.estimate_unbuffered(&parts(), None).input_tokens,
        1_000_000
    );
    assert_eq!(e.snapshot().fallbacks, 3);
}

#[test]
fn calibration_converges_to_the_observed_ratio() {
    let e = AnthropicEstimator::new();
    let body = user(json!("word ".repeat(400)));
    let first = est(&e, &body);
    assert_eq!(first.input_tokens, first.raw_input_tokens);
    for _ in 0..20 {
        let v = est(&e, &body);
        let actual = (v.raw_input_tokens as f64 * 1.3).round() as u64;
        e.observe(
            &v,
            &Usage {
                input_tokens: actual,
                output_tokens: 10,
                ..Usage::default()
            },
        );
    }
    let v = est(&e, &body);
    let snap = e.snapshot();
    let m = &snap.models[0];
    assert_eq!(m.model, "claude-sonnet-4-5");
    assert_eq!(m.samples, 20);
    assert!(m.factor >= 1.3 - 1e-3, "factor {}", m.factor);
    assert!(v.input_tokens as f64 >= 1.3 * v.raw_input_tokens as f64 - 1.0);
    // Other models are not affected.
    let mut other = body.clone();
    other["model"] = json!("claude-haiku-4-5");
    let o = est(&e, &other);
    assert_eq!(o.input_tokens, o.raw_input_tokens);
}

#[test]
fn calibration_learns_below_one() {
    // A tokenizer that counts 20 % fewer tokens than the raw estimate: the
    // calibrated estimate comes down to it (it was never below the raw one).
    let e = AnthropicEstimator::new();
    let body = user(json!(prose(3000)));
    for _ in 0..10 {
        let v = est(&e, &body);
        let actual = (v.raw_input_tokens as f64 * 0.8).round() as u64;
        e.observe(
            &v,
            &Usage {
                input_tokens: actual,
                ..Usage::default()
            },
        );
    }
    let v = est(&e, &body);
    let actual = v.raw_input_tokens as f64 * 0.8;
    assert!(
        (v.input_tokens as f64 - actual).abs() <= 1.0,
        "{} vs {actual}",
        v.input_tokens
    );
}

#[test]
fn calibration_keeps_a_high_quantile_not_the_mean() {
    let e = AnthropicEstimator::builder()
        .calibration(CalibrationConfig {
            window: 10,
            // The quantile itself, never below the raw estimate.
            spread_weight: 1.0,
            min_factor: 1.0,
            ..CalibrationConfig::default()
        })
        .build();
    let body = user(json!("z".repeat(3500)));
    // Nine at 1.0 and one at 2.0: p90 of ten is the ninth: 1.0; one more 2.0 lifts it.
    for ratio in [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0] {
        let v = est(&e, &body);
        let actual = (v.raw_input_tokens as f64 * ratio) as u64;
        e.observe(
            &v,
            &Usage {
                input_tokens: actual,
                ..Usage::default()
            },
        );
    }
    assert_eq!(e.calibration().factor("claude-sonnet-4-5"), 1.0);
    let v = est(&e, &body);
    e.observe(
        &v,
        &Usage {
            input_tokens: v.raw_input_tokens * 2,
            ..Usage::default()
        },
    );
    assert_eq!(e.calibration().factor("claude-sonnet-4-5"), 2.0);
}

#[test]
fn fallback_estimates_teach_nothing() {
    let e = AnthropicEstimator::new();
    let v = e.estimate(&parts(), b"garbage");
    for _ in 0..10 {
        e.observe(
            &v,
            &Usage {
                input_tokens: 1_000_000,
                ..Usage::default()
            },
        );
    }
    assert!(e.snapshot().models.is_empty());
}

// ---- prompt cache ----

fn long_system() -> String {
    // 7000 chars, about 1,600 tokens: above the 1024-token minimum.
    "You are a careful assistant. ".repeat(7000 / 29 + 1)[..7000].to_owned()
}

fn cached_request(system_ttl: Option<&str>, question: &str) -> Value {
    let mut cc = json!({"type": "ephemeral"});
    if let Some(ttl) = system_ttl {
        cc["ttl"] = json!(ttl);
    }
    json!({"model": "claude-sonnet-4-5", "max_tokens": 100,
        "system": [{"type": "text", "text": long_system(), "cache_control": cc}],
        "messages": [{"role": "user", "content": question}]})
}

/// The tokens of `long_system()` read from a warm cache, as the estimator
/// counts them.
fn sys() -> u64 {
    let with = cached_request(None, "q");
    let mut without = with.clone();
    without["system"] = json!([]);
    raw(&with) - raw(&without)
}

fn created(v: &Estimate) -> Usage {
    Usage {
        input_tokens: v.raw_input_tokens.saturating_sub(sys()),
        cache_creation_input_tokens: sys(),
        ..Usage::default()
    }
}

fn read(v: &Estimate) -> Usage {
    Usage {
        input_tokens: v.raw_input_tokens,
        cache_read_input_tokens: v.cache_read_tokens,
        ..Usage::default()
    }
}

#[tokio::test(start_paused = true)]
async fn warm_prefix_is_charged_only_for_what_follows() {
    let e = AnthropicEstimator::new();
    let cold = est(&e, &cached_request(None, "first question"));
    assert_eq!(cold.cache_read_tokens, 0);
    assert!(sys() > 1024, "{}", sys());
    assert!(cold.raw_input_tokens > sys());
    e.observe(&cold, &created(&cold));
    assert_eq!(e.snapshot().warm_cache_entries, 1);

    tokio::time::advance(Duration::from_secs(60)).await;
    let warm = est(&e, &cached_request(None, "second question, longer"));
    // The system prompt is read from the cache.
    assert!(near(warm.cache_read_tokens, sys()), "{warm:?}");
    assert!(warm.raw_input_tokens < 50, "{warm:?}");
    assert_eq!(warm.input_tokens, warm.raw_input_tokens);
}

/// A request without breakpoints that settles while one with a breakpoint
/// (of the same size, the same text) is in flight does not settle the
/// other's write: that write is confirmed by its own response.
#[tokio::test(start_paused = true)]
async fn a_request_without_breakpoints_leaves_anothers_write_alone() {
    let e = AnthropicEstimator::new();
    let writer = est(&e, &cached_request(None, "q"));
    assert_eq!(writer.cache_writes.len(), 1);
    let mut plain = cached_request(None, "q");
    plain["system"][0]
        .as_object_mut()
        .map(|block| block.remove("cache_control"));
    let other = est(&e, &plain);
    assert!(other.cache_writes.is_empty(), "{other:?}");
    assert_eq!(other.raw_input_tokens, writer.raw_input_tokens);
    e.observe(
        &other,
        &Usage {
            input_tokens: other.raw_input_tokens,
            ..Usage::default()
        },
    );
    e.observe(&writer, &created(&writer));
    assert_eq!(e.snapshot().warm_cache_entries, 1);
    let warm = est(&e, &cached_request(None, "another question"));
    assert!(near(warm.cache_read_tokens, sys()), "{warm:?}");
}

#[tokio::test(start_paused = true)]
async fn unconfirmed_prefix_stays_cold() {
    // Requests sent together before any response all pay full price.
    let e = AnthropicEstimator::new();
    let a = est(&e, &cached_request(None, "q"));
    let b = est(&e, &cached_request(None, "q"));
    assert_eq!(a.cache_read_tokens, 0);
    assert_eq!(b.cache_read_tokens, 0);
    assert_eq!(e.snapshot().warm_cache_entries, 0);
}

/// A request's breakpoints are its cache writes; a later request sharing
/// the prefix while no response confirmed it lists it as pending (the budget
/// may hold it for the write), and no longer once it is warm.
#[tokio::test(start_paused = true)]
async fn prefix_in_flight_is_pending_for_later_requests() {
    let e = AnthropicEstimator::new();
    let a = est(&e, &cached_request(None, "q"));
    assert!(a.cache_pending.is_empty(), "{a:?}");
    assert_eq!(a.cache_writes.len(), 1);
    assert!(near(a.cache_writes[0].tokens, sys()), "{a:?}");
    let b = est(&e, &cached_request(None, "another question"));
    assert_eq!(b.cache_read_tokens, 0);
    assert_eq!(b.cache_pending.first(), a.cache_writes.first(), "{b:?}");
    e.observe(&a, &created(&a));
    let c = est(&e, &cached_request(None, "a third"));
    assert!(near(c.cache_read_tokens, sys()), "{c:?}");
    assert!(c.cache_pending.is_empty(), "{c:?}");
}

#[tokio::test(start_paused = true)]
async fn prefix_expires_after_five_minutes() {
    let e = AnthropicEstimator::new();
    let v = est(&e, &cached_request(None, "q"));
    e.observe(&v, &created(&v));
    tokio::time::advance(Duration::from_secs(4 * 60 + 59)).await;
    let v = est(&e, &cached_request(None, "q"));
    let warm = v.cache_read_tokens;
    assert!(near(warm, sys()), "still warm just before 5 minutes");
    e.observe(&v, &read(&v));
    // The read refreshed the lifetime: 4m59s later it is still warm.
    tokio::time::advance(Duration::from_secs(4 * 60 + 59)).await;
    assert_eq!(est(&e, &cached_request(None, "q")).cache_read_tokens, warm);
    tokio::time::advance(Duration::from_secs(5 * 60 + 1)).await;
    let v = est(&e, &cached_request(None, "q"));
    assert_eq!(v.cache_read_tokens, 0, "cold after 5 minutes idle");
}

#[tokio::test(start_paused = true)]
async fn one_hour_ttl_is_honoured() {
    let e = AnthropicEstimator::new();
    let v = est(&e, &cached_request(Some("1h"), "q"));
    e.observe(&v, &created(&v));
    tokio::time::advance(Duration::from_secs(59 * 60)).await;
    let warm = est(&e, &cached_request(Some("1h"), "q")).cache_read_tokens;
    assert!(near(warm, sys()), "{warm}");
    tokio::time::advance(Duration::from_secs(60 * 60 + 1)).await;
    assert_eq!(
        est(&e, &cached_request(Some("1h"), "q")).cache_read_tokens,
        0
    );
}

#[tokio::test(start_paused = true)]
async fn server_reporting_no_read_forgets_the_prefix() {
    let e = AnthropicEstimator::new();
    let v = est(&e, &cached_request(None, "q"));
    e.observe(&v, &created(&v));
    let warm = est(&e, &cached_request(None, "q"));
    assert!(near(warm.cache_read_tokens, sys()));
    // The server evicted it early: no read, nothing created either.
    e.observe(
        &warm,
        &Usage {
            input_tokens: 2050,
            ..Usage::default()
        },
    );
    assert_eq!(est(&e, &cached_request(None, "q")).cache_read_tokens, 0);
}

#[tokio::test(start_paused = true)]
async fn short_prefixes_are_not_remembered() {
    let e = AnthropicEstimator::new();
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 10,
        "system": [{"type": "text", "text": "short", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "q"}]});
    let v = est(&e, &body);
    e.observe(
        &v,
        &Usage {
            input_tokens: 20,
            cache_creation_input_tokens: 5,
            ..Usage::default()
        },
    );
    assert_eq!(est(&e, &body).cache_read_tokens, 0);
    assert_eq!(e.snapshot().cache_entries, 0);
}

#[tokio::test(start_paused = true)]
async fn a_different_prefix_is_a_miss() {
    let e = AnthropicEstimator::new();
    let v = est(&e, &cached_request(None, "q"));
    e.observe(&v, &created(&v));
    // Same system, but tools come first in the prefix: adding one changes it.
    let mut with_tool = cached_request(None, "q");
    with_tool["tools"] = json!([{"name": "t", "description": "d", "input_schema": {}}]);
    assert_eq!(est(&e, &with_tool).cache_read_tokens, 0);
    // Another model has its own cache.
    let mut other = cached_request(None, "q");
    other["model"] = json!("claude-opus-4-5");
    assert_eq!(est(&e, &other).cache_read_tokens, 0);
}

#[tokio::test(start_paused = true)]
async fn moving_breakpoint_finds_the_previous_turn() {
    let e = AnthropicEstimator::new();
    let history = long_system();
    let turn1 = json!({"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [
        {"role": "user", "content": [{"type": "text", "text": history, "cache_control": {"type": "ephemeral"}}]}
    ]});
    let v = est(&e, &turn1);
    e.observe(&v, &created(&v));
    // Next turn: the breakpoint moves to the new last message; the old one is gone.
    let turn2 = json!({"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [
        {"role": "user", "content": [{"type": "text", "text": history}]},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": [{"type": "text", "text": "follow-up", "cache_control": {"type": "ephemeral"}}]}
    ]});
    let v2 = est(&e, &turn2);
    // History + its message overhead.
    assert!(near(v2.cache_read_tokens, sys() + 5), "{v2:?}");
    assert!(v2.raw_input_tokens < 40, "{v2:?}");
}

#[tokio::test(start_paused = true)]
async fn cache_memory_is_bounded() {
    let e = AnthropicEstimator::builder().cache_max_entries(8).build();
    for i in 0..50 {
        let v = est(&e, &cached_request(None, "q").tap_system(i));
        e.observe(&v, &created(&v));
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    assert!(e.snapshot().cache_entries <= 8);
    // The most recent prefix is still warm.
    let warm = est(&e, &cached_request(None, "q").tap_system(49)).cache_read_tokens;
    assert!(near(warm, sys()), "{warm}");
}

trait TapSystem {
    fn tap_system(self, i: usize) -> Value;
}

impl TapSystem for Value {
    /// Makes the system prompt distinct per `i` (same length and classes
    /// of characters: the first word's two lower-case letters change).
    fn tap_system(mut self, i: usize) -> Value {
        let mut s = long_system();
        let letter = |n: usize| char::from(b'a' + (n % 26) as u8);
        s.replace_range(1..3, &format!("{}{}", letter(i / 26), letter(i)));
        self["system"][0]["text"] = json!(s);
        self
    }
}

#[test]
fn estimator_is_send_sync_and_debug() {
    fn assert_send_sync<T: Send + Sync + std::fmt::Debug + 'static>() {}
    assert_send_sync::<AnthropicEstimator>();
    let e: std::sync::Arc<dyn TokenEstimator> = std::sync::Arc::new(AnthropicEstimator::new());
    let _ = e.estimate(&parts(), b"{}");
    assert!(format!("{:?}", AnthropicEstimator::new()).contains("AnthropicEstimator"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let e = AnthropicEstimator::new();
        let v = e.estimate(&parts(), &body);
        if v.fallback {
            prop_assert_eq!(v.input_tokens, (body.len() as u64).div_ceil(2));
        }
    }

    #[test]
    fn mutated_requests_never_panic(
        cut in 0usize..400,
        flip in 0usize..400,
        byte in any::<u8>(),
    ) {
        let body = serde_json::to_vec(&json!({"model": "claude-sonnet-4-5", "max_tokens": 5,
            "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
            "tools": [{"name": "t", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hello \u{e9}\u{65e5}"},
                image_block(&png(10, 10), "image/png"),
                {"type": "tool_result", "tool_use_id": "x", "content": [{"type": "text", "text": "r"}]}
            ]}]})).unwrap_or_default();
        let mut m = body.clone();
        if let Some(b) = m.get_mut(flip % body.len()) { *b = byte; }
        m.truncate(body.len() - cut % body.len());
        let _ = AnthropicEstimator::new().estimate(&parts(), &m);
    }

    #[test]
    fn estimates_are_monotone_in_added_text(
        base in "[ -~\u{e9}\u{65e5}]{0,300}",
        extra in "[ -~\u{e9}\u{65e5}]{0,300}",
        model in prop::sample::select(vec!["claude-sonnet-4-5", "claude-opus-4-7", "x"]),
    ) {
        let e = AnthropicEstimator::new();
        let mk = |text: String| json!({"model": model, "max_tokens": 10, "messages": [
            {"role": "user", "content": [{"type": "text", "text": text}]}]});
        let a = est(&e, &mk(base.clone()));
        let b = est(&e, &mk(format!("{base}{extra}")));
        prop_assert!(!a.fallback && !b.fallback);
        prop_assert!(b.input_tokens >= a.input_tokens);
        // Another message never lowers the estimate either.
        let mut two = mk(base.clone());
        if let Some(v) = two["messages"].as_array_mut() {
            v.push(json!({"role": "user", "content": extra}));
        }
        prop_assert!(est(&e, &two).input_tokens >= a.input_tokens + 5);
    }
}

/// A request estimated while its prefix was warm, that waits in line past
/// the prefix's lifetime, is charged the whole prompt again; the usage it
/// then gets (a cache write) settles against the estimate without the read.
#[tokio::test(start_paused = true)]
async fn a_read_that_expires_while_its_request_waits_is_taken_back() {
    let e = AnthropicEstimator::new();
    let first = est(&e, &cached_request(None, "first question"));
    e.observe(&first, &created(&first));
    let waiting = est(&e, &cached_request(None, "a question that waits"));
    assert!(near(waiting.cache_read_tokens, sys()), "{waiting:?}");
    // Four minutes on the prefix stands.
    tokio::time::advance(Duration::from_secs(4 * 60)).await;
    assert_eq!(e.recheck_cache_read(&waiting), None);
    // 4 min 55 s: the five minutes of its lifetime end within the margin.
    tokio::time::advance(Duration::from_secs(55)).await;
    let whole = e
        .recheck_cache_read(&waiting)
        .expect("the read is taken back");
    assert_eq!(whole.cache_read_tokens, 0);
    assert_eq!(whole.cache_read_served, None);
    assert_eq!(
        whole.raw_input_tokens,
        waiting.raw_input_tokens + waiting.cache_read_tokens
    );
    assert!(
        whole.input_tokens >= whole.raw_input_tokens * 9 / 10,
        "{whole:?}"
    );
    assert!(whole.input_tokens > waiting.input_tokens, "{whole:?}");
    assert_eq!(whole.cache_writes, waiting.cache_writes);
    // Taken back once: the record now expects no read.
    assert_eq!(e.recheck_cache_read(&whole), None);
    // Its usage, a write of the prefix, confirms the prefix again: the next
    // request reads it.
    e.observe(&whole, &created(&whole));
    let next = est(&e, &cached_request(None, "the next one"));
    assert!(near(next.cache_read_tokens, sys()), "{next:?}");
}

/// A read the server confirmed meanwhile (another request read the prefix
/// and its usage said so) extends the prefix's life: the waiting request's
/// read stands.
#[tokio::test(start_paused = true)]
async fn a_read_another_answer_extended_stands() {
    let e = AnthropicEstimator::new();
    let first = est(&e, &cached_request(None, "first question"));
    e.observe(&first, &created(&first));
    let waiting = est(&e, &cached_request(None, "a question that waits"));
    tokio::time::advance(Duration::from_secs(3 * 60)).await;
    let other = est(&e, &cached_request(None, "another reader"));
    assert!(near(other.cache_read_tokens, sys()), "{other:?}");
    e.observe(&other, &read(&other));
    tokio::time::advance(Duration::from_secs(2 * 60 + 30)).await;
    assert_eq!(e.recheck_cache_read(&waiting), None);
    // Nothing to check for a request that reads nothing.
    assert_eq!(e.recheck_cache_read(&first), None);
}
