//! Overhead of `RetryAfterLayer` on a request that succeeds at once, against the
//! bare service and against `tower::retry::Retry` with a policy that only clones
//! the request, measured in the same run. Every variant wraps the same inner
//! function, is cloned per request the same way (`svc.clone().oneshot(req)`),
//! and builds the same request.
//!
//! Two more variants put the budget's cost in context: ours without its retry
//! budget, and tower's `Retry` with tower's own `TpsBudget` (deposited on each
//! success, as tower's docs show), which reads the clock per request too.
//!
//! Run: `cargo bench --bench retry -- --warm-up-time 1 --measurement-time 3`

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use tower::retry::budget::{Budget, TpsBudget};
use tower::retry::{Policy, Retry};
use tower::{service_fn, Layer, ServiceExt};
use tower_llm_limits::body::ReplayBody;
use tower_llm_limits::retry::RetryAfterLayer;

const BODY: &[u8] = br#"{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Summarise the following paragraph in one sentence, keeping every number it mentions and naming the people involved."}]}"#;

fn request() -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::from_static(BODY)));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static("https://api.anthropic.com/v1/messages");
    let h = req.headers_mut();
    h.insert("x-api-key", http::HeaderValue::from_static("sk-ant-bench"));
    h.insert(
        "anthropic-version",
        http::HeaderValue::from_static("2023-06-01"),
    );
    h.insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    h.insert("accept", http::HeaderValue::from_static("application/json"));
    req
}

fn ok<B>(req: Request<B>) -> Ready<Result<Response<Full<Bytes>>, Infallible>> {
    drop(black_box(req));
    ready(Ok(Response::new(Full::new(Bytes::new()))))
}

/// tower's retry with the least a policy must do: clone the request, never retry.
#[derive(Clone)]
struct CloneRequest;

impl<B: Clone, Res, E> Policy<Request<B>, Res, E> for CloneRequest {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut Request<B>, _: &mut Result<Res, E>) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, req: &Request<B>) -> Option<Request<B>> {
        let mut clone = Request::new(req.body().clone());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        *clone.extensions_mut() = req.extensions().clone();
        Some(clone)
    }
}

/// [`CloneRequest`] plus tower's retry budget, with tower's defaults (the
/// defaults of ours): the like-for-like baseline of a layer with a budget.
#[derive(Clone)]
struct CloneWithBudget(Arc<TpsBudget>);

impl<B: Clone, Res, E> Policy<Request<B>, Res, E> for CloneWithBudget {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut Request<B>, result: &mut Result<Res, E>) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                self.0.deposit();
                None
            }
            Err(_) => self.0.withdraw().then(|| ready(())),
        }
    }

    fn clone_request(&mut self, req: &Request<B>) -> Option<Request<B>> {
        <CloneRequest as Policy<Request<B>, Res, E>>::clone_request(&mut CloneRequest, req)
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("retry_success_overhead");

    let bare = service_fn(ok::<Full<Bytes>>);
    group.bench_function("bare", |b| b.to_async(&rt).iter(|| bare.oneshot(request())));

    let tower_retry = Retry::new(CloneRequest, service_fn(ok::<Full<Bytes>>));
    group.bench_function("tower_retry", |b| {
        b.to_async(&rt)
            .iter(|| tower_retry.clone().oneshot(request()))
    });

    let tower_budget = Retry::new(
        CloneWithBudget(Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2))),
        service_fn(ok::<Full<Bytes>>),
    );
    group.bench_function("tower_retry_with_budget", |b| {
        b.to_async(&rt)
            .iter(|| tower_budget.clone().oneshot(request()))
    });

    let retry_after = rt.block_on(async {
        RetryAfterLayer::anthropic().layer(service_fn(ok::<ReplayBody<Full<Bytes>>>))
    });
    group.bench_function("retry_after", |b| {
        b.to_async(&rt)
            .iter(|| retry_after.clone().oneshot(request()))
    });

    let no_budget = rt.block_on(async {
        RetryAfterLayer::builder()
            .without_budget()
            .build()
            .layer(service_fn(ok::<ReplayBody<Full<Bytes>>>))
    });
    group.bench_function("retry_after_without_budget", |b| {
        b.to_async(&rt)
            .iter(|| no_budget.clone().oneshot(request()))
    });
    group.finish();
}

/// What the layer does on the fast path that a trivial tower policy does not,
/// priced alone, to explain the difference.
fn components(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let mut group = c.benchmark_group("retry_components");
    group.bench_function("buffered_bytes_extension", |b| {
        b.iter(|| {
            let mut ext = http::Extensions::new();
            ext.insert(tower_llm_limits::body::BufferedBytes(Bytes::from_static(
                BODY,
            )));
            black_box(ext)
        })
    });
    group.bench_function("tokio_instant_now", |b| {
        b.iter(|| black_box(tokio::time::Instant::now()))
    });
    // The same clock without tokio: `test-util` (on for benches through the
    // dev-dependencies) only takes its mutex once a clock was paused.
    group.bench_function("std_instant_now", |b| {
        b.iter(|| black_box(std::time::Instant::now()))
    });
    group.finish();
}

criterion_group!(benches, bench, components);
criterion_main!(benches);
