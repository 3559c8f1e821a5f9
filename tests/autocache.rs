//! `AutoCacheLayer` over the token budget and the emulator, on tokio's paused
//! clock: a conversation sent without breakpoints gets them, so its turns
//! read the prefix the turn before wrote, and fewer input tokens are charged.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tower::{Service, ServiceExt};
use tower_llm_limits::autocache::{AutoCacheLayer, NoAutoCache};
use tower_llm_limits::budget::TokenBudgetLayer;
use tower_llm_limits_emulator::{Emulator, Latency, Limits};

const LIMITS: Limits = Limits {
    requests_per_minute: Some(50),
    input_tokens_per_minute: Some(30_000),
    output_tokens_per_minute: Some(8_000),
};

fn emulator() -> Emulator {
    Emulator::builder()
        .limits(LIMITS)
        .latency(Latency::none())
        .seed(11)
        .build()
        .expect("emulator")
}

/// Turn `n` of a conversation with a long system prompt, no breakpoints.
fn turn(n: usize) -> Value {
    let system = "You are a careful reviewer of long contracts. ".repeat(150);
    let mut messages = Vec::new();
    for t in 0..=n {
        let text = format!(
            "clause {t}: {}",
            "the party of the first part shall ".repeat(60)
        );
        messages.push(json!({"role": "user", "content": text}));
        if t < n {
            messages.push(json!({"role": "assistant", "content": format!("noted clause {t}")}));
        }
    }
    json!({"model": "claude-sonnet-4-5", "max_tokens": 30, "system": system, "messages": messages})
}

fn post(body: &Value) -> Request<Full<Bytes>> {
    Request::post("/v1/messages")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

/// The ITPM the emulator charged, and what it read from its cache.
fn charged(emu: &Emulator) -> (u64, u64) {
    let total = emu.stats().total();
    (total.input_tokens, total.cache_read_input_tokens)
}

#[tokio::test(start_paused = true)]
async fn breakpoints_make_each_turn_read_the_last_ones_prefix() {
    // Without the layer: every turn is charged in full.
    let plain = emulator();
    let mut client = tower::ServiceBuilder::new()
        .layer(TokenBudgetLayer::builder().limits(LIMITS).build())
        .service(plain.service());
    for n in 0..6 {
        let response = ServiceExt::<Request<Full<Bytes>>>::ready(&mut client)
            .await
            .expect("ready")
            .call(post(&turn(n)))
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::OK);
        let _ = response.into_body().collect().await.expect("body");
    }
    let (plain_charged, plain_read) = charged(&plain);
    assert_eq!(plain_read, 0);

    // With the layer outside the budget: each turn writes only what it adds
    // and reads the rest, so at least a third of the ITPM is saved over six turns.
    let cached = emulator();
    let cache = AutoCacheLayer::new();
    let mut client = tower::ServiceBuilder::new()
        .layer(cache.clone())
        .layer(TokenBudgetLayer::builder().limits(LIMITS).build())
        .service(cached.service());
    for n in 0..6 {
        let response = ServiceExt::<Request<Full<Bytes>>>::ready(&mut client)
            .await
            .expect("ready")
            .call(post(&turn(n)))
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::OK);
        let _ = response.into_body().collect().await.expect("body");
    }
    let (cached_charged, cached_read) = charged(&cached);
    let snapshot = cache.snapshot();
    assert_eq!((snapshot.requests, snapshot.rewritten), (6, 6));
    assert!(
        snapshot.breakpoints >= 6 && snapshot.breakpoints <= 24,
        "{snapshot:?}"
    );
    assert!(cached_read > 0, "no cache read");
    assert_eq!(
        snapshot.read_tokens, cached_read,
        "the layer reports what the emulator read"
    );
    assert!(snapshot.write_5m_tokens > 0);
    assert!(snapshot.cost_delta_tokens() < 0.0, "{snapshot:?}");
    assert!(
        cached_charged * 3 < plain_charged * 2,
        "charged {cached_charged} with the layer, {plain_charged} without"
    );
}

#[tokio::test(start_paused = true)]
async fn hand_placed_breakpoints_and_opted_out_requests_are_sent_as_they_came() {
    let emu = emulator();
    let cache = AutoCacheLayer::new();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Bytes>::new()));
    let record = seen.clone();
    let inner = tower::service_fn(move |request: Request<Full<Bytes>>| {
        let record = record.clone();
        let mut emu = emu.service();
        async move {
            let (parts, body) = request.into_parts();
            let bytes = body.collect().await.expect("body").to_bytes();
            record.lock().expect("lock").push(bytes.clone());
            emu.call(Request::from_parts(parts, Full::new(bytes))).await
        }
    });
    let mut client = tower::ServiceBuilder::new()
        .layer(cache.clone())
        .service(inner);
    let mut marked = turn(3);
    marked["system"] = json!([{"type": "text", "text": marked["system"].clone(), "cache_control": {"type": "ephemeral"}}]);
    let marked_bytes = Bytes::from(marked.to_string());
    let mut opted_out = post(&turn(2));
    opted_out.extensions_mut().insert(NoAutoCache);
    let opted_bytes = Bytes::from(turn(2).to_string());
    for request in [post(&marked), opted_out] {
        let response = ServiceExt::<Request<Full<Bytes>>>::ready(&mut client)
            .await
            .expect("ready")
            .call(request)
            .await
            .expect("answer");
        let _ = response.into_body().collect().await.expect("body");
    }
    assert_eq!(*seen.lock().expect("lock"), vec![marked_bytes, opted_bytes]);
    let snapshot = cache.snapshot();
    assert_eq!(
        (
            snapshot.had_breakpoints,
            snapshot.opted_out,
            snapshot.rewritten
        ),
        (1, 1, 0)
    );
}
