//! The budget keeps a charge only for a request that may have reached the
//! server: a request cancelled while an inner layer held it, shed by the
//! concurrency queue, refused by an inner layer, or whose connection was
//! refused is refunded in full, whatever the order of the layers. And a
//! burst through the preset waits instead of failing locally.
//!
//! The upstream is a `service_fn` in process, under tokio's paused clock.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_llm_limits::budget::{BudgetMode, BudgetSnapshot, Limits, TokenBudgetLayer};
use tower_llm_limits::concurrency::{ConcurrencyBuilder, ConcurrencyLayer};
use tower_llm_limits::preset::LimitsLayer;
use tower_llm_limits::retry::RetryAfterLayer;
use tower_llm_limits::{BoxError, Dimension, Error};

const LIMITS: Limits = Limits {
    requests_per_minute: Some(60),
    input_tokens_per_minute: Some(1_000_000),
    output_tokens_per_minute: Some(1_000_000),
};

fn request() -> Request<Full<Bytes>> {
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"Hi"}]}"#;
    Request::post("/v1/messages")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request")
}

/// Counts the requests that reach it; answers 200 with a usage after `delay`.
fn upstream<B: Send + 'static>(
    sent: Arc<AtomicU64>,
    delay: Duration,
) -> impl Service<
    Request<B>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |_req: Request<B>| {
        sent.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(delay).await;
            let body = r#"{"type":"message","usage":{"input_tokens":8,"output_tokens":2}}"#;
            Ok::<_, BoxError>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .expect("response"),
            )
        }
    })
}

fn budget() -> TokenBudgetLayer {
    TokenBudgetLayer::anthropic(LIMITS)
}

fn retry() -> RetryAfterLayer {
    RetryAfterLayer::anthropic()
}

/// Requests charged and kept: admitted, less the ones refunded as unsent.
fn kept(snap: &BudgetSnapshot) -> u64 {
    snap.admitted - snap.refunded_unsent
}

/// Requests the budget still counts against the requests-per-minute bucket.
fn requests_used(snap: &BudgetSnapshot) -> f64 {
    snap.keys
        .iter()
        .map(|k| {
            let d = k.dimension(Dimension::Requests);
            d.capacity.unwrap_or(0.0) - d.remaining.unwrap_or(0.0)
        })
        .sum()
}

/// Builds the stack of `budget`, `concurrency` and `retry` in every order
/// (outermost first) over an upstream counting into `sent` and answering
/// after `delay`, and runs `$scenario(service, label)` on each.
macro_rules! each_order {
    ($budget:expr, $concurrency:expr, $sent:expr, $delay:expr, $scenario:expr) => {{
        macro_rules! run {
            ($label:expr, $a:expr, $b:expr, $c:expr) => {{
                let (budget, concurrency, sent) = ($budget, $concurrency, $sent);
                let svc = ServiceBuilder::new()
                    .layer($a(&budget, &concurrency))
                    .layer($b(&budget, &concurrency))
                    .layer($c(&budget, &concurrency))
                    .service(upstream(Arc::clone(&sent), $delay));
                $scenario(svc, $label, budget, concurrency, sent).await;
            }};
        }
        let b = |b: &TokenBudgetLayer, _: &ConcurrencyLayer| b.clone();
        let c = |_: &TokenBudgetLayer, c: &ConcurrencyLayer| c.clone();
        let r = |_: &TokenBudgetLayer, _: &ConcurrencyLayer| retry();
        run!("budget, concurrency, retry", b, c, r);
        run!("budget, retry, concurrency", b, r, c);
        run!("concurrency, budget, retry", c, b, r);
        run!("concurrency, retry, budget", c, r, b);
        run!("retry, budget, concurrency", r, b, c);
        run!("retry, concurrency, budget", r, c, b);
    }};
}

/// Fixed concurrency 1 and a slow upstream: 20 requests at once, all
/// cancelled after 100 ms. One was sent; the 19 others were waiting in the
/// concurrency queue (or in the budget) and must not stay charged.
#[tokio::test(start_paused = true)]
async fn requests_cancelled_while_queued_are_refunded_in_every_order() {
    async fn scenario<S, RB>(
        svc: S,
        label: &str,
        budget: TokenBudgetLayer,
        concurrency: ConcurrencyLayer,
        sent: Arc<AtomicU64>,
    ) where
        S: Service<Request<Full<Bytes>>, Response = Response<RB>> + Clone,
        S::Error: Into<BoxError>,
    {
        let calls: Vec<_> = (0..20).map(|_| svc.clone().oneshot(request())).collect();
        let all = futures_util::future::join_all(calls);
        let timed_out = tokio::time::timeout(Duration::from_millis(100), all).await;
        assert!(timed_out.is_err(), "{label}: the upstream answers in 10 s");
        // Every caller gave up (the futures were dropped with the timeout).
        let snap = budget.snapshot();
        let sent = sent.load(Ordering::SeqCst);
        assert_eq!(sent, 1, "{label}");
        assert_eq!(kept(&snap), sent, "{label}: {snap:?}");
        let used = requests_used(&snap);
        assert!(
            used < sent as f64 + 0.5,
            "{label}: {used} charged, {sent} sent"
        );
        let c = concurrency.snapshot();
        assert_eq!((c.in_flight, c.waiting.total()), (0, 0), "{label}");
    }
    each_order!(
        budget(),
        ConcurrencyLayer::fixed(1),
        Arc::new(AtomicU64::new(0)),
        Duration::from_secs(10),
        scenario
    );
}

/// Fixed concurrency 1 with `max_waiting` 4: of 20 requests at once, 15 are
/// shed with `Overloaded`, which is neither retried nor charged.
#[tokio::test(start_paused = true)]
async fn shed_requests_are_refunded_and_not_retried_in_every_order() {
    async fn scenario<S, RB>(
        svc: S,
        label: &str,
        budget: TokenBudgetLayer,
        concurrency: ConcurrencyLayer,
        sent: Arc<AtomicU64>,
    ) where
        S: Service<Request<Full<Bytes>>, Response = Response<RB>> + Clone,
        S::Error: Into<BoxError>,
        RB: http_body::Body,
        RB::Error: Into<BoxError>,
    {
        let calls = (0..20).map(|_| {
            let svc = svc.clone();
            async move {
                let response = svc.oneshot(request()).await.map_err(Into::into)?;
                response.into_body().collect().await.map_err(Into::into)?;
                Ok::<_, BoxError>(())
            }
        });
        let results = futures_util::future::join_all(calls).await;
        let mut shed = 0;
        for result in results {
            if let Err(e) = result {
                match e.downcast_ref::<Error>() {
                    Some(Error::Overloaded { .. }) => shed += 1,
                    other => panic!("{label}: {other:?} ({e})"),
                }
            }
        }
        let sent = sent.load(Ordering::SeqCst);
        assert_eq!((sent, shed), (5, 15), "{label}");
        let snap = budget.snapshot();
        assert_eq!(kept(&snap), sent, "{label}: {snap:?}");
        let c = concurrency.snapshot();
        assert_eq!((c.in_flight, c.waiting.total()), (0, 0), "{label}");
    }
    let concurrency = || {
        ConcurrencyBuilder::fixed(1)
            .max_waiting(4)
            .build()
            .expect("settings")
    };
    each_order!(
        budget(),
        concurrency(),
        Arc::new(AtomicU64::new(0)),
        Duration::from_secs(1),
        scenario
    );
}

/// An inner budget that refuses (reject mode): the outer budget refunds the
/// refused requests in full, and keeps the one the inner budget sent.
#[tokio::test(start_paused = true)]
async fn a_refusal_by_an_inner_budget_is_refunded_by_the_outer_one() {
    let outer = budget();
    let inner = TokenBudgetLayer::builder()
        .limits(Limits {
            requests_per_minute: Some(1),
            ..LIMITS
        })
        .mode(BudgetMode::Reject)
        .build();
    let sent = Arc::new(AtomicU64::new(0));
    let svc = ServiceBuilder::new()
        .layer(outer.clone())
        .layer(inner.clone())
        .service(upstream(Arc::clone(&sent), Duration::ZERO));
    let first = svc.clone().oneshot(request()).await.expect("admitted");
    first.into_body().collect().await.expect("body");
    for _ in 0..2 {
        let err = svc.clone().oneshot(request()).await.expect_err("refused");
        assert!(
            matches!(
                err.downcast_ref::<Error>(),
                Some(Error::BudgetExceeded { .. })
            ),
            "{err}"
        );
    }
    assert_eq!(sent.load(Ordering::SeqCst), 1);
    let snap = outer.snapshot();
    assert_eq!((snap.admitted, snap.refunded_unsent), (3, 2), "{snap:?}");
    assert!(requests_used(&snap) < 1.5, "{snap:?}");
}

/// A transport that fails with `ConnectionRefused` sent nothing: refunded.
/// One that fails with `ConnectionReset` may have sent the request: kept.
#[tokio::test(start_paused = true)]
async fn a_refused_connection_is_refunded_and_a_reset_is_not() {
    for (kind, refunded) in [
        (std::io::ErrorKind::ConnectionRefused, 1),
        (std::io::ErrorKind::ConnectionReset, 0),
    ] {
        let layer = budget();
        // Wrapped, as a client wraps the socket's error in its own.
        let transport = tower::service_fn(move |_req: Request<_>| async move {
            let wrapped = std::io::Error::other(std::io::Error::from(kind));
            Err::<Response<Full<Bytes>>, BoxError>(Box::new(wrapped))
        });
        let svc = layer.layer(transport);
        let err = svc.oneshot(request()).await.expect_err("transport error");
        let snap = layer.snapshot();
        assert_eq!(snap.refunded_unsent, refunded, "{kind:?}: {err}");
        assert_eq!(snap.admitted, 1);
    }
}

/// 50,000 requests at once through the preset, with limits that admit them
/// all at once and a fast upstream: every one ends ok (the concurrency queue
/// makes them wait; nothing fails locally), and the budget keeps exactly one
/// charge per request sent.
#[tokio::test(start_paused = true)]
async fn a_burst_of_50k_through_the_preset_ends_ok() {
    const N: usize = 50_000;
    let wide = Limits {
        requests_per_minute: Some(10_000_000),
        input_tokens_per_minute: Some(1_000_000_000),
        output_tokens_per_minute: Some(1_000_000_000),
    };
    let limits = LimitsLayer::anthropic(wide);
    let sent = Arc::new(AtomicU64::new(0));
    let svc = ServiceBuilder::new()
        .layer(limits.clone())
        .service(upstream(Arc::clone(&sent), Duration::from_millis(20)));
    let mut tasks = Vec::with_capacity(N);
    for _ in 0..N {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let response = svc.oneshot(request()).await?;
            response.into_body().collect().await?;
            Ok::<_, BoxError>(())
        }));
    }
    let mut failed = Vec::new();
    for task in tasks {
        if let Err(e) = task.await.expect("task") {
            failed.push(e.to_string());
        }
    }
    failed.truncate(5);
    assert!(failed.is_empty(), "{failed:?}");
    let sent = sent.load(Ordering::SeqCst);
    assert_eq!(sent, N as u64);
    assert_eq!(kept(&limits.budget().snapshot()), sent);
    let retry = limits.retry().snapshot();
    assert_eq!((retry.retries, retry.give_ups.total()), (0, 0));
    let c = limits.concurrency().snapshot();
    assert_eq!((c.in_flight, c.waiting.total()), (0, 0));
}

/// A request that waits out the retry layer's shared cooldown (inside the
/// budget) and is cancelled there was never sent: refunded.
#[tokio::test(start_paused = true)]
async fn a_request_cancelled_in_the_retry_cooldown_is_refunded() {
    let layer = budget();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&sent);
    let transport = tower::service_fn(move |_req: Request<_>| {
        let first = counter.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            let mut response = Response::new(Full::new(Bytes::from_static(
                br#"{"type":"message","usage":{"input_tokens":8,"output_tokens":2}}"#,
            )));
            if first {
                *response.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
                response
                    .headers_mut()
                    .insert("retry-after", http::HeaderValue::from_static("5"));
            }
            Ok::<_, BoxError>(response)
        }
    });
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .layer(retry())
        .service(transport);
    let first = tokio::spawn(svc.clone().oneshot(request()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(sent.load(Ordering::SeqCst), 1, "the 429 came back");
    let waited = tokio::time::timeout(Duration::from_secs(1), svc.oneshot(request())).await;
    assert!(waited.is_err(), "the second request waits out the cooldown");
    let response = first.await.expect("task").expect("retried after 5 s");
    response.into_body().collect().await.expect("body");
    assert_eq!(sent.load(Ordering::SeqCst), 2);
    let snap = layer.snapshot();
    assert_eq!((snap.admitted, snap.refunded_unsent), (2, 1), "{snap:?}");
}

/// A request whose body an outer layer read is admitted by the budget in
/// its `call` and handed on there: dropped without ever being polled, it
/// is refunded if it was still waiting in the concurrency queue, and kept
/// if it had been handed to the transport.
#[tokio::test(start_paused = true)]
async fn requests_admitted_in_call_and_dropped_unpolled_are_refunded_unless_sent() {
    let budget = budget();
    let concurrency = ConcurrencyLayer::fixed(1);
    let sent = Arc::new(AtomicU64::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(budget.clone())
        .layer(concurrency.clone())
        .service(upstream(Arc::clone(&sent), Duration::from_secs(10)));
    let mut futures = Vec::new();
    for _ in 0..3 {
        let mut req = request();
        let bytes = req.body().clone().collect().await.expect("body").to_bytes();
        req.extensions_mut()
            .insert(tower_llm_limits::body::BufferedBytes(bytes));
        ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
            .await
            .expect("ready");
        futures.push(svc.call(req));
    }
    // Admitted in `call`: one went to the transport, two wait for its slot.
    let snap = budget.snapshot();
    assert_eq!((snap.admitted, sent.load(Ordering::SeqCst)), (3, 1));
    assert_eq!(concurrency.snapshot().waiting.total(), 2);
    drop(futures);
    let snap = budget.snapshot();
    assert_eq!(kept(&snap), 1, "{snap:?}");
    assert!(requests_used(&snap) < 1.5, "{snap:?}");
    let c = concurrency.snapshot();
    assert_eq!((c.in_flight, c.waiting.total()), (0, 0));
}
