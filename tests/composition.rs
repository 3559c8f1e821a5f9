//! The layers with the rest of the tower ecosystem: in `ServiceBuilder` with
//! tower's `Timeout`, tower-http's `Trace` and `BoxCloneService`; each layer
//! alone; the three in other orders (no deadlock); and on an axum server
//! through `Router::layer`.
//!
//! The upstream is the emulator crate in process, under tokio's paused
//! clock, so minutes of rate-limited traffic take milliseconds.

mod support;

use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::response::IntoResponse;
use axum::routing::post;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_http::trace::TraceLayer;
use tower_llm_limits::budget::{Callers, Limits, TokenBudgetLayer};
use tower_llm_limits::concurrency::ConcurrencyLayer;
use tower_llm_limits::preset::LimitsLayer;
use tower_llm_limits::retry::RetryAfterLayer;
use tower_llm_limits::BoxError;
use tower_llm_limits_emulator::{Emulator, Latency};

use support::rate_limited;

const LIMITS: Limits = Limits {
    requests_per_minute: Some(20),
    input_tokens_per_minute: Some(4_000),
    output_tokens_per_minute: Some(2_000),
};

fn emulator() -> Emulator {
    Emulator::builder()
        .limits(LIMITS)
        .latency(Latency::default())
        .seed(5)
        .build()
        .expect("emulator settings")
}

/// A request of about 300 input tokens (three times the RPM limit's worth of
/// them exceed a minute's ITPM), streamed every third time.
fn request(i: usize) -> Request<Full<Bytes>> {
    let words = "pace the tokens per minute, ".repeat(40);
    let body = format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":50,"stream":{},"messages":[{{"role":"user","content":"{i}: {words}"}}]}}"#,
        i % 3 == 0
    );
    Request::post("/v1/messages")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request")
}

/// Sends `n` requests at once through `svc` and reads every answer to its
/// end. Returns (successes, other outcomes), and panics if the whole batch
/// does not finish within 30 virtual minutes (a deadlock).
async fn run<S, B>(svc: S, n: usize) -> (usize, usize)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut tasks = Vec::new();
    for i in 0..n {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let result = svc.oneshot(request(i)).await.map_err(Into::into);
            match result {
                Ok(resp) => {
                    let ok = resp.status() == StatusCode::OK;
                    let body = resp.into_body().collect().await.map_err(Into::into);
                    ok && body.is_ok()
                }
                Err(_) => false,
            }
        }));
    }
    let all = async {
        let mut ok = 0;
        for t in tasks {
            if t.await.expect("task") {
                ok += 1;
            }
        }
        ok
    };
    let ok = tokio::time::timeout(Duration::from_secs(30 * 60), all)
        .await
        .expect("the batch finished (no deadlock)");
    (ok, n - ok)
}

#[tokio::test(start_paused = true)]
async fn preset_in_service_builder_with_timeout_trace_and_box_clone_service() {
    let emu = emulator();
    let limits = LimitsLayer::anthropic(LIMITS);
    let svc = ServiceBuilder::new()
        .layer(BoxCloneService::layer())
        .layer(TraceLayer::new_for_http())
        .timeout(Duration::from_secs(600))
        .layer(limits.clone())
        .service(emu.service());
    let (ok, failed) = run(svc, 60).await;
    assert_eq!((ok, failed), (60, 0));
    // Paced: the emulator never had to refuse one.
    assert_eq!(rate_limited(&emu), 0);
    assert_eq!(limits.concurrency().snapshot().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn timeout_inside_the_stack_fails_attempts_retries_and_frees_slots() {
    // Plain answers come after ~600 ms to the first token plus the output; a
    // 100 ms timeout under the stack fails each of their attempts, the retry
    // layer retries twice, then gives up. A streamed answer's head (with
    // `message_start`) comes at once, so the timeout, which covers the head
    // only, lets it through: requests 0 and 3 of the batch stream.
    let emu = emulator();
    let retry = RetryAfterLayer::builder().max_retries(2).build();
    let concurrency = ConcurrencyLayer::fixed(4);
    let svc = ServiceBuilder::new()
        .layer(retry.clone())
        .layer(TokenBudgetLayer::anthropic(LIMITS))
        .layer(concurrency.clone())
        .timeout(Duration::from_millis(100))
        .service(emu.service());
    let (ok, failed) = run(svc, 5).await;
    assert_eq!((ok, failed), (2, 3));
    let snap = retry.snapshot();
    assert_eq!(snap.retries, 6, "{snap:?}");
    assert_eq!(snap.give_ups.max_retries, 3, "{snap:?}");
    assert_eq!(concurrency.snapshot().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn retry_layer_alone_absorbs_the_429s() {
    let emu = emulator();
    let svc = ServiceBuilder::new()
        .layer(
            RetryAfterLayer::builder()
                .max_retries(20)
                .max_server_delay(Duration::from_secs(120))
                .without_budget()
                .build(),
        )
        .service(emu.service());
    let (ok, failed) = run(svc, 40).await;
    assert_eq!((ok, failed), (40, 0));
    assert!(
        rate_limited(&emu) > 0,
        "unpaced, so the emulator refused some"
    );
}

#[tokio::test(start_paused = true)]
async fn budget_layer_alone_paces_without_429s() {
    let emu = emulator();
    let svc = ServiceBuilder::new()
        .layer(TokenBudgetLayer::anthropic(LIMITS))
        .service(emu.service());
    let (ok, failed) = run(svc, 40).await;
    assert_eq!((ok, failed), (40, 0));
    assert_eq!(rate_limited(&emu), 0);
}

#[tokio::test(start_paused = true)]
async fn concurrency_layer_alone_caps_in_flight() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let emu = Emulator::new(Limits::new().rpm(10_000).itpm(10_000_000).otpm(10_000_000));
    // Counts calls whose response head has not come back yet, and the most
    // at once.
    let now = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let counted = {
        let (now, most) = (now.clone(), most.clone());
        tower::service_fn(move |req: Request<_>| {
            let (now, most) = (now.clone(), most.clone());
            let call = emu.service().oneshot(req);
            async move {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(n, Ordering::SeqCst);
                let out = call.await;
                now.fetch_sub(1, Ordering::SeqCst);
                out
            }
        })
    };
    let layer = ConcurrencyLayer::fixed(3);
    let svc = ServiceBuilder::new().layer(layer.clone()).service(counted);
    let (ok, failed) = run(svc, 30).await;
    assert_eq!((ok, failed), (30, 0));
    assert_eq!(most.load(Ordering::SeqCst), 3);
    let snap = layer.snapshot();
    assert_eq!((snap.in_flight, snap.limit), (0, 3));
}

#[tokio::test(start_paused = true)]
async fn other_orders_finish_without_deadlock() {
    fn retry() -> RetryAfterLayer {
        RetryAfterLayer::builder()
            .max_retries(10)
            .max_server_delay(Duration::from_secs(120))
            .build()
    }
    let budget = || TokenBudgetLayer::anthropic(LIMITS);
    let conc = || ConcurrencyLayer::adaptive(1..=16);

    // Concurrency -> Budget -> Retry.
    let emu = emulator();
    let svc = ServiceBuilder::new()
        .layer(conc())
        .layer(budget())
        .layer(retry())
        .service(emu.service());
    assert_eq!(run(svc, 30).await, (30, 0));

    // Budget -> Retry -> Concurrency.
    let emu = emulator();
    let svc = ServiceBuilder::new()
        .layer(budget())
        .layer(retry())
        .layer(conc())
        .service(emu.service());
    assert_eq!(run(svc, 30).await, (30, 0));

    // Concurrency -> Retry -> Budget.
    let emu = emulator();
    let svc = ServiceBuilder::new()
        .layer(conc())
        .layer(retry())
        .layer(budget())
        .service(emu.service());
    assert_eq!(run(svc, 30).await, (30, 0));

    // Retry -> Concurrency -> Budget: waiting for tokens while holding a
    // slot is wasteful, but must not deadlock.
    let emu = emulator();
    let svc = ServiceBuilder::new()
        .layer(retry())
        .layer(ConcurrencyLayer::fixed(2))
        .layer(budget())
        .service(emu.service());
    assert_eq!(run(svc, 30).await, (30, 0));
}

async fn echo(body: Bytes) -> impl IntoResponse {
    let text = String::from_utf8_lossy(&body).into_owned();
    let usage = r#"{"type":"message","usage":{"input_tokens":1,"output_tokens":1}}"#;
    if text.contains("max_tokens") {
        (StatusCode::OK, usage.to_string())
    } else {
        (StatusCode::BAD_REQUEST, "no max_tokens".to_string())
    }
}

async fn to_response(e: BoxError) -> impl IntoResponse {
    (StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

#[tokio::test]
async fn layers_on_an_axum_router_serving_on_loopback() {
    let concurrency = ConcurrencyLayer::fixed(2);
    let enforce = TokenBudgetLayer::enforce(
        Limits::new().rpm(5).itpm(100_000).otpm(100_000),
        Callers::new().caller("caller-1", "caller-1"),
    );
    let app = axum::Router::new()
        .route("/v1/messages", post(echo))
        .route_layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(to_response))
                .layer(enforce.clone()),
        )
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(to_response))
                .layer(concurrency.clone()),
        )
        .layer(TraceLayer::new_for_http());
    let addr = support::serve(app).await;

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut statuses = Vec::new();
    for i in 0..7 {
        let mut req = request(i);
        *req.uri_mut() = format!("http://{addr}/v1/messages").parse().expect("uri");
        req.headers_mut()
            .insert("x-api-key", http::HeaderValue::from_static("caller-1"));
        let resp = client.request(req).await.expect("server answers");
        statuses.push(resp.status().as_u16());
        let _ = resp.into_body().collect().await;
    }
    // Five per minute for this caller: the sixth and seventh get 429s.
    assert_eq!(statuses, vec![200, 200, 200, 200, 200, 429, 429]);
    assert_eq!(concurrency.snapshot().in_flight, 0);
}
