//! The preset over `ReqwestService` (feature `reqwest`) against the emulator
//! served on loopback, and reqwest's errors as the retry layer and the budget
//! see them: a refused connection is retried as never sent and refunded in
//! full; a timeout after the request was written is a counted replay.
#![cfg(feature = "reqwest")]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};
use tower_llm_limits::budget::Tier;
use tower_llm_limits::classify::{never_connected, Class, Classifier};
use tower_llm_limits::preset::{BoxClient, LimitsLayer};
use tower_llm_limits::reqwest::ReqwestService;
use tower_llm_limits::retry::RetryAfterLayer;
use tower_llm_limits_emulator::Limits;

use support::{admitted_and_rate_limited, message, serve_emulator, usage_of};

/// A reqwest client for loopback: no proxy from the environment. (The
/// dev-dependency's reqwest has rustls without a provider, for the example:
/// a client cannot be built before one is installed.)
fn reqwest_client(timeout: Option<Duration>) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = reqwest::Client::builder().no_proxy();
    let builder = match timeout {
        Some(t) => builder.timeout(t),
        None => builder,
    };
    builder.build().expect("reqwest client")
}

fn request(uri: &str, body: &serde_json::Value) -> Request<Full<Bytes>> {
    Request::post(uri)
        .header("content-type", "application/json")
        .header("x-api-key", "sk-test")
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap()
}

/// Retries quickly on the real clock (reqwest uses real sockets).
fn quick_retries(max_retries: u32) -> RetryAfterLayer {
    RetryAfterLayer::builder()
        .max_retries(max_retries)
        .initial_backoff(Duration::from_millis(1))
        .max_backoff(Duration::from_millis(2))
        .build()
}

#[tokio::test]
async fn the_preset_over_reqwest_paces_streams_and_settles() {
    let (emulator, addr) = serve_emulator(Limits::new().rpm(50).itpm(30_000).otpm(8_000)).await;
    let limits = LimitsLayer::anthropic(Tier::Tier1);
    let client: BoxClient = limits.boxed(ReqwestService::new(reqwest_client(None)));
    let uri = format!("http://{addr}/v1/messages");

    for stream in [false, true] {
        let body = message("claude-sonnet-4-5", "Say hi", 64, stream);
        let response = client.clone().oneshot(request(&uri, &body)).await.unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(content_type.starts_with("text/event-stream"), stream);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let (input, output) = usage_of(&bytes).expect("usage in the answer");
        assert!(input > 0 && output > 0, "{input} {output}");
    }

    let budget = limits.budget().snapshot();
    assert_eq!(budget.admitted, 2);
    assert_eq!(budget.settled, 2, "both answers settled from their usage");
    assert_eq!(limits.concurrency().snapshot().in_flight, 0);
    assert_eq!(admitted_and_rate_limited(&emulator), (2, 0));
}

/// A loopback address nothing listens on.
async fn closed_port() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

#[tokio::test]
async fn a_refused_connection_is_retried_as_never_sent_and_refunded() {
    let addr = closed_port().await;
    let uri = format!("http://{addr}/v1/messages");
    let body = message("claude-sonnet-4-5", "Say hi", 64, false);

    let mut bare = ReqwestService::new(reqwest_client(None));
    let err = bare.call(request(&uri, &body)).await.unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    assert_eq!(Classifier::new().classify(&err), Class::Connection);
    assert!(never_connected(&err));

    let limits = LimitsLayer::anthropic(Tier::Tier1).with_retry(quick_retries(2));
    let stack = tower::Layer::layer(&limits, ReqwestService::new(reqwest_client(None)));
    let err = stack.oneshot(request(&uri, &body)).await.unwrap_err();
    let retry = limits.retry().snapshot();
    assert_eq!(retry.retries, 2, "{err}");
    assert_eq!(retry.replays_after_send, 0, "never sent: not a replay");
    let budget = limits.budget().snapshot();
    assert_eq!(budget.admitted, 3);
    assert_eq!(budget.refunded_unsent, 3, "every attempt refunded in full");
}

#[tokio::test]
async fn a_timeout_after_the_request_was_written_is_a_counted_replay() {
    // A server that reads requests and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            held.push(socket);
        }
    });
    let uri = format!("http://{addr}/v1/messages");
    let body = message("claude-sonnet-4-5", "Say hi", 64, false);
    let timeout = Some(Duration::from_millis(150));

    let mut bare = ReqwestService::new(reqwest_client(timeout));
    let err = bare.call(request(&uri, &body)).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(Classifier::new().classify(&err), Class::Timeout);
    assert!(!never_connected(&err), "the request may have been done");

    let limits = LimitsLayer::anthropic(Tier::Tier1).with_retry(quick_retries(1));
    let stack = tower::Layer::layer(&limits, ReqwestService::new(reqwest_client(timeout)));
    let err = stack.oneshot(request(&uri, &body)).await.unwrap_err();
    let retry = limits.retry().snapshot();
    assert_eq!(retry.retries, 1, "{err}");
    assert_eq!(retry.replays_after_send, 1);
    let budget = limits.budget().snapshot();
    assert_eq!(budget.admitted, 2);
    assert_eq!(budget.refunded_unsent, 0, "sent: the charge is kept");
}
