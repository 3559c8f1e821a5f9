//! A request that waited in the concurrency queue under the retry layer is
//! sent again with its own head: while it waits, the queue holds it without
//! its head, on the retry layer's equal copy (one head per waiting
//! request), makes the head again from the copy when the request leaves
//! the queue, and leaves the copy when it drops the request; a request whose
//! head a layer between changed waits whole. In the budget's line the copy
//! is lent instead. On tokio's paused clock.
#![cfg(all(feature = "retry", feature = "concurrency"))]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_llm_limits::body::ReplayBody;
use tower_llm_limits::concurrency::ConcurrencyLayer;
use tower_llm_limits::retry::{RetryAfterLayer, RETRY_COUNT};
use tower_llm_limits::BoxError;

/// What the upstream saw of one attempt.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

/// A request with a header made at run time (its bytes are copied when the
/// head is).
fn request(id: &str) -> Request<Full<Bytes>> {
    Request::post("https://api.anthropic.com/v1/messages?beta=true")
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .header("x-request-name", id)
        .body(Full::new(Bytes::from(format!(r#"{{"id":"{id}"}}"#))))
        .unwrap_or_else(|e| panic!("request: {e}"))
}

/// The upstream: records each attempt; the request named `slow` takes
/// `hold`, `b`'s first attempt is answered 503, the rest 200 at once.
fn upstream<B>(
    seen: Arc<Mutex<Vec<Seen>>>,
    hold: Duration,
) -> impl tower::Service<
    Request<B>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send,
> + Clone
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    service_fn(move |req: Request<B>| {
        let seen = Arc::clone(&seen);
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map_err(Into::into)?.to_bytes();
            let name = parts
                .headers
                .get("x-request-name")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let first_of_b = {
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                let first = name == "b" && !seen.iter().any(|s| s.headers["x-request-name"] == "b");
                seen.push(Seen {
                    method: parts.method,
                    uri: parts.uri,
                    headers: parts.headers,
                    body,
                });
                first
            };
            if name == "slow" {
                tokio::time::sleep(hold).await;
            }
            let status = if first_of_b {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::new()))?,
            )
        }
    })
}

fn attempts_of(seen: &Mutex<Vec<Seen>>, name: &str) -> Vec<Seen> {
    seen.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|s| s.headers["x-request-name"] == name)
        .cloned()
        .collect()
}

/// Every attempt of `b` carries its method, URI, headers and body; the
/// second one also the retry count.
fn assert_replayed(attempts: &[Seen]) {
    assert_replayed_as(attempts, &request("b"));
}

/// Every attempt carries `original`'s method, URI, headers (in their
/// order) and body; the second one also the retry count.
fn assert_replayed_as(attempts: &[Seen], original: &Request<Full<Bytes>>) {
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    for (i, attempt) in attempts.iter().enumerate() {
        assert_eq!(attempt.method, Method::POST);
        assert_eq!(&attempt.uri, original.uri());
        assert_eq!(attempt.body, Bytes::from_static(br#"{"id":"b"}"#));
        let mut expected = original.headers().clone();
        if i > 0 {
            expected.insert(RETRY_COUNT, i.into());
        }
        assert_eq!(attempt.headers, expected, "attempt {i}");
    }
}

/// `b` waits for the one slot, is answered 503 once it gets it, and is
/// sent again with the same head.
#[tokio::test(start_paused = true)]
async fn a_request_that_waited_in_the_queue_is_sent_again_with_its_head() {
    assert_replayed(&queued_behind_a_slow_request(request("b")).await);
}

/// Sends a slow request through a retry layer over one concurrency slot,
/// then `b` (named "b"), which waits for the slot and is answered 503 once;
/// both end 200. Returns `b`'s attempts as the upstream saw them.
async fn queued_behind_a_slow_request(b: Request<Full<Bytes>>) -> Vec<Seen> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let client = ServiceBuilder::new()
        .layer(RetryAfterLayer::builder().jitter(|| 0.0).build())
        .layer(ConcurrencyLayer::fixed(1))
        .service(upstream(Arc::clone(&seen), Duration::from_secs(2)));
    let slow = tokio::spawn(client.clone().oneshot(request("slow")));
    tokio::task::yield_now().await;
    let b = client.clone().oneshot(b).await;
    assert_eq!(b.map(|r| r.status()).ok(), Some(StatusCode::OK));
    assert_eq!(
        slow.await.ok().and_then(|r| r.ok()).map(|r| r.status()),
        Some(StatusCode::OK)
    );
    attempts_of(&seen, "b")
}

/// A request as an SDK sends it: fourteen headers (more bytes than the
/// retry layer's copy writes on the stack first), the API key marked
/// sensitive, a header named twice.
fn sdk_request(id: &str) -> Request<Full<Bytes>> {
    let mut key = http::HeaderValue::from_str(&format!("sk-ant-api03-{}", "x".repeat(95)))
        .unwrap_or_else(|e| panic!("key: {e}"));
    key.set_sensitive(true);
    let mut request = request(id);
    let h = request.headers_mut();
    h.insert("x-api-key", key);
    for (name, value) in [
        ("anthropic-beta", "prompt-caching-2024-07-31"),
        ("anthropic-beta", "token-counting-2024-11-01"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("user-agent", "Anthropic/Python 0.40.0"),
        ("x-stainless-arch", "x64"),
        ("x-stainless-lang", "python"),
        ("x-stainless-os", "Linux"),
        ("x-stainless-package-version", "0.40.0"),
        ("x-stainless-runtime", "CPython"),
        ("x-stainless-runtime-version", "3.12.7"),
    ] {
        h.append(name, http::HeaderValue::from_static(value));
    }
    request
}

/// `b`, with an SDK's headers, waits for the one slot, is answered 503,
/// and is sent again with every header as it was, in its order, the key
/// still sensitive.
#[tokio::test(start_paused = true)]
async fn a_request_with_an_sdks_headers_is_sent_again_with_its_head() {
    let attempts = queued_behind_a_slow_request(sdk_request("b")).await;
    assert_replayed_as(&attempts, &sdk_request("b"));
    for (i, attempt) in attempts.iter().enumerate() {
        let betas: Vec<_> = attempt.headers.get_all("anthropic-beta").iter().collect();
        assert_eq!(
            betas,
            ["prompt-caching-2024-07-31", "token-counting-2024-11-01"]
        );
        assert!(attempt.headers["x-api-key"].is_sensitive(), "attempt {i}");
    }
}

/// A layer between the retry layer and the queue (a timeout) drops `b`
/// while it waits: the queue leaves the copy it stood on, and the retry
/// layer sends `b` again with it.
#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_it_waited_is_sent_again_with_its_head() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    // One slot, shared by a client with a timeout and one without.
    let slot = ConcurrencyLayer::fixed(1);
    let up = upstream(Arc::clone(&seen), Duration::from_millis(1_500));
    let client = ServiceBuilder::new()
        .layer(RetryAfterLayer::builder().jitter(|| 0.0).build())
        .timeout(Duration::from_secs(1))
        .layer(slot.clone())
        .service(up.clone());
    let patient = ServiceBuilder::new().layer(slot).service(up);
    let slow = tokio::spawn(patient.oneshot(request("slow").map(ReplayBody::passthrough)));
    tokio::task::yield_now().await;
    // Its first attempt waits a second in the queue and is cut; the second
    // gets the slot at 1.5 s and is answered 503; the third, 200.
    let b = client.clone().oneshot(request("b")).await;
    assert_eq!(b.map(|r| r.status()).ok(), Some(StatusCode::OK));
    let attempts = attempts_of(&seen, "b");
    let original = request("b");
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    for (attempt, count) in attempts.iter().zip([1u32, 2]) {
        let mut expected = original.headers().clone();
        expected.insert(RETRY_COUNT, count.into());
        assert_eq!(attempt.headers, expected);
        assert_eq!(&attempt.uri, original.uri());
        assert_eq!(attempt.body, Bytes::from_static(br#"{"id":"b"}"#));
    }
    drop(slow);
}

/// `b` waits for its turn in the budget's line (one request a minute),
/// is answered 503 once admitted, and is sent again with the same head.
#[cfg(feature = "budget")]
#[tokio::test(start_paused = true)]
async fn a_request_that_waited_in_the_budgets_line_is_sent_again_with_its_head() {
    use tower_llm_limits::budget::{Limits, TokenBudgetLayer};
    let seen = Arc::new(Mutex::new(Vec::new()));
    let budget = TokenBudgetLayer::anthropic(Limits::new().rpm(1).itpm(1_000_000).otpm(1_000_000));
    let client = ServiceBuilder::new()
        .layer(RetryAfterLayer::builder().jitter(|| 0.0).build())
        .layer(budget.clone())
        .service(upstream(Arc::clone(&seen), Duration::ZERO));
    let first = client.clone().oneshot(request("slow")).await;
    assert_eq!(first.map(|r| r.status()).ok(), Some(StatusCode::OK));
    let started = tokio::time::Instant::now();
    let b = client.clone().oneshot(request("b")).await;
    assert_eq!(b.map(|r| r.status()).ok(), Some(StatusCode::OK));
    assert!(
        started.elapsed() >= Duration::from_secs(30),
        "b waited for its turn: {:?}",
        started.elapsed()
    );
    assert!(
        budget.snapshot().waited >= 1,
        "{:?}",
        budget.snapshot().waited
    );
    assert_replayed(&attempts_of(&seen, "b"));
}

/// A layer between the retry layer and the queue adds a header: `b` waits
/// whole (its head is not the retry layer's copy), and each attempt is
/// sent with the changed head.
#[tokio::test(start_paused = true)]
async fn a_request_whose_head_a_layer_between_changed_waits_with_that_head() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let client = ServiceBuilder::new()
        .layer(RetryAfterLayer::builder().jitter(|| 0.0).build())
        .map_request(|mut req: Request<ReplayBody<Full<Bytes>>>| {
            req.headers_mut()
                .insert("x-between", http::HeaderValue::from_static("1"));
            req
        })
        .layer(ConcurrencyLayer::fixed(1))
        .service(upstream(Arc::clone(&seen), Duration::from_secs(2)));
    let slow = tokio::spawn(client.clone().oneshot(request("slow")));
    tokio::task::yield_now().await;
    let b = client.clone().oneshot(request("b")).await;
    assert_eq!(b.map(|r| r.status()).ok(), Some(StatusCode::OK));
    assert!(slow.await.is_ok());
    let attempts = attempts_of(&seen, "b");
    let original = request("b");
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    for (i, attempt) in attempts.iter().enumerate() {
        let mut expected = original.headers().clone();
        if i > 0 {
            expected.insert(RETRY_COUNT, i.into());
        }
        expected.insert("x-between", http::HeaderValue::from_static("1"));
        assert_eq!(attempt.headers, expected, "attempt {i}");
        assert_eq!(&attempt.uri, original.uri());
        assert_eq!(attempt.body, Bytes::from_static(br#"{"id":"b"}"#));
    }
}

/// Through the whole preset (retry, budget, concurrency with one slot):
/// `b` waits for the slot, is answered 503, and is sent again with the
/// same head.
#[cfg(feature = "budget")]
#[tokio::test(start_paused = true)]
async fn a_request_that_waited_for_a_slot_in_the_preset_is_sent_again_with_its_head() {
    use tower_llm_limits::budget::Limits;
    use tower_llm_limits::preset::LimitsLayer;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let limits = LimitsLayer::anthropic(Limits::new().rpm(1_000).itpm(1_000_000).otpm(1_000_000))
        .with_retry(RetryAfterLayer::builder().jitter(|| 0.0).build())
        .with_concurrency(ConcurrencyLayer::fixed(1));
    let client = ServiceBuilder::new()
        .layer(limits.clone())
        .service(upstream(Arc::clone(&seen), Duration::from_secs(2)));
    let slow = tokio::spawn(client.clone().oneshot(request("slow")));
    tokio::task::yield_now().await;
    let b = tokio::spawn(client.clone().oneshot(request("b")));
    tokio::task::yield_now().await;
    assert_eq!(
        limits.concurrency().snapshot().waiting.total(),
        1,
        "b waits for the slot"
    );
    let b = b.await.ok().and_then(|r| r.ok()).map(|r| r.status());
    assert_eq!(b, Some(StatusCode::OK));
    assert!(slow.await.is_ok());
    assert_replayed(&attempts_of(&seen, "b"));
}

/// Under the retry layer, a request waiting in the budget's line (one
/// request a minute) is parked on the retry layer's copy of its head: its
/// `count_tokens` request, made once a count call is free (one a minute:
/// `a`, ahead of it, took the first), carries that head (its authority and
/// headers, the API key among them), and the request is sent with its own
/// head once its turn comes.
#[cfg(feature = "budget")]
#[tokio::test(start_paused = true)]
async fn a_request_counted_while_it_waits_in_the_budgets_line_carries_its_head() {
    use tower_llm_limits::budget::{CountTokens, Limits, TokenBudgetLayer};
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&seen);
    let upstream = service_fn(move |req: Request<ReplayBody<ReplayBody<Full<Bytes>>>>| {
        let seen = Arc::clone(&recorded);
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await?.to_bytes();
            let count = parts.uri.path().ends_with("/count_tokens");
            seen.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
                method: parts.method,
                uri: parts.uri,
                headers: parts.headers,
                body,
            });
            let answer = if count {
                r#"{"input_tokens":7}"#
            } else {
                r#"{"type":"message","usage":{"input_tokens":7,"output_tokens":3}}"#
            };
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(
                answer.as_bytes(),
            ))))
        }
    });
    let budget = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1).itpm(1_000_000).otpm(1_000_000))
        .count_tokens(Some(CountTokens::new(1).min_input_tokens(0)))
        .build();
    let client = ServiceBuilder::new()
        .layer(RetryAfterLayer::builder().jitter(|| 0.0).build())
        .layer(budget)
        .service(upstream);
    let messages = |id: &str| {
        let body = format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{{"role":"user","content":"hello {id}"}}]}}"#
        );
        let mut req = request(id);
        *req.body_mut() = Full::new(Bytes::from(body));
        req
    };
    let first = client.clone().oneshot(messages("first")).await;
    assert_eq!(first.map(|r| r.status()).ok(), Some(StatusCode::OK));
    let a = tokio::spawn(client.clone().oneshot(messages("a")));
    tokio::task::yield_now().await;
    let b = tokio::spawn(client.clone().oneshot(messages("b")));
    for task in [a, b] {
        let status = task.await.ok().and_then(|r| r.ok()).map(|r| r.status());
        assert_eq!(status, Some(StatusCode::OK));
    }
    let of_b = attempts_of(&seen, "b");
    let (counts, sent): (Vec<_>, Vec<_>) = of_b
        .iter()
        .partition(|s| s.uri.path().ends_with("/count_tokens"));
    assert_eq!(counts.len(), 1, "b was counted while it waited: {of_b:?}");
    let original = messages("b");
    let count = counts[0];
    assert_eq!(count.uri.authority(), original.uri().authority());
    assert_eq!(count.uri.path(), "/v1/messages/count_tokens");
    for name in ["x-api-key", "anthropic-version", "x-request-name"] {
        assert_eq!(
            count.headers.get(name),
            original.headers().get(name),
            "{name}"
        );
    }
    assert_eq!(sent.len(), 1, "{of_b:?}");
    assert_eq!(sent[0].method, Method::POST);
    assert_eq!(&sent[0].uri, original.uri());
    assert_eq!(sent[0].headers, *original.headers());
}
