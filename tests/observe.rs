//! Observing the layers: the `on_*` callbacks, the serialized snapshots,
//! and (with the `metrics` feature) the metrics recorded through the
//! `metrics` facade.
//!
//! Under tokio's paused clock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::sync::Notify;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_llm_limits::budget::{BudgetMode, Limits, TokenBudgetLayer};
use tower_llm_limits::concurrency::ConcurrencyBuilder;
use tower_llm_limits::observe::{LayerKind, RetryCause};
use tower_llm_limits::retry::RetryAfterLayer;
use tower_llm_limits::{BoxError, Error};

const ONE_A_MINUTE: Limits = Limits::new().rpm(1).itpm(100_000).otpm(100_000);
const ANSWER: &str = r#"{"type":"message","usage":{"input_tokens":7,"output_tokens":3}}"#;

fn request() -> Request<Full<Bytes>> {
    Request::post("http://127.0.0.1:9/v1/messages")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"Hi"}]}"#,
        )))
        .expect("request")
}

fn ok(_req: Request<impl Send>) -> std::future::Ready<Result<Response<Full<Bytes>>, BoxError>> {
    std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(
        ANSWER.as_bytes(),
    )))))
}

/// What a callback saw.
type Seen<T> = Arc<Mutex<Vec<T>>>;

/// Collects what a callback saw: the reader, and the callback's copy.
fn log<T: Send + 'static>() -> (Seen<T>, Seen<T>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    (seen.clone(), seen)
}

#[tokio::test(start_paused = true)]
async fn on_retry_sees_each_retry() {
    let (seen, sink) = log();
    let layer = RetryAfterLayer::builder()
        .jitter(|| 0.5)
        .on_retry(move |e| {
            sink.lock().expect("lock").push((
                e.attempt,
                e.status.map(|s| s.as_u16()),
                e.delay,
                e.cause,
            ))
        })
        .build();
    let mut calls = 0;
    let api = service_fn(move |_req: Request<_>| {
        calls += 1;
        let status = if calls < 3 { 503 } else { 200 };
        std::future::ready(Ok::<_, BoxError>(
            Response::builder()
                .status(status)
                .body(Full::new(Bytes::new()))
                .expect("response"),
        ))
    });
    let response = layer.layer(api).oneshot(request()).await.expect("response");
    assert_eq!(response.status(), 200);
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen,
        [
            (
                2,
                Some(503),
                Duration::from_millis(250),
                RetryCause::Backoff
            ),
            (
                3,
                Some(503),
                Duration::from_millis(500),
                RetryCause::Backoff
            ),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn the_budget_reports_waits_and_settlements() {
    let (waits, wait_sink) = log();
    let (settled, settle_sink) = log();
    let layer = TokenBudgetLayer::builder()
        .limits(ONE_A_MINUTE)
        .on_wait(move |e| {
            wait_sink
                .lock()
                .expect("lock")
                .push((e.layer, e.waited, e.deadline_reached))
        })
        .on_settle(move |e| settle_sink.lock().expect("lock").push(*e))
        .build();
    let svc = layer.layer(service_fn(ok));
    for _ in 0..2 {
        let response = svc.clone().oneshot(request()).await.expect("response");
        let _ = response.into_body().collect().await.expect("body");
    }
    // The second request waited a minute for the one request a minute.
    let waits = waits.lock().expect("lock").clone();
    assert_eq!(waits.len(), 1, "{waits:?}");
    let (kind, waited, reached) = waits[0];
    assert_eq!((kind, reached), (LayerKind::Budget, false));
    assert!(
        waited > Duration::from_secs(55) && waited <= Duration::from_secs(60),
        "{waited:?}"
    );
    let settled = settled.lock().expect("lock").clone();
    assert_eq!(settled.len(), 2);
    for s in settled {
        assert!(s.usage_known);
        assert_eq!((s.input_tokens, s.output_tokens), (7, 3));
        assert!(s.reserved_input_tokens > 0 && s.reserved_output_tokens > 0);
    }
}

#[tokio::test(start_paused = true)]
async fn the_budget_reports_rejections() {
    let (seen, sink) = log();
    let layer = TokenBudgetLayer::builder()
        .limits(ONE_A_MINUTE)
        .mode(BudgetMode::Reject)
        .on_reject(move |e| {
            let retry_in = e.error.retry_in();
            sink.lock().expect("lock").push((e.layer, retry_in))
        })
        .build();
    let svc = layer.layer(service_fn(ok));
    let first = svc.clone().oneshot(request()).await.expect("admitted");
    drop(first);
    let err = svc.oneshot(request()).await.expect_err("rejected");
    assert!(matches!(
        err.downcast_ref::<Error>(),
        Some(Error::BudgetExceeded { .. })
    ));
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, LayerKind::Budget);
    assert!(seen[0].1.is_some_and(|d| d > Duration::from_secs(50)));
}

#[tokio::test(start_paused = true)]
async fn the_concurrency_layer_reports_queueing_and_shedding() {
    let (waits, wait_sink) = log();
    let (sheds, shed_sink) = log();
    let layer = ConcurrencyBuilder::fixed(1)
        .max_waiting(1)
        .on_wait(move |e| wait_sink.lock().expect("lock").push((e.layer, e.waited)))
        .on_reject(move |e| {
            let waiting = match e.error {
                Error::Overloaded { waiting } => *waiting,
                _ => usize::MAX,
            };
            shed_sink.lock().expect("lock").push((e.layer, waiting))
        })
        .build()
        .expect("settings");
    let release = Arc::new(Notify::new());
    let gate = release.clone();
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        let gate = gate.clone();
        async move {
            gate.notified().await;
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::new())))
        }
    });
    let mut svc = layer.layer(api);
    let first = svc.ready().await.expect("ready").call(request());
    let second = svc.ready().await.expect("ready").call(request());
    let third = svc.ready().await.expect("ready").call(request());
    let err = third.await.expect_err("shed");
    assert!(matches!(
        err.downcast_ref::<Error>(),
        Some(Error::Overloaded { .. })
    ));
    assert_eq!(
        sheds.lock().expect("lock").clone(),
        [(LayerKind::Concurrency, 1)]
    );
    let second = tokio::spawn(second);
    let first = tokio::spawn(first);
    tokio::time::sleep(Duration::from_secs(2)).await;
    release.notify_one();
    let response = first.await.expect("task").expect("first");
    drop(response);
    tokio::time::sleep(Duration::from_millis(10)).await;
    release.notify_one();
    second.await.expect("task").expect("second");
    let waits = waits.lock().expect("lock").clone();
    assert_eq!(waits.len(), 1, "{waits:?}");
    assert_eq!(waits[0].0, LayerKind::Concurrency);
    assert!(waits[0].1 >= Duration::from_secs(2), "{waits:?}");
}

#[tokio::test(start_paused = true)]
async fn snapshots_serialize() {
    let retry = RetryAfterLayer::anthropic();
    let budget = TokenBudgetLayer::anthropic(ONE_A_MINUTE);
    let concurrency = ConcurrencyBuilder::fixed(4).build().expect("settings");
    let response = budget
        .layer(service_fn(ok))
        .oneshot(request())
        .await
        .expect("response");
    let _ = response.into_body().collect().await.expect("body");

    let r = serde_json::to_value(retry.snapshot()).expect("retry snapshot");
    assert_eq!(r["retries"], 0);
    assert_eq!(r["give_ups"]["max_retries"], 0);
    let b = serde_json::to_value(budget.snapshot()).expect("budget snapshot");
    assert_eq!(b["admitted"], 1);
    assert_eq!(b["keys"][0]["dimensions"][0]["dimension"], "requests");
    assert_eq!(b["keys"][0]["dimensions"][0]["limit"], 1);
    let c = serde_json::to_value(concurrency.snapshot()).expect("concurrency snapshot");
    assert_eq!(c["limit"], 4);
    assert_eq!(c["waiting"]["interactive"], 0);
}

/// A wait cut by the request's deadline is reported as such.
#[tokio::test(start_paused = true)]
async fn a_wait_cut_by_the_deadline_is_reported() {
    let (waits, sink) = log();
    let budget = TokenBudgetLayer::builder()
        .limits(ONE_A_MINUTE)
        .on_wait(move |e| {
            sink.lock()
                .expect("lock")
                .push((e.layer, e.waited, e.deadline_reached))
        })
        .build();
    let retry = RetryAfterLayer::builder()
        .deadline(Duration::from_secs(5))
        .build();
    let first = budget
        .layer(service_fn(ok))
        .oneshot(request())
        .await
        .expect("admitted");
    drop(first);
    let err = retry
        .layer(budget.layer(service_fn(ok)))
        .oneshot(request())
        .await
        .expect_err("deadline");
    assert!(matches!(
        err.downcast_ref::<Error>(),
        Some(Error::RetriesExhausted {
            reason: tower_llm_limits::GiveUpReason::Deadline,
            ..
        })
    ));
    assert_eq!(
        waits.lock().expect("lock").clone(),
        [(LayerKind::Budget, Duration::from_secs(5), true)]
    );
}
