//! What the caller gets when the crate gives up: the time it reports having
//! waited, the whole-request deadline, and the last response (as it came,
//! or inside the error).
//!
//! Under tokio's paused clock: minutes of waiting take milliseconds.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};
use tower_llm_limits::budget::Limits;
use tower_llm_limits::preset::LimitsLayer;
use tower_llm_limits::retry::RetryAfterLayer;
use tower_llm_limits::{BoxError, Error, GiveUpReason};

/// Two requests a minute: once two were sent, the next waits about 30 s.
const LIMITS: Limits = Limits::new().rpm(2).itpm(1_000_000).otpm(1_000_000);

fn request() -> Request<Full<Bytes>> {
    Request::post("http://127.0.0.1:9/v1/messages")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"Hi"}]}"#,
        )))
        .expect("request")
}

/// Spends the budget's requests of this minute through a transport that answers.
async fn drain(limits: &LimitsLayer, n: usize) {
    let ok = service_fn(|_req: Request<_>| async {
        let body = r#"{"type":"message","usage":{"input_tokens":5,"output_tokens":1}}"#;
        Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(body))))
    });
    let svc = limits.layer(ok);
    for _ in 0..n {
        let response = svc.clone().oneshot(request()).await.expect("drained");
        drop(response);
    }
}

/// A transport whose every connection is refused at once.
macro_rules! refusing {
    () => {
        service_fn(|_req: Request<_>| async {
            Err::<Response<Full<Bytes>>, BoxError>(Box::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )))
        })
    };
}

fn exhausted(err: &BoxError) -> (u32, Duration, GiveUpReason) {
    match err.downcast_ref::<Error>() {
        Some(Error::RetriesExhausted {
            attempts,
            waited,
            reason,
            ..
        }) => (*attempts, *waited, *reason),
        other => panic!("expected RetriesExhausted, got {other:?} ({err})"),
    }
}

/// A request refused on every attempt behind a budget that makes it wait:
/// the time it reports having waited is the time it took (the transport
/// answers at once, so all of it was waiting), the budget's wait included.
#[tokio::test(start_paused = true)]
async fn waited_counts_the_budget_wait() {
    let limits = LimitsLayer::anthropic(LIMITS);
    drain(&limits, 2).await;
    let start = Instant::now();
    let err = limits
        .layer(refusing!())
        .oneshot(request())
        .await
        .expect_err("refused every time");
    let took = start.elapsed();
    let (attempts, waited, reason) = exhausted(&err);
    assert_eq!(reason, GiveUpReason::MaxRetries);
    assert_eq!(attempts, 5);
    assert!(took >= Duration::from_secs(20), "took {took:?}");
    assert!(
        waited + Duration::from_millis(5) >= took && waited <= took,
        "waited {waited:?}, took {took:?}"
    );
}

/// The deadline bounds the whole request, the budget's wait included: a
/// request that would wait 30 s for the budget fails at its 5 s deadline.
#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_the_budget_wait() {
    let retry = RetryAfterLayer::builder()
        .deadline(Duration::from_secs(5))
        .build();
    let limits = LimitsLayer::anthropic(LIMITS).with_retry(retry);
    drain(&limits, 2).await;
    let start = Instant::now();
    let err = limits
        .layer(refusing!())
        .oneshot(request())
        .await
        .expect_err("deadline");
    let took = start.elapsed();
    let (_, waited, reason) = exhausted(&err);
    assert_eq!(reason, GiveUpReason::Deadline);
    assert!(took <= Duration::from_secs(5), "took {took:?}");
    assert!(waited >= Duration::from_millis(4_990), "waited {waited:?}");
    // The request gave its place in line back and holds nothing.
    let snap = limits.budget().snapshot();
    assert!(snap.keys.iter().all(|k| k.waiting == 0), "{snap:?}");
}
