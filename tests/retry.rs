//! RetryAfterLayer against a scripted mock API, on tokio's paused clock.
#![cfg(feature = "retry")]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Layer, Service, ServiceExt};
use tower_llm_limits::body::{BufferedBytes, ReplayBody};
use tower_llm_limits::headers::format_rfc3339;
use tower_llm_limits::retry::{AfterSend, RetryAfter, RetryAfterLayer, RetryBudget, RETRY_COUNT};
use tower_llm_limits::{BoxError, Dimension, Error, GiveUpReason};

type Resp = Response<Full<Bytes>>;

const SPEND_CAP_BODY: &str = r#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your API usage limits. You will regain access on 2026-12-01 at 00:00 UTC.","details":{"error_code":"enforced_spend_limit_reached"}},"request_id":"req_1"}"#;
const ITPM_BODY: &str = r#"{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed the rate limit for your organization of 30,000 input tokens per minute."},"request_id":"req_2"}"#;

// ---------------------------------------------------------------- the mock API

#[derive(Clone)]
enum Reply {
    Status {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    Fail(fn() -> BoxError),
}

fn status(code: u16) -> Reply {
    Reply::Status {
        status: code,
        headers: Vec::new(),
        body: String::new(),
    }
}

impl Reply {
    fn header(mut self, name: &str, value: &str) -> Self {
        if let Reply::Status { headers, .. } = &mut self {
            headers.push((name.to_owned(), value.to_owned()));
        }
        self
    }

    fn body(mut self, text: &str) -> Self {
        if let Reply::Status { body, .. } = &mut self {
            *body = text.to_owned();
        }
        self
    }
}

#[derive(Debug, Clone)]
struct Seen {
    at: Duration,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
    buffered_ext: Option<Bytes>,
}

struct MockState {
    start: Instant,
    script: Mutex<VecDeque<Reply>>,
    fallback: Reply,
    seen: Mutex<Vec<Seen>>,
}

/// An API that answers from a script, then with `fallback`, and records what it saw.
#[derive(Clone)]
struct Mock(Arc<MockState>);

impl Mock {
    fn new(script: impl IntoIterator<Item = Reply>) -> Self {
        Self::with_fallback(script, status(200))
    }

    fn with_fallback(script: impl IntoIterator<Item = Reply>, fallback: Reply) -> Self {
        Mock(Arc::new(MockState {
            start: Instant::now(),
            script: Mutex::new(script.into_iter().collect()),
            fallback,
            seen: Mutex::new(Vec::new()),
        }))
    }

    fn seen(&self) -> Vec<Seen> {
        let mut seen = self.0.seen.lock().unwrap().clone();
        seen.sort_by_key(|s| s.at);
        seen
    }

    fn calls(&self) -> usize {
        self.0.seen.lock().unwrap().len()
    }
}

impl<B> Service<Request<ReplayBody<B>>> for Mock
where
    ReplayBody<B>: http_body::Body<Data = Bytes, Error = BoxError> + Send + 'static,
{
    type Response = Resp;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Resp, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody<B>>) -> Self::Future {
        let state = self.0.clone();
        let at = state.start.elapsed();
        let reply = state
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| state.fallback.clone());
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let collected = body.collect().await?;
            let trailers = collected.trailers().cloned();
            state.seen.lock().unwrap().push(Seen {
                at,
                headers: parts.headers,
                body: collected.to_bytes(),
                trailers,
                buffered_ext: parts.extensions.get::<BufferedBytes>().map(|b| b.0.clone()),
            });
            match reply {
                Reply::Fail(make) => Err(make()),
                Reply::Status {
                    status,
                    headers,
                    body,
                } => {
                    let mut resp = Response::builder().status(status);
                    for (k, v) in headers {
                        resp = resp.header(k, v);
                    }
                    Ok(resp.body(Full::new(Bytes::from(body)))?)
                }
            }
        })
    }
}

// ---------------------------------------------------------------- helpers

fn request(body: &'static str) -> Request<Full<Bytes>> {
    Request::builder()
        .method("POST")
        .uri("http://api.test/v1/messages")
        .header("x-api-key", "sk-ant-SECRET-KEY")
        .header("authorization", "Bearer SECRET-TOKEN")
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn call<B>(svc: &mut RetryAfter<Mock>, req: Request<B>) -> Result<Resp, BoxError>
where
    RetryAfter<Mock>: Service<Request<B>, Response = Resp, Error = BoxError>,
{
    ServiceExt::<Request<B>>::ready(svc).await?.call(req).await
}

async fn send(svc: &mut RetryAfter<Mock>, body: &'static str) -> Result<Resp, BoxError> {
    call(svc, request(body)).await
}

fn deterministic() -> tower_llm_limits::retry::RetryAfterBuilder {
    RetryAfterLayer::builder().jitter(|| 0.5)
}

fn crate_err(err: &BoxError) -> &Error {
    err.downcast_ref::<Error>()
        .unwrap_or_else(|| panic!("not a crate error: {err}"))
}

fn retry_counts(seen: &[Seen]) -> Vec<Option<String>> {
    seen.iter()
        .map(|s| {
            s.headers
                .get(RETRY_COUNT)
                .map(|v| v.to_str().unwrap().to_owned())
        })
        .collect()
}

// ---------------------------------------------------------------- delays

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_and_the_body_replayed() {
    let mock = Mock::new([status(429).header("retry-after", "2").body(ITPM_BODY)]);
    let layer = RetryAfterLayer::anthropic();
    let mut svc = layer.layer(mock.clone());
    let start = Instant::now();
    let resp = send(&mut svc, r#"{"model":"claude","max_tokens":1}"#)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    let seen = mock.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].at, Duration::from_secs(2));
    assert_eq!(seen[0].body, seen[1].body);
    assert_eq!(&seen[0].body[..], br#"{"model":"claude","max_tokens":1}"#);
    // Each attempt carries the bytes as an extension, and the head is copied.
    assert_eq!(seen[1].buffered_ext.as_ref(), Some(&seen[1].body));
    assert_eq!(
        seen[1].headers.get("anthropic-version").unwrap(),
        "2023-06-01"
    );
    assert_eq!(retry_counts(&seen), [None, Some("1".to_owned())]);
    let snap = layer.snapshot();
    assert_eq!((snap.requests, snap.retries), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn retry_after_ms_comes_before_retry_after() {
    let mock = Mock::new([status(429)
        .header("retry-after-ms", "1500")
        .header("retry-after", "7")]);
    let mut svc = RetryAfterLayer::anthropic().layer(mock.clone());
    let start = Instant::now();
    send(&mut svc, "{}").await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
}

#[tokio::test(start_paused = true)]
async fn retry_after_as_http_date() {
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(4));
    let mock = Mock::new([status(503).header("retry-after", &date)]);
    let mut svc = RetryAfterLayer::anthropic().layer(mock.clone());
    let start = Instant::now();
    send(&mut svc, "{}").await.unwrap();
    // Second precision: between 3 and 4 seconds from now.
    let waited = start.elapsed();
    assert!(
        waited > Duration::from_secs(2) && waited <= Duration::from_secs(4),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn reset_of_an_exhausted_limit_is_the_delay_without_retry_after() {
    let reset = format_rfc3339(SystemTime::now() + Duration::from_secs(11));
    let mock = Mock::new([status(429)
        .header("anthropic-ratelimit-input-tokens-limit", "30000")
        .header("anthropic-ratelimit-input-tokens-remaining", "0")
        .header("anthropic-ratelimit-input-tokens-reset", &reset)
        .header("anthropic-ratelimit-requests-remaining", "40")
        .body(ITPM_BODY)]);
    let mut svc = deterministic().build().layer(mock.clone());
    let start = Instant::now();
    send(&mut svc, "{}").await.unwrap();
    let waited = start.elapsed();
    assert!(
        waited > Duration::from_secs(9) && waited <= Duration::from_secs(11),
        "{waited:?}"
    );
}

/// On a wall clock that follows the paused clock, the reset is read
/// exactly: no dependence on the real clock's sub-second phase.
#[tokio::test(start_paused = true)]
async fn reset_is_read_on_the_given_wall_clock() {
    // 2027-01-15T08:00:00Z, then 2.25 s of virtual time.
    let clock = tower_llm_limits::clock::WallClock::following_tokio(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    );
    tokio::time::advance(Duration::from_millis(2_250)).await;
    let mock = Mock::new([status(529)
        .header("anthropic-ratelimit-input-tokens-limit", "30000")
        .header("anthropic-ratelimit-input-tokens-remaining", "0")
        .header(
            "anthropic-ratelimit-input-tokens-reset",
            "2027-01-15T08:00:09Z",
        )
        .body(ITPM_BODY)]);
    let mut svc = deterministic()
        .wall_clock(clock)
        .build()
        .layer(mock.clone());
    let start = Instant::now();
    send(&mut svc, "{}").await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(6_750));
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_with_full_jitter() {
    let mock = Mock::new([status(503), status(500), status(529)]);
    let mut svc = deterministic().build().layer(mock.clone());
    send(&mut svc, "{}").await.unwrap();
    let at: Vec<_> = mock.seen().iter().map(|s| s.at).collect();
    // Half of 0.5 s, 1 s, 2 s.
    let ms = Duration::from_millis;
    assert_eq!(at, [ms(0), ms(250), ms(750), ms(1750)]);
    assert_eq!(
        retry_counts(&mock.seen()),
        [None, Some("1".into()), Some("2".into()), Some("3".into())]
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_stops_growing_at_max_backoff() {
    let mock = Mock::new([status(503), status(503), status(503)]);
    let mut svc = deterministic()
        .initial_backoff(Duration::from_secs(4))
        .max_backoff(Duration::from_secs(6))
        .build()
        .layer(mock.clone());
    send(&mut svc, "{}").await.unwrap();
    let at: Vec<_> = mock.seen().iter().map(|s| s.at.as_secs()).collect();
    assert_eq!(at, [0, 2, 5, 8]);
}

#[tokio::test(start_paused = true)]
async fn injected_jitter_of_zero_retries_at_once() {
    let mock = Mock::new([status(502)]);
    let mut svc = RetryAfterLayer::builder()
        .jitter(|| 0.0)
        .build()
        .layer(mock.clone());
    let start = Instant::now();
    send(&mut svc, "{}").await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(mock.calls(), 2);
}

// ---------------------------------------------------------------- what is retried

#[tokio::test(start_paused = true)]
async fn retries_408_409_429_and_5xx() {
    for code in [408, 409, 429, 500, 502, 503, 504, 529, 599] {
        let mock = Mock::new([status(code)]);
        let mut svc = deterministic().build().layer(mock.clone());
        let resp = send(&mut svc, "{}").await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{code}");
        assert_eq!(mock.calls(), 2, "{code}");
    }
}

#[tokio::test(start_paused = true)]
async fn never_retries_other_4xx_nor_success() {
    for code in [200, 201, 304, 400, 401, 402, 403, 404, 413, 422] {
        let mock = Mock::new([status(code).header("retry-after", "1")]);
        let mut svc = deterministic().build().layer(mock.clone());
        let resp = send(&mut svc, "{}").await.unwrap();
        assert_eq!(resp.status().as_u16(), code);
        assert_eq!(mock.calls(), 1, "{code}");
    }
}

#[tokio::test(start_paused = true)]
async fn x_should_retry_false_stops_retrying() {
    let mock = Mock::new([status(503).header("x-should-retry", "false").body("down")]);
    let mut svc = deterministic().build().layer(mock.clone());
    let resp = send(&mut svc, "{}").await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "down");
    assert_eq!(mock.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn x_should_retry_true_retries_any_status() {
    let mock = Mock::new([status(400).header("x-should-retry", "true")]);
    let mut svc = deterministic().build().layer(mock.clone());
    let resp = send(&mut svc, "{}").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(mock.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn spend_cap_429_fails_at_once() {
    let mock = Mock::new([status(429)
        .header("x-should-retry", "true")
        .body(SPEND_CAP_BODY)]);
    let layer = deterministic().build();
    let mut svc = layer.layer(mock.clone());
    let start = Instant::now();
    let err = send(&mut svc, "{}").await.unwrap_err();
    assert!(matches!(crate_err(&err), Error::SpendLimitReached));
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(mock.calls(), 1);
    assert_eq!(layer.snapshot().spend_limit_reached, 1);
    assert_eq!(layer.snapshot().cooldown_remaining, None);
}

#[tokio::test(start_paused = true)]
async fn rate_limit_429_without_retry_after_backs_off() {
    // Same status, same error type, no details: not the spend cap.
    let mock = Mock::new([status(429).body(ITPM_BODY)]);
    let mut svc = deterministic().build().layer(mock.clone());
    send(&mut svc, "{}").await.unwrap();
    assert_eq!(mock.seen()[1].at, Duration::from_millis(250));
}

// ---------------------------------------------------------------- long delays

#[tokio::test(start_paused = true)]
async fn long_delay_is_waited_when_the_cap_allows() {
    let mock = Mock::new([status(429).header("retry-after", "505")]);
    let mut svc = deterministic()
        .max_server_delay(Duration::from_secs(600))
        .build()
        .layer(mock.clone());
    let start = Instant::now();
    let resp = send(&mut svc, "{}").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::from_secs(505));
    assert_eq!(mock.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn long_delay_fails_at_once_under_the_default_cap() {
    let mock = Mock::new([status(429).header("retry-after", "505")]);
    let layer = RetryAfterLayer::anthropic();
    let mut svc = layer.layer(mock.clone());
    let start = Instant::now();
    let err = send(&mut svc, "{}").await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    match crate_err(&err) {
        Error::RetryAfterTooLong {
            delay,
            status,
            attempts,
            response,
        } => {
            assert_eq!(*delay, Duration::from_secs(505));
            assert_eq!(*status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(*attempts, 1);
            // The response that named the delay, headers included.
            let last = response.as_deref().expect("the last response");
            assert_eq!(last.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(last.headers()["retry-after"], "505");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(crate_err(&err).retry_in(), Some(Duration::from_secs(505)));
    assert_eq!(mock.calls(), 1);
    // The limit is known to be exhausted: the next request waits the cap
    // (60 s), not the 505 s, then asks the server again.
    let start = Instant::now();
    let resp = send(&mut svc, "{}").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::from_secs(60));
    assert_eq!(mock.calls(), 2);
    assert_eq!(layer.snapshot().retry_after_too_long, 1);
}

/// `retry-after: 86400` answers the request that received it at once; the
/// shared cooldown is clamped to the cap, so the client goes on after 60 s
/// instead of failing every request for a day.
#[tokio::test(start_paused = true)]
async fn a_day_long_retry_after_pauses_the_others_for_the_cap_only() {
    let mock = Mock::new([status(429).header("retry-after", "86400")]);
    let layer = deterministic().build();
    let mut svc = layer.layer(mock.clone());
    let err = send(&mut svc, "{}").await.unwrap_err();
    assert!(
        matches!(
            crate_err(&err),
            Error::RetryAfterTooLong { delay, attempts: 1, .. } if *delay == Duration::from_secs(86_400)
        ),
        "{err}"
    );
    assert_eq!(
        layer.snapshot().cooldown_remaining,
        Some(Duration::from_secs(60))
    );
    let start = Instant::now();
    let others = (0..10).map(|_| svc.clone().oneshot(request("{}")));
    let results = futures_util::future::join_all(others).await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.status() == StatusCode::OK)));
    assert_eq!(start.elapsed(), Duration::from_secs(60));
    assert_eq!(mock.calls(), 11);
    tokio::time::advance(Duration::from_secs(600)).await;
    let snap = layer.snapshot();
    assert_eq!(snap.cooldown_remaining, None);
    assert_eq!(snap.retry_after_too_long, 1);
}

/// A delay too large to be a plausible date (1e12 s) is still a delay above
/// the cap, not a malformed header retried after a short backoff.
#[tokio::test(start_paused = true)]
async fn a_retry_after_above_a_year_is_too_long_not_malformed() {
    for huge in ["31622399", "31622401", "1000000000000"] {
        let mock = Mock::new([status(429).header("retry-after", huge)]);
        let layer = deterministic().build();
        let mut svc = layer.layer(mock.clone());
        let start = Instant::now();
        let err = send(&mut svc, "{}").await.unwrap_err();
        assert!(
            matches!(crate_err(&err), Error::RetryAfterTooLong { delay, .. } if *delay >= Duration::from_secs(31_622_399)),
            "{huge}: {err}"
        );
        assert_eq!(start.elapsed(), Duration::ZERO, "{huge}");
        assert_eq!(mock.calls(), 1, "{huge}");
        assert_eq!(
            layer.snapshot().cooldown_remaining,
            Some(Duration::from_secs(60)),
            "{huge}"
        );
    }
}

/// `reset_cooldown` lets new requests go at once; a request already waiting
/// keeps its wait.
#[tokio::test(start_paused = true)]
async fn reset_cooldown_lets_new_requests_go_at_once() {
    let mock = Mock::new([status(429).header("retry-after", "900")]);
    let layer = deterministic()
        .max_server_delay(Duration::from_secs(3600))
        .build();
    let mut first = layer.layer(mock.clone());
    let mut second = first.clone();
    let waiting = tokio::spawn(async move { send(&mut first, "{}").await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        layer.snapshot().cooldown_remaining,
        Some(Duration::from_secs(899))
    );
    layer.reset_cooldown();
    assert_eq!(layer.snapshot().cooldown_remaining, None);
    assert_eq!(
        send(&mut second, "{}").await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(waiting.await.unwrap().unwrap(), StatusCode::OK);
    let at: Vec<_> = mock.seen().iter().map(|s| s.at.as_secs()).collect();
    assert_eq!(at, [0, 1, 900]);
}

// ---------------------------------------------------------------- bounds

#[tokio::test(start_paused = true)]
async fn retries_exhausted_is_a_typed_error_with_the_last_status() {
    let mock = Mock::with_fallback([], status(503));
    let layer = deterministic().max_retries(2).build();
    let mut svc = layer.layer(mock.clone());
    let err = send(&mut svc, "{}").await.unwrap_err();
    match crate_err(&err) {
        Error::RetriesExhausted {
            attempts,
            waited,
            last_status,
            reason,
            source,
            response,
        } => {
            assert_eq!(*attempts, 3);
            assert_eq!(*waited, Duration::from_millis(750));
            assert_eq!(*last_status, Some(StatusCode::SERVICE_UNAVAILABLE));
            assert_eq!(*reason, GiveUpReason::MaxRetries);
            assert!(source.is_none());
            let last = response.as_deref().expect("the last response");
            assert_eq!(last.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert!(last.body_complete());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(mock.calls(), 3);
    let snap = layer.snapshot();
    assert_eq!(snap.give_ups.max_retries, 1);
    assert_eq!(snap.give_ups.get(GiveUpReason::MaxRetries), 1);
    assert_eq!(snap.retries, 2);
}

#[tokio::test(start_paused = true)]
async fn max_retries_zero_makes_one_attempt() {
    let mock = Mock::with_fallback([], status(429).header("retry-after", "1"));
    let mut svc = deterministic().max_retries(0).build().layer(mock.clone());
    let err = send(&mut svc, "{}").await.unwrap_err();
    assert!(matches!(
        crate_err(&err),
        Error::RetriesExhausted {
            attempts: 1,
            reason: GiveUpReason::MaxRetries,
            ..
        }
    ));
    assert_eq!(mock.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn deadline_stops_before_an_attempt_would_start_after_it() {
    let mock = Mock::with_fallback([], status(429).header("retry-after", "3"));
    let layer = deterministic().deadline(Duration::from_secs(5)).build();
    let mut svc = layer.layer(mock.clone());
    let start = Instant::now();
    let err = send(&mut svc, "{}").await.unwrap_err();
    // Attempts at 0 s and 3 s; the third would start at 6 s: given up at 3 s, not waited.
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert!(matches!(
        crate_err(&err),
        Error::RetriesExhausted {
            attempts: 2,
            reason: GiveUpReason::Deadline,
            last_status: Some(StatusCode::TOO_MANY_REQUESTS),
            ..
        }
    ));
    assert_eq!(layer.snapshot().give_ups.deadline, 1);
}

#[tokio::test(start_paused = true)]
async fn empty_budget_gives_up() {
    let mock = Mock::with_fallback([], status(503));
    let layer = deterministic()
        .budget(RetryBudget::new(0.0, 0, Duration::from_secs(10)))
        .build();
    let mut svc = layer.layer(mock.clone());
    let err = send(&mut svc, "{}").await.unwrap_err();
    assert!(matches!(
        crate_err(&err),
        Error::RetriesExhausted {
            attempts: 1,
            reason: GiveUpReason::Budget,
            ..
        }
    ));
    let snap = layer.snapshot();
    assert_eq!(snap.give_ups.budget, 1);
    assert_eq!(snap.budget_balance, Some(0));
}

#[tokio::test(start_paused = true)]
async fn budget_allows_retries_as_a_ratio_of_requests_shared_by_clones() {
    // One retry per two requests, no floor.
    let layer = deterministic()
        .budget(RetryBudget::new(0.5, 0, Duration::from_secs(10)))
        .build();
    let ok = Mock::new([]);
    let mut a = layer.layer(ok.clone());
    let mut b = a.clone();
    send(&mut a, "{}").await.unwrap();
    send(&mut b, "{}").await.unwrap();
    assert_eq!(layer.snapshot().budget_balance, Some(1));
    // A third request deposits too: the budget holds 1.5 retries, so one is allowed.
    let failing = Mock::with_fallback([], status(503));
    let mut c = layer.layer(failing.clone());
    let err = send(&mut c, "{}").await.unwrap_err();
    assert!(matches!(
        crate_err(&err),
        Error::RetriesExhausted {
            attempts: 2,
            reason: GiveUpReason::Budget,
            ..
        }
    ));
    assert!(layer.snapshot().budget_balance.is_some());
    // Without a budget, only max_retries bounds.
    let unbounded = deterministic().without_budget().build();
    assert_eq!(unbounded.snapshot().budget_balance, None);
}

// ---------------------------------------------------------------- inner errors

fn connection_reset() -> BoxError {
    "connection reset by peer".into()
}

#[tokio::test(start_paused = true)]
async fn inner_errors_before_a_response_are_retried() {
    let mock = Mock::new([Reply::Fail(connection_reset)]);
    let mut svc = deterministic().build().layer(mock.clone());
    let resp = send(&mut svc, "{}").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(mock.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_of_inner_errors_keep_the_last_error() {
    let mock = Mock::with_fallback([], Reply::Fail(connection_reset));
    let mut svc = deterministic().max_retries(1).build().layer(mock.clone());
    let err = send(&mut svc, "{}").await.unwrap_err();
    match crate_err(&err) {
        Error::RetriesExhausted {
            attempts: 2,
            last_status: None,
            source: Some(source),
            ..
        } => assert_eq!(source.to_string(), "connection reset by peer"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn non_transient_crate_errors_are_not_retried() {
    fn too_large() -> BoxError {
        Box::new(Error::RequestTooLarge {
            dimension: Dimension::InputTokens,
            cost: 50_000,
            limit: 30_000,
        })
    }
    fn spend() -> BoxError {
        Box::new(Error::SpendLimitReached)
    }
    for make in [too_large as fn() -> BoxError, spend] {
        let mock = Mock::new([Reply::Fail(make)]);
        let mut svc = deterministic().build().layer(mock.clone());
        let err = send(&mut svc, "{}").await.unwrap_err();
        assert!(!crate_err(&err).is_transient());
        assert_eq!(mock.calls(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn budget_exceeded_is_retried_after_its_retry_in() {
    fn budget() -> BoxError {
        Box::new(Error::BudgetExceeded {
            retry_in: Duration::from_secs(3),
            dimension: Dimension::OutputTokens,
        })
    }
    let mock = Mock::new([Reply::Fail(budget)]);
    let mut svc = deterministic().build().layer(mock.clone());
    let start = Instant::now();
    send(&mut svc, "{}").await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    // A retry_in above the cap: the inner error itself comes back, at once.
    fn far() -> BoxError {
        Box::new(Error::BudgetExceeded {
            retry_in: Duration::from_secs(3600),
            dimension: Dimension::OutputTokens,
        })
    }
    let mock = Mock::new([Reply::Fail(far)]);
    let mut svc = deterministic().build().layer(mock.clone());
    let err = send(&mut svc, "{}").await.unwrap_err();
    assert_eq!(crate_err(&err).retry_in(), Some(Duration::from_secs(3600)));
    assert_eq!(mock.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn overloaded_is_local_back_pressure_and_not_retried() {
    fn overloaded() -> BoxError {
        Box::new(Error::Overloaded { waiting: 64 })
    }
    let mock = Mock::new([Reply::Fail(overloaded)]);
    let layer = deterministic().build();
    let mut svc = layer.layer(mock.clone());
    let err = send(&mut svc, "{}").await.unwrap_err();
    assert!(matches!(crate_err(&err), Error::Overloaded { waiting: 64 }));
    assert_eq!(mock.calls(), 1);
    assert_eq!(layer.snapshot().retries, 0);
}

// ---------------------------------------------------------------- bodies

#[tokio::test(start_paused = true)]
async fn oversized_body_is_sent_once_and_returned_as_is() {
    let mock = Mock::new([status(503).body("busy")]);
    let layer = deterministic().buffer_limit(8).build();
    let mut svc = layer.layer(mock.clone());
    let resp = send(&mut svc, "a body longer than eight bytes")
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let seen = mock.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(&seen[0].body[..], b"a body longer than eight bytes");
    assert_eq!(seen[0].buffered_ext, None);
    assert_eq!(layer.snapshot().not_replayable, 1);
}

#[tokio::test(start_paused = true)]
async fn oversized_body_with_an_inner_error_is_not_replayable() {
    let mock = Mock::new([Reply::Fail(connection_reset)]);
    let layer = deterministic().buffer_limit(8).build();
    let mut svc = layer.layer(mock.clone());
    let err = send(&mut svc, "a body longer than eight bytes")
        .await
        .unwrap_err();
    match crate_err(&err) {
        Error::NotReplayable {
            status: None,
            source: Some(source),
        } => assert_eq!(source.to_string(), "connection reset by peer"),
        other => panic!("{other:?}"),
    }
    assert_eq!(mock.calls(), 1);
    assert_eq!(layer.snapshot().not_replayable, 1);
}

type Chunks = stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;

fn streamed(chunks: usize, trailers: bool) -> (StreamBody<Chunks>, Vec<u8>) {
    let mut frames = Vec::new();
    let mut all = Vec::new();
    for i in 0..chunks {
        let chunk = vec![b'a' + (i % 26) as u8; 10];
        all.extend_from_slice(&chunk);
        frames.push(Ok(Frame::data(Bytes::from(chunk))));
    }
    if trailers {
        let mut t = HeaderMap::new();
        t.insert("x-checksum", "42".parse().unwrap());
        frames.push(Ok(Frame::trailers(t)));
    }
    (StreamBody::new(stream::iter(frames)), all)
}

#[tokio::test(start_paused = true)]
async fn streamed_bodies_are_replayed_or_passed_through_intact() {
    // Within the limit: 20 frames + trailers, replayed identically.
    let mock = Mock::new([status(503)]);
    let layer = deterministic().buffer_limit(1000).build();
    let mut svc = layer.layer(mock.clone());
    let (body, all) = streamed(20, true);
    let resp = call(&mut svc, Request::new(body)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = mock.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(&s.body[..], &all[..]);
        assert_eq!(
            s.trailers
                .as_ref()
                .and_then(|t| t.get("x-checksum"))
                .unwrap(),
            "42"
        );
    }
    // Unknown size growing past the limit: passes through unchanged, not retried.
    let mock = Mock::new([status(503)]);
    let mut svc = layer.layer(mock.clone());
    let (body, all) = streamed(200, true);
    let resp = call(&mut svc, Request::new(body)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let seen = mock.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(&seen[0].body[..], &all[..]);
    assert!(seen[0].trailers.is_some());
    assert_eq!(layer.snapshot().not_replayable, 1);
}

#[tokio::test(start_paused = true)]
async fn a_body_that_fails_to_read_is_a_body_error() {
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
        Ok(Frame::data(Bytes::from_static(b"partial"))),
        Err("client went away".into()),
    ];
    let mock = Mock::new([]);
    let mut svc = deterministic().build().layer(mock.clone());
    let req = Request::new(StreamBody::new(stream::iter(frames)));
    let err = call(&mut svc, req).await.unwrap_err();
    assert!(matches!(crate_err(&err), Error::Body(_)));
    assert_eq!(mock.calls(), 0);
}

// ---------------------------------------------------------------- shared cooldown

#[tokio::test(start_paused = true)]
async fn shared_cooldown_holds_fifty_concurrent_requests() {
    let mock = Mock::new([status(429).header("retry-after", "2")]);
    let layer = RetryAfterLayer::anthropic();
    let svc = layer.layer(mock.clone());
    let requests = (0..50).map(|_| svc.clone().oneshot(request(r#"{"n":1}"#)));
    let results = futures_util::future::join_all(requests).await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.status() == StatusCode::OK)));
    let seen = mock.seen();
    assert_eq!(seen.len(), 51);
    // The one that was answered 429 at 0 s; nobody else before 2 s.
    assert_eq!(seen[0].at, Duration::ZERO);
    assert!(seen[1..].iter().all(|s| s.at == Duration::from_secs(2)));
    assert_eq!(layer.snapshot().retries, 1);
}

#[tokio::test(start_paused = true)]
async fn cooldown_holds_new_requests_through_clones_and_services() {
    let mock = Mock::new([status(529).header("retry-after", "5")]);
    let layer = RetryAfterLayer::anthropic();
    let mut first = layer.layer(mock.clone());
    let mut other = layer.layer(mock.clone());
    let a = tokio::spawn(async move { send(&mut first, "{}").await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        layer.snapshot().cooldown_remaining,
        Some(Duration::from_secs(4))
    );
    let b = tokio::spawn(async move { send(&mut other, "{}").await.map(|r| r.status()) });
    assert_eq!(a.await.unwrap().unwrap(), StatusCode::OK);
    assert_eq!(b.await.unwrap().unwrap(), StatusCode::OK);
    let at: Vec<_> = mock.seen().iter().map(|s| s.at.as_secs()).collect();
    assert_eq!(at, [0, 5, 5]);
    assert_eq!(layer.snapshot().cooldown_remaining, None);
}

#[tokio::test(start_paused = true)]
async fn a_503_with_retry_after_does_not_pause_others() {
    let mock = Mock::new([status(503).header("retry-after", "5")]);
    let layer = RetryAfterLayer::anthropic();
    let mut first = layer.layer(mock.clone());
    let mut other = first.clone();
    let a = tokio::spawn(async move { send(&mut first, "{}").await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(layer.snapshot().cooldown_remaining, None);
    send(&mut other, "{}").await.unwrap();
    a.await.unwrap().unwrap();
    let at: Vec<_> = mock.seen().iter().map(|s| s.at.as_secs()).collect();
    assert_eq!(at, [0, 1, 5]);
}

#[tokio::test(start_paused = true)]
async fn waited_counts_cooldowns_and_backoff() {
    let mock = Mock::with_fallback(
        [status(429).header("retry-after", "2"), status(503)],
        status(500),
    );
    let mut svc = deterministic().max_retries(2).build().layer(mock.clone());
    let err = send(&mut svc, "{}").await.unwrap_err();
    match crate_err(&err) {
        Error::RetriesExhausted { waited, .. } => {
            // 2 s (retry-after) + 0.5 s (half of the 1 s bound).
            assert_eq!(*waited, Duration::from_millis(2500));
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------- tower contract

#[tokio::test(start_paused = true)]
async fn readiness_is_forwarded_and_rechecked_before_each_retry() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<ReplayBody<Full<Bytes>>>, Resp>();
    let mut svc = tower_test::mock::Spawn::new(deterministic().build().layer(mock));
    handle.allow(0);
    assert_pending!(svc.poll_ready::<Request<Full<Bytes>>>());
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready::<Request<Full<Bytes>>>());
    let mut fut = tokio_test::task::spawn(svc.call(request("{}")));
    assert_pending!(fut.poll());
    let (req, send_response) = handle.next_request().await.unwrap();
    assert!(req.headers().get(RETRY_COUNT).is_none());
    send_response.send_response(
        Response::builder()
            .status(503)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    );
    // The retry waits its backoff, then for the inner service to be ready again.
    assert_pending!(fut.poll());
    tokio::time::advance(Duration::from_millis(249)).await;
    assert_pending!(fut.poll());
    assert!(handle.poll_request().is_pending());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_pending!(fut.poll());
    assert!(handle.poll_request().is_pending());
    handle.allow(1);
    assert_pending!(fut.poll());
    let (req, send_response) = handle.next_request().await.unwrap();
    assert_eq!(req.headers().get(RETRY_COUNT).unwrap(), "1");
    send_response.send_response(Response::new(Full::new(Bytes::new())));
    let resp = assert_ready_ok!(fut.poll());
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_stops_retrying() {
    let mock = Mock::with_fallback([], status(429).header("retry-after", "5"));
    let layer = RetryAfterLayer::anthropic();
    let mut svc = layer.layer(mock.clone());
    let req = request("{}");
    let ready = ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
        .await
        .unwrap();
    let mut fut = tokio_test::task::spawn(ready.call(req));
    assert_pending!(fut.poll());
    assert_eq!(mock.calls(), 1);
    drop(fut);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(mock.calls(), 1);
    assert_eq!(layer.snapshot().retries, 1);
}

/// A body of given frames announcing `hint` as its exact size.
struct Announced {
    frames: VecDeque<Frame<Bytes>>,
    hint: u64,
}

impl http_body::Body for Announced {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.frames.pop_front().map(Ok))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.hint)
    }
}

fn announced(chunks: &[&'static [u8]], trailer: bool, hint: u64) -> Announced {
    let mut frames: VecDeque<_> = chunks
        .iter()
        .map(|c| Frame::data(Bytes::from_static(c)))
        .collect();
    if trailer {
        let mut t = HeaderMap::new();
        t.insert("x-checksum", "7".parse().unwrap());
        frames.push_back(Frame::trailers(t));
    }
    Announced { frames, hint }
}

#[tokio::test(start_paused = true)]
async fn bodies_of_known_size_in_many_frames_are_replayed_intact() {
    let mock = Mock::new([status(500)]);
    let mut svc = deterministic().build().layer(mock.clone());
    let body = announced(&[b"{\"a\":", b"", b"1,", b"\"b\":2}"], true, 13);
    let resp = call(&mut svc, Request::new(body)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = mock.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(&s.body[..], b"{\"a\":1,\"b\":2}");
        assert_eq!(s.buffered_ext.as_deref(), Some(&b"{\"a\":1,\"b\":2}"[..]));
        assert_eq!(
            s.trailers
                .as_ref()
                .and_then(|t| t.get("x-checksum"))
                .unwrap(),
            "7"
        );
    }
    // An empty body is replayed as empty.
    let mock = Mock::new([status(500)]);
    let mut svc = deterministic().build().layer(mock.clone());
    call(&mut svc, Request::new(announced(&[], false, 0)))
        .await
        .unwrap();
    assert!(mock.seen().iter().all(|s| s.body.is_empty()));
}

#[tokio::test(start_paused = true)]
async fn a_body_longer_than_its_exact_size_is_a_body_error() {
    let mock = Mock::new([]);
    let mut svc = deterministic().build().layer(mock.clone());
    let body = announced(&[b"12345", b"6789"], false, 5);
    let err = call(&mut svc, Request::new(body)).await.unwrap_err();
    assert!(matches!(crate_err(&err), Error::Body(_)));
    assert_eq!(mock.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_limit_resetting_after_the_cap_fails_at_once() {
    let reset = format_rfc3339(SystemTime::now() + Duration::from_secs(300));
    let mock = Mock::new([status(429)
        .header("anthropic-ratelimit-output-tokens-remaining", "0")
        .header("anthropic-ratelimit-output-tokens-reset", &reset)
        .body(ITPM_BODY)]);
    let mut svc = deterministic().build().layer(mock.clone());
    let err = send(&mut svc, "{}").await.unwrap_err();
    match crate_err(&err) {
        Error::RetryAfterTooLong { delay, .. } => {
            assert!(*delay > Duration::from_secs(298) && *delay <= Duration::from_secs(300))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(mock.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_cooldown_past_the_deadline_fails_a_new_request_without_an_attempt() {
    let mock = Mock::new([status(429).header("retry-after", "30")]);
    let layer = deterministic().deadline(Duration::from_secs(10)).build();
    let mut first = layer.layer(mock.clone());
    let mut second = first.clone();
    let err = send(&mut first, "{}").await.unwrap_err();
    assert!(matches!(
        crate_err(&err),
        Error::RetriesExhausted {
            attempts: 1,
            reason: GiveUpReason::Deadline,
            ..
        }
    ));
    let start = Instant::now();
    let err = send(&mut second, "{}").await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert!(matches!(
        crate_err(&err),
        Error::RetriesExhausted {
            attempts: 0,
            reason: GiveUpReason::Deadline,
            last_status: None,
            ..
        }
    ));
    assert_eq!(mock.calls(), 1);
    assert_eq!(layer.snapshot().give_ups.deadline, 2);
}

// ---------------------------------------------------------------- bodies that are not ready at once

/// A body of exact size whose bytes arrive later (as a network body's do).
struct Later {
    rx: Option<tokio::sync::oneshot::Receiver<Bytes>>,
    size: u64,
}

impl http_body::Body for Later {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(rx) = self.rx.as_mut() else {
            return Poll::Ready(None);
        };
        let got = std::task::ready!(Pin::new(rx).poll(cx));
        self.rx = None;
        Poll::Ready(Some(got.map(Frame::data).map_err(Into::into)))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.size)
    }
}

#[tokio::test(start_paused = true)]
async fn an_exact_size_body_not_ready_at_once_is_read_when_it_wakes_the_task() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<ReplayBody<Later>>, Resp>();
    let mut svc = tower_test::mock::Spawn::new(deterministic().build().layer(mock));
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready::<Request<Later>>());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let body = Later {
        rx: Some(rx),
        size: 5,
    };
    let mut fut = tokio_test::task::spawn(svc.call(Request::new(body)));
    assert!(handle.poll_request().is_pending());
    assert_pending!(fut.poll());
    assert!(handle.poll_request().is_pending());
    tx.send(Bytes::from_static(b"hello")).unwrap();
    // The task's waker was registered by the poll.
    assert!(fut.is_woken());
    assert_pending!(fut.poll());
    let (req, send_response) = handle.next_request().await.unwrap();
    assert_eq!(
        req.extensions().get::<BufferedBytes>().map(|b| b.0.clone()),
        Some(Bytes::from_static(b"hello"))
    );
    send_response.send_response(Response::new(Full::new(Bytes::new())));
    assert_eq!(assert_ready_ok!(fut.poll()).status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn an_exact_size_body_that_fails_is_a_body_error_without_an_attempt() {
    let mock = Mock::new([]);
    let mut svc = deterministic().build().layer(mock.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<Bytes>();
    drop(tx);
    let body = Later {
        rx: Some(rx),
        size: 5,
    };
    let err = call(&mut svc, Request::new(body)).await.unwrap_err();
    assert!(matches!(crate_err(&err), Error::Body(_)));
    assert_eq!(mock.calls(), 0);
}

#[tokio::test(start_paused = true)]
#[should_panic(expected = "`retry::ResponseFuture` polled after completion")]
async fn polling_a_finished_response_future_panics() {
    let mock = Mock::new([]);
    let mut svc = deterministic().build().layer(mock);
    let ready = ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
        .await
        .unwrap();
    let mut fut = tokio_test::task::spawn(ready.call(request("{}")));
    while fut.poll().is_pending() {
        tokio::task::yield_now().await;
    }
    let _ = fut.poll();
}

// ---------------------------------------------------------------- stalled error bodies

/// A response body that sends `data` and ends, or never sends anything
/// (`stalls`); it records when it is dropped.
#[derive(Debug)]
struct Stall {
    data: Option<Bytes>,
    stalls: bool,
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for Stall {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.stalls {
            return Poll::Pending;
        }
        Poll::Ready(self.data.take().map(|d| Ok(Frame::data(d))))
    }
}

impl Drop for Stall {
    fn drop(&mut self) {
        self.dropped
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

type StallReply = std::future::Ready<Result<Response<Stall>, BoxError>>;

/// An API whose first answer is a 429 without `retry-after` whose body
/// stalls for ever (`stalls`) or is the spend-cap body; then 200.
fn stalling_api(
    stalls: bool,
    calls: Arc<Mutex<Vec<Duration>>>,
    dropped: Arc<std::sync::atomic::AtomicBool>,
) -> impl Service<
    Request<ReplayBody<Full<Bytes>>>,
    Response = Response<Stall>,
    Error = BoxError,
    Future = StallReply,
> + Clone {
    let start = Instant::now();
    tower::service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
        let mut seen = calls.lock().unwrap();
        seen.push(start.elapsed());
        let first = seen.len() == 1;
        let body = Stall {
            data: first.then(|| Bytes::from_static(SPEND_CAP_BODY.as_bytes())),
            stalls: first && stalls,
            dropped: dropped.clone(),
        };
        let mut resp = Response::new(body);
        if first {
            *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        }
        std::future::ready(Ok(resp))
    })
}

/// A 429 without `retry-after` whose body stalls is not waited on for ever:
/// after the error body timeout it is dropped (freeing what it holds) and
/// the 429 is retried as a rate-limit one.
#[tokio::test(start_paused = true)]
async fn a_stalled_error_body_times_out_and_the_429_is_retried() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let layer = deterministic()
        .error_body_timeout(Duration::from_secs(3))
        .build();
    let svc = layer.layer(stalling_api(true, calls.clone(), dropped.clone()));
    let outcome = tokio::time::timeout(Duration::from_secs(3600), svc.oneshot(request("{}")))
        .await
        .expect("a stalled error body must not hang the request");
    assert_eq!(outcome.unwrap().status(), StatusCode::OK);
    assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
    let calls = calls.lock().unwrap().clone();
    // 3 s of timeout, then a backoff of at most 0.5 s (jitter 0.5: 0.25 s).
    assert_eq!(calls, [Duration::ZERO, Duration::from_millis(3_250)]);
    let snap = layer.snapshot();
    assert_eq!((snap.error_body_timeouts, snap.retries), (1, 1));
}

/// A body that arrives within the timeout is still read: the spend-cap 429 fails at once.
#[tokio::test(start_paused = true)]
async fn an_error_body_in_time_is_still_read() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let layer = deterministic().build();
    let svc = layer.layer(stalling_api(false, calls.clone(), dropped));
    let err = svc.oneshot(request("{}")).await.unwrap_err();
    assert!(matches!(crate_err(&err), Error::SpendLimitReached));
    assert_eq!(calls.lock().unwrap().len(), 1);
    assert_eq!(layer.snapshot().error_body_timeouts, 0);
}

// ---------------------------------------------------------------- replays after send

fn reset_mid_request() -> BoxError {
    Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
}

fn refused() -> BoxError {
    Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
}

/// By default a request reset mid-request is replayed, as the SDKs do, and
/// the replay is counted; a refused connection is retried but is no replay.
#[tokio::test(start_paused = true)]
async fn replays_after_send_are_retried_by_default_and_counted() {
    let mock = Mock::new([Reply::Fail(reset_mid_request), Reply::Fail(refused)]);
    let layer = deterministic().build();
    let mut svc = layer.layer(mock.clone());
    assert_eq!(send(&mut svc, "{}").await.unwrap().status(), StatusCode::OK);
    assert_eq!(mock.calls(), 3);
    let snap = layer.snapshot();
    assert_eq!((snap.retries, snap.replays_after_send), (2, 1));
    assert_eq!(snap.give_ups.total(), 0);
}

/// With `AfterSend::Fail` a request that may have reached the server is not
/// sent again; one that never left (refused, a local refusal) still is.
#[tokio::test(start_paused = true)]
async fn after_send_fail_does_not_replay_a_request_the_server_may_have_done() {
    let mock = Mock::new([Reply::Fail(refused), Reply::Fail(reset_mid_request)]);
    let layer = deterministic().after_send(AfterSend::Fail).build();
    let mut svc = layer.layer(mock.clone());
    let err = send(&mut svc, "{}").await.unwrap_err();
    match crate_err(&err) {
        Error::RetriesExhausted {
            attempts: 2,
            reason: GiveUpReason::Sent,
            last_status: None,
            source: Some(source),
            ..
        } => {
            let io = source.downcast_ref::<std::io::Error>().unwrap();
            assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(mock.calls(), 2);
    let snap = layer.snapshot();
    assert_eq!((snap.retries, snap.replays_after_send), (1, 0));
    assert_eq!(snap.give_ups.get(GiveUpReason::Sent), 1);
    // A local refusal from an inner layer never left either: retried.
    let mock = Mock::new([Reply::Fail(|| {
        Box::new(Error::BudgetExceeded {
            retry_in: Duration::from_secs(1),
            dimension: Dimension::InputTokens,
        })
    })]);
    let mut svc = layer.layer(mock.clone());
    assert_eq!(send(&mut svc, "{}").await.unwrap().status(), StatusCode::OK);
    assert_eq!(mock.calls(), 2);
    assert_eq!(layer.snapshot().replays_after_send, 0);
}
