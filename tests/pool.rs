//! The pool: one service over several upstreams. Each upstream is an
//! in-process emulator (or a scripted answer) behind a host name, under
//! tokio's paused clock; one test goes through a hyper-util client to two
//! emulators on loopback.
#![cfg(feature = "pool")]

mod support;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, ServiceExt};
use tower_llm_limits::budget::{
    Limits, LimitsConfig, ModelClass, TokenBudgetBuilder, TokenBudgetLayer,
};
use tower_llm_limits::estimate::{AnthropicEstimator, Estimate, TokenEstimator};
use tower_llm_limits::pool::{
    AllowFallback, DrainReason, Pool, PoolBuilder, PoolError, Upstream, MODEL_HEADER,
    UPSTREAM_HEADER,
};
use tower_llm_limits::wire::Usage;
use tower_llm_limits::BoxError;
use tower_llm_limits_emulator::{Emulator, Latency};

type Body = UnsyncBoxBody<Bytes, BoxError>;
type Transport = BoxCloneSyncService<Request<Full<Bytes>>, Response<Body>, BoxError>;

const BIG: Limits = Limits::new().rpm(1_000).itpm(1_000_000).otpm(1_000_000);

fn emulator(limits: Limits) -> Emulator {
    Emulator::builder()
        .limits(limits)
        .latency(Latency::none())
        .seed(3)
        .build()
        .expect("emulator settings")
}

/// What an upstream host does with a request.
#[derive(Clone)]
enum Backend {
    Emu(Emulator),
    /// A status, a body and an optional `retry-after` (seconds).
    Status(u16, &'static str, Option<u64>),
    /// The connection fails with this kind, no response.
    Fail(io::ErrorKind),
    /// A 200 event stream whose body fails after its first event.
    StreamThenFail,
    /// The emulator, except that this host's call number `n` (from 0) gets
    /// a `529 overloaded_error`.
    OverloadedOnce(usize, Emulator),
}

/// One request as a host received it.
#[derive(Debug, Clone)]
struct Call {
    host: String,
    uri: String,
    api_key: Option<String>,
    authorization: bool,
    body: Bytes,
}

type Calls = Arc<Mutex<Vec<Call>>>;

fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A transport that sends each request to the backend of its host and
/// records it.
fn transport(hosts: Vec<(&'static str, Backend)>) -> (Transport, Calls) {
    let hosts: Arc<HashMap<&'static str, Backend>> = Arc::new(hosts.into_iter().collect());
    let calls: Calls = Arc::default();
    let log = Arc::clone(&calls);
    let svc = service_fn(move |req: Request<Full<Bytes>>| {
        let hosts = Arc::clone(&hosts);
        let log = Arc::clone(&log);
        async move {
            // `a.example` is backend `a`.
            let host = req.uri().host().unwrap_or_default();
            let host = host.split('.').next().unwrap_or_default().to_string();
            let (parts, body) = req.into_parts();
            let body = body.collect().await?.to_bytes();
            log.lock().expect("log").push(Call {
                host: host.clone(),
                uri: parts.uri.to_string(),
                api_key: parts
                    .headers
                    .get("x-api-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                authorization: parts.headers.contains_key("authorization"),
                body: body.clone(),
            });
            let nth = log
                .lock()
                .expect("log")
                .iter()
                .filter(|c| c.host == host)
                .count()
                - 1;
            let backend = hosts.get(host.as_str()).cloned();
            match backend {
                Some(Backend::OverloadedOnce(n, _)) if n == nth => {
                    let text = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
                    let mut resp =
                        Response::new(boxed(Full::new(Bytes::from_static(text.as_bytes()))));
                    *resp.status_mut() = StatusCode::from_u16(529)?;
                    Ok(resp)
                }
                Some(Backend::OverloadedOnce(_, e)) => {
                    let req = Request::from_parts(parts, Full::new(body));
                    let resp = e.service().oneshot(req).await?;
                    Ok(resp.map(boxed))
                }
                Some(Backend::Emu(e)) => {
                    let req = Request::from_parts(parts, Full::new(body));
                    let resp = e.service().oneshot(req).await?;
                    Ok(resp.map(boxed))
                }
                Some(Backend::Status(status, text, retry_after)) => {
                    let mut resp =
                        Response::new(boxed(Full::new(Bytes::from_static(text.as_bytes()))));
                    *resp.status_mut() = StatusCode::from_u16(status)?;
                    if let Some(s) = retry_after {
                        resp.headers_mut().insert("retry-after", s.into());
                    }
                    Ok(resp)
                }
                Some(Backend::Fail(kind)) => Err(io::Error::new(kind, "scripted").into()),
                Some(Backend::StreamThenFail) => {
                    let first = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n";
                    let frames: Vec<Result<http_body::Frame<Bytes>, BoxError>> = vec![
                        Ok(http_body::Frame::data(Bytes::from_static(first.as_bytes()))),
                        Err(io::Error::new(io::ErrorKind::ConnectionReset, "mid-stream").into()),
                    ];
                    let body = StreamBody::new(futures_util::stream::iter(frames));
                    let mut resp = Response::new(boxed(body));
                    resp.headers_mut()
                        .insert("content-type", "text/event-stream".parse()?);
                    Ok(resp)
                }
                None => Err(io::Error::new(io::ErrorKind::ConnectionRefused, "no host").into()),
            }
        }
    });
    (BoxCloneSyncService::new(svc), calls)
}

fn upstream(name: &str, limits: impl Into<LimitsConfig>) -> Upstream {
    Upstream::new(name, &format!("http://{name}.example"), limits)
        .expect("base url")
        .key(format!("sk-secret-{name}"))
        .expect("key")
}

fn body(value: &Value) -> Full<Bytes> {
    Full::new(Bytes::from(serde_json::to_vec(value).expect("json")))
}

fn plain(prompt: &str) -> Value {
    json!({"model": "claude-sonnet-4-5", "max_tokens": 20,
           "messages": [{"role": "user", "content": prompt}]})
}

fn request(value: &Value) -> Request<Full<Bytes>> {
    Request::post("/v1/messages")
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .header("x-api-key", "sk-caller-key")
        .body(body(value))
        .expect("request")
}

/// Sends one request and reads its answer: (status, upstream header, body).
async fn send(pool: &Pool<Transport>, value: &Value) -> Result<(u16, String, Bytes), BoxError> {
    send_request(pool, request(value)).await
}

async fn send_request(
    pool: &Pool<Transport>,
    req: Request<Full<Bytes>>,
) -> Result<(u16, String, Bytes), BoxError> {
    let resp = pool.send(req).await?;
    let status = resp.status().as_u16();
    let upstream = resp
        .headers()
        .get(UPSTREAM_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, upstream, body))
}

fn admitted(e: &Emulator) -> u64 {
    support::admitted_and_rate_limited(e).0
}

// ---------------------------------------------------------------- routing

#[tokio::test(start_paused = true)]
async fn a_burst_goes_where_it_is_admitted_soonest() {
    // a admits 2 requests a minute, b 6: 8 at once all fit at once only if
    // 2 go to a and 6 to b (round robin would make 2 of a's 4 wait 30 s).
    let small = Limits::new().rpm(2).itpm(100_000).otpm(100_000);
    let large = Limits::new().rpm(6).itpm(100_000).otpm(100_000);
    let (ea, eb) = (emulator(small), emulator(large));
    let (t, _) = transport(vec![
        ("a", Backend::Emu(ea.clone())),
        ("b", Backend::Emu(eb.clone())),
    ]);
    let pool = Pool::builder()
        .upstream(upstream("a", small))
        .upstream(upstream("b", large))
        .build(t)
        .expect("pool");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            send(&pool, &plain(&format!("q{i}"))).await
        }));
    }
    for t in tasks {
        let (status, _, _) = t.await.expect("task").expect("answer");
        assert_eq!(status, 200);
    }
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!((admitted(&ea), admitted(&eb)), (2, 6));
    assert_eq!(support::rate_limited(&ea) + support::rate_limited(&eb), 0);
    let snap = pool.snapshot();
    assert_eq!(snap.failovers, 0);
    assert!(snap.upstreams.iter().all(|u| u.pending.requests == 0));
    let admitted: Vec<u64> = snap.upstreams.iter().map(|u| u.admitted.requests).collect();
    assert_eq!(admitted, [2, 6]);
    assert!(snap.upstreams.iter().all(|u| u.admitted.input_tokens > 0));

    // The ninth waits for the first refill, 10 s on b (6 RPM) against 30 s
    // on a: it goes to b.
    let (_, up, _) = send(&pool, &plain("ninth")).await.expect("answer");
    assert_eq!(up, "b");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(12),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_that_waits_is_counted_through_its_upstream() {
    // The default budget of an upstream counts a large request that waits
    // (`count_tokens`): the count goes to that upstream, with its key.
    let limits = Limits::new().rpm(1_000).itpm(6_000).otpm(100_000);
    let e = emulator(limits);
    let (t, calls) = transport(vec![("a", Backend::Emu(e.clone()))]);
    let pool = Pool::builder()
        .upstream(upstream("a", limits))
        .build(t)
        .expect("pool");
    let first = plain(&"lorem ipsum dolor sit amet ".repeat(700));
    assert_eq!(send(&pool, &first).await.expect("answer").0, 200);
    let second = plain(&"consectetur adipiscing elit sed do ".repeat(550));
    assert_eq!(send(&pool, &second).await.expect("answer").0, 200);
    let calls = calls.lock().expect("calls").clone();
    let counts: Vec<&Call> = calls
        .iter()
        .filter(|c| c.uri.ends_with("/v1/messages/count_tokens"))
        .collect();
    let uris: Vec<&str> = calls.iter().map(|c| c.uri.as_str()).collect();
    assert_eq!(counts.len(), 1, "{uris:?}");
    assert_eq!(counts[0].uri, "http://a.example/v1/messages/count_tokens");
    assert_eq!(counts[0].api_key.as_deref(), Some("sk-secret-a"));
    assert_eq!(support::rate_limited(&e), 0);
}

#[tokio::test(start_paused = true)]
async fn requests_that_must_wait_count_those_already_waiting() {
    // Both upstreams used up (a: 2 a minute, b: 4). Six more at once: b
    // frees a request every 15 s, a every 30 s; counting the requests
    // already routed and waiting, four go to b (15, 30, 45, 60 s) and two to
    // a (30, 60 s): all done in a minute. Looking at the buckets alone would
    // send all six to b (done at 90 s).
    let small = Limits::new().rpm(2).itpm(100_000).otpm(100_000);
    let large = Limits::new().rpm(4).itpm(100_000).otpm(100_000);
    let (ea, eb) = (emulator(small), emulator(large));
    let (t, _) = transport(vec![
        ("a", Backend::Emu(ea.clone())),
        ("b", Backend::Emu(eb.clone())),
    ]);
    let pool = Pool::builder()
        .upstream(upstream("a", small))
        .upstream(upstream("b", large))
        .build(t)
        .expect("pool");
    for i in 0..6 {
        send(&pool, &plain(&format!("warm {i}")))
            .await
            .expect("answer");
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            send(&pool, &plain(&format!("q{i}"))).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task").expect("answer").0, 200);
    }
    let took = start.elapsed();
    assert!(took <= Duration::from_secs(61), "{took:?}");
    assert_eq!((admitted(&ea), admitted(&eb)), (4, 8));
    assert_eq!(support::rate_limited(&ea) + support::rate_limited(&eb), 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_request_moves_to_an_upstream_that_became_sooner() {
    // Two upstreams of 2 requests a minute, both used up. Four requests:
    // two wait on each (30 s and 60 s). The two on `b` are cancelled: one of
    // those waiting on `a` moves to `b` (free in 30 s), unsent until then.
    let limits = Limits::new().rpm(2).itpm(100_000).otpm(100_000);
    let (ea, eb) = (emulator(limits), emulator(limits));
    let (t, _) = transport(vec![
        ("a", Backend::Emu(ea.clone())),
        ("b", Backend::Emu(eb.clone())),
    ]);
    let pool = Pool::builder()
        .upstream(upstream("a", limits))
        .upstream(upstream("b", limits))
        .build(t)
        .expect("pool");
    for i in 0..4 {
        send(&pool, &plain(&format!("warm {i}")))
            .await
            .expect("answer");
    }
    assert_eq!((admitted(&ea), admitted(&eb)), (2, 2));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let answer = send(&pool, &plain(&format!("q{i}"))).await;
            (answer, Instant::now())
        }));
        tokio::task::yield_now().await;
    }
    let pending = |name: &str| {
        pool.snapshot()
            .upstream(name)
            .map_or(0, |u| u.pending.requests)
    };
    assert_eq!((pending("a"), pending("b")), (2, 2));
    // Requests 1 and 3 went to `b`.
    tasks[1].abort();
    tasks[3].abort();
    tokio::task::yield_now().await;
    assert_eq!(pending("b"), 0);
    let mut done = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        if i % 2 == 0 {
            let ((status, upstream, _), at) = {
                let (answer, at) = t.await.expect("task");
                (answer.expect("answer"), at)
            };
            assert_eq!(status, 200);
            done.push((upstream, at - start));
        }
    }
    // One of the two waiting on `a` moved to `b`: both are answered in
    // 30 s, one by each upstream, where staying would take 60 s.
    let mut by: Vec<&str> = done.iter().map(|(u, _)| u.as_str()).collect();
    by.sort_unstable();
    assert_eq!(by, ["a", "b"]);
    for (_, took) in &done {
        assert!(*took <= Duration::from_secs(31), "{took:?}");
    }
    assert_eq!(pool.snapshot().moved, 1);
    assert_eq!((admitted(&ea), admitted(&eb)), (3, 3));
    assert_eq!(support::rate_limited(&ea) + support::rate_limited(&eb), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_failed_over_on_a_529_moves_back_while_it_waits() {
    // `b` and `c` admit 2 requests a minute and are used up; `a` has room
    // but answers its third call with a 529. That request fails over to `b`,
    // the soonest not yet tried, where it would wait about 30 s (as on `c`);
    // a 529 is momentary, so it moves back to `a` (free now) at the first
    // check, a second later, though `c` was never tried.
    let slow = Limits::new().rpm(2).itpm(100_000).otpm(100_000);
    let (ea, eb, ec) = (emulator(BIG), emulator(slow), emulator(slow));
    let (t, calls) = transport(vec![
        ("a", Backend::OverloadedOnce(2, ea.clone())),
        ("b", Backend::Emu(eb.clone())),
        ("c", Backend::Emu(ec.clone())),
    ]);
    let pool = Pool::builder()
        .upstream(upstream("a", BIG))
        .upstream(upstream("b", slow))
        .upstream(upstream("c", slow))
        .build(t)
        .expect("pool");
    // Equal waits and loads take turns: a, b, c, a, b, c.
    for i in 0..6 {
        send(&pool, &plain(&format!("warm {i}")))
            .await
            .expect("answer");
    }
    let admitted_each = || (admitted(&ea), admitted(&eb), admitted(&ec));
    assert_eq!(admitted_each(), (2, 2, 2));
    let start = Instant::now();
    let (status, up, _) = send(&pool, &plain("overloaded once"))
        .await
        .expect("answer");
    assert_eq!((status, up.as_str()), (200, "a"));
    assert!(
        start.elapsed() <= Duration::from_secs(2),
        "{:?}: it waited on b",
        start.elapsed()
    );
    let snap = pool.snapshot();
    assert_eq!((snap.failovers, snap.moved, snap.failed), (1, 1, 0));
    let hosts: Vec<String> = calls
        .lock()
        .expect("calls")
        .iter()
        .skip(6)
        .filter(|c| c.uri.ends_with("/v1/messages"))
        .map(|c| c.host.clone())
        .collect();
    assert_eq!(hosts, ["a", "a"], "529 on a, unsent on b, answered by a");
    assert_eq!(admitted_each(), (3, 2, 2));
    let limited: u64 = [&ea, &eb, &ec]
        .iter()
        .map(|e| support::rate_limited(e))
        .sum();
    assert_eq!(limited, 0);
}

#[tokio::test(start_paused = true)]
async fn an_upstream_in_its_cooldown_is_avoided() {
    // a answers a 429 with retry-after 30: the request fails over to b, and
    // the next ones go to b while a's cooldown runs.
    let eb = emulator(BIG);
    let (t, calls) = transport(vec![
        (
            "a",
            Backend::Status(
                429,
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
                Some(30),
            ),
        ),
        ("b", Backend::Emu(eb.clone())),
    ]);
    let pool = Pool::builder()
        .upstream(upstream("a", BIG))
        .upstream(upstream("b", BIG))
        .build(t)
        .expect("pool");
    for i in 0..4 {
        let (status, up, _) = send(&pool, &plain(&format!("q{i}"))).await.expect("answer");
        assert_eq!((status, up.as_str()), (200, "b"));
    }
    let to_a = calls
        .lock()
        .expect("calls")
        .iter()
        .filter(|c| c.host == "a")
        .count();
    assert_eq!(to_a, 1, "a was tried once, then left alone in its cooldown");
    let snap = pool.snapshot();
    assert_eq!(snap.failovers, 1);
    assert!(snap
        .upstream("a")
        .and_then(|u| u.retry.cooldown_remaining)
        .is_some());
}

// ---------------------------------------------------------------- failover

#[tokio::test(start_paused = true)]
async fn each_error_kind_fails_over_with_the_same_body() {
    let overloaded =
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    let api_error = r#"{"type":"error","error":{"type":"api_error","message":"oops"}}"#;
    let rate = r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;
    let kinds = [
        ("429", Backend::Status(429, rate, Some(2))),
        ("529", Backend::Status(529, overloaded, None)),
        ("500", Backend::Status(500, api_error, None)),
        ("503", Backend::Status(503, api_error, None)),
        ("refused", Backend::Fail(io::ErrorKind::ConnectionRefused)),
        ("reset", Backend::Fail(io::ErrorKind::ConnectionReset)),
    ];
    for (what, failing) in kinds {
        let eb = emulator(BIG);
        let (t, calls) = transport(vec![("a", failing), ("b", Backend::Emu(eb.clone()))]);
        let pool = Pool::builder()
            .upstream(upstream("a", BIG))
            .upstream(upstream("b", BIG))
            .build(t)
            .expect("pool");
        let sent = plain(&format!("a request that fails over on {what}"));
        let (status, up, answer) = send(&pool, &sent).await.expect(what);
        assert_eq!((status, up.as_str()), (200, "b"), "{what}");
        assert!(support::usage_of(&answer).is_some(), "{what}");
        let calls = calls.lock().expect("calls").clone();
        assert_eq!(calls.len(), 2, "{what}: one attempt each");
        assert_eq!(calls[0].host, "a", "{what}");
        assert_eq!(
            calls[0].body, calls[1].body,
            "{what}: the same body replayed"
        );
        let snap = pool.snapshot();
        assert_eq!((snap.failovers, snap.failed), (1, 0), "{what}");
        assert_eq!(snap.upstream("a").map(|u| u.failovers), Some(1), "{what}");
        let a = snap.upstream("a").expect("a");
        let received = (a.received_429, a.received_529);
        match what {
            "429" => assert_eq!(received, (1, 0)),
            "529" => assert_eq!(received, (0, 1)),
            _ => assert_eq!(received, (0, 0)),
        }
        assert_eq!(admitted(&eb), 1, "{what}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_last_failure_is_returned_when_attempts_run_out() {
    let overloaded =
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    let (t, calls) = transport(vec![
        ("a", Backend::Status(529, overloaded, None)),
        ("b", Backend::Fail(io::ErrorKind::ConnectionRefused)),
    ]);
    let pool = Pool::builder()
        .upstream(upstream("a", BIG))
        .upstream(upstream("b", BIG))
        .max_attempts(3)
        .build(t)
        .expect("pool");
    let result = send(&pool, &plain("doomed")).await;
    assert!(result.is_err(), "{result:?}");
    let hosts: Vec<String> = calls
        .lock()
        .expect("calls")
        .iter()
        .map(|c| c.host.clone())
        .collect();
    assert_eq!(hosts.len(), 3);
    assert_ne!(
        hosts[0], hosts[1],
        "each upstream is tried once before any again"
    );
    let snap = pool.snapshot();
    assert_eq!(snap.failed, 1);
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_began_is_never_retried() {
    let eb = emulator(BIG);
    let (t, calls) = transport(vec![
        ("a", Backend::StreamThenFail),
        ("b", Backend::Emu(eb.clone())),
    ]);
    let pool = Pool::builder()
        .upstream(upstream("a", BIG))
        .upstream(upstream("b", BIG))
        .build(t)
        .expect("pool");
    let mut streamed = plain("stream me");
    streamed["stream"] = json!(true);
    let resp = pool
        .clone()
        .oneshot(request(&streamed))
        .await
        .expect("head");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[UPSTREAM_HEADER], "a");
    let read = resp.into_body().collect().await;
    assert!(read.is_err(), "the error mid-stream reaches the caller");
    assert_eq!(calls.lock().expect("calls").len(), 1, "no second attempt");
    assert_eq!(admitted(&eb), 0);
    assert_eq!(pool.snapshot().failovers, 0);
}

// ---------------------------------------------------------------- draining

#[tokio::test(start_paused = true)]
async fn a_spend_capped_upstream_is_drained_and_returns_after_the_configured_time() {
    let (ea, eb) = (emulator(BIG), emulator(BIG));
    ea.set_spend_limit_reached(true);
    let (t, _) = transport(vec![
        ("a", Backend::Emu(ea.clone())),
        ("b", Backend::Emu(eb.clone())),
    ]);
    let pool = Pool::builder()
        .upstream(upstream("a", BIG))
        .upstream(upstream("b", BIG))
        .drain_for(Duration::from_secs(60))
        .build(t)
        .expect("pool");
    for i in 0..5 {
        let (status, up, _) = send(&pool, &plain(&format!("q{i}"))).await.expect("answer");
        assert_eq!((status, up.as_str()), (200, "b"));
    }
    let snap = pool.snapshot();
    let a = snap.upstream("a").expect("a");
    assert_eq!(a.routed, 1, "tried once, then out of rotation");
    assert_eq!(a.drains, 1);
    let (reason, left) = a.drained.expect("drained");
    assert_eq!(reason, DrainReason::SpendLimit);
    assert!(
        left > Duration::from_secs(55) && left <= Duration::from_secs(60),
        "{left:?}"
    );
    assert_eq!(snap.failed, 0);

    // The cap is lifted; after the drain time a is back in rotation.
    ea.set_spend_limit_reached(false);
    tokio::time::advance(Duration::from_secs(61)).await;
    for i in 0..4 {
        let (status, _, _) = send(&pool, &plain(&format!("r{i}"))).await.expect("answer");
        assert_eq!(status, 200);
    }
    let snap = pool.snapshot();
    assert!(snap.upstream("a").expect("a").drained.is_none());
    assert!(admitted(&ea) >= 1, "a serves again");
}

#[tokio::test(start_paused = true)]
async fn requests_waiting_on_an_upstream_that_drains_are_not_sent_there() {
    // One request a minute on each. a reaches its spend cap while three
    // requests wait in its queue: the first gets the spend-cap 429 and
    // drains a; the two others, when a's budget admits them, are not sent
    // to a but to b. Nothing is lost.
    let one = Limits::new().rpm(1).itpm(100_000).otpm(100_000);
    let (ea, eb) = (emulator(one), emulator(one));
    let (t, calls) = transport(vec![
        ("a", Backend::Emu(ea.clone())),
        ("b", Backend::Emu(eb.clone())),
    ]);
    let pool = Pool::builder()
        .upstream(upstream("a", one))
        .upstream(upstream("b", one))
        .drain_for(Duration::from_secs(3_600))
        .build(t)
        .expect("pool");
    send(&pool, &plain("warm a")).await.expect("answer");
    send(&pool, &plain("warm b")).await.expect("answer");
    ea.set_spend_limit_reached(true);
    let mut tasks = Vec::new();
    for i in 0..6 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            send(&pool, &plain(&format!("q{i}"))).await
        }));
    }
    for t in tasks {
        let (status, up, _) = t.await.expect("task").expect("answer");
        assert_eq!((status, up.as_str()), (200, "b"));
    }
    let to_a = calls
        .lock()
        .expect("calls")
        .iter()
        // Requests waiting in a's queue may be counted there (a free
        // `count_tokens` call): only the messages sent matter here.
        .filter(|c| c.host == "a" && !c.uri.ends_with("/count_tokens"))
        .count();
    assert_eq!(to_a, 2, "the warm-up and the one spend-cap 429");
    let snap = pool.snapshot();
    let a = snap.upstream("a").expect("a");
    assert_eq!(a.drains, 1);
    assert_eq!(a.budget.refunded_unsent, 2, "the two refused were refunded");
    assert_eq!(snap.failed, 0);
    assert_eq!(admitted(&eb), 7);
}

#[tokio::test(start_paused = true)]
async fn a_401_or_403_drains_and_every_upstream_drained_is_a_typed_error() {
    let denied =
        r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#;
    let forbidden = r#"{"type":"error","error":{"type":"permission_error","message":"no"}}"#;
    let (t, _) = transport(vec![
        ("a", Backend::Status(401, denied, None)),
        ("b", Backend::Status(403, forbidden, None)),
    ]);
    let pool = Pool::builder()
        .upstream(upstream("a", BIG))
        .upstream(upstream("b", BIG))
        .drain_for(Duration::from_secs(120))
        .build(t)
        .expect("pool");
    // Both are tried and drained; the caller gets the last answer.
    let (status, _, _) = send(&pool, &plain("first")).await.expect("an answer");
    assert!(status == 401 || status == 403, "{status}");
    let snap = pool.snapshot();
    let reasons: Vec<DrainReason> = snap
        .upstreams
        .iter()
        .filter_map(|u| u.drained.map(|d| d.0))
        .collect();
    assert_eq!(
        reasons,
        vec![DrainReason::Unauthorized, DrainReason::Forbidden]
    );
    // Now none is in rotation: refused at once, with when the first returns.
    let err = send(&pool, &plain("second"))
        .await
        .expect_err("all drained");
    match err.downcast_ref::<PoolError>() {
        Some(PoolError::AllDrained { retry_in }) => {
            assert!(*retry_in > Duration::from_secs(110), "{retry_in:?}")
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------- affinity

fn cached(turns: usize) -> Value {
    let mut messages = vec![json!({"role": "user", "content": "first question"})];
    for i in 0..turns {
        messages.push(json!({"role": "assistant", "content": format!("answer {i}")}));
        messages.push(json!({"role": "user", "content": format!("follow-up {i}")}));
    }
    json!({"model": "claude-sonnet-4-5", "max_tokens": 20,
           "system": [{"type": "text", "text": "a long shared system prompt",
                       "cache_control": {"type": "ephemeral"}}],
           "messages": messages})
}

#[tokio::test(start_paused = true)]
async fn a_cached_prefix_stays_on_its_upstream() {
    let (ea, eb) = (emulator(BIG), emulator(BIG));
    let (t, _) = transport(vec![("a", Backend::Emu(ea)), ("b", Backend::Emu(eb))]);
    let pool = Pool::builder()
        .upstream(upstream("a", BIG))
        .upstream(upstream("b", BIG))
        .build(t)
        .expect("pool");
    // Without a breakpoint, equally free upstreams share the requests.
    let mut plain_hosts = Vec::new();
    for i in 0..4 {
        plain_hosts.push(
            send(&pool, &plain(&format!("q{i}")))
                .await
                .expect("answer")
                .1,
        );
    }
    assert!(plain_hosts.contains(&"a".to_string()) && plain_hosts.contains(&"b".to_string()));
    // A conversation with a cached prefix stays where its cache is.
    let mut hosts = Vec::new();
    for turn in 0..6 {
        hosts.push(send(&pool, &cached(turn)).await.expect("answer").1);
    }
    assert!(hosts.iter().all(|h| *h == hosts[0]), "{hosts:?}");
    assert!(pool.snapshot().affinity_routed >= 5);
}

async fn affinity_under_load(threshold: Duration) -> (Vec<String>, Duration) {
    // a admits 3 requests a minute (then one per 20 s), b 100.
    let small = Limits::new().rpm(3).itpm(1_000_000).otpm(1_000_000);
    let large = Limits::new().rpm(100).itpm(1_000_000).otpm(1_000_000);
    let (t, _) = transport(vec![
        ("a", Backend::Emu(emulator(small))),
        ("b", Backend::Emu(emulator(large))),
    ]);
    let pool = Pool::builder()
        .upstream(upstream("a", small))
        .upstream(upstream("b", large))
        .affinity_threshold(threshold)
        .build(t)
        .expect("pool");
    let start = Instant::now();
    let mut hosts = Vec::new();
    for turn in 0..4 {
        hosts.push(send(&pool, &cached(turn)).await.expect("answer").1);
    }
    (hosts, start.elapsed())
}

#[tokio::test(start_paused = true)]
async fn affinity_yields_only_to_an_upstream_much_sooner() {
    // The fourth turn would wait 20 s on a: past a 5 s threshold it moves
    // to b; under a 60 s threshold it waits for a.
    let (hosts, elapsed) = affinity_under_load(Duration::from_secs(5)).await;
    assert_eq!(hosts, ["a", "a", "a", "b"]);
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    let (hosts, elapsed) = affinity_under_load(Duration::from_secs(60)).await;
    assert_eq!(hosts, ["a", "a", "a", "a"]);
    assert!(elapsed >= Duration::from_secs(19), "{elapsed:?}");
}

// ---------------------------------------------------------------- fallback

#[tokio::test(start_paused = true)]
async fn model_fallback_is_opt_in_and_named_in_the_response() {
    let sonnet = Limits::new().rpm(1).itpm(100_000).otpm(100_000);
    let config = LimitsConfig::learned()
        .with_default(BIG)
        .with_class(ModelClass::Sonnet4, sonnet);
    let e = Emulator::builder()
        .limits(BIG)
        .class_limits(ModelClass::Sonnet4, sonnet)
        .latency(Latency::none())
        .seed(1)
        .build()
        .expect("emulator");
    let (t, calls) = transport(vec![("a", Backend::Emu(e.clone()))]);
    let pool = Pool::builder()
        .upstream(upstream("a", config))
        .fallback("claude-haiku-4-5", Duration::from_secs(10))
        .build(t)
        .expect("pool");
    let start = Instant::now();
    send(&pool, &plain("uses the minute's sonnet request"))
        .await
        .expect("first");

    // Opted in by header: sent at once as haiku.
    let mut req = request(&plain("may fall back"));
    req.headers_mut().insert(
        "x-llm-limits-allow-fallback",
        "true".parse().expect("value"),
    );
    let resp = pool.clone().oneshot(req).await.expect("fallback");
    assert_eq!(resp.headers()[MODEL_HEADER], "claude-haiku-4-5");
    let _ = resp.into_body().collect().await;
    // Opted in by extension: the same.
    let mut req = request(&plain("may fall back too"));
    req.extensions_mut().insert(AllowFallback);
    let resp = pool.clone().oneshot(req).await.expect("fallback");
    assert_eq!(resp.headers()[MODEL_HEADER], "claude-haiku-4-5");
    let _ = resp.into_body().collect().await;
    assert!(start.elapsed() < Duration::from_secs(1));
    {
        let calls = calls.lock().expect("calls");
        let last: Value = serde_json::from_slice(&calls[2].body).expect("json");
        assert_eq!(last["model"], "claude-haiku-4-5");
        assert!(!calls.iter().any(|c| c.uri.contains("fallback")));
    }

    // Not opted in: waits for sonnet.
    let resp = pool
        .clone()
        .oneshot(request(&plain("no fallback")))
        .await
        .expect("sonnet");
    assert_eq!(resp.headers()[MODEL_HEADER], "claude-sonnet-4-5");
    let _ = resp.into_body().collect().await;
    assert!(
        start.elapsed() >= Duration::from_secs(59),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(pool.snapshot().fallbacks, 2);
}

// ---------------------------------------------------------------- cancellation

#[tokio::test(start_paused = true)]
async fn a_cancelled_request_leaves_no_reservation_or_permit() {
    let one = Limits::new().rpm(1).itpm(100_000).otpm(100_000);
    let e = Emulator::builder()
        .limits(one)
        .latency(Latency::default().with_jitter(0.0))
        .seed(2)
        .build()
        .expect("emulator");
    let (t, _) = transport(vec![("a", Backend::Emu(e))]);
    let pool = Pool::builder()
        .upstream(upstream("a", one))
        .build(t)
        .expect("pool");

    // Cancelled in flight (admitted, waiting for the answer).
    let gone = tokio::time::timeout(
        Duration::from_millis(100),
        send(&pool, &plain("dropped in flight")),
    )
    .await;
    assert!(gone.is_err());
    let snap = pool.snapshot();
    let a = &snap.upstreams[0];
    assert_eq!(a.concurrency.in_flight, 0, "the slot came back");
    assert_eq!(a.pending.requests, 0);

    // Cancelled while waiting for the budget (the minute's request is used).
    let gone = tokio::time::timeout(
        Duration::from_secs(5),
        send(&pool, &plain("dropped while queued")),
    )
    .await;
    assert!(gone.is_err());
    let snap = pool.snapshot();
    let a = &snap.upstreams[0];
    assert_eq!(a.pending, Default::default(), "nothing left pending");
    let key = a
        .budget
        .key("sonnet-4")
        .or_else(|| a.budget.keys.first())
        .expect("key");
    assert_eq!(key.waiting, 0);
    let requests = key.dimension(tower_llm_limits::Dimension::Requests);
    // One request charged (the first), refilling since: nothing else reserved.
    let remaining = requests.remaining.expect("remaining");
    assert!(remaining > 0.0 && remaining < 0.2, "{remaining}");
    assert_eq!(a.concurrency.in_flight, 0);
}

// ---------------------------------------------------------------- one estimate

/// An estimator that counts its estimates and the usages it is taught.
#[derive(Default)]
struct Counting {
    inner: AnthropicEstimator,
    estimates: AtomicUsize,
    observed: AtomicUsize,
}

impl TokenEstimator for Counting {
    fn estimate(&self, parts: &http::request::Parts, body: &[u8]) -> Estimate {
        self.estimates.fetch_add(1, Ordering::Relaxed);
        self.inner.estimate(parts, body)
    }

    fn estimate_unbuffered(&self, parts: &http::request::Parts, len: Option<u64>) -> Estimate {
        self.estimates.fetch_add(1, Ordering::Relaxed);
        self.inner.estimate_unbuffered(parts, len)
    }

    fn observe(&self, estimate: &Estimate, usage: &Usage) {
        self.observed.fetch_add(1, Ordering::Relaxed);
        self.inner.observe(estimate, usage);
    }
}

#[tokio::test(start_paused = true)]
async fn each_request_is_estimated_once_and_its_usage_teaches_the_pools_estimator() {
    let counting = Arc::new(Counting::default());
    let estimator: Arc<dyn TokenEstimator> = counting.clone();
    let (ea, eb, ec) = (emulator(BIG), emulator(BIG), emulator(BIG));
    let (t, _) = transport(vec![
        ("a", Backend::Emu(ea.clone())),
        ("b", Backend::Emu(eb.clone())),
        ("c", Backend::Emu(ec.clone())),
    ]);
    // `a` has the default budget; `b` a budget of its own given the pool's
    // estimator: neither estimates the body again.
    let b = upstream("b", BIG).budget(
        TokenBudgetBuilder::anthropic(BIG)
            .estimator(Arc::clone(&estimator))
            .build(),
    );
    let pool = Pool::builder()
        .estimator(Arc::clone(&estimator))
        .upstream(upstream("a", BIG))
        .upstream(b)
        .build(t.clone())
        .expect("pool");
    for i in 0..6 {
        let (status, _, _) = send(&pool, &plain(&format!("once {i}")))
            .await
            .expect("answer");
        assert_eq!(status, 200);
    }
    assert!(
        admitted(&ea) > 0 && admitted(&eb) > 0,
        "both upstreams served"
    );
    assert_eq!(counting.estimates.load(Ordering::Relaxed), 6);
    // Each response's usage reached the estimator that made the estimate:
    // calibration learns from every upstream.
    assert_eq!(counting.observed.load(Ordering::Relaxed), 6);
    // A budget with an estimator of its own estimates the body itself (and
    // learns from its own responses).
    let c = upstream("c", BIG).budget(TokenBudgetLayer::anthropic(BIG));
    let pool = Pool::builder()
        .estimator(estimator)
        .upstream(c)
        .build(t)
        .expect("pool");
    assert_eq!(
        send(&pool, &plain("elsewhere")).await.expect("answer").0,
        200
    );
    assert_eq!(counting.estimates.load(Ordering::Relaxed), 7);
    assert_eq!(counting.observed.load(Ordering::Relaxed), 6);
    assert_eq!(admitted(&ec), 1);
}

// ---------------------------------------------------------------- addressing, keys, logs

#[tokio::test(start_paused = true)]
async fn requests_are_addressed_keyed_and_mapped_per_upstream() {
    let ok = r#"{"type":"message","usage":{"input_tokens":3,"output_tokens":1}}"#;
    let (t, calls) = transport(vec![("b", Backend::Status(200, ok, None))]);
    let b = Upstream::new("b", "http://b.example/proxy/", BIG)
        .expect("url")
        .key("sk-secret-b")
        .expect("key")
        .model("claude-sonnet-4-5", "sonnet-dated-name");
    let pool = Pool::builder().upstream(b).build(t).expect("pool");
    let mut req = request(&plain("map me"));
    *req.uri_mut() = "/v1/messages?beta=true".parse().expect("uri");
    req.headers_mut()
        .insert("authorization", "Bearer sk-caller".parse().expect("value"));
    let resp = pool.clone().oneshot(req).await.expect("answer");
    assert_eq!(resp.headers()[MODEL_HEADER], "claude-sonnet-4-5");
    let calls = calls.lock().expect("calls").clone();
    assert_eq!(calls[0].uri, "http://b.example/proxy/v1/messages?beta=true");
    assert_eq!(calls[0].api_key.as_deref(), Some("sk-secret-b"));
    assert!(
        !calls[0].authorization,
        "the caller's credentials are not forwarded"
    );
    let sent: Value = serde_json::from_slice(&calls[0].body).expect("json");
    assert_eq!(sent["model"], "sonnet-dated-name");
    assert_eq!(sent["messages"][0]["content"], "map me");
}

#[test]
fn bad_configuration_is_a_typed_error() {
    let (t, _) = transport(vec![]);
    assert_eq!(
        Pool::builder().build(t.clone()).err(),
        Some(PoolError::NoUpstreams)
    );
    let dup = Pool::builder()
        .upstream(upstream("a", BIG))
        .upstream(upstream("a", BIG))
        .build(t.clone());
    assert!(matches!(dup.err(), Some(PoolError::DuplicateName { .. })));
    for bad in [
        "api.anthropic.com",
        "ftp://x.example",
        "http://user:pw@x.example",
        "http://x.example/?q=1",
    ] {
        let e = Upstream::new("x", bad, BIG).err();
        assert!(
            matches!(e, Some(PoolError::InvalidBaseUrl { .. })),
            "{bad}: {e:?}"
        );
    }
    let e = upstream("x", BIG)
        .key("sk-bad\nkey")
        .expect_err("invalid key");
    assert!(!format!("{e} {e:?}").contains("sk-bad"));
    let f = PoolBuilder::default()
        .upstream(upstream("a", BIG))
        .fallback("", Duration::from_secs(1))
        .build(t);
    assert_eq!(f.err(), Some(PoolError::InvalidFallback));
}

/// Everything the crate logs in this binary.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let writer = Arc::clone(&buf);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Writer(Arc::clone(&writer)))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    })
}

struct Writer(Arc<Mutex<Vec<u8>>>);

impl io::Write for Writer {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn failover_and_drain_are_logged_and_no_key_is_ever_shown() {
    let logs = logs();
    let ea = emulator(BIG);
    ea.set_spend_limit_reached(true);
    let overloaded =
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    let (t, _) = transport(vec![
        ("a", Backend::Emu(ea)),
        ("b", Backend::Status(529, overloaded, None)),
        ("c", Backend::Emu(emulator(BIG))),
    ]);
    let layer = Pool::builder()
        .upstream(upstream("a", BIG))
        .upstream(upstream("b", BIG))
        .upstream(upstream("c", BIG))
        .into_layer()
        .expect("layer");
    let pool = tower::Layer::layer(&layer, t);
    let (status, up, _) = send(&pool, &plain("one")).await.expect("answer");
    assert_eq!((status, up.as_str()), (200, "c"));
    let text = String::from_utf8_lossy(&logs.lock().expect("logs")).to_string();
    assert!(text.contains("upstream drained"), "{text}");
    assert!(text.contains("failover"), "{text}");
    let snap = layer.snapshot();
    let shown = format!(
        "{text}\n{snap:?}\n{pool:?}\n{layer:?}\n{:?}",
        upstream("z", BIG)
    );
    assert!(!shown.contains("sk-secret"), "a key was shown");
    assert!(!shown.contains("sk-caller"), "a caller key was shown");
}

// ---------------------------------------------------------------- over loopback

#[tokio::test]
async fn a_pool_over_hyper_serves_json_and_streams_from_two_emulators_on_loopback() {
    let (ea, addr_a) = support::serve_emulator(BIG).await;
    let (eb, addr_b) = support::serve_emulator(BIG).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let transport = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let client = client.clone();
        async move {
            client
                .request(req)
                .await
                .map(|r| r.map(boxed))
                .map_err(BoxError::from)
        }
    });
    let pool = Pool::builder()
        .upstream(
            Upstream::new("a", &format!("http://{addr_a}"), BIG)
                .expect("a")
                .key("sk-a")
                .expect("key"),
        )
        .upstream(
            Upstream::new("b", &format!("http://{addr_b}"), BIG)
                .expect("b")
                .key("sk-b")
                .expect("key"),
        )
        .build(transport)
        .expect("pool");
    let mut hosts = Vec::new();
    for i in 0..4 {
        let mut value = plain(&format!("hello {i}"));
        value["stream"] = json!(i % 2 == 1);
        let resp = pool.clone().oneshot(request(&value)).await.expect("answer");
        assert_eq!(resp.status(), 200);
        hosts.push(
            resp.headers()[UPSTREAM_HEADER]
                .to_str()
                .expect("name")
                .to_string(),
        );
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(support::usage_of(&body).is_some(), "{body:?}");
    }
    assert!(hosts.contains(&"a".to_string()) && hosts.contains(&"b".to_string()));
    assert_eq!(admitted(&ea) + admitted(&eb), 4);
}

// ---------------------------------------------------------------- weights, bad input

#[tokio::test(start_paused = true)]
async fn weights_share_requests_among_upstreams_that_admit_as_soon() {
    let (t, _) = transport(vec![
        ("a", Backend::Emu(emulator(BIG))),
        ("b", Backend::Emu(emulator(BIG))),
    ]);
    let pool = Pool::builder()
        .upstream(upstream("a", BIG).weight(3))
        .upstream(upstream("b", BIG))
        .build(t)
        .expect("pool");
    for i in 0..40 {
        send(&pool, &plain(&format!("q{i}"))).await.expect("answer");
    }
    let snap = pool.snapshot();
    let (a, b) = (snap.upstreams[0].routed, snap.upstreams[1].routed);
    assert_eq!(a + b, 40);
    assert_eq!((a, b), (30, 10), "3 to 1");
    assert_eq!(
        (snap.upstreams[0].weight, snap.upstreams[0].succeeded),
        (3, 30)
    );
    assert!(snap.upstreams[0].budget.admitted == 30 && snap.upstreams[1].budget.admitted == 10);
}

#[tokio::test(start_paused = true)]
async fn a_body_above_the_limit_is_refused_unsent_and_odd_bodies_still_route() {
    let ok = r#"{"type":"message","usage":{"input_tokens":3,"output_tokens":1}}"#;
    let (t, calls) = transport(vec![("a", Backend::Status(200, ok, None))]);
    let pool = Pool::builder()
        .upstream(upstream("a", BIG))
        .buffer_limit(1_000)
        .build(t)
        .expect("pool");
    let big = plain(&"x".repeat(2_000));
    let err = send(&pool, &big).await.expect_err("too large");
    assert_eq!(
        err.downcast_ref::<PoolError>(),
        Some(&PoolError::BodyTooLarge { limit: 1_000 })
    );
    assert!(calls.lock().expect("calls").is_empty(), "nothing was sent");

    // Not JSON: estimated from its length, sent as it is, no model named.
    let req = Request::post("/v1/messages")
        .body(Full::new(Bytes::from_static(b"not json at all")))
        .expect("request");
    let resp = pool.send(req).await.expect("answer");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get(MODEL_HEADER).is_none());
    assert_eq!(
        &calls.lock().expect("calls")[0].body[..],
        b"not json at all"
    );
}
