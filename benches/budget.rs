//! TokenBudgetLayer benches.
//!
//! - `uncontended`: one request at a time through the layer (estimate,
//!   reserve, call, settle from the JSON usage as the body is read), against
//!   the bare inner service in the same run.
//! - `waiters`: 1,000 requests queued at once on a drained budget, drained in
//!   order on tokio's paused clock (virtual time passes instantly): wall time
//!   to drain them all, and polls and queue wakeups per admission.
//!
//! Run: `cargo bench --bench budget -- --warm-up-time 1 --measurement-time 3`

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::request::Parts;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_llm_limits::body::BufferedBytes;
use tower_llm_limits::budget::{Limits, TokenBudgetLayer};
use tower_llm_limits::estimate::{Estimate, TokenEstimator};
use tower_llm_limits::BoxError;

const BODY: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Summarise the attached report in three bullet points, keeping every figure."}]}"#;
const USAGE_1000: &str = r#"{"type":"message","usage":{"input_tokens":1000,"output_tokens":12}}"#;
const USAGE: &str = r#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"- a\n- b\n- c"}],"model":"claude-sonnet-4-5","stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":12}}"#;

/// A fixed estimate: isolates the layer's own cost from the estimator's.
#[derive(Debug)]
struct Fixed(u64);

impl TokenEstimator for Fixed {
    fn estimate(&self, _parts: &Parts, _body: &[u8]) -> Estimate {
        Estimate {
            model: Some("claude-sonnet-4-5".into()),
            input_tokens: self.0,
            raw_input_tokens: self.0,
            max_tokens: Some(1024),
            ..Estimate::default()
        }
    }

    fn estimate_unbuffered(&self, _parts: &Parts, _len: Option<u64>) -> Estimate {
        Estimate {
            input_tokens: self.0,
            fallback: true,
            ..Estimate::default()
        }
    }
}

/// Answers at once with a JSON usage (stands for the HTTP client).
#[derive(Debug, Clone, Copy)]
struct Inner(&'static str);

impl<B> Service<Request<B>> for Inner {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(
            self.0.as_bytes(),
        )))))
    }
}

fn request(with_extension: bool) -> Request<Full<Bytes>> {
    let bytes = Bytes::from_static(BODY.as_bytes());
    let mut req = Request::post("https://api.anthropic.com/v1/messages")
        .body(Full::new(bytes.clone()))
        .unwrap_or_default();
    if with_extension {
        req.extensions_mut().insert(BufferedBytes(bytes));
    }
    req
}

fn big_limits() -> Limits {
    Limits::new()
        .rpm(u64::MAX / 4)
        .itpm(u64::MAX / 4)
        .otpm(u64::MAX / 4)
}

fn uncontended(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let mut group = c.benchmark_group("uncontended");

    let mut bare = Inner(USAGE);
    group.bench_function("bare_inner", |b| {
        b.to_async(&rt).iter(|| {
            let fut = Service::<Request<Full<Bytes>>>::call(&mut bare, request(true));
            async move {
                let resp = fut.await.unwrap_or_default();
                resp.into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes().len())
                    .unwrap_or(0)
            }
        })
    });

    for (name, reuse, anthropic) in [
        ("layer_fixed_estimate_buffered_bytes", true, false),
        ("layer_fixed_estimate_reads_body", false, false),
        ("layer_anthropic_estimator_buffered_bytes", true, true),
    ] {
        let mut builder = TokenBudgetLayer::builder().limits(big_limits());
        if !anthropic {
            builder = builder.estimator(Arc::new(Fixed(30)));
        }
        let layer = builder.build();
        let mut svc = layer.layer(Inner(USAGE));
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let fut = svc.call(request(reuse));
                async move {
                    match fut.await {
                        Ok(resp) => resp
                            .into_body()
                            .collect()
                            .await
                            .map(|c| c.to_bytes().len())
                            .unwrap_or(0),
                        Err(_) => 0,
                    }
                }
            })
        });
        let snap = layer.snapshot();
        eprintln!(
            "{name}: admitted {} settled {} waited {}",
            snap.admitted, snap.settled, snap.waited
        );
    }
    group.finish();
}

/// Counts the polls of a future.
struct Counted<F> {
    fut: Pin<Box<F>>,
    polls: Arc<AtomicUsize>,
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, Ordering::Relaxed);
        self.fut.as_mut().poll(cx)
    }
}

const WAITERS: usize = 1_000;

/// Drains 1,000 waiters of 1,000 input tokens each through a 60,000 ITPM
/// budget that starts empty: 1,000 s of virtual time, auto-advanced.
async fn drain(polls: Arc<AtomicUsize>) -> (u64, u64) {
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1_000_000).itpm(60_000).otpm(100_000_000))
        .estimator(Arc::new(Fixed(1_000)))
        .build();
    let svc = layer.layer(Inner(USAGE_1000));
    // Drain the bucket: one request of the whole minute.
    let drain_all = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1_000_000).itpm(60_000).otpm(100_000_000))
        .estimator(Arc::new(Fixed(60_000)))
        .ledger(Arc::clone(layer.ledger()))
        .build();
    let mut first = drain_all.layer(Inner(USAGE_1000));
    if let Ok(ready) = ServiceExt::<Request<Full<Bytes>>>::ready(&mut first).await {
        // Dropped unread: no usage seen, so the whole charge is kept.
        drop(ready.call(request(true)).await);
    }
    let mut tasks = Vec::with_capacity(WAITERS);
    for _ in 0..WAITERS {
        let mut svc = svc.clone();
        let fut = async move {
            let resp = ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
                .await?
                .call(request(true))
                .await?;
            resp.into_body().collect().await?;
            Ok::<_, BoxError>(())
        };
        tasks.push(tokio::spawn(Counted {
            fut: Box::pin(fut),
            polls: Arc::clone(&polls),
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let snap = layer.snapshot();
    (snap.admitted, snap.wakeups)
}

fn waiters(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let polls = Arc::new(AtomicUsize::new(0));
    let (admitted, wakeups) = rt.block_on(drain(Arc::clone(&polls)));
    eprintln!(
        "waiters: {WAITERS} drained; admitted {admitted}; queue wakeups per admission {:.3}; polls per request {:.3}",
        wakeups as f64 / admitted.max(1) as f64,
        polls.load(Ordering::Relaxed) as f64 / WAITERS as f64,
    );
    let mut group = c.benchmark_group("waiters");
    group.sample_size(10);
    group.bench_function("drain_1000_waiters", |b| {
        b.iter_batched(
            || Arc::new(AtomicUsize::new(0)),
            |polls| rt.block_on(drain(polls)),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, uncontended, waiters);
criterion_main!(benches);
