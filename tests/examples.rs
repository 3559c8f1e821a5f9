//! The integration examples, run against the crate's emulator served on
//! loopback (`axum::serve` on `127.0.0.1:0`): the hyper client example's
//! stack, and the axum gateway example with its per-caller budgets.

// The gateway example includes the client example as its module
// `hyper_client`: both are tested through that one copy.
#[path = "../examples/axum_gateway.rs"]
#[allow(dead_code)]
mod axum_gateway;

use axum_gateway::hyper_client;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::net::TcpListener;
use tower_llm_limits::budget::Limits;
use tower_llm_limits::emulator::{Emulator, Latency};
use tower_llm_limits::headers::RateLimitSnapshot;
use tower_llm_limits::preset::LimitsLayer;

/// Serves `router` on a fresh loopback port.
async fn serve(router: axum::Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

/// An emulator with quick answers (a few milliseconds), on loopback.
async fn emulator(limits: Limits) -> (Emulator, SocketAddr) {
    let emulator = Emulator::builder()
        .limits(limits)
        .latency(
            Latency::none()
                .with_time_to_first_token(Duration::from_millis(5))
                .with_per_output_token(Duration::from_micros(200)),
        )
        .seed(11)
        .build()
        .expect("emulator settings");
    let addr = serve(emulator.router()).await;
    (emulator, addr)
}

fn total_admitted(e: &Emulator) -> (u64, u64) {
    let stats = e.stats();
    stats.classes.values().fold((0, 0), |(a, r), c| {
        (a + c.requests_admitted, r + c.rate_limited)
    })
}

#[tokio::test]
async fn hyper_client_example_talks_to_the_emulator_json_and_sse() {
    let limits = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let (emu, addr) = emulator(limits).await;
    let client = hyper_client::Anthropic::new(
        &format!("http://{addr}"),
        "sk-test-not-a-real-key",
        LimitsLayer::anthropic(limits),
    )
    .expect("client");

    let mut tasks = Vec::new();
    for i in 0..6 {
        let client = client.clone();
        let body = hyper_client::message("claude-sonnet-4-5", "Say hello, please.", 32, i % 2 == 1);
        tasks.push(tokio::spawn(async move { client.send(&body).await }));
    }
    for t in tasks {
        let (status, body) = t.await.expect("task").expect("request");
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let (input, output) = hyper_client::usage_of(&body).expect("usage in the answer");
        assert!(input > 0 && output > 0 && output <= 32, "{input} {output}");
    }
    assert_eq!(total_admitted(&emu), (6, 0));
}

#[tokio::test]
async fn hyper_client_example_never_sends_a_request_that_cannot_fit() {
    // An ITPM of 100: a prompt of thousands of tokens can never be admitted,
    // so the budget fails it at once and the emulator never sees it.
    let limits = Limits::new().rpm(50).itpm(100).otpm(8_000);
    let (emu, addr) = emulator(limits).await;
    let client = hyper_client::Anthropic::new(
        &format!("http://{addr}"),
        "sk-test",
        LimitsLayer::anthropic(limits),
    )
    .expect("client");
    let long = "word ".repeat(5_000);
    let err = client
        .send(&hyper_client::message(
            "claude-sonnet-4-5",
            &long,
            16,
            false,
        ))
        .await
        .expect_err("too large");
    assert!(
        matches!(
            err.downcast_ref::<tower_llm_limits::Error>(),
            Some(tower_llm_limits::Error::RequestTooLarge { .. })
        ),
        "{err}"
    );
    assert_eq!(total_admitted(&emu), (0, 0));
}

/// A plain HTTP client for the gateway's callers.
async fn call(
    addr: SocketAddr,
    caller_key: &str,
    body: &Value,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{addr}/v1/messages"))
        .header("content-type", "application/json")
        .header("x-api-key", caller_key)
        .body(Full::new(Bytes::from(
            serde_json::to_vec(body).expect("json"),
        )))
        .expect("request");
    let resp = client.request(req).await.expect("gateway answers");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, body)
}

#[tokio::test]
async fn axum_gateway_enforces_each_callers_budget_with_anthropic_shaped_429s() {
    let org = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let (emu, upstream_addr) = emulator(org).await;
    let upstream = axum_gateway::Anthropic::new(
        &format!("http://{upstream_addr}"),
        "sk-gateway-upstream",
        LimitsLayer::anthropic(org),
    )
    .expect("upstream client");
    // Each caller: 3 requests per minute.
    let (router, callers) =
        axum_gateway::router(upstream, Limits::new().rpm(3).itpm(20_000).otpm(4_000));
    let gateway = serve(router).await;
    let msg = hyper_client::message("claude-sonnet-4-5", "Hello there.", 16, false);

    for _ in 0..3 {
        let (status, headers, body) = call(gateway, "team-a", &msg).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        // The caller's own budget is reported on admitted answers.
        let snap = RateLimitSnapshot::from_headers(&headers);
        assert_eq!(snap.requests.limit, Some(3), "{headers:?}");
    }
    // The fourth request of team-a within the minute: refused by the gateway.
    let (status, headers, body) = call(gateway, "team-a", &msg).await;
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
    let (status, _, body) = call(gateway, "team-b", &msg).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));

    // Only admitted requests reached the upstream, and none got a 429 there.
    assert_eq!(total_admitted(&emu), (4, 0));
    assert_eq!(callers.snapshot().keys.len(), 2);
}

#[tokio::test]
async fn axum_gateway_streams_sse_answers_through() {
    let org = Limits::new().rpm(50).itpm(30_000).otpm(8_000);
    let (_emu, upstream_addr) = emulator(org).await;
    let upstream = axum_gateway::Anthropic::new(
        &format!("http://{upstream_addr}"),
        "sk-gateway-upstream",
        LimitsLayer::anthropic(org),
    )
    .expect("upstream client");
    let (router, _) =
        axum_gateway::router(upstream, Limits::new().rpm(10).itpm(20_000).otpm(4_000));
    let gateway = serve(router).await;
    let msg = hyper_client::message("claude-sonnet-4-5", "Stream, please.", 40, true);
    let (status, headers, body) = call(gateway, "team-s", &msg).await;
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
    let (input, output) = hyper_client::usage_of(&body).expect("usage");
    assert!(input > 0 && output > 0);
}
