//! The metrics the layers record through the `metrics` facade (feature
//! `metrics`), read back with a small recorder of this test's own, set for
//! the current thread only (`metrics::with_local_recorder`) around a
//! current-thread runtime under tokio's paused clock.
#![cfg(all(
    feature = "metrics",
    feature = "retry",
    feature = "budget",
    feature = "concurrency"
))]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use tower::{service_fn, Layer, ServiceExt};
use tower_llm_limits::budget::{BudgetMode, Limits, TokenBudgetLayer};
use tower_llm_limits::preset::LimitsLayer;
use tower_llm_limits::retry::RetryAfterLayer;
use tower_llm_limits::BoxError;

/// A metric's name and labels, as `name{k=v,...}`.
fn id(key: &Key) -> String {
    let labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

#[derive(Default)]
struct Store {
    counters: Mutex<BTreeMap<String, u64>>,
    histograms: Mutex<BTreeMap<String, Vec<f64>>>,
}

struct CounterCell(Arc<Store>, String);
impl metrics::CounterFn for CounterCell {
    fn increment(&self, value: u64) {
        if let Ok(mut c) = self.0.counters.lock() {
            *c.entry(self.1.clone()).or_default() += value;
        }
    }
    fn absolute(&self, value: u64) {
        if let Ok(mut c) = self.0.counters.lock() {
            c.insert(self.1.clone(), value);
        }
    }
}

struct HistogramCell(Arc<Store>, String);
impl metrics::HistogramFn for HistogramCell {
    fn record(&self, value: f64) {
        if let Ok(mut h) = self.0.histograms.lock() {
            h.entry(self.1.clone()).or_default().push(value);
        }
    }
}

struct TestRecorder(Arc<Store>);

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Arc::new(CounterCell(self.0.clone(), id(key))))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(Arc::new(HistogramCell(self.0.clone(), id(key))))
    }
}

/// Runs `fut` on a paused current-thread runtime with the test recorder.
fn recorded<F: std::future::Future<Output = ()>>(fut: F) -> Arc<Store> {
    let store = Arc::new(Store::default());
    let recorder = TestRecorder(store.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    metrics::with_local_recorder(&recorder, || runtime.block_on(fut));
    store
}

fn request() -> Request<Full<Bytes>> {
    Request::post("http://127.0.0.1:9/v1/messages")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"Hi"}]}"#,
        )))
        .expect("request")
}

const ANSWER: &str = r#"{"type":"message","usage":{"input_tokens":7,"output_tokens":3}}"#;

#[test]
fn retries_give_ups_waits_and_tokens_are_recorded() {
    let store = recorded(async {
        let retry = RetryAfterLayer::builder()
            .max_retries(1)
            .jitter(|| 0.5)
            .build();
        let limits = LimitsLayer::anthropic(Limits::new().rpm(2).itpm(100_000).otpm(100_000))
            .with_retry(retry);
        // Two answered requests: the second waits for nothing (two a minute).
        let ok = service_fn(|_req: Request<_>| async {
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(
                ANSWER.as_bytes(),
            ))))
        });
        for _ in 0..2 {
            let response = limits.layer(ok).oneshot(request()).await.expect("ok");
            let _ = response.into_body().collect().await.expect("body");
        }
        // A third is overloaded twice: one retry, then a give-up; it
        // waits about 30 s for the budget first.
        let overloaded = service_fn(|_req: Request<_>| async {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(529)
                    .body(Full::new(Bytes::new()))
                    .expect("response"),
            )
        });
        let err = limits
            .layer(overloaded)
            .oneshot(request())
            .await
            .expect_err("gave up");
        let _ = err;
    });
    let counters = store.counters.lock().expect("lock").clone();
    let get = |k: &str| counters.get(k).copied().unwrap_or(0);
    assert_eq!(get("tower_llm_limits_requests_total{}"), 3, "{counters:#?}");
    assert_eq!(
        get("tower_llm_limits_retries_total{cause=backoff}"),
        1,
        "{counters:#?}"
    );
    assert_eq!(
        get("tower_llm_limits_give_ups_total{reason=max_retries}"),
        1
    );
    assert_eq!(
        get("tower_llm_limits_settled_tokens_total{dimension=input}"),
        14
    );
    assert_eq!(
        get("tower_llm_limits_settled_tokens_total{dimension=output}"),
        6
    );
    assert!(get("tower_llm_limits_reserved_tokens_total{dimension=input}") >= 14);
    let histograms = store.histograms.lock().expect("lock").clone();
    let waits = histograms
        .get("tower_llm_limits_wait_seconds{layer=budget}")
        .cloned()
        .unwrap_or_default();
    assert_eq!(waits.len(), 1, "{histograms:#?}");
    assert!(waits[0] > 25.0 && waits[0] <= 30.0, "{waits:?}");
    assert_eq!(
        histograms.get("tower_llm_limits_retry_delay_seconds{cause=backoff}"),
        Some(&vec![0.25])
    );
}

#[test]
fn rejections_are_recorded_by_layer_and_reason() {
    let store = recorded(async {
        let budget = TokenBudgetLayer::builder()
            .limits(Limits::new().rpm(1).itpm(100_000).otpm(100_000))
            .mode(BudgetMode::Reject)
            .build();
        let svc = budget.layer(service_fn(|_req: Request<_>| async {
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(
                ANSWER.as_bytes(),
            ))))
        }));
        let first = svc.clone().oneshot(request()).await.expect("admitted");
        drop(first);
        let _ = svc.oneshot(request()).await.expect_err("rejected");
        tokio::time::sleep(Duration::from_millis(1)).await;
    });
    let counters = store.counters.lock().expect("lock").clone();
    assert_eq!(
        counters.get("tower_llm_limits_rejections_total{layer=budget,reason=budget_exceeded}"),
        Some(&1),
        "{counters:#?}"
    );
}
