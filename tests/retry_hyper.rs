//! RetryAfterLayer over real hyper: a hyper-util client against a loopback hyper server.
#![cfg(feature = "retry")]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};
use tower_llm_limits::body::ReplayBody;
use tower_llm_limits::retry::{AfterSend, RetryAfterLayer, RETRY_COUNT};
use tower_llm_limits::{Error, GiveUpReason};

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(HeaderMap, Bytes)>>>);

/// Serves on 127.0.0.1:0; `answer(n)` makes the response to the n-th request (0-based).
async fn serve(answer: fn(usize) -> Response<Full<Bytes>>) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let handler = service_fn(move |req: Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let bytes = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let n = {
                            let mut log = log.0.lock().unwrap();
                            log.push((parts.headers, bytes));
                            log.len() - 1
                        };
                        Ok::<_, Infallible>(answer(n))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), handler)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, ReplayBody<Full<Bytes>>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn messages_request(addr: SocketAddr, body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/v1/messages"))
        .header("content-type", "application/json")
        .header("x-api-key", "sk-ant-test")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

#[tokio::test]
async fn two_429s_then_200_over_real_hyper_replays_the_same_bytes() {
    let (addr, seen) = serve(|n| {
        let builder = Response::builder();
        if n < 2 {
            builder
                .status(StatusCode::TOO_MANY_REQUESTS)
                .header("retry-after-ms", "150")
                .header("retry-after", "1")
                .header("x-should-retry", "true")
                .body(Full::new(Bytes::from_static(
                    br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
                )))
        } else {
            builder.body(Full::new(Bytes::from_static(b"{\"type\":\"message\"}")))
        }
        .unwrap()
    })
    .await;

    let layer = RetryAfterLayer::anthropic();
    let svc = layer.layer(client());
    let body: &'static [u8] = br#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;
    let started = Instant::now();
    let response = svc.oneshot(messages_request(addr, body)).await.unwrap();
    let elapsed = started.elapsed();

    assert_eq!(response.status(), StatusCode::OK);
    let text = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&text[..], b"{\"type\":\"message\"}");
    assert!(
        // Twice `retry-after-ms` (read before `retry-after`, as the SDKs do).
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );

    let seen = seen.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    for (headers, bytes) in &seen {
        assert_eq!(&bytes[..], body, "the server saw different bytes");
        assert_eq!(
            headers.get("content-length").unwrap(),
            &body.len().to_string()
        );
        assert_eq!(headers.get("x-api-key").unwrap(), "sk-ant-test");
    }
    let counts: Vec<_> = seen
        .iter()
        .map(|(h, _)| h.get(RETRY_COUNT).cloned())
        .collect();
    assert_eq!(
        counts,
        [None, Some("1".parse().unwrap()), Some("2".parse().unwrap())]
    );
    assert_eq!(layer.snapshot().retries, 2);
}

#[tokio::test]
async fn spend_cap_body_is_read_from_a_real_response() {
    let (addr, seen) = serve(|_| {
        Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .body(Full::new(Bytes::from_static(
                br#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your API usage limits.","details":{"error_code":"enforced_spend_limit_reached"}},"request_id":"req_x"}"#,
            )))
            .unwrap()
    })
    .await;
    let svc = RetryAfterLayer::anthropic().layer(client());
    let err = svc
        .oneshot(messages_request(addr, b"{}"))
        .await
        .unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::SpendLimitReached)),
        "{err}"
    );
    assert_eq!(seen.0.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn connection_refused_is_retried_then_reported_with_its_source() {
    // Bind and drop: the port is (almost certainly) closed now.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let layer = RetryAfterLayer::builder()
        .max_retries(2)
        .initial_backoff(Duration::from_millis(10))
        .build();
    let svc = layer.layer(client());
    let err = svc
        .oneshot(messages_request(addr, b"{}"))
        .await
        .unwrap_err();
    match err.downcast_ref::<Error>() {
        Some(Error::RetriesExhausted {
            attempts: 3,
            last_status: None,
            source: Some(_),
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(layer.snapshot().retries, 2);
}

/// hyper-util's connect error cannot be named without depending on hyper-util,
/// but it carries the `io::Error` of the failed connect in its source chain:
/// the classifier finds it there, by type.
#[tokio::test]
async fn a_refused_connection_is_classified_as_a_connection_error() {
    use tower_llm_limits::classify::{Class, Classifier};
    // A port that was just free: bind, note it, close it.
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::get(format!("http://{addr}/"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let err = client.request(req).await.unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    assert_eq!(
        Classifier::new().classify(&err),
        Class::Connection,
        "{err:?}"
    );
    assert!(tower_llm_limits::classify::never_connected(&err), "{err:?}");
}

/// Accepts connections, reads what the client sends, and hangs up without
/// an answer: the server may have done the work. Returns the connections seen.
async fn hang_up_after_reading() -> (SocketAddr, Arc<Mutex<usize>>) {
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            *count.lock().unwrap() += 1;
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
            });
        }
    });
    (addr, seen)
}

/// A request whose connection is cut after it was sent is replayed by
/// default and counted; with `AfterSend::Fail` it is not sent again.
#[tokio::test]
async fn a_connection_cut_after_sending_is_a_counted_replay_or_refused() {
    let (addr, seen) = hang_up_after_reading().await;
    let layer = RetryAfterLayer::builder()
        .max_retries(1)
        .initial_backoff(Duration::from_millis(5))
        .build();
    let err = layer
        .layer(client())
        .oneshot(messages_request(addr, b"{}"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<Error>(),
            Some(Error::RetriesExhausted {
                attempts: 2,
                reason: GiveUpReason::MaxRetries,
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(*seen.lock().unwrap(), 2);
    assert_eq!(layer.snapshot().replays_after_send, 1);

    let (addr, seen) = hang_up_after_reading().await;
    let layer = RetryAfterLayer::builder()
        .after_send(AfterSend::Fail)
        .build();
    let err = layer
        .layer(client())
        .oneshot(messages_request(addr, b"{}"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<Error>(),
            Some(Error::RetriesExhausted {
                attempts: 1,
                reason: GiveUpReason::Sent,
                source: Some(_),
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(*seen.lock().unwrap(), 1);
    let snap = layer.snapshot();
    assert_eq!((snap.replays_after_send, snap.give_ups.sent), (0, 1));
}

/// A refused connection never sent anything: `AfterSend::Fail` still retries it.
#[tokio::test]
async fn a_refused_connection_is_retried_even_when_replays_are_refused() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let layer = RetryAfterLayer::builder()
        .after_send(AfterSend::Fail)
        .max_retries(2)
        .initial_backoff(Duration::from_millis(5))
        .build();
    let err = layer
        .layer(client())
        .oneshot(messages_request(addr, b"{}"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<Error>(),
            Some(Error::RetriesExhausted {
                attempts: 3,
                reason: GiveUpReason::MaxRetries,
                ..
            })
        ),
        "{err:?}"
    );
    let snap = layer.snapshot();
    assert_eq!((snap.retries, snap.replays_after_send), (2, 0));
}
