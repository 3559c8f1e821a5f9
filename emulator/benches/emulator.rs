//! The emulator's cost per request in process (no latency model, limits that
//! never bind), beside a baseline measured in the same run: what any mock of
//! the API must at least do, parse the request's JSON and serialize a fixed
//! answer.
//!
//! Run: `cargo bench -p tower-llm-limits-emulator --bench emulator -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;
use tower_llm_limits::budget::Limits;
use tower_llm_limits_emulator::{Emulator, Latency, OutputLength};

fn body(stream: bool) -> Bytes {
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream,
            "system": "You are a careful assistant.",
            "messages": [{"role": "user", "content": text}]
        }))
        .unwrap_or_default(),
    )
}

fn per_request(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let mut group = c.benchmark_group("emulator");

    let json_body = body(false);
    let answer = serde_json::json!({"id": "msg_1", "type": "message", "role": "assistant",
        "model": "claude-sonnet-4-5", "content": [{"type": "text", "text": "ok ".repeat(64)}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 500, "output_tokens": 64}});
    group.bench_function("baseline_parse_and_serialize", |b| {
        b.iter(|| {
            let v: serde_json::Value =
                serde_json::from_slice(black_box(&json_body)).unwrap_or_default();
            black_box(v);
            serde_json::to_vec(black_box(&answer)).unwrap_or_default()
        })
    });

    let emulator = Emulator::builder()
        .limits(
            Limits::new()
                .rpm(u64::MAX / 4)
                .itpm(u64::MAX / 4)
                .otpm(u64::MAX / 4),
        )
        .latency(Latency::none())
        .output_length(OutputLength::new(1.0, 1.0))
        .build()
        .unwrap_or_else(|e| panic!("emulator: {e}"));
    for (name, stream) in [("emulator_json", false), ("emulator_sse", true)] {
        let bytes = body(stream);
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| {
                let request = http::Request::post("/v1/messages")
                    .body(Full::new(bytes.clone()))
                    .unwrap_or_else(|e| panic!("request: {e}"));
                let service = emulator.service();
                async move {
                    let response = service
                        .oneshot(request)
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                    response
                        .into_body()
                        .collect()
                        .await
                        .map(|c| c.to_bytes().len())
                        .unwrap_or(0)
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, per_request);
criterion_main!(benches);
