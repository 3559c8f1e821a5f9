//! The scenarios the integration examples show, built here from the public
//! API against the emulator served on loopback (`axum::serve` on
//! `127.0.0.1:0`): the preset stack over a real hyper-util client
//! (`examples/hyper_client.rs`), and an axum gateway enforcing per-caller
//! budgets in front of it (`examples/axum_gateway.rs`), served with its
//! bounds (connection limit, header and body read timeouts) as the example
//! serves it.

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request as AxumRequest, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Limited};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tower_llm_limits::budget::{error_response, forward_response, Callers, EnforceLayer, Limits};
use tower_llm_limits::headers::RateLimitSnapshot;
use tower_llm_limits::preset::LimitsLayer;

use support::{
    admitted_and_rate_limited, message, post_message, serve, serve_emulator, usage_of, PresetClient,
};

/// The example's callers: `team-<x>` sends the gateway key `gw-key-<x>`.
fn callers() -> Callers {
    Callers::new()
        .caller("team-a", "gw-key-a")
        .caller("team-b", "gw-key-b")
        .caller("team-s", "gw-key-s")
}

/// A gateway: `POST /v1/messages` with each caller's budget enforced
/// (`EnforceLayer`, callers authenticated by their gateway key; no
/// `HandleErrorLayer`), forwarded through the paced `upstream`. Returns the
/// caller budget too.
fn gateway(upstream: PresetClient, caller_limits: Limits) -> (Router, EnforceLayer) {
    let callers = EnforceLayer::new(caller_limits, callers());
    let router = Router::new()
        .route("/v1/messages", post(forward))
        .route_layer(callers.clone())
        .layer(middleware::from_fn(read_body_in_time))
        .with_state(upstream);
    (router, callers)
}

/// The example's body read timeout (shortened): the whole body in 2 s.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The example's header read timeout (shortened).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// As the example: the whole body within [`BODY_READ_TIMEOUT`] or a 408
/// that closes the connection.
async fn read_body_in_time(req: AxumRequest, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(body, 32 << 20).collect());
    match read.await {
        Ok(Ok(collected)) => {
            let body = Body::from(collected.to_bytes());
            next.run(AxumRequest::from_parts(parts, body)).await
        }
        Ok(Err(e)) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            [(http::header::CONNECTION, "close")],
            "request body not received in time",
        )
            .into_response(),
    }
}

/// As the example's `serve`: at most `max_connections` at once, each request
/// head within [`HEADER_READ_TIMEOUT`]. Returns the address on loopback.
async fn serve_bounded(app: Router, max_connections: usize) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let app = app.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| app.clone().oneshot(req));
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                drop(slot);
            });
        }
    });
    addr
}

/// As the example: sends the caller's body upstream (with the gateway's own
/// key) and streams the answer back with the headers a client reads, or
/// answers the stack's error in the API's words.
async fn forward(State(upstream): State<PresetClient>, body: Bytes) -> Response {
    match upstream.forward(body).await {
        Ok(resp) => forward_response(resp).map(Body::new),
        Err(e) => error_response(&*e).map(Body::from),
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
        let (status, headers, body) = post_message(gateway, "gw-key-a", &msg).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        // The caller's own budget is reported on admitted answers.
        let snap = RateLimitSnapshot::from_headers(&headers);
        assert_eq!(snap.requests.limit, Some(3), "{headers:?}");
    }
    // The fourth request of team-a within the minute: refused by the gateway.
    let (status, headers, body) = post_message(gateway, "gw-key-a", &msg).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let snap = RateLimitSnapshot::from_headers(&headers);
    let retry_after = snap.retry_after.expect("retry-after on the 429");
    assert!(retry_after >= Duration::from_secs(1) && retry_after <= Duration::from_secs(60));
    assert_eq!(snap.requests.remaining, Some(0));
    let json: Value = serde_json::from_slice(&body).expect("error JSON");
    assert_eq!(json["type"], "error");
    assert_eq!(json["error"]["type"], "rate_limit_error");
    // The caller's key is never echoed.
    assert!(!String::from_utf8_lossy(&body).contains("gw-key"));

    // Another caller has its own budget.
    let (status, _, body) = post_message(gateway, "gw-key-b", &msg).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));

    // An unknown key, or none: 401 in the API's shape, no budget touched.
    for key in ["gw-key-rotated-1", "gw-key-rotated-2", ""] {
        let (status, _, body) = post_message(gateway, key, &msg).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let json: Value = serde_json::from_slice(&body).expect("error JSON");
        assert_eq!(json["error"]["type"], "authentication_error");
    }

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
    let (status, headers, body) = post_message(gateway, "gw-key-s", &msg).await;
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

/// A trivial app behind the example's bounds (body read timeout included).
fn bounded_app() -> Router {
    Router::new()
        .route("/v1/messages", post(|body: Bytes| async move { body }))
        .layer(middleware::from_fn(read_body_in_time))
}

/// Reads until the server closes the connection (or resets it); returns the
/// bytes read, or `None` if it was still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok()?;
    Some(got)
}

/// Slow-loris clients that never finish their request head are closed at
/// the header read timeout (a plain `axum::serve` keeps them open).
#[tokio::test(start_paused = true)]
async fn gateway_closes_connections_whose_head_stalls() {
    let addr = serve_bounded(bounded_app(), 64).await;
    let start = tokio::time::Instant::now();
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\nx-api-key: gw-")
            .await
            .expect("write");
        clients.push(s);
    }
    for s in &mut clients {
        let closed = closed_within(s, HEADER_READ_TIMEOUT + Duration::from_secs(5)).await;
        assert!(closed.is_some(), "a stalled head kept its connection open");
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= HEADER_READ_TIMEOUT, "{elapsed:?}");
    assert!(
        elapsed < HEADER_READ_TIMEOUT + Duration::from_secs(2),
        "{elapsed:?}"
    );
}

/// A body that trickles in is answered with 408 at the body read timeout and
/// its connection closed.
#[tokio::test(start_paused = true)]
async fn gateway_closes_connections_whose_body_stalls() {
    let addr = serve_bounded(bounded_app(), 64).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .expect("write");
    let start = tokio::time::Instant::now();
    let got = closed_within(&mut s, BODY_READ_TIMEOUT + Duration::from_secs(5))
        .await
        .expect("closed");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(start.elapsed() >= BODY_READ_TIMEOUT);
}

/// Past the connection limit, a new connection is served only when one of
/// the open ones closes (here: at the header read timeout).
#[tokio::test(start_paused = true)]
async fn gateway_serves_at_most_its_connection_limit() {
    let addr = serve_bounded(bounded_app(), 2).await;
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"POST /v1/messages HTTP/1.1\r\n")
            .await
            .expect("write");
        stalled.push(s);
    }
    // Let the server accept both before the third arrives.
    tokio::task::yield_now().await;
    let start = tokio::time::Instant::now();
    let mut third = TcpStream::connect(addr).await.expect("connect");
    third
        .write_all(b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi")
        .await
        .expect("write");
    let got = closed_within(&mut third, HEADER_READ_TIMEOUT + Duration::from_secs(5))
        .await
        .expect("answered once a slot was free");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("hi"), "{text}");
    assert!(
        start.elapsed() >= HEADER_READ_TIMEOUT,
        "served before a slot was free"
    );
}

/// A kept-alive connection that sends nothing after its answer is closed at
/// the header read timeout too: an idle client cannot hold a slot.
#[tokio::test(start_paused = true)]
async fn gateway_closes_idle_kept_alive_connections() {
    let addr = serve_bounded(bounded_app(), 64).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\nhi")
        .await
        .expect("write");
    let start = tokio::time::Instant::now();
    let got = closed_within(&mut s, HEADER_READ_TIMEOUT + Duration::from_secs(5))
        .await
        .expect("an idle kept-alive connection was left open");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(start.elapsed() >= HEADER_READ_TIMEOUT);
}
