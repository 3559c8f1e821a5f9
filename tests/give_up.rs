//! What the caller gets when the crate gives up: the time it reports having
//! waited, the whole-request deadline, and the last response (as it came,
//! or inside the error).
//!
//! Under tokio's paused clock: minutes of waiting take milliseconds.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};
use tower_llm_limits::budget::Limits;
use tower_llm_limits::preset::LimitsLayer;
use tower_llm_limits::retry::{GiveUpPolicy, RetryAfterLayer};
use tower_llm_limits::{BoxError, Error, GiveUpReason, LastResponse};

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

const OVERLOADED: &str = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_011"}"#;

/// An API that is overloaded on every attempt: a 529 with its `request-id`,
/// a cookie that must not be printed, and the API's error body.
macro_rules! overloaded {
    ($body:expr) => {
        service_fn(|_req: Request<_>| async {
            let response = Response::builder()
                .status(529)
                .header("request-id", "req_011")
                .header("set-cookie", "session=do-not-print")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from($body)))
                .expect("response");
            Ok::<_, BoxError>(response)
        })
    };
}

fn retry(policy: GiveUpPolicy) -> RetryAfterLayer {
    RetryAfterLayer::builder()
        .max_retries(2)
        .give_up(policy)
        .build()
}

/// The default: an error that keeps what the server said, as the SDKs do.
#[tokio::test(start_paused = true)]
async fn the_give_up_error_carries_the_last_response() {
    let layer = retry(GiveUpPolicy::Error);
    let err = layer
        .layer(overloaded!(OVERLOADED))
        .oneshot(request())
        .await
        .expect_err("overloaded every time");
    let e = err.downcast_ref::<Error>().expect("crate error");
    let last = e.last_response().expect("the last response");
    assert_eq!(last.status().as_u16(), 529);
    assert_eq!(last.request_id(), Some("req_011"));
    assert_eq!(last.headers()["content-type"], "application/json");
    assert_eq!(last.body().as_ref(), OVERLOADED.as_bytes());
    assert!(last.body_complete());
    assert!(e.to_string().contains("request-id req_011"), "{e}");
    // Debug prints header names, never their values.
    let debug = format!("{e:?}");
    assert!(
        debug.contains("req_011") && debug.contains("set-cookie"),
        "{debug}"
    );
    assert!(!debug.contains("do-not-print"), "{debug}");
    assert_eq!(layer.snapshot().give_ups.max_retries, 1);
}

/// A body above the limit is cut there and not marked complete.
#[tokio::test(start_paused = true)]
async fn the_kept_body_is_bounded() {
    let big = "x".repeat(LastResponse::BODY_LIMIT + 10);
    let layer = retry(GiveUpPolicy::Error);
    let err = layer
        .layer(overloaded!(big.clone()))
        .oneshot(request())
        .await
        .expect_err("overloaded every time");
    let last = err
        .downcast_ref::<Error>()
        .and_then(Error::last_response)
        .expect("the last response");
    assert_eq!(last.body().len(), LastResponse::BODY_LIMIT);
    assert!(!last.body_complete());
}

/// For a gateway: the last response as it came, headers and body untouched.
#[tokio::test(start_paused = true)]
async fn the_last_response_as_it_came() {
    let layer = retry(GiveUpPolicy::LastResponse);
    let response = layer
        .layer(overloaded!(OVERLOADED))
        .oneshot(request())
        .await
        .expect("the last response, not an error");
    assert_eq!(response.status().as_u16(), 529);
    assert_eq!(response.headers()["request-id"], "req_011");
    assert_eq!(response.headers()["set-cookie"], "session=do-not-print");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body.as_ref(), OVERLOADED.as_bytes());
    let snap = layer.snapshot();
    assert_eq!((snap.retries, snap.give_ups.max_retries), (2, 1));
}

/// A delay above the cap: the 429 that named it, returned as it came.
#[tokio::test(start_paused = true)]
async fn a_delay_above_the_cap_returns_the_response_under_last_response() {
    let layer = retry(GiveUpPolicy::LastResponse);
    let api = service_fn(|_req: Request<_>| async {
        let response = Response::builder()
            .status(429)
            .header("retry-after", "600")
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("response");
        Ok::<_, BoxError>(response)
    });
    let start = Instant::now();
    let response = layer.layer(api).oneshot(request()).await.expect("response");
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(response.headers()["retry-after"], "600");
    assert_eq!(layer.snapshot().retry_after_too_long, 1);
}

/// The spend-cap 429 is still never retried under `LastResponse`.
#[tokio::test(start_paused = true)]
async fn the_spend_cap_still_fails_under_last_response() {
    let layer = retry(GiveUpPolicy::LastResponse);
    let api = service_fn(|_req: Request<_>| async {
        let body = r#"{"type":"error","error":{"type":"rate_limit_error","message":"limit","details":{"error_code":"enforced_spend_limit_reached"}}}"#;
        let response = Response::builder()
            .status(429)
            .body(Full::new(Bytes::from(body)))
            .expect("response");
        Ok::<_, BoxError>(response)
    });
    let err = layer
        .layer(api)
        .oneshot(request())
        .await
        .expect_err("spend cap");
    assert!(matches!(
        err.downcast_ref::<Error>(),
        Some(Error::SpendLimitReached)
    ));
    assert_eq!(layer.snapshot().retries, 0);
}

/// The deadline also bounds the wait for a concurrency slot: a request
/// queued behind one that holds the only slot fails at its deadline, gives
/// back its place, and reports the time it queued as waited.
#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_the_concurrency_queue() {
    use tower::Service;
    use tower_llm_limits::concurrency::ConcurrencyBuilder;

    let concurrency = ConcurrencyBuilder::fixed(1).build().expect("settings");
    let retry = RetryAfterLayer::builder()
        .deadline(Duration::from_secs(3))
        .build();
    macro_rules! slow {
        () => {
            service_fn(|_req: Request<_>| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<_, BoxError>(Response::new(Full::new(Bytes::new())))
            })
        };
    }
    let mut holder = concurrency.layer(slow!());
    let held = tokio::spawn(holder.ready().await.expect("ready").call(request()));
    tokio::task::yield_now().await;
    assert_eq!(concurrency.snapshot().in_flight, 1);

    let start = Instant::now();
    let err = retry
        .layer(concurrency.layer(slow!()))
        .oneshot(request())
        .await
        .expect_err("deadline");
    let (attempts, waited, reason) = exhausted(&err);
    assert_eq!((attempts, reason), (1, GiveUpReason::Deadline));
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(waited, Duration::from_secs(3));
    assert_eq!(concurrency.snapshot().waiting.total(), 0);
    held.abort();
}
