//! Every test that reads the crate's `tracing` events, in a binary of its own.
//!
//! A thread-local subscriber (`set_default`) races with tests on other threads:
//! a callsite first hit while no subscriber of this thread exists caches the
//! interest "never", and the test then sees nothing. Here one global subscriber
//! is installed once, before any event, for the whole binary; it records every
//! event with the thread that emitted it, and each test reads only its own
//! thread's events (each `#[tokio::test]` runs its runtime, and every task it
//! spawns, on its own thread).
#![cfg(all(feature = "retry", feature = "concurrency"))]

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::ThreadId;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::{sleep, Instant};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_llm_limits::concurrency::ConcurrencyBuilder;
use tower_llm_limits::retry::RetryAfterLayer;
use tower_llm_limits::BoxError;
use tracing_subscriber::layer::SubscriberExt;

// ---------------------------------------------------------------- the capture

/// One event: the thread that emitted it, its target, and its fields rendered
/// as text (`message` included).
#[derive(Debug, Clone)]
struct Event {
    thread: ThreadId,
    target: String,
    fields: Vec<(String, String)>,
    /// The spans the event is in, innermost first: name and fields.
    spans: Vec<(String, Vec<(String, String)>)>,
}

impl Event {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// All fields as one `name=value` line.
    fn line(&self) -> String {
        let parts: Vec<String> = self
            .fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        parts.join(" ")
    }
}

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
        self.0.push((f.name().to_owned(), v.to_owned()));
    }
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        self.0.push((f.name().to_owned(), format!("{v:?}")));
    }
}

/// A span's fields as recorded so far (kept in the span's extensions).
struct SpanFields(Vec<(String, String)>);

struct Capture;

impl<S> tracing_subscriber::Layer<S> for Capture
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = Vec::new();
        attrs.record(&mut Fields(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            if let Some(SpanFields(fields)) = ext.get_mut::<SpanFields>() {
                let mut new = Vec::new();
                values.record(&mut Fields(&mut new));
                for (k, v) in new {
                    fields.retain(|(name, _)| *name != k);
                    fields.push((k, v));
                }
            }
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = Vec::new();
        event.record(&mut Fields(&mut fields));
        let spans = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .map(|span| {
                        let fields = span
                            .extensions()
                            .get::<SpanFields>()
                            .map(|f| f.0.clone())
                            .unwrap_or_default();
                        (span.name().to_owned(), fields)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let record = Event {
            thread: std::thread::current().id(),
            target: event.metadata().target().to_owned(),
            fields,
            spans,
        };
        if let Ok(mut all) = events().lock() {
            all.push(record);
        }
    }
}

fn events() -> &'static Mutex<Vec<Event>> {
    static EVENTS: OnceLock<Mutex<Vec<Event>>> = OnceLock::new();
    EVENTS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Installs the global subscriber (once per binary) and returns a reader of the
/// events this thread emits from now on.
fn capture() -> Captured {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let subscriber = tracing_subscriber::registry().with(Capture);
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in this binary");
    });
    Captured {
        thread: std::thread::current().id(),
        from: events().lock().unwrap().len(),
    }
}

struct Captured {
    thread: ThreadId,
    from: usize,
}

impl Captured {
    /// This thread's events since `capture()`.
    fn events(&self) -> Vec<Event> {
        events().lock().unwrap()[self.from..]
            .iter()
            .filter(|e| e.thread == self.thread)
            .cloned()
            .collect()
    }
}

// ---------------------------------------------------------------- retry

#[tokio::test(start_paused = true)]
async fn each_retry_is_traced_without_secrets() {
    let captured = capture();
    let calls = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&calls);
    let upstream = service_fn(move |req: Request<_>| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let _ = BodyExt::collect(req.into_body()).await?;
            match n {
                0 => Ok(Response::builder()
                    .status(429)
                    .header("retry-after", "1")
                    .body(Full::new(Bytes::new()))?),
                1 => Err::<_, BoxError>("connection reset by peer".into()),
                _ => Ok(Response::new(Full::new(Bytes::new()))),
            }
        }
    });
    let mut svc = RetryAfterLayer::builder()
        .jitter(|| 0.5)
        .build()
        .layer(upstream);
    let request = Request::builder()
        .method("POST")
        .uri("http://api.test/v1/messages")
        .header("x-api-key", "sk-ant-SECRET-KEY")
        .header("authorization", "Bearer SECRET-TOKEN")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = svc.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    let events = captured.events();
    let lines: Vec<String> = events.iter().map(Event::line).collect();
    let retries: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("retrying request"))
        .collect();
    assert_eq!(retries.len(), 2, "{lines:#?}");
    assert!(retries[0].contains("attempt=2") && retries[0].contains("status=429"));
    assert!(retries[0].contains("delay_ms=1000"), "{}", retries[0]);
    assert!(retries[1].contains("attempt=3") && retries[1].contains("connection reset"));
    assert!(lines.iter().all(|l| !l.contains("SECRET")), "{lines:#?}");
}

/// The `llm_request` span's fields around an event, as `name=value` pairs.
fn request_span(event: &Event) -> Option<String> {
    let (_, fields) = event.spans.iter().find(|(name, _)| name == "llm_request")?;
    let parts: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Some(parts.join(" "))
}

/// Each request runs in an `llm_request` span carrying the model (from the
/// budget), the lane (from the concurrency layer) and the attempt number,
/// and no key.
#[tokio::test(start_paused = true)]
async fn each_request_has_a_span_with_model_lane_and_attempt() {
    let captured = capture();
    let calls = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&calls);
    let upstream = service_fn(move |_req: Request<_>| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        tracing::info!(call = n, "upstream called");
        async move {
            let status = if n == 0 { 529 } else { 200 };
            let body = r#"{"type":"message","usage":{"input_tokens":5,"output_tokens":1}}"#;
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from(body)))?,
            )
        }
    });
    let limits = tower_llm_limits::preset::LimitsLayer::anthropic(
        tower_llm_limits::budget::Limits::new()
            .rpm(50)
            .itpm(30_000)
            .otpm(8_000),
    );
    let mut request = Request::post("http://api.test/v1/messages")
        .header("x-api-key", "sk-ant-SECRET-KEY")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"Hi"}]}"#,
        )))
        .unwrap();
    request
        .extensions_mut()
        .insert(tower_llm_limits::concurrency::Priority::Interactive);
    let response = limits.layer(upstream).oneshot(request).await.unwrap();
    let _ = response.into_body().collect().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    let events = captured.events();
    let retry = events
        .iter()
        .find(|e| e.line().contains("retrying request"))
        .expect("a retry event");
    let span = request_span(retry).expect("inside llm_request");
    assert!(span.contains("attempt=1"), "{span}");
    assert!(span.contains("model=claude-sonnet-4-5"), "{span}");
    assert!(span.contains("lane=interactive"), "{span}");
    let calls: Vec<String> = events
        .iter()
        .filter(|e| e.line().contains("upstream called"))
        .filter_map(request_span)
        .collect();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    let has = |s: &str, field: &str| s.split_whitespace().any(|f| f == field);
    assert!(has(&calls[0], "attempt=1"), "{calls:#?}");
    assert!(has(&calls[1], "attempt=2"), "{calls:#?}");
    let all: Vec<String> = events
        .iter()
        .map(|e| format!("{} {:?}", e.line(), e.spans))
        .collect();
    assert!(all.iter().all(|l| !l.contains("SECRET")), "{all:#?}");
}

// ---------------------------------------------------------------- concurrency

#[derive(Debug, Clone, PartialEq, Eq)]
struct LimitEvent {
    from: u64,
    to: u64,
    reason: String,
}

/// The concurrency layer's limit changes among this thread's events.
fn limit_events(captured: &Captured) -> Vec<LimitEvent> {
    captured
        .events()
        .iter()
        .filter(|e| e.target == "tower_llm_limits::concurrency")
        .map(|e| LimitEvent {
            from: e.field("from").and_then(|v| v.parse().ok()).unwrap_or(0),
            to: e.field("to").and_then(|v| v.parse().ok()).unwrap_or(0),
            reason: e.field("reason").unwrap_or_default().to_owned(),
        })
        .collect()
}

type Upstream = tower::util::BoxCloneSyncService<Request<()>, Response<Full<Bytes>>, Infallible>;

/// An upstream that answers after 100 ms: `status(n)` for its `n`th call (from 0).
fn upstream(status: impl Fn(u64) -> u16 + Send + Sync + 'static) -> (Upstream, Arc<AtomicU64>) {
    let calls = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&calls);
    let status = Arc::new(status);
    let svc = service_fn(move |_: Request<()>| {
        let code = status(counter.fetch_add(1, Ordering::SeqCst));
        async move {
            sleep(Duration::from_millis(100)).await;
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = http::StatusCode::from_u16(code).unwrap();
            Ok::<_, Infallible>(response)
        }
    });
    (tower::util::BoxCloneSyncService::new(svc), calls)
}

#[tokio::test(start_paused = true)]
async fn limit_changes_are_traced() {
    let captured = capture();
    let (up, _) = upstream(|_| 529);
    let layer = ConcurrencyBuilder::adaptive(1..=20)
        .initial_limit(10)
        .build()
        .unwrap();
    let mut svc = layer.layer(up);
    let response = svc.ready().await.unwrap().call(Request::new(())).await;
    let _ = response.unwrap().into_body().collect().await;
    assert_eq!(
        limit_events(&captured),
        vec![LimitEvent {
            from: 10,
            to: 9,
            reason: "cut on status 529".into()
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn slow_start_doubles_then_grows_additively_after_a_drop() {
    let captured = capture();
    let fail_at = Arc::new(AtomicU64::new(u64::MAX));
    let f = Arc::clone(&fail_at);
    // One 529, for the call numbered `fail_at` once it is set.
    let (up, calls) = upstream(move |n| {
        if n == f.load(Ordering::SeqCst) {
            529
        } else {
            200
        }
    });
    let layer = ConcurrencyBuilder::adaptive(1..=1000)
        .latency_tolerance(None)
        .build()
        .unwrap();
    let svc = layer.layer(up);
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..300)
        .map(|_| {
            let mut c = svc.clone();
            tokio::spawn(async move {
                while t0.elapsed() < Duration::from_secs(60) {
                    let response = c.ready().await.unwrap().call(Request::new(())).await;
                    if let Ok(response) = response {
                        let _ = response.into_body().collect().await;
                    }
                }
            })
        })
        .collect();
    while layer.snapshot().limit < 32 {
        sleep(Duration::from_millis(10)).await;
    }
    assert!(layer.snapshot().slow_start);
    fail_at.store(calls.load(Ordering::SeqCst) + 1, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }

    let events = limit_events(&captured);
    let reasons: Vec<&str> = events.iter().map(|e| e.reason.as_str()).collect();
    let cut = reasons
        .iter()
        .position(|r| *r == "cut on status 529")
        .expect("one cut");
    // Before the cut: doubling from 1.
    for (i, e) in events[..cut].iter().enumerate() {
        assert_eq!((e.from, e.to), (1 << i, 2 << i), "{e:?}");
        assert_eq!(e.reason, "slow start");
    }
    assert!(cut >= 5, "reached 32 by doubling");
    // The cut: x 0.9.
    let c = &events[cut];
    assert_eq!(c.to, c.from * 9 / 10, "{c:?}");
    // After it: +1 per window, nothing else.
    let after = &events[cut + 1..];
    assert!(after.len() >= 10, "{} increases", after.len());
    for (i, e) in after.iter().enumerate() {
        assert_eq!(e.reason, "additive increase");
        assert_eq!((e.from, e.to), (c.to + i as u64, c.to + i as u64 + 1));
    }
    assert_eq!(layer.snapshot().cuts, 1);
}

// ---------------------------------------------------------------- budget

/// A caller's key is never logged, nor its hash: the budget's events name a
/// hashed caller by its model class only.
#[cfg(feature = "budget")]
#[tokio::test(start_paused = true)]
async fn budget_events_never_name_a_key_or_its_hash() {
    use tower_llm_limits::budget::{Callers, Limits, TokenBudgetLayer};

    let captured = capture();
    let upstream = service_fn(|_req: Request<_>| async {
        let body = r#"{"type":"message","usage":{"input_tokens":10,"output_tokens":20}}"#;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    });
    let layer = TokenBudgetLayer::enforce(
        Limits::new().rpm(1).itpm(30_000).otpm(8_000),
        Callers::any_key_unauthenticated(),
    );
    let mut svc = layer.layer(upstream);
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let request = Request::post("http://gw.test/v1/messages")
            .header("x-api-key", "sk-gw-SECRET-KEY")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"claude-haiku-4-5","max_tokens":100,"messages":[{"role":"user","content":"Hi"}]}"#,
            )))
            .unwrap();
        let response = svc.ready().await.unwrap().call(request).await.unwrap();
        statuses.push(response.status().as_u16());
        let _ = response.into_body().collect().await.unwrap();
    }
    assert_eq!(statuses, [200, 429]);
    let names: Vec<String> = layer
        .snapshot()
        .keys
        .iter()
        .filter_map(|k| k.key.split('/').next().map(str::to_owned))
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("key-"), "{names:?}");
    let lines: Vec<String> = captured.events().iter().map(Event::line).collect();
    assert!(
        lines.iter().any(|l| l.contains("budget: rejected")),
        "{lines:#?}"
    );
    for line in &lines {
        assert!(!line.contains("SECRET"), "{line}");
        assert!(!line.contains(names[0].as_str()), "{line}");
    }
}
