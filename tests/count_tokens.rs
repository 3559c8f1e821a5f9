//! The `count_tokens` mode: requests that wait anyway are charged the exact
//! count of `POST /v1/messages/count_tokens`, asked through the same inner
//! service, paced to the endpoint's own rate, cached by body; any failure
//! leaves the estimate; a request that could go now is never delayed.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Layer, ServiceExt};
use tower_llm_limits::body::ReplayBody;
use tower_llm_limits::budget::{CountTokens, Limits, TokenBudget, TokenBudgetLayer};
use tower_llm_limits::estimate::{Estimate, TokenEstimator};
use tower_llm_limits::{BoxError, Dimension, Error};

const MODEL: &str = "claude-sonnet-4-5";
const KEY: &str = "sonnet-4";

type ResBody = UnsyncBoxBody<Bytes, Infallible>;
type Upstream = BoxCloneService<Request<ReplayBody<Full<Bytes>>>, Response<ResBody>, BoxError>;

/// Estimates the `input` field of the body.
#[derive(Debug, Default)]
struct JsonEstimator;

impl TokenEstimator for JsonEstimator {
    fn estimate(&self, _parts: &Parts, body: &[u8]) -> Estimate {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let input = v["input"].as_u64().unwrap_or(0);
        Estimate {
            model: Some(MODEL.into()),
            input_tokens: input,
            raw_input_tokens: input,
            max_tokens: Some(10),
            ..Estimate::default()
        }
    }

    fn estimate_unbuffered(&self, _parts: &Parts, len: Option<u64>) -> Estimate {
        Estimate {
            input_tokens: len.unwrap_or(0),
            raw_input_tokens: len.unwrap_or(0),
            fallback: true,
            ..Estimate::default()
        }
    }
}

/// How the fake `count_tokens` endpoint answers.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// `{"input_tokens": n}` after `delay`.
    Count(u64, Duration),
    Status(u16),
    BadJson,
    Hang,
}

#[derive(Debug)]
struct Api {
    answer: Mutex<Answer>,
    /// `(path, name, when)` of every call.
    calls: Mutex<Vec<(String, String, Instant)>>,
}

impl Api {
    fn new(answer: Answer) -> Arc<Self> {
        Arc::new(Self {
            answer: Mutex::new(answer),
            calls: Mutex::default(),
        })
    }

    fn counts(&self) -> Vec<Instant> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|(p, _, _)| p.ends_with("/count_tokens"))
            .map(|(_, _, at)| *at)
            .collect()
    }

    fn sent(&self, name: &str) -> Option<Instant> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .find(|(p, n, _)| p == "/v1/messages" && n == name)
            .map(|(_, _, at)| *at)
    }
}

fn body(text: String) -> ResBody {
    Full::new(Bytes::from(text))
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

/// Messages: answers the `actual` input tokens. count_tokens: per `Answer`.
fn upstream(api: Arc<Api>) -> Upstream {
    BoxCloneService::new(tower::service_fn(
        move |req: Request<ReplayBody<Full<Bytes>>>| {
            let api = Arc::clone(&api);
            async move {
                let path = req.uri().path().to_owned();
                let bytes = req.into_body().collect().await?.to_bytes();
                let v: serde_json::Value = serde_json::from_slice(&bytes)?;
                let name = v["system"].as_str().unwrap_or("").to_owned();
                api.calls
                    .lock()
                    .unwrap()
                    .push((path.clone(), name, Instant::now()));
                if path == "/v1/messages" {
                    assert!(v.get("input").is_some(), "the request itself, unchanged");
                    let actual = v["actual"].as_u64().unwrap_or(0);
                    let usage = format!(
                        r#"{{"type":"message","usage":{{"input_tokens":{actual},"output_tokens":1}}}}"#
                    );
                    return Ok::<_, BoxError>(Response::new(body(usage)));
                }
                assert_eq!(path, "/v1/messages/count_tokens");
                // Only the fields count_tokens takes.
                assert!(
                    v.get("max_tokens").is_none() && v.get("input").is_none(),
                    "{v}"
                );
                let answer = *api.answer.lock().unwrap();
                match answer {
                    Answer::Count(n, delay) => {
                        tokio::time::sleep(delay).await;
                        Ok(Response::new(body(format!(r#"{{"input_tokens":{n}}}"#))))
                    }
                    Answer::Status(status) => {
                        let mut r = Response::new(body(r#"{"type":"error"}"#.to_owned()));
                        *r.status_mut() = StatusCode::from_u16(status)?;
                        Ok(r)
                    }
                    Answer::BadJson => Ok(Response::new(body("{\"input_tok".to_owned()))),
                    Answer::Hang => std::future::pending().await,
                }
            }
        },
    ))
}

fn layer(count: CountTokens) -> TokenBudgetLayer {
    TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(10_000).itpm(10_000).otpm(1_000_000))
        .estimator(Arc::new(JsonEstimator))
        .count_tokens(Some(count))
        .build()
}

/// A Messages request named `name` (in its system prompt), estimated at
/// `input`, counted by the server as `actual`.
fn request(name: &str, input: u64, actual: u64) -> Request<Full<Bytes>> {
    let json = serde_json::json!({
        "model": MODEL, "max_tokens": 10, "system": name, "input": input, "actual": actual,
        "messages": [{"role": "user", "content": "hi"}],
    });
    Request::post("http://localhost/v1/messages")
        .header("x-api-key", "test")
        .body(Full::new(Bytes::from(json.to_string())))
        .unwrap()
}

async fn send(svc: TokenBudget<Upstream>, req: Request<Full<Bytes>>) -> Result<(), BoxError> {
    let resp = svc.oneshot(req).await?;
    resp.into_body().collect().await?;
    Ok(())
}

fn remaining_input(layer: &TokenBudgetLayer) -> f64 {
    layer
        .snapshot()
        .key(KEY)
        .and_then(|k| k.dimension(Dimension::InputTokens).remaining)
        .unwrap_or(f64::NAN)
}

/// Takes the whole input bucket (10,000 tokens, counted by the server as
/// such), so that the next request waits.
async fn drain(svc: &TokenBudget<Upstream>) {
    send(svc.clone(), request("drain", 10_000, 10_000))
        .await
        .unwrap();
}

/// A waiting request is charged the exact count: estimated 6,000, counted
/// 3,000, it goes when 3,000 refilled (18 s), not 6,000 (36 s).
#[tokio::test(start_paused = true)]
async fn a_waiting_request_is_charged_the_exact_count() {
    let api = Api::new(Answer::Count(3_000, Duration::from_millis(50)));
    let layer = layer(CountTokens::new(100));
    let svc = layer.layer(upstream(Arc::clone(&api)));
    let start = Instant::now();
    drain(&svc).await;
    send(svc.clone(), request("b", 6_000, 3_000)).await.unwrap();
    let at = api.sent("b").unwrap() - start;
    assert!(
        at >= Duration::from_secs(17) && at <= Duration::from_secs(19),
        "{at:?}"
    );
    assert_eq!(api.counts().len(), 1);
}

/// A request that reaches the head of its queue while no count call is free
/// is counted once one is, not admitted later on its estimate. At 2 counts
/// a minute (one every 30 s), `a` is counted as it arrives and goes at 18 s
/// (3,000 refilled); `b`, estimated 6,000 and counted 3,000, arrived with it
/// and is counted at 30 s: it goes at 36 s (3,000 more refilled after
/// `a`), not at 54 s (6,000).
#[tokio::test(start_paused = true)]
async fn the_head_is_counted_when_a_count_call_frees() {
    let api = Api::new(Answer::Count(3_000, Duration::from_millis(50)));
    let layer = layer(CountTokens::new(2));
    let svc = layer.layer(upstream(Arc::clone(&api)));
    let start = Instant::now();
    drain(&svc).await;
    let (a, b) = tokio::join!(send(svc.clone(), request("a", 6_000, 3_000)), async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        send(svc.clone(), request("b", 6_000, 3_000)).await
    });
    a.unwrap();
    b.unwrap();
    let a_at = api.sent("a").unwrap() - start;
    let b_at = api.sent("b").unwrap() - start;
    assert!(
        a_at >= Duration::from_secs(17) && a_at <= Duration::from_secs(19),
        "{a_at:?}"
    );
    assert!(
        b_at >= Duration::from_secs(35) && b_at <= Duration::from_secs(37),
        "{b_at:?}"
    );
    let counts: Vec<Duration> = api.counts().iter().map(|at| *at - start).collect();
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(counts[1] >= Duration::from_secs(30), "{counts:?}");
}

/// The input headroom absorbs estimate errors: a counted request waits for
/// it only while a request admitted on an estimate awaits the server's
/// count. With a 10 % headroom (1,000 of 10,000), `b` (counted 3,000) goes
/// at 18 s when the bucket's last estimate was settled, not at 24 s; while
/// an estimated request is in flight, `c` (counted 3,000) waits for 4,000.
#[tokio::test(start_paused = true)]
async fn the_headroom_is_kept_only_while_estimates_are_in_flight() {
    let api = Api::new(Answer::Count(3_000, Duration::from_millis(50)));
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(10_000).itpm(10_000).otpm(1_000_000))
        .estimator(Arc::new(JsonEstimator))
        .count_tokens(Some(CountTokens::new(100)))
        .input_headroom(0.1)
        .build();
    let svc = layer.layer(upstream(Arc::clone(&api)));
    let start = Instant::now();
    // Settled at once: nothing estimated stays in flight.
    send(svc.clone(), request("drain", 9_000, 9_000))
        .await
        .unwrap();
    send(svc.clone(), request("b", 6_000, 3_000)).await.unwrap();
    let b = api.sent("b").unwrap() - start;
    // 1,000 left, 2,000 more at 10,000 a minute: 12 s.
    assert!(
        b >= Duration::from_secs(11) && b <= Duration::from_secs(13),
        "{b:?}"
    );
    // Now one request on its estimate, unanswered (its answer hangs), and
    // `c` behind it: the headroom stands.
    let hang = request("hang", 500, 500);
    let svc2 = layer.layer(BoxCloneService::new(tower::service_fn(
        |_req: Request<ReplayBody<Full<Bytes>>>| async move {
            std::future::pending::<Result<Response<ResBody>, BoxError>>().await
        },
    )));
    let pending = tokio::spawn(svc2.oneshot(hang));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let before = Instant::now();
    send(svc.clone(), request("c", 6_000, 3_000)).await.unwrap();
    let c = api.sent("c").unwrap() - before;
    // b left the bucket empty; the hanging request waits 3 s for its 500,
    // then c for its 3,000 and the 1,000 of headroom: 27 s (21 s without
    // the headroom).
    assert!(
        c >= Duration::from_secs(26) && c <= Duration::from_secs(28),
        "{c:?}"
    );
    pending.abort();
}

/// A request too large by its estimate alone (15,000 against 10,000 a
/// minute) is counted before it is refused: counted 6,000, it goes once
/// 6,000 fit; when the count fails, it is refused as too large, unsent.
#[tokio::test(start_paused = true)]
async fn a_request_too_large_by_its_estimate_is_counted_first() {
    let api = Api::new(Answer::Count(6_000, Duration::from_millis(50)));
    let counted = layer(CountTokens::new(100));
    let svc = counted.layer(upstream(Arc::clone(&api)));
    send(svc.clone(), request("big", 15_000, 6_000))
        .await
        .unwrap();
    assert!(api.sent("big").is_some());
    assert_eq!(api.counts().len(), 1);

    let api = Api::new(Answer::Status(500));
    let failed = layer(CountTokens::new(100));
    let svc = failed.layer(upstream(Arc::clone(&api)));
    let err = send(svc.clone(), request("big", 15_000, 6_000))
        .await
        .unwrap_err();
    let err = err.downcast_ref::<Error>().expect("a typed error");
    assert!(matches!(err, Error::RequestTooLarge { .. }), "{err:?}");
    assert!(api.sent("big").is_none(), "never sent");
    assert_eq!(remaining_input(&failed), 10_000.0, "nothing kept");
}

/// A request that fits now goes now, with its estimate: no count is asked.
#[tokio::test(start_paused = true)]
async fn a_request_that_could_go_now_is_not_delayed() {
    let api = Api::new(Answer::Count(3_000, Duration::from_secs(1)));
    let layer = layer(CountTokens::new(100));
    let svc = layer.layer(upstream(Arc::clone(&api)));
    let start = Instant::now();
    send(svc.clone(), request("b", 6_000, 6_000)).await.unwrap();
    assert_eq!(api.sent("b").unwrap(), start);
    assert!(api.counts().is_empty());
}

/// A count slower than the request's turn: the request goes with its
/// estimate when it fits, and is not held for the count.
#[tokio::test(start_paused = true)]
async fn the_turn_coming_first_goes_with_the_estimate() {
    let api = Api::new(Answer::Count(1_000, Duration::from_secs(60)));
    let layer = layer(CountTokens::new(100).timeout(Duration::from_secs(120)));
    let svc = layer.layer(upstream(Arc::clone(&api)));
    let start = Instant::now();
    drain(&svc).await;
    send(svc.clone(), request("b", 3_000, 3_000)).await.unwrap();
    let at = api.sent("b").unwrap() - start;
    assert!(
        at >= Duration::from_secs(17) && at <= Duration::from_secs(19),
        "{at:?}"
    );
}

/// Any failure of the count leaves the estimate: an error status, a 429, an
/// unreadable answer, no answer within the timeout.
#[tokio::test(start_paused = true)]
async fn errors_fall_back_to_the_estimate() {
    for answer in [
        Answer::Status(500),
        Answer::Status(429),
        Answer::BadJson,
        Answer::Hang,
    ] {
        let api = Api::new(answer);
        let layer = layer(CountTokens::new(100).timeout(Duration::from_secs(1)));
        let svc = layer.layer(upstream(Arc::clone(&api)));
        let start = Instant::now();
        drain(&svc).await;
        send(svc.clone(), request("b", 6_000, 6_000)).await.unwrap();
        let at = api.sent("b").unwrap() - start;
        assert!(
            at >= Duration::from_secs(35) && at <= Duration::from_secs(37),
            "{answer:?}: {at:?}"
        );
        assert_eq!(api.counts().len(), 1, "{answer:?}");
    }
}

/// The same body is counted once: the second time the answer is known and
/// charged at once.
#[tokio::test(start_paused = true)]
async fn the_cache_hits_on_the_same_body() {
    let api = Api::new(Answer::Count(3_000, Duration::from_millis(50)));
    let layer = layer(CountTokens::new(100));
    let svc = layer.layer(upstream(Arc::clone(&api)));
    drain(&svc).await;
    send(svc.clone(), request("b", 6_000, 3_000)).await.unwrap();
    assert_eq!(api.counts().len(), 1);
    // Again, the same bytes, while the bucket is empty (the first was sent
    // when 3,000 had refilled): charged 3,000 from the cache, without a
    // second call, so it goes 18 s later, not 36 s.
    let start = Instant::now();
    send(svc.clone(), request("b", 6_000, 3_000)).await.unwrap();
    assert_eq!(api.counts().len(), 1);
    let waited = Instant::now() - start;
    assert!(
        waited >= Duration::from_secs(17) && waited <= Duration::from_secs(19),
        "{waited:?}"
    );
}

/// Counts are paced to the endpoint's rate: at 60 RPM, calls at least 1 s
/// apart, however many requests wait.
#[tokio::test(start_paused = true)]
async fn the_count_tokens_rpm_is_respected() {
    let api = Api::new(Answer::Count(2_000, Duration::from_millis(10)));
    let layer = layer(CountTokens::new(60));
    let svc = layer.layer(upstream(Arc::clone(&api)));
    drain(&svc).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let name = format!("w{i}");
        tasks.push(tokio::spawn(
            svc.clone().oneshot(request(&name, 4_000, 2_000)),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in tasks {
        let resp = t.await.unwrap().unwrap();
        resp.into_body().collect().await.unwrap();
    }
    let counts = api.counts();
    assert!(counts.len() >= 2, "{}", counts.len());
    for pair in counts.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_secs(1), "{counts:?}");
    }
}

/// A request dropped while its count runs gives back its place and leaves
/// nothing reserved.
#[tokio::test(start_paused = true)]
async fn cancellation_while_counting_loses_nothing() {
    let api = Api::new(Answer::Hang);
    let layer = layer(CountTokens::new(100).timeout(Duration::from_secs(600)));
    let svc = layer.layer(upstream(Arc::clone(&api)));
    drain(&svc).await;
    let waiting = tokio::spawn(svc.clone().oneshot(request("b", 6_000, 6_000)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(api.counts().len(), 1);
    assert_eq!(layer.snapshot().key(KEY).unwrap().waiting, 1);
    waiting.abort();
    assert!(waiting.await.unwrap_err().is_cancelled());
    assert_eq!(layer.snapshot().key(KEY).unwrap().waiting, 0);
    // The bucket refills to full: nothing stayed reserved for it.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let input = remaining_input(&layer);
    assert!((input - 10_000.0).abs() < 1.0, "{input}");
}

/// Through the preset and the crate's emulator of the API (its own
/// tokenizer and its own `count_tokens` limiter, 100 RPM): waiting requests
/// are counted, the emulator accepts every count request and never refuses
/// one, and no Messages request meets a 429.
#[tokio::test(start_paused = true)]
async fn the_preset_counts_against_the_emulator_without_429s() {
    use tower::ServiceBuilder;
    use tower_llm_limits::preset::LimitsLayer;
    use tower_llm_limits_emulator::{Emulator, Latency};

    let limits = Limits::new().rpm(50).itpm(8_000).otpm(8_000);
    let emu = Emulator::builder()
        .limits(limits)
        .latency(Latency::default())
        .seed(9)
        .build()
        .expect("emulator settings");
    let svc = ServiceBuilder::new()
        .layer(LimitsLayer::anthropic(limits))
        .service(emu.service());
    let words = "count the tokens of this prompt exactly, please. ".repeat(160);
    let mut tasks = Vec::new();
    for i in 0..12 {
        let body = format!(
            r#"{{"model":"{MODEL}","max_tokens":20,"temperature":0.5,"messages":[{{"role":"user","content":"{i}: {words}"}}]}}"#
        );
        let req = Request::post("/v1/messages")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        tasks.push(tokio::spawn(svc.clone().oneshot(req)));
    }
    for t in tasks {
        let resp = t.await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body().collect().await.unwrap();
    }
    let stats = emu.stats();
    assert!(stats.count_tokens.requests_admitted >= 1, "{stats:?}");
    assert_eq!(stats.count_tokens.rate_limited, 0);
    assert_eq!(stats.invalid_requests, 0);
    assert_eq!(stats.total().rate_limited, 0);
    assert_eq!(stats.total().requests_admitted, 12);
}
