//! What the emulator refuses, as the API does, and what its server does with
//! slow and idle clients.
//!
//! The server tests run on loopback with the real clock (sockets need it):
//! 200 ms timeouts, a handful of connections, each test well under 2 s.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;
use tower_llm_limits::budget::Limits;
use tower_llm_limits_emulator::{Emulator, EmulatorBuilder, Latency};

fn quiet() -> EmulatorBuilder {
    Emulator::builder()
        .limits(Limits::new().rpm(1_000).itpm(1_000_000).otpm(1_000_000))
        .latency(Latency::none())
}

async fn post(emulator: &Emulator, body: &Value) -> (StatusCode, Value) {
    let request = Request::post("/v1/messages")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap();
    let response = emulator.service().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

fn with_model(model: &str) -> Value {
    json!({"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]})
}

/// A request with `n` text blocks, each a cache breakpoint.
fn with_breakpoints(n: usize) -> Value {
    let blocks: Vec<Value> = (0..n)
        .map(|i| {
            json!({"type": "text", "text": format!("part {i}"),
                         "cache_control": {"type": "ephemeral"}})
        })
        .collect();
    json!({"model": "claude-sonnet-4-5", "max_tokens": 8,
           "messages": [{"role": "user", "content": blocks}]})
}

fn error_message(body: &Value) -> &str {
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    body["error"]["message"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn an_unknown_model_is_refused_unless_allowed() {
    let emulator = quiet().build().unwrap();
    for model in ["claude-2.1", "gpt-4o", "claude-opus-5"] {
        let (status, body) = post(&emulator, &with_model(model)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{model}: {body}");
        let message = error_message(&body);
        assert!(
            message.starts_with(&format!("model: {model} ")),
            "{message}"
        );
    }
    // A long name is not repeated in full.
    let long = "x".repeat(100_000);
    let (_, body) = post(&emulator, &with_model(&long)).await;
    assert!(error_message(&body).len() < 1_000);
    // Known families pass, in any of their spellings.
    for model in [
        "claude-sonnet-4-5",
        "claude-3-5-haiku-latest",
        "claude-opus-4-1-20250805",
    ] {
        let (status, body) = post(&emulator, &with_model(model)).await;
        assert_eq!(status, StatusCode::OK, "{model}: {body}");
    }
    let lenient = quiet().allow_unknown_models(true).build().unwrap();
    let (status, body) = post(&lenient, &with_model("claude-2.1")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(lenient.stats().classes["other"].requests_admitted, 1);
}

#[tokio::test]
async fn more_than_four_cache_breakpoints_are_refused_unless_allowed() {
    let emulator = quiet().build().unwrap();
    let (status, body) = post(&emulator, &with_breakpoints(4)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post(&emulator, &with_breakpoints(5)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        error_message(&body),
        "A maximum of 4 blocks with cache_control may be provided. Found 5."
    );
    let two = quiet().max_cache_breakpoints(Some(2)).build().unwrap();
    let (status, _) = post(&two, &with_breakpoints(3)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let unlimited = quiet().max_cache_breakpoints(None).build().unwrap();
    let (status, body) = post(&unlimited, &with_breakpoints(9)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

const TIMEOUT: Duration = Duration::from_millis(200);
/// How long a test waits for the server to close a connection before it fails.
const GIVE_UP: Duration = Duration::from_millis(1_500);

/// Serves an emulator with 200 ms timeouts on loopback.
async fn serve(builder: EmulatorBuilder) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let emulator = builder
        .header_read_timeout(TIMEOUT)
        .body_read_timeout(TIMEOUT)
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = emulator.serve(listener).await;
    });
    (addr, task)
}

/// Reads until the server closes the connection (or resets it); fails after [`GIVE_UP`].
/// Returns what was read.
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let read = tokio::time::timeout(GIVE_UP, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the connection is still open after {GIVE_UP:?}"
    );
    seen
}

/// A handful of slow-loris connections: one idle, some stalled in their
/// headers, some in their body. The server closes each after its timeout.
#[tokio::test]
async fn slow_and_idle_connections_are_closed_after_their_timeout() {
    let (addr, server) = serve(quiet()).await;
    let started = Instant::now();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let mut in_headers = Vec::new();
    let mut in_body = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-ty")
            .await
            .unwrap();
        in_headers.push(s);
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"model\":",
        )
        .await
        .unwrap();
        in_body.push(s);
    }
    until_closed(&mut idle).await;
    for s in &mut in_headers {
        until_closed(s).await;
    }
    for s in &mut in_body {
        let answer = until_closed(s).await;
        // Dropped without an answer, as a request the server never got.
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= TIMEOUT - Duration::from_millis(20),
        "{elapsed:?}"
    );
    server.abort();
}

/// With room for one connection, a second is served only once the first,
/// a slow loris, has been closed.
#[tokio::test]
async fn past_the_connection_limit_new_connections_wait() {
    let (addr, server) = serve(quiet().max_connections(1)).await;
    let mut loris = TcpStream::connect(addr).await.unwrap();
    loris
        .write_all(b"POST /v1/messages HTTP/1.1\r\n")
        .await
        .unwrap();
    // Let the server accept the loris first.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let mut client = TcpStream::connect(addr).await.unwrap();
    let body = serde_json::to_vec(&with_model("claude-sonnet-4-5")).unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).await.unwrap();
    client.write_all(&body).await.unwrap();
    let answer = until_closed(&mut client).await;
    let waited = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Served after the loris was closed (200 ms after it connected).
    assert!(
        waited >= Duration::from_millis(100),
        "served after {waited:?}"
    );
    until_closed(&mut loris).await;
    server.abort();
}

/// After an answer, a keep-alive connection that sends nothing more is
/// closed after the header read timeout.
#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let (addr, server) = serve(quiet()).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    let body = serde_json::to_vec(&with_model("claude-sonnet-4-5")).unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).await.unwrap();
    client.write_all(&body).await.unwrap();
    let answer = until_closed(&mut client).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    server.abort();
}
