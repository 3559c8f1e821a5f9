//! The scenarios the integration examples show, built here from the public
//! API against the emulator served on loopback (`axum::serve` on
//! `127.0.0.1:0`): the preset stack over a real hyper-util client
//! (`examples/hyper_client.rs`), and an axum gateway enforcing per-caller
//! budgets in front of it (`examples/axum_gateway.rs`).

mod support;

use std::time::Duration;

use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::StatusCode;
use serde_json::Value;
use tower::ServiceBuilder;
use tower_llm_limits::budget::{Limits, TokenBudgetLayer};
use tower_llm_limits::headers::RateLimitSnapshot;
use tower_llm_limits::preset::LimitsLayer;
use tower_llm_limits::BoxError;

use support::{
    admitted_and_rate_limited, message, post_message, serve, serve_emulator, usage_of, PresetClient,
};

/// A gateway: `POST /v1/messages` with each caller's budget enforced
/// (`TokenBudgetLayer::enforce`, callers told apart by their `x-api-key`),
/// forwarded through the paced `upstream`. Returns the caller budget too.
fn gateway(upstream: PresetClient, caller_limits: Limits) -> (Router, TokenBudgetLayer) {
    let callers = TokenBudgetLayer::enforce(caller_limits);
    let router = Router::new()
        .route("/v1/messages", post(forward))
        .route_layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|e: BoxError| async move {
                    (StatusCode::BAD_REQUEST, e.to_string()).into_response()
                }))
                .layer(callers.clone()),
        )
        .with_state(upstream);
    (router, callers)
}

/// Sends the caller's body upstream (with the gateway's own key) and streams
/// the answer back with its content type.
async fn forward(State(upstream): State<PresetClient>, body: Bytes) -> Response {
    match upstream.forward(body).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let mut out = Response::new(Body::new(body));
            *out.status_mut() = parts.status;
            if let Some(v) = parts.headers.get(http::header::CONTENT_TYPE) {
                out.headers_mut()
                    .insert(http::header::CONTENT_TYPE, v.clone());
            }
            out
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

#[tokio::test]
async fn preset_over_hyper_talks_to_the_emulator_json_and_sse() {
    let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let (emu, addr) = serve_emulator(limits).await;
    let client = PresetClient::new(
        addr,
        "sk-test-not-a-real-key",
        LimitsLayer::anthropic(limits),
    );

    let mut tasks = Vec::new();
    for i in 0..6 {
        let client = client.clone();
        let body = message("claude-sonnet-4-5", "Say hello, please.", 32, i % 2 == 1);
        tasks.push(tokio::spawn(async move { client.send(&body).await }));
    }
    for t in tasks {
        let (status, body) = t.await.expect("task").expect("request");
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let (input, output) = usage_of(&body).expect("usage in the answer");
        assert!(input > 0 && output > 0 && output <= 32, "{input} {output}");
    }
    assert_eq!(admitted_and_rate_limited(&emu), (6, 0));
}

#[tokio::test]
async fn preset_over_hyper_never_sends_a_request_that_cannot_fit() {
    // An ITPM of 100: a prompt of thousands of tokens can never be admitted,
    // so the budget fails it at once and the emulator never sees it.
    let limits = Limits::new().rpm(50).itpm(100).otpm(8_000);
    let (emu, addr) = serve_emulator(limits).await;
    let client = PresetClient::new(addr, "sk-test", LimitsLayer::anthropic(limits));
    let long = "word ".repeat(5_000);
    let err = client
        .send(&message("claude-sonnet-4-5", &long, 16, false))
        .await
        .expect_err("too large");
    assert!(
        matches!(
            err.downcast_ref::<tower_llm_limits::Error>(),
            Some(tower_llm_limits::Error::RequestTooLarge { .. })
        ),
        "{err}"
    );
    assert_eq!(admitted_and_rate_limited(&emu), (0, 0));
}

#[tokio::test]
async fn axum_gateway_enforces_each_callers_budget_with_anthropic_shaped_429s() {
    let org = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let (emu, upstream_addr) = serve_emulator(org).await;
    let upstream = PresetClient::new(
        upstream_addr,
        "sk-gateway-upstream",
        LimitsLayer::anthropic(org),
    );
    // Each caller: 3 requests per minute.
    let (router, callers) = gateway(upstream, Limits::new().rpm(3).itpm(20_000).otpm(4_000));
    let gateway = serve(router).await;
    let msg = message("claude-sonnet-4-5", "Hello there.", 16, false);

    for _ in 0..3 {
        let (status, headers, body) = post_message(gateway, "team-a", &msg).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        // The caller's own budget is reported on admitted answers.
        let snap = RateLimitSnapshot::from_headers(&headers);
        assert_eq!(snap.requests.limit, Some(3), "{headers:?}");
    }
    // The fourth request of team-a within the minute: refused by the gateway.
    let (status, headers, body) = post_message(gateway, "team-a", &msg).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let snap = RateLimitSnapshot::from_headers(&headers);
    let retry_after = snap.retry_after.expect("retry-after on the 429");
    assert!(retry_after >= Duration::from_secs(1) && retry_after <= Duration::from_secs(60));
    assert_eq!(snap.requests.remaining, Some(0));
    let json: Value = serde_json::from_slice(&body).expect("error JSON");
    assert_eq!(json["type"], "error");
    assert_eq!(json["error"]["type"], "rate_limit_error");
    // The caller's key is never echoed.
    assert!(!String::from_utf8_lossy(&body).contains("team-a"));

    // Another caller has its own budget.
    let (status, _, body) = post_message(gateway, "team-b", &msg).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));

    // Only admitted requests reached the upstream, and none got a 429 there.
    assert_eq!(admitted_and_rate_limited(&emu), (4, 0));
    assert_eq!(callers.snapshot().keys.len(), 2);
}

#[tokio::test]
async fn axum_gateway_streams_sse_answers_through() {
    let org = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let (_emu, upstream_addr) = serve_emulator(org).await;
    let upstream = PresetClient::new(
        upstream_addr,
        "sk-gateway-upstream",
        LimitsLayer::anthropic(org),
    );
    let (router, _) = gateway(upstream, Limits::new().rpm(10).itpm(20_000).otpm(4_000));
    let gateway = serve(router).await;
    let msg = message("claude-sonnet-4-5", "Stream, please.", 40, true);
    let (status, headers, body) = post_message(gateway, "team-s", &msg).await;
    assert_eq!(status, StatusCode::OK);
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok());
    assert!(
        content_type.is_some_and(|t| t.starts_with("text/event-stream")),
        "{content_type:?}"
    );
    let text = String::from_utf8_lossy(&body);
    let start = text.find("event: message_start").expect("message_start");
    let stop = text.find("event: message_stop").expect("message_stop");
    assert!(start < stop);
    assert!(text.contains("event: content_block_delta"));
    let (input, output) = usage_of(&body).expect("usage");
    assert!(input > 0 && output > 0);
}
