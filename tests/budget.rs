//! TokenBudgetLayer: pacing, settlement, header sync, cancellation, reject and
//! enforce modes, on tokio's paused clock.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt};
use tower_llm_limits::body::{BufferedBytes, ReplayBody};
use tower_llm_limits::budget::{
    BudgetMode, BudgetSnapshot, Callers, KeyExtractor, Limits, OutputMode, TokenBudgetLayer,
};
use tower_llm_limits::estimate::{Estimate, TokenEstimator};
use tower_llm_limits::headers::RateLimitSnapshot;
use tower_llm_limits::wire::Usage;
use tower_llm_limits::{BoxError, Dimension, Error};

type ResBody = UnsyncBoxBody<Bytes, BoxError>;

// ---------------------------------------------------------------------------
// An exact estimator: the request says what it costs (`"input": N`).

#[derive(Debug, Default)]
struct ExactEstimator {
    observed: AtomicUsize,
}

fn estimate_json(body: &[u8]) -> Estimate {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let input = v["input"].as_u64().unwrap_or(0);
    Estimate {
        model: v["model"].as_str().map(Into::into),
        input_tokens: input,
        raw_input_tokens: input,
        cache_read_tokens: v["cache_read"].as_u64().unwrap_or(0),
        max_tokens: v["max_tokens"].as_u64(),
        stream: v["stream"].as_bool().unwrap_or(false),
        fallback: false,
        ..Estimate::default()
    }
}

impl TokenEstimator for ExactEstimator {
    fn estimate(&self, _parts: &Parts, body: &[u8]) -> Estimate {
        estimate_json(body)
    }

    fn estimate_unbuffered(&self, _parts: &Parts, body_len: Option<u64>) -> Estimate {
        Estimate {
            input_tokens: body_len.unwrap_or(0),
            raw_input_tokens: body_len.unwrap_or(0),
            fallback: true,
            ..Estimate::default()
        }
    }

    fn observe(&self, _estimate: &Estimate, _usage: &Usage) {
        self.observed.fetch_add(1, Ordering::SeqCst);
    }
}

const MODEL: &str = "claude-sonnet-4-5";
const KEY: &str = "sonnet-4";

fn request_body(input: u64, max_tokens: u64) -> String {
    format!(r#"{{"model":"{MODEL}","max_tokens":{max_tokens},"input":{input},"messages":[]}}"#)
}

fn request(input: u64, max_tokens: u64) -> Request<Full<Bytes>> {
    Request::post("http://localhost/v1/messages")
        .body(Full::new(Bytes::from(request_body(input, max_tokens))))
        .unwrap()
}

fn json_usage(input: u64, output: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"id":"msg_1","type":"message","role":"assistant","content":[{{"type":"text","text":"hi"}}],"model":"{MODEL}","stop_reason":"end_turn","usage":{{"input_tokens":{input},"output_tokens":{output}}}}}"#
    ))
}

fn full(bytes: Bytes) -> ResBody {
    Full::new(bytes)
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

// ---------------------------------------------------------------------------
// A recording upstream.

#[derive(Debug, Clone, Copy)]
struct Sent {
    at: Instant,
    input: u64,
    max_tokens: Option<u64>,
}

#[derive(Debug, Default)]
struct Log {
    sent: Mutex<Vec<Sent>>,
}

impl Log {
    fn sent(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }
}

/// Answers every request 200 with a JSON usage: the input it said, `output` tokens.
type Upstream = BoxCloneService<Request<ReplayBody<Full<Bytes>>>, Response<ResBody>, BoxError>;

fn upstream(log: Arc<Log>, output: u64) -> Upstream {
    BoxCloneService::new(tower::service_fn(
        move |req: Request<ReplayBody<Full<Bytes>>>| {
            let log = Arc::clone(&log);
            async move {
                let bytes = req.into_body().collect().await?.to_bytes();
                let input = estimate_json(&bytes).input_tokens;
                // What the server really counts, if the request says it differs.
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                let counted = v["actual"].as_u64().unwrap_or(input);
                log.sent.lock().unwrap().push(Sent {
                    at: Instant::now(),
                    input,
                    max_tokens: v["max_tokens"].as_u64(),
                });
                Ok::<_, BoxError>(Response::new(full(json_usage(counted, output))))
            }
        },
    ))
}

fn budget(limits: Limits) -> (TokenBudgetLayer, Arc<ExactEstimator>) {
    let estimator = Arc::new(ExactEstimator::default());
    let layer = TokenBudgetLayer::builder()
        .limits(limits)
        .estimator(estimator.clone())
        .build();
    (layer, estimator)
}

fn remaining(snap: &BudgetSnapshot, d: Dimension) -> f64 {
    snap.key(KEY)
        .and_then(|k| k.dimension(d).remaining)
        .unwrap_or(f64::NAN)
}

/// [`remaining`] of the one caller of [`one_caller`].
fn remaining_of_all(snap: &BudgetSnapshot, d: Dimension) -> f64 {
    snap.key(&format!("all/{KEY}"))
        .and_then(|k| k.dimension(d).remaining)
        .unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------

/// A workload of three minutes' worth of ITPM finishes close to the
/// limit-bound minimum, and a token bucket server with the same limit (full
/// at the start, refilling at limit/60 per second) never has to refuse it.
#[tokio::test(start_paused = true)]
async fn workload_of_three_minutes_itpm_is_paced_to_the_limit() {
    const ITPM: u64 = 60_000;
    const EACH: u64 = 6_000;
    const N: u64 = 30; // 180,000 tokens = 3 minutes of ITPM
    let log = Arc::new(Log::default());
    let (layer, _) = budget(Limits::new().rpm(10_000).itpm(ITPM).otpm(10_000_000));
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(upstream(log.clone(), 10));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..N {
        let mut svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let resp = svc.ready().await?.call(request(EACH, 100)).await?;
            resp.into_body().collect().await?;
            Ok::<_, BoxError>(Instant::now())
        }));
    }
    let mut last = start;
    for t in tasks {
        last = last.max(t.await.unwrap().unwrap());
    }
    let elapsed = last - start;
    // The first minute's worth goes at once; the other 120,000 tokens refill
    // at 1,000 per second: 120 s is the least possible.
    let minimum = Duration::from_secs((N * EACH - ITPM) * 60 / ITPM);
    assert!(
        elapsed >= minimum - Duration::from_millis(10),
        "{elapsed:?}"
    );
    assert!(
        elapsed <= minimum + Duration::from_secs(2),
        "took {elapsed:?}, minimum {minimum:?}"
    );

    // Replay what the upstream saw against a token bucket server.
    let sent = log.sent();
    assert_eq!(sent.len(), N as usize);
    let rate = ITPM as f64 / 60.0;
    let mut level = ITPM as f64;
    let mut prev = start;
    for s in &sent {
        level = (level + (s.at - prev).as_secs_f64() * rate).min(ITPM as f64);
        prev = s.at;
        level -= s.input as f64;
        assert!(
            level >= -1e-6,
            "server would refuse: level {level} at {:?}",
            s.at - start
        );
    }
    // And in every 60 s window, no more than a full bucket plus a minute's refill.
    for (i, a) in sent.iter().enumerate() {
        let in_window: u64 = sent[i..]
            .iter()
            .take_while(|b| b.at - a.at < Duration::from_secs(60))
            .map(|b| b.input)
            .sum();
        assert!(in_window <= 2 * ITPM, "{in_window}");
    }
    let snap = layer.snapshot();
    assert_eq!(snap.admitted, N);
    assert!(snap.waited >= N - ITPM / EACH);
}

/// Waiters are served in order: a large request at the head of the line is
/// not overtaken by small ones that arrive after it.
#[tokio::test(start_paused = true)]
async fn large_request_at_the_head_is_not_starved() {
    let log = Arc::new(Log::default());
    let (layer, _) = budget(Limits::new().rpm(10_000).itpm(10_000).otpm(10_000_000));
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(upstream(log.clone(), 1));
    let spawn = |input: u64| {
        let mut svc = svc.clone();
        tokio::spawn(async move {
            let resp = svc.ready().await?.call(request(input, 10)).await?;
            resp.into_body().collect().await?;
            Ok::<_, BoxError>(())
        })
    };
    let first = spawn(10_000);
    tokio::task::yield_now().await;
    first.await.unwrap().unwrap();
    let large = spawn(9_000);
    // Half-way through the large one's wait, 5,000 tokens are free: enough
    // for every small request, not for the large one.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let mut smalls = Vec::new();
    for _ in 0..20 {
        smalls.push(spawn(100));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    large.await.unwrap().unwrap();
    for s in smalls {
        s.await.unwrap().unwrap();
    }
    let sent = log.sent();
    let order: Vec<u64> = sent.iter().map(|s| s.input).collect();
    assert_eq!(order[0], 10_000);
    // Small requests pass the large one only within the bound: each of 100
    // tokens delays it by 0.6 s of refill (10,000 per minute), and all that
    // pass may delay it by 2 s: three of them. The large one alone would go
    // at 54 s (9,000 tokens refilled), so it goes by 56 s.
    let large = order.iter().position(|&i| i == 9_000).unwrap();
    assert_eq!(large, 4, "{order:?}");
    let at = sent[large].at - sent[0].at;
    assert!(at <= Duration::from_secs(56), "{at:?}");
    // Wakeups are about as many as admissions (no thundering herd).
    let snap = layer.snapshot();
    assert!(snap.wakeups <= 2 * snap.admitted, "{snap:?}");
}

/// A settlement that refunds an over-estimate wakes the head of the line at
/// once, instead of letting it sleep until the instant it was first given.
#[tokio::test(start_paused = true)]
async fn refund_at_settlement_wakes_the_waiting_head() {
    let log = Arc::new(Log::default());
    let (layer, _) = budget(Limits::new().rpm(1_000).itpm(10_000).otpm(1_000_000));
    let svc = layer.layer(upstream(log.clone(), 1));
    let start = Instant::now();
    // Estimated at 10,000 input tokens; the server counts 2,000.
    let over = Request::post("http://localhost/v1/messages")
        .body(Full::new(Bytes::from(format!(
            r#"{{"model":"{MODEL}","max_tokens":10,"input":10000,"actual":2000}}"#
        ))))
        .unwrap();
    let mut first = svc.clone();
    let resp = first.ready().await.unwrap().call(over).await.unwrap();
    let mut second = svc.clone();
    let waiter = tokio::spawn(async move {
        let resp = second.ready().await?.call(request(5_000, 10)).await?;
        resp.into_body().collect().await?;
        Ok::<_, BoxError>(Instant::now())
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(layer.snapshot().key(KEY).unwrap().waiting, 1);
    // Reading the first answer settles it: 8,000 tokens come back.
    resp.into_body().collect().await.unwrap();
    let admitted = waiter.await.unwrap().unwrap() - start;
    // Without the wakeup it would have slept until 30 s.
    assert!(admitted < Duration::from_secs(6), "{admitted:?}");
    assert!(layer.snapshot().wakeups >= 1);
}

/// Output reservations are given back at settlement: `max_tokens` in reserve
/// mode, and the prior expected output in realtime mode, which then learns.
#[tokio::test(start_paused = true)]
async fn output_reservation_is_refunded_on_settle_in_both_modes() {
    for mode in [OutputMode::Reserve, OutputMode::Realtime] {
        let log = Arc::new(Log::default());
        let estimator = Arc::new(ExactEstimator::default());
        let layer = TokenBudgetLayer::builder()
            .limits(Limits::new().rpm(1_000).itpm(1_000_000).otpm(100_000))
            .output_mode(mode)
            .estimator(estimator.clone())
            .build();
        let mut svc = layer.layer(upstream(log.clone(), 100));
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(request(500, 4_000))
            .await
            .unwrap();
        // Head received, body not read: the whole max_tokens is reserved
        // (realtime mode starts from the prior, the whole max_tokens).
        let snap = layer.snapshot();
        assert_eq!(
            remaining(&snap, Dimension::OutputTokens),
            96_000.0,
            "{mode:?}"
        );
        assert_eq!(remaining(&snap, Dimension::InputTokens), 999_500.0);
        resp.into_body().collect().await.unwrap();
        let snap = layer.snapshot();
        assert_eq!(
            remaining(&snap, Dimension::OutputTokens),
            99_900.0,
            "{mode:?}"
        );
        assert_eq!(remaining(&snap, Dimension::InputTokens), 999_500.0);
        assert_eq!(remaining(&snap, Dimension::Requests), 999.0);
        assert_eq!(estimator.observed.load(Ordering::SeqCst), 1);
        assert_eq!(snap.settled, 1);

        // Twenty more answers of 100 tokens out of 4,000: realtime mode now
        // reserves the learned p90 share (2.5 %), reserve mode still max_tokens.
        for _ in 0..20 {
            let resp = svc
                .ready()
                .await
                .unwrap()
                .call(request(10, 4_000))
                .await
                .unwrap();
            resp.into_body().collect().await.unwrap();
        }
        let before = remaining(&layer.snapshot(), Dimension::OutputTokens);
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(request(10, 4_000))
            .await
            .unwrap();
        let reserved = before - remaining(&layer.snapshot(), Dimension::OutputTokens);
        let ratio = layer.snapshot().key(KEY).unwrap().expected_output_ratio;
        match mode {
            OutputMode::Reserve => assert_eq!(reserved, 4_000.0),
            _ => {
                assert_eq!(ratio, 0.025);
                assert_eq!(reserved, 100.0);
            }
        }
        drop(resp);
    }
}

/// The output-ratio settings: `output_ratio_min_samples` is how many answers
/// a key needs before the learned ratio replaces the prior, and
/// `output_ratio_window` how many recent ratios its quantile is taken from.
#[tokio::test(start_paused = true)]
async fn output_ratio_min_samples_and_window_are_settings() {
    let log = Arc::new(Log::default());
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1_000).itpm(1_000_000).otpm(1_000_000))
        .estimator(Arc::new(ExactEstimator::default()))
        .output_ratio_min_samples(3)
        .output_ratio_window(2)
        .build();
    let mut svc = layer.layer(upstream(log.clone(), 100));
    let ratio = |layer: &TokenBudgetLayer| layer.snapshot().key(KEY).unwrap().expected_output_ratio;
    // Answers of 100 tokens out of 1,000 (10 %), then of 100 out of 400 (25 %).
    for (n, max_tokens) in [1_000, 1_000, 400, 400].into_iter().enumerate() {
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(request(10, max_tokens))
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap();
        let expected = match n {
            // Fewer than three answers: the prior, the whole max_tokens.
            0 | 1 => 1.0,
            // Three answers, a window of two: the p90 of [0.1, 0.25], then
            // of [0.25, 0.25] (the 10 % answers have left the window).
            _ => 0.25,
        };
        assert_eq!(ratio(&layer), expected, "after {} answers", n + 1);
    }
    // A window of two: a 10 % answer now brings the p90 down to the larger of the two.
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(request(10, 1_000))
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap();
    assert_eq!(ratio(&layer), 0.25);
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(request(10, 1_000))
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap();
    assert!((ratio(&layer) - 0.1).abs() < 1e-12, "{}", ratio(&layer));
}

/// A request that does not say its `max_tokens` is charged
/// `default_max_tokens` of output (4,096 unless set).
#[tokio::test(start_paused = true)]
async fn default_max_tokens_is_reserved_for_a_request_without_max_tokens() {
    for (setting, reserved) in [(None, 4_096.0), (Some(1_000), 1_000.0)] {
        let log = Arc::new(Log::default());
        let mut builder = TokenBudgetLayer::builder()
            .limits(Limits::new().rpm(1_000).itpm(1_000_000).otpm(100_000))
            .output_mode(OutputMode::Reserve)
            .estimator(Arc::new(ExactEstimator::default()));
        if let Some(tokens) = setting {
            builder = builder.default_max_tokens(tokens);
        }
        let layer = builder.build();
        let mut svc = layer.layer(upstream(log.clone(), 10));
        let body = format!(r#"{{"model":"{MODEL}","input":10,"messages":[]}}"#);
        let req = Request::post("http://localhost/v1/messages")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = svc.ready().await.unwrap().call(req).await.unwrap();
        let left = remaining(&layer.snapshot(), Dimension::OutputTokens);
        assert_eq!(100_000.0 - left, reserved, "{setting:?}");
        resp.into_body().collect().await.unwrap();
        assert_eq!(log.sent()[0].max_tokens, None);
    }
}

/// A real event stream, as the streaming docs show it (with caching counts).
const SSE: &str = "event: message_start\n\
data: {\"type\": \"message_start\", \"message\": {\"id\": \"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY\", \"type\": \"message\", \"role\": \"assistant\", \"content\": [], \"model\": \"claude-sonnet-4-5-20250929\", \"stop_reason\": null, \"stop_sequence\": null, \"usage\": {\"input_tokens\": 472, \"cache_creation_input_tokens\": 28, \"cache_read_input_tokens\": 2000, \"output_tokens\": 2}}}\n\
\n\
event: content_block_start\n\
data: {\"type\": \"content_block_start\", \"index\": 0, \"content_block\": {\"type\": \"text\", \"text\": \"\"}}\n\
\n\
event: ping\n\
data: {\"type\": \"ping\"}\n\
\n\
event: content_block_delta\n\
data: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"Hello\"}}\n\
\n\
event: content_block_delta\n\
data: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"! \\\"usage\\\": {\\\"output_tokens\\\": 9999}\"}}\n\
\n\
event: content_block_stop\n\
data: {\"type\": \"content_block_stop\", \"index\": 0}\n\
\n\
event: message_delta\n\
data: {\"type\": \"message_delta\", \"delta\": {\"stop_reason\": \"end_turn\", \"stop_sequence\":null}, \"usage\": {\"output_tokens\": 15}}\n\
\n\
event: message_stop\n\
data: {\"type\": \"message_stop\"}\n\
\n";

/// A response body made of the given frames, counting how often it is polled.
struct Frames {
    frames: std::collections::VecDeque<Bytes>,
    pending_after: Option<usize>,
    polls: Arc<AtomicUsize>,
}

impl Body for Frames {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        if self.pending_after == Some(0) {
            return Poll::Pending;
        }
        if let Some(n) = self.pending_after.as_mut() {
            *n -= 1;
        }
        Poll::Ready(self.frames.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.pending_after.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

fn frames(parts: Vec<Bytes>, pending_after: Option<usize>) -> Frames {
    Frames {
        frames: parts.into(),
        pending_after,
        polls: Arc::new(AtomicUsize::new(0)),
    }
}

fn sse_upstream(make: impl Fn() -> Frames + Clone + Send + Sync + 'static) -> Upstream {
    BoxCloneService::new(tower::service_fn(
        move |_req: Request<ReplayBody<Full<Bytes>>>| {
            let body = make();
            async move {
                let mut resp = Response::new(body.boxed_unsync());
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/event-stream; charset=utf-8"),
                );
                Ok::<_, BoxError>(resp)
            }
        },
    ))
}

fn stream_request(input: u64, max_tokens: u64) -> Request<Full<Bytes>> {
    let body =
        format!(r#"{{"model":"{MODEL}","max_tokens":{max_tokens},"input":{input},"stream":true}}"#);
    Request::post("http://localhost/v1/messages")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// An event stream settles with its events' usage, wherever the frames split
/// the lines: every split point of a real stream into two frames, and three
/// frames at awkward places.
#[tokio::test(start_paused = true)]
async fn sse_settles_with_frames_split_at_every_byte() {
    let bytes = Bytes::from_static(SSE.as_bytes());
    for i in 0..=bytes.len() {
        let (a, b) = (bytes.slice(..i), bytes.slice(i..));
        let (layer, _) = budget(Limits::new().rpm(1_000).itpm(100_000).otpm(10_000));
        let mut svc = layer.layer(sse_upstream(move || {
            frames(vec![a.clone(), b.clone()], None)
        }));
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(stream_request(1_000, 1_000))
            .await
            .unwrap();
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, bytes, "passed through unchanged");
        let snap = layer.snapshot();
        // 472 uncached + 28 cache writes count; the 2,000 cache reads do not (Sonnet 4.x).
        assert_eq!(
            remaining(&snap, Dimension::InputTokens),
            99_500.0,
            "split at {i}"
        );
        assert_eq!(
            remaining(&snap, Dimension::OutputTokens),
            9_985.0,
            "split at {i}"
        );
    }
    // A \r\n stream in three frames splitting "\r" from "\n" and a field name.
    let crlf = SSE.replace('\n', "\r\n");
    let bytes = Bytes::from(crlf);
    let cr = bytes.iter().position(|&b| b == b'\r').unwrap();
    let cuts = [cr + 1, bytes.len() - 20];
    let (layer, _) = budget(Limits::new().rpm(1_000).itpm(100_000).otpm(10_000));
    let b2 = bytes.clone();
    let mut svc = layer.layer(sse_upstream(move || {
        frames(
            vec![
                b2.slice(..cuts[0]),
                b2.slice(cuts[0]..cuts[1]),
                b2.slice(cuts[1]..),
            ],
            None,
        )
    }));
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(stream_request(1_000, 1_000))
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap();
    assert_eq!(
        remaining(&layer.snapshot(), Dimension::OutputTokens),
        9_985.0
    );
}

/// Settlement happens at `message_stop`, as the frame passes, not when the
/// connection closes.
#[tokio::test(start_paused = true)]
async fn sse_settles_at_message_stop_without_waiting_for_the_end() {
    let (layer, _) = budget(Limits::new().rpm(1_000).itpm(100_000).otpm(10_000));
    let bytes = Bytes::from_static(SSE.as_bytes());
    let mut svc = layer.layer(sse_upstream(move || frames(vec![bytes.clone()], Some(1))));
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(stream_request(1_000, 1_000))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.data_ref().map(|d| d.len()), Some(SSE.len()));
    // The body has not ended (its next poll is pending), yet the charge is settled.
    assert_eq!(
        remaining(&layer.snapshot(), Dimension::OutputTokens),
        9_985.0
    );
    assert_eq!(layer.snapshot().settled, 1);
}

/// A stream's `message_start` says what the server charged for input: the
/// over-reservation is given back at once, while the answer is still being
/// generated, and the end settles only the output (the input is not
/// corrected twice).
#[tokio::test(start_paused = true)]
async fn sse_input_is_settled_at_message_start() {
    let (layer, _) = budget(Limits::new().rpm(1_000).itpm(100_000).otpm(10_000));
    let cut = SSE.find("event: content_block_start").unwrap();
    let (start, rest) = (
        Bytes::from_static(&SSE.as_bytes()[..cut]),
        Bytes::from_static(&SSE.as_bytes()[cut..]),
    );
    let mut svc = layer.layer(sse_upstream(move || {
        frames(vec![start.clone(), rest.clone()], None)
    }));
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(stream_request(6_000, 1_000))
        .await
        .unwrap();
    assert_eq!(
        remaining(&layer.snapshot(), Dimension::InputTokens),
        94_000.0,
        "6,000 reserved"
    );
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    // Only `message_start` was read, the answer goes on: 472 uncached + 28
    // cache writes charged, not 6,000.
    let snap = layer.snapshot();
    assert_eq!(remaining(&snap, Dimension::InputTokens), 99_500.0);
    assert_eq!(snap.settled, 0, "the answer is not settled yet");
    body.frame().await.unwrap().unwrap();
    let snap = layer.snapshot();
    assert_eq!(snap.settled, 1);
    assert_eq!(remaining(&snap, Dimension::InputTokens), 99_500.0);
    assert_eq!(remaining(&snap, Dimension::OutputTokens), 9_985.0);
}

/// A stream that ends in an `event: error` after a 200 settles with what its
/// events said; a stream dropped half-way keeps the output reservation.
#[tokio::test(start_paused = true)]
async fn sse_error_event_and_dropped_stream() {
    let cut = SSE.find("event: content_block_stop").unwrap();
    let errored = format!(
        "{}event: error\ndata: {{\"type\": \"error\", \"error\": {{\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}}}\n\n",
        &SSE[..cut]
    );
    let (layer, _) = budget(Limits::new().rpm(1_000).itpm(100_000).otpm(10_000));
    let bytes = Bytes::from(errored);
    let mut svc = layer.layer(sse_upstream(move || frames(vec![bytes.clone()], None)));
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(stream_request(1_000, 1_000))
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap();
    let snap = layer.snapshot();
    assert_eq!(remaining(&snap, Dimension::InputTokens), 99_500.0);
    // Output: the message_start said 2.
    assert_eq!(remaining(&snap, Dimension::OutputTokens), 9_998.0);

    // Dropped after message_start: input is known, output stays reserved.
    let (layer, _) = budget(Limits::new().rpm(1_000).itpm(100_000).otpm(10_000));
    let head = Bytes::from(SSE[..cut].to_owned());
    let mut svc = layer.layer(sse_upstream(move || frames(vec![head.clone()], Some(1))));
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(stream_request(1_000, 1_000))
        .await
        .unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    let snap = layer.snapshot();
    assert_eq!(remaining(&snap, Dimension::InputTokens), 99_500.0);
    assert_eq!(remaining(&snap, Dimension::OutputTokens), 9_000.0);
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

/// Answers with the given status and headers, and a JSON usage.
fn scripted(script: Arc<Mutex<Vec<(StatusCode, HeaderMap)>>>, calls: Arc<AtomicUsize>) -> Upstream {
    BoxCloneService::new(tower::service_fn(
        move |req: Request<ReplayBody<Full<Bytes>>>| {
            let script = Arc::clone(&script);
            let calls = Arc::clone(&calls);
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let bytes = req.into_body().collect().await?.to_bytes();
                let input = estimate_json(&bytes).input_tokens;
                let (status, headers) = {
                    let mut s = script.lock().unwrap();
                    if s.len() > 1 {
                        s.remove(0)
                    } else {
                        s[0].clone()
                    }
                };
                let body = if status.is_success() {
                    json_usage(input, 10)
                } else {
                    Bytes::from_static(
                        br#"{"type":"error","error":{"type":"rate_limit_error","message":"x"}}"#,
                    )
                };
                let mut resp = Response::new(full(body));
                *resp.status_mut() = status;
                *resp.headers_mut() = headers;
                Ok::<_, BoxError>(resp)
            }
        },
    ))
}

/// With no limits configured, the first response's headers teach them and
/// later requests are paced; the server's lower `remaining` wins.
#[tokio::test(start_paused = true)]
async fn limits_are_learned_from_headers_and_pace_later_requests() {
    let h = headers(&[
        ("anthropic-ratelimit-requests-limit", "50"),
        ("anthropic-ratelimit-requests-remaining", "49"),
        ("anthropic-ratelimit-input-tokens-limit", "60000"),
        ("anthropic-ratelimit-input-tokens-remaining", "30000"),
        ("anthropic-ratelimit-output-tokens-limit", "8000"),
        ("anthropic-ratelimit-output-tokens-remaining", "8000"),
        ("anthropic-ratelimit-tokens-limit", "68000"),
        ("anthropic-ratelimit-tokens-remaining", "38000"),
    ]);
    let script = Arc::new(Mutex::new(vec![(StatusCode::OK, h)]));
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, _) = budget(Limits::new());
    let svc = layer.layer(scripted(script, calls.clone()));
    let snap = layer.snapshot();
    assert!(snap.keys.is_empty());

    let mut first = svc.clone();
    let resp = first
        .ready()
        .await
        .unwrap()
        .call(request(30_000, 100))
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap();
    let snap = layer.snapshot();
    let key = snap.key(KEY).unwrap();
    let input = key.dimension(Dimension::InputTokens);
    assert_eq!(input.limit, Some(60_000));
    assert!(input.learned);
    assert_eq!(key.dimension(Dimension::OutputTokens).limit, Some(8_000));
    assert_eq!(key.dimension(Dimension::Requests).limit, Some(50));
    // The server said 30,000 left: the ledger agrees (a new bucket starts full
    // and was lowered to the server's view).
    assert!(input.remaining.unwrap() <= 30_500.0, "{input:?}");

    // Two more of 30,000: the first fits, the second waits for 30,000 tokens
    // to refill at 1,000 per second: 30 s.
    let start = Instant::now();
    let mut done = Vec::new();
    for _ in 0..2 {
        let mut svc = svc.clone();
        done.push(tokio::spawn(async move {
            let resp = svc.ready().await?.call(request(30_000, 100)).await?;
            resp.into_body().collect().await?;
            Ok::<_, BoxError>(Instant::now())
        }));
    }
    let mut times = Vec::new();
    for d in done {
        times.push(d.await.unwrap().unwrap() - start);
    }
    times.sort();
    assert!(times[0] < Duration::from_secs(1), "{times:?}");
    assert!(
        times[1] >= Duration::from_secs(27) && times[1] <= Duration::from_secs(31),
        "{times:?}"
    );
}

/// A learned limit is plausible: never below the smallest published tier
/// value (50 RPM, 30,000 ITPM, 8,000 OTPM), and never taken from one
/// response that disagrees with the ones before: a new value needs three
/// responses in a row.
#[tokio::test(start_paused = true)]
async fn learned_limits_are_plausible_and_confirmed() {
    let said = |rpm: &str, itpm: &str| {
        (
            StatusCode::OK,
            headers(&[
                ("anthropic-ratelimit-requests-limit", rpm),
                ("anthropic-ratelimit-input-tokens-limit", itpm),
            ]),
        )
    };
    let script = Arc::new(Mutex::new(vec![
        said("1000", "450000"),
        // One garbled response: a limit of 1 would throttle the client.
        said("1", "12"),
        // One response that disagrees with the last ones, then a change
        // confirmed by three in a row.
        said("1000", "40000"),
        said("1000", "450000"),
        said("1000", "40000"),
        said("1000", "40000"),
        said("1000", "40000"),
    ]));
    let (layer, _) = budget(Limits::new());
    let mut svc = layer.layer(scripted(script, Arc::new(AtomicUsize::new(0))));
    let mut seen = Vec::new();
    for _ in 0..7 {
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(request(1_000, 100))
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap();
        let snap = layer.snapshot();
        let key = snap.key(KEY).unwrap();
        seen.push((
            key.dimension(Dimension::Requests).limit,
            key.dimension(Dimension::InputTokens).limit,
        ));
    }
    let (rpm, old, new) = (Some(1_000), Some(450_000), Some(40_000));
    assert_eq!(
        seen,
        [
            (rpm, old),
            (rpm, old),
            (rpm, old),
            (rpm, old),
            (rpm, old),
            (rpm, old),
            (rpm, new)
        ]
    );
}

/// The combined `tokens` header is used for input only when the response has
/// no input-tokens headers.
#[tokio::test(start_paused = true)]
async fn combined_tokens_header_stands_in_for_missing_input_headers() {
    let h = headers(&[
        ("anthropic-ratelimit-tokens-limit", "40000"),
        ("anthropic-ratelimit-tokens-remaining", "10000"),
    ]);
    let script = Arc::new(Mutex::new(vec![(StatusCode::OK, h)]));
    let (layer, _) = budget(Limits::new());
    let mut svc = layer.layer(scripted(script, Arc::new(AtomicUsize::new(0))));
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(request(1_000, 100))
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap();
    let snap = layer.snapshot();
    let key = snap.key(KEY).unwrap();
    assert_eq!(key.dimension(Dimension::InputTokens).limit, Some(40_000));
    assert_eq!(key.dimension(Dimension::OutputTokens).limit, None);
}

/// A 429 refunds the whole reservation (the server charged nothing) and
/// syncs from its headers.
#[tokio::test(start_paused = true)]
async fn a_429_refunds_everything_and_syncs() {
    let h = headers(&[
        ("retry-after", "20"),
        ("anthropic-ratelimit-input-tokens-limit", "30000"),
        ("anthropic-ratelimit-input-tokens-remaining", "0"),
    ]);
    let script = Arc::new(Mutex::new(vec![(StatusCode::TOO_MANY_REQUESTS, h)]));
    let (layer, est) = budget(Limits::new().rpm(50).itpm(30_000).otpm(8_000));
    let mut svc = layer.layer(scripted(script, Arc::new(AtomicUsize::new(0))));
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(request(5_000, 1_000))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    resp.into_body().collect().await.unwrap();
    let snap = layer.snapshot();
    assert_eq!(snap.refunded_429, 1);
    assert_eq!(remaining(&snap, Dimension::Requests), 50.0);
    assert_eq!(remaining(&snap, Dimension::OutputTokens), 8_000.0);
    // The server said nothing is left: the refund does not put back more.
    assert!(remaining(&snap, Dimension::InputTokens) <= 500.0);
    assert_eq!(est.observed.load(Ordering::SeqCst), 0);
}

/// A refused answer (529) refunds everything; an error answer without usage
/// (500) refunds the output reservation (no output was produced) and keeps the
/// rest; a transport error keeps it all.
#[tokio::test(start_paused = true)]
async fn error_status_and_transport_error() {
    // 529 overloaded (and 503): the server turned the request away, nothing
    // is charged. 500: the work may have been done; the input is kept, the
    // output (none was produced) refunded.
    for (status, requests_left, input_left) in [(529, 50.0, 30_000.0), (500, 49.0, 25_000.0)] {
        let script = Arc::new(Mutex::new(vec![(
            StatusCode::from_u16(status).unwrap(),
            HeaderMap::new(),
        )]));
        let (layer, _) = budget(Limits::new().rpm(50).itpm(30_000).otpm(8_000));
        let mut svc = layer.layer(scripted(script, Arc::new(AtomicUsize::new(0))));
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(request(5_000, 1_000))
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap();
        let snap = layer.snapshot();
        assert_eq!(
            remaining(&snap, Dimension::Requests),
            requests_left,
            "{status}"
        );
        assert_eq!(
            remaining(&snap, Dimension::InputTokens),
            input_left,
            "{status}"
        );
        assert_eq!(
            remaining(&snap, Dimension::OutputTokens),
            8_000.0,
            "{status}"
        );
    }

    let (layer, _) = budget(Limits::new().rpm(50).itpm(30_000).otpm(8_000));
    let failing = tower::service_fn(|_req: Request<ReplayBody<Full<Bytes>>>| async {
        Err::<Response<ResBody>, BoxError>("connection reset".into())
    });
    let mut svc = layer.layer(failing);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request(5_000, 1_000))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "connection reset",
        "inner errors pass through"
    );
    let snap = layer.snapshot();
    assert_eq!(remaining(&snap, Dimension::InputTokens), 25_000.0);
    assert_eq!(remaining(&snap, Dimension::OutputTokens), 7_000.0);
}

/// A request dropped while waiting gives back its place in line and holds
/// no reservation: the one behind it goes as soon as it fits.
#[tokio::test(start_paused = true)]
async fn cancelled_waiter_gives_back_its_place() {
    let log = Arc::new(Log::default());
    let (layer, _) = budget(Limits::new().rpm(1_000).itpm(10_000).otpm(1_000_000));
    let svc = layer.layer(upstream(log.clone(), 1));
    let start = Instant::now();
    let mut s = svc.clone();
    let resp = s
        .ready()
        .await
        .unwrap()
        .call(request(10_000, 10))
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap();

    let mut big = svc.clone();
    let big =
        tokio::spawn(async move { big.ready().await?.call(request(9_000, 10)).await.map(drop) });
    tokio::time::sleep(Duration::from_millis(1)).await;
    let mut small = svc.clone();
    let small = tokio::spawn(async move {
        let resp = small.ready().await?.call(request(1_000, 10)).await?;
        resp.into_body().collect().await?;
        Ok::<_, BoxError>(Instant::now())
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(layer.snapshot().key(KEY).unwrap().waiting, 2);
    big.abort();
    assert!(big.await.unwrap_err().is_cancelled());
    let done = small.await.unwrap().unwrap() - start;
    // 1,000 tokens refill in 6 s; the 9,000 that was dropped would have
    // taken 54 s and made the small one wait 60 s.
    assert!(done <= Duration::from_secs(7), "{done:?}");
    let snap = layer.snapshot();
    assert_eq!(snap.key(KEY).unwrap().waiting, 0);
    let sent: Vec<u64> = log.sent().iter().map(|s| s.input).collect();
    assert_eq!(sent, vec![10_000, 1_000]);
    // Nothing of the dropped request stayed reserved.
    let input = remaining(&snap, Dimension::InputTokens);
    assert!(input.abs() < 1.0, "{input}");
}

/// Reject mode fails at once with the wait it would have needed.
#[tokio::test(start_paused = true)]
async fn reject_mode_fails_at_once_with_retry_in() {
    let log = Arc::new(Log::default());
    let estimator = Arc::new(ExactEstimator::default());
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1_000).itpm(10_000).otpm(1_000_000))
        .mode(BudgetMode::Reject)
        .estimator(estimator)
        .build();
    let mut svc = layer.layer(upstream(log.clone(), 1));
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(request(8_000, 10))
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap();
    let start = Instant::now();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request(5_000, 10))
        .await
        .unwrap_err();
    assert_eq!(Instant::now(), start, "no wait");
    match err.downcast_ref::<Error>() {
        Some(Error::BudgetExceeded {
            retry_in,
            dimension,
        }) => {
            assert_eq!(*dimension, Dimension::InputTokens);
            // 3,000 tokens at 10,000 per minute: 18 s.
            assert_eq!(*retry_in, Duration::from_secs(18));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(log.sent().len(), 1);
    assert_eq!(layer.snapshot().rejected, 1);
}

/// A request that can never fit fails at once and is never sent; in realtime
/// mode a large max_tokens is not a reason to refuse.
#[tokio::test(start_paused = true)]
async fn request_that_can_never_fit_is_never_sent() {
    let log = Arc::new(Log::default());
    let (layer, _) = budget(Limits::new().rpm(50).itpm(30_000).otpm(8_000));
    let mut svc = layer.layer(upstream(log.clone(), 1));
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request(40_000, 10))
        .await
        .unwrap_err();
    match err.downcast_ref::<Error>() {
        Some(Error::RequestTooLarge {
            dimension: Dimension::InputTokens,
            cost: 40_000,
            limit: 30_000,
        }) => {}
        other => panic!("{other:?}"),
    }
    // Realtime (default): max_tokens 10,000 above the 8,000 OTPM is admitted.
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(request(100, 10_000))
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap();
    assert_eq!(log.sent().len(), 1);

    let estimator = Arc::new(ExactEstimator::default());
    let reserve = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(50).itpm(30_000).otpm(8_000))
        .output_mode(OutputMode::Reserve)
        .estimator(estimator)
        .build();
    let mut svc = reserve.layer(upstream(log.clone(), 1));
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request(100, 10_000))
        .await
        .unwrap_err();
    assert!(matches!(
        err.downcast_ref::<Error>(),
        Some(Error::RequestTooLarge {
            dimension: Dimension::OutputTokens,
            ..
        })
    ));
    assert_eq!(log.sent().len(), 1);
    assert_eq!(reserve.snapshot().too_large, 1);
}

fn request_for_model(model: &str) -> Request<Full<Bytes>> {
    let body = format!(r#"{{"model":"{model}","max_tokens":10,"input":5,"messages":[]}}"#);
    Request::post("http://localhost/v1/messages")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// A `model` longer than any model name (256 bytes) is refused with a typed
/// error before it is charged or sent, whether the budget read the body or an
/// outer layer did; 256 bytes pass.
#[tokio::test(start_paused = true)]
async fn a_model_name_over_256_bytes_is_refused_unsent() {
    let log = Arc::new(Log::default());
    let (layer, _) = budget(Limits::new().rpm(50).itpm(30_000).otpm(8_000));
    let mut svc = layer.layer(upstream(log.clone(), 1));
    for reuse in [false, true] {
        let mut req = request_for_model(&"m".repeat(257));
        if reuse {
            let body = Bytes::from(format!(r#"{{"model":"{}","input":5}}"#, "m".repeat(257)));
            req.extensions_mut().insert(BufferedBytes(body));
        }
        let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
        match err.downcast_ref::<Error>() {
            Some(e @ Error::ModelTooLong { len: 257 }) => assert!(!e.is_transient()),
            other => panic!("{other:?}"),
        }
    }
    assert!(log.sent().is_empty());
    assert!(layer.snapshot().keys.is_empty(), "nothing charged");
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(request_for_model(&"m".repeat(256)))
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap();
    assert_eq!(log.sent().len(), 1);
}

/// In enforce mode the same request gets the API's 400
/// `invalid_request_error`, and is not sent.
#[tokio::test(start_paused = true)]
async fn enforce_mode_answers_a_huge_model_name_with_a_400() {
    let log = Arc::new(Log::default());
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(50).itpm(30_000).otpm(8_000))
        .enforce(one_caller())
        .build();
    let mut gateway = layer.layer(upstream(log.clone(), 1));
    let resp = gateway
        .ready()
        .await
        .unwrap()
        .call(request_for_model(&"m".repeat(4 << 20)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(resp.headers().contains_key("request-id"));
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("4194304 bytes"));
    assert!(log.sent().is_empty());
    assert!(layer.snapshot().keys.is_empty());
}

/// A request body that counts how often it is polled.
struct CountingBody {
    data: Option<Bytes>,
    polls: Arc<AtomicUsize>,
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        Poll::Ready(self.data.take().map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }
}

/// When an outer layer already holds the body (`BufferedBytes`), the budget
/// estimates from those bytes and passes the body through without reading it.
#[tokio::test(start_paused = true)]
async fn buffered_bytes_are_reused_without_reading_the_body() {
    let (layer, _) = budget(Limits::new().rpm(50).itpm(30_000).otpm(8_000));
    let polls_at_call = Arc::new(Mutex::new(Vec::new()));
    let seen = polls_at_call.clone();
    let inner = tower::service_fn(move |req: Request<ReplayBody<CountingBody>>| {
        let seen = seen.clone();
        async move {
            let polls = req
                .extensions()
                .get::<Arc<AtomicUsize>>()
                .unwrap()
                .load(Ordering::SeqCst);
            let body = req.into_body().collect().await?.to_bytes();
            seen.lock().unwrap().push((polls, body.len()));
            Ok::<_, BoxError>(Response::new(full(json_usage(1_234, 5))))
        }
    });
    let mut svc = layer.layer(inner);
    for reuse in [true, false] {
        let bytes = Bytes::from(request_body(1_234, 100));
        let polls = Arc::new(AtomicUsize::new(0));
        let mut req = Request::post("http://localhost/v1/messages")
            .body(CountingBody {
                data: Some(bytes.clone()),
                polls: polls.clone(),
            })
            .unwrap();
        req.extensions_mut().insert(polls.clone());
        if reuse {
            req.extensions_mut().insert(BufferedBytes(bytes.clone()));
        }
        let resp = svc.ready().await.unwrap().call(req).await.unwrap();
        resp.into_body().collect().await.unwrap();
    }
    let seen = polls_at_call.lock().unwrap().clone();
    let len = request_body(1_234, 100).len();
    // With BufferedBytes: not polled before the inner service read it.
    assert_eq!(seen[0], (0, len));
    // Without: read once by the budget, then replayed.
    assert_eq!(seen[1], (1, len));
    let snap = layer.snapshot();
    assert_eq!(
        remaining(&snap, Dimension::InputTokens),
        30_000.0 - 2.0 * 1_234.0
    );
    assert_eq!(snap.key(KEY).unwrap().estimates, 2);
}

/// A body larger than the buffer limit passes through and is estimated from
/// its length (a fallback estimate).
#[tokio::test(start_paused = true)]
async fn body_above_the_buffer_limit_passes_through() {
    let estimator = Arc::new(ExactEstimator::default());
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(50).itpm(30_000).otpm(8_000))
        .estimator(estimator)
        .buffer_limit(16)
        .build();
    let log = Arc::new(Log::default());
    let mut svc = layer.layer(upstream(log.clone(), 1));
    let req = request(7, 10);
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    resp.into_body().collect().await.unwrap();
    assert_eq!(log.sent()[0].input, 7, "the body arrived whole");
    let snap = layer.snapshot();
    let other = snap.key("other").unwrap();
    assert_eq!(other.fallback_estimates, 1);
    // Estimated from its length; settled to the 7 tokens the usage reported.
    assert_eq!(
        other.dimension(Dimension::InputTokens).remaining,
        Some(30_000.0 - 7.0)
    );
}

/// Enforce mode answers an over-budget caller with an Anthropic-shaped 429,
/// puts the rate-limit headers on every response, and keeps callers apart.
#[tokio::test(start_paused = true)]
async fn enforce_mode_answers_an_anthropic_shaped_429() {
    let log = Arc::new(Log::default());
    let estimator = Arc::new(ExactEstimator::default());
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(50).itpm(30_000).otpm(8_000))
        .estimator(estimator)
        .enforce(Callers::any_key_unauthenticated())
        .build();
    let mut gateway = layer.layer(upstream(log.clone(), 100));
    let keyed = |key: &str, input: u64| {
        let mut r = request(input, 1_000);
        r.headers_mut().insert("x-api-key", key.parse().unwrap());
        r
    };
    let ok = gateway
        .ready()
        .await
        .unwrap()
        .call(keyed("sk-ant-alice", 25_000))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let snap = RateLimitSnapshot::from_headers(ok.headers());
    assert_eq!(snap.input_tokens.limit, Some(30_000));
    assert_eq!(snap.input_tokens.remaining, Some(5_000));
    assert_eq!(snap.requests.limit, Some(50));
    assert_eq!(snap.requests.remaining, Some(49));
    assert_eq!(snap.output_tokens.limit, Some(8_000));
    assert_eq!(snap.output_tokens.remaining, Some(7_000));
    assert_eq!(snap.tokens.limit, Some(38_000));
    assert_eq!(snap.tokens.remaining, Some(12_000));
    assert!(snap.input_tokens.reset_in.is_some());
    ok.into_body().collect().await.unwrap();

    let denied = gateway
        .ready()
        .await
        .unwrap()
        .call(keyed("sk-ant-alice", 10_000))
        .await
        .unwrap();
    assert_anthropic_shaped_429(denied, "alice").await;

    // Another caller has its own budget.
    let bob = gateway
        .ready()
        .await
        .unwrap()
        .call(keyed("sk-ant-bob", 10_000))
        .await
        .unwrap();
    assert_eq!(bob.status(), StatusCode::OK);
    bob.into_body().collect().await.unwrap();
    assert_eq!(log.sent().len(), 2);

    // A request above the whole limit: 429, not to be retried.
    let never = gateway
        .ready()
        .await
        .unwrap()
        .call(keyed("sk-ant-carol", 40_000))
        .await
        .unwrap();
    assert_eq!(never.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(never.headers()["x-should-retry"], "false");
    assert!(never.headers().get("retry-after").is_none());

    // Keys in the snapshot are hashes, never the API key.
    let snap = layer.snapshot();
    assert_eq!(snap.keys.len(), 3);
    assert!(snap
        .keys
        .iter()
        .all(|k| k.key.starts_with("key-") && !k.key.contains("sk-ant")));
    assert_eq!(snap.rejected, 1);
}

/// The enforce-mode 429 of a caller who asked for 10,000 input tokens with
/// 5,000 of 30,000 left: Anthropic's headers and error body, and never any
/// part of the caller's API key (`secret`).
async fn assert_anthropic_shaped_429<B>(denied: Response<B>, secret: &str)
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = denied.headers().clone();
    let snap = RateLimitSnapshot::from_headers(&h);
    // 5,000 left of 30,000; 10,000 needed: 5,000 more at 500/s = 10 s.
    assert_eq!(snap.retry_after, Some(Duration::from_secs(10)));
    assert_eq!(h["retry-after"], "10");
    assert_eq!(snap.should_retry, Some(true));
    assert_eq!(snap.input_tokens.limit, Some(30_000));
    assert_eq!(snap.input_tokens.remaining, Some(5_000));
    assert_eq!(h["content-type"], "application/json");
    let body = denied.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["type"], "error");
    assert_eq!(json["error"]["type"], "rate_limit_error");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("30,000 input tokens per minute"),
        "{message}"
    );
    let id = json["request_id"].as_str().unwrap();
    assert!(id.starts_with("req_"));
    assert_eq!(h["request-id"], id);
    // The key is never echoed.
    assert!(!String::from_utf8_lossy(&body).contains(secret));
    assert!(h
        .values()
        .all(|v| !v.to_str().unwrap_or("").contains(secret)));
}

/// Budgets can be keyed by a custom extractor; a request it names no caller
/// for is refused with 401, charged to no budget.
#[tokio::test(start_paused = true)]
async fn enforce_mode_with_a_custom_key_extractor() {
    let log = Arc::new(Log::default());
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1).itpm(30_000).otpm(8_000))
        .estimator(Arc::new(ExactEstimator::default()))
        .enforce(KeyExtractor::new(|parts: &Parts| {
            parts
                .headers
                .get("x-team")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        }))
        .build();
    let mut gateway = layer.layer(upstream(log.clone(), 1));
    let team = |t: Option<&str>| {
        let mut r = request(10, 10);
        if let Some(t) = t {
            r.headers_mut().insert("x-team", t.parse().unwrap());
        }
        r
    };
    let mut statuses = Vec::new();
    for t in [Some("a"), Some("a"), Some("b"), None, None] {
        let r = gateway.ready().await.unwrap().call(team(t)).await.unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, vec![200, 429, 200, 401, 401]);
    let snap = layer.snapshot();
    assert!(snap.key("a/sonnet-4").is_some());
    assert!(
        snap.key("sonnet-4").is_none(),
        "no caller: refused, no budget"
    );
}

#[allow(dead_code)]
fn assert_send<T: Send>(_: &T) {}

/// The layer's futures are Send (usable in tokio::spawn and axum).
#[test]
fn futures_are_send() {
    let (layer, _) = budget(Limits::new());
    let mut svc = layer.layer(upstream(Arc::new(Log::default()), 1));
    let fut = svc.call(request(1, 1));
    assert_send(&fut);
}

/// An inner service that is ready the first time it is asked, and then
/// pending (or failing) when asked again.
#[derive(Clone)]
struct ReadyOnce {
    asked: Arc<AtomicUsize>,
    fail: bool,
}

impl<B> Service<Request<B>> for ReadyOnce {
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<ResBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match (self.asked.fetch_add(1, Ordering::SeqCst), self.fail) {
            (0, _) => Poll::Ready(Ok(())),
            (_, true) => Poll::Ready(Err("connection pool closed".into())),
            (_, false) => Poll::Pending,
        }
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        std::future::ready(Ok(Response::new(full(json_usage(1, 1)))))
    }
}

/// A request admitted but never handed to the inner service (its readiness
/// failed, or the future was dropped while the inner service was not ready)
/// gives its reservation back.
#[tokio::test(start_paused = true)]
async fn admitted_but_unsent_request_is_refunded() {
    for fail in [true, false] {
        let (layer, _) = budget(Limits::new().rpm(50).itpm(30_000).otpm(8_000));
        let mut svc = layer.layer(ReadyOnce {
            asked: Arc::new(AtomicUsize::new(0)),
            fail,
        });
        ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
            .await
            .unwrap();
        let fut = svc.call(request(5_000, 1_000));
        if fail {
            let err = fut.await.unwrap_err();
            assert_eq!(err.to_string(), "connection pool closed");
        } else {
            let timed_out = tokio::time::timeout(Duration::from_secs(1), fut).await;
            assert!(timed_out.is_err(), "the inner service never became ready");
        }
        let snap = layer.snapshot();
        assert_eq!(snap.admitted, 1);
        assert_eq!(remaining(&snap, Dimension::Requests), 50.0, "fail={fail}");
        assert_eq!(remaining(&snap, Dimension::InputTokens), 30_000.0);
        assert_eq!(remaining(&snap, Dimension::OutputTokens), 8_000.0);
    }
}

/// With a prior of 0 (a server charging output only as it is produced), a
/// request reserves one output token: admitted while the output bucket has
/// room, held back while a long answer left it in debt.
#[tokio::test(start_paused = true)]
async fn zero_output_prior_reserves_one_token_and_respects_debt() {
    let log = Arc::new(Log::default());
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(50).itpm(30_000).otpm(1_000))
        .estimator(Arc::new(ExactEstimator::default()))
        .output_ratio_prior(0.0)
        .enforce(one_caller())
        .build();
    let mut gateway = layer.layer(upstream(log.clone(), 1_500));
    let first = gateway
        .ready()
        .await
        .unwrap()
        .call(request(10, 4_000))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    // One output token reserved at admission, not 4,000.
    let out = RateLimitSnapshot::from_headers(first.headers()).output_tokens;
    assert_eq!(
        out.remaining,
        Some(1_000),
        "999 rounded to the nearest thousand"
    );
    assert_eq!(
        remaining_of_all(&layer.snapshot(), Dimension::OutputTokens),
        999.0
    );
    first.into_body().collect().await.unwrap();
    // 1,500 produced: 500 in debt.
    assert_eq!(
        remaining_of_all(&layer.snapshot(), Dimension::OutputTokens),
        -500.0
    );
    let second = gateway
        .ready()
        .await
        .unwrap()
        .call(request(10, 4_000))
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    // 501 tokens at 1,000 per minute: 30.06 s, rounded up.
    assert_eq!(second.headers()["retry-after"], "31");
    assert_eq!(log.sent().len(), 1);
}

/// Behind the retry layer, the budget reuses the bytes the retry layer
/// buffered (the body is read once in all), paces every attempt, and refunds
/// the attempt the server refused.
#[tokio::test(start_paused = true)]
async fn behind_the_retry_layer_each_attempt_is_paced_and_the_429_refunded() {
    use tower_llm_limits::retry::RetryAfterLayer;

    let rejected = headers(&[
        ("retry-after", "2"),
        ("x-should-retry", "true"),
        ("anthropic-ratelimit-input-tokens-limit", "30000"),
        ("anthropic-ratelimit-input-tokens-remaining", "25000"),
    ]);
    let script = Arc::new(Mutex::new(vec![
        (StatusCode::TOO_MANY_REQUESTS, rejected),
        (StatusCode::OK, HeaderMap::new()),
    ]));
    let calls = Arc::new(AtomicUsize::new(0));
    let (budget_layer, _) = budget(Limits::new().rpm(50).itpm(30_000).otpm(8_000));
    let inner = tower::service_fn({
        let upstream = scripted(script, calls.clone());
        move |req: Request<ReplayBody<ReplayBody<CountingBody>>>| {
            let upstream = upstream.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body.collect().await?.to_bytes();
                let req = Request::from_parts(parts, ReplayBody::passthrough(Full::new(bytes)));
                upstream.oneshot(req).await
            }
        }
    });
    let mut client = tower::ServiceBuilder::new()
        .layer(RetryAfterLayer::anthropic())
        .layer(budget_layer.clone())
        .service(inner);
    let polls = Arc::new(AtomicUsize::new(0));
    let req = Request::post("http://localhost/v1/messages")
        .body(CountingBody {
            data: Some(Bytes::from(request_body(5_000, 1_000))),
            polls: polls.clone(),
        })
        .unwrap();
    let start = Instant::now();
    let resp = client.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    assert!(Instant::now() - start >= Duration::from_secs(2));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(polls.load(Ordering::SeqCst), 1, "the body was read once");
    let snap = budget_layer.snapshot();
    assert_eq!(snap.admitted, 2);
    assert_eq!(snap.refunded_429, 1);
    // One request charged in the end (the refused one was refunded).
    assert_eq!(remaining(&snap, Dimension::Requests), 49.0);
    assert_eq!(snap.key(KEY).unwrap().estimates, 2);
}

/// Idle keys can be forgotten; a key in use is kept.
#[tokio::test(start_paused = true)]
async fn idle_keys_are_forgotten_on_request() {
    let log = Arc::new(Log::default());
    let (layer, _) = budget(Limits::new().rpm(50).itpm(30_000).otpm(8_000));
    let mut svc = layer.layer(upstream(log, 1));
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(request(10, 10))
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap();
    assert_eq!(layer.forget_idle(Duration::from_secs(60)), 0);
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(layer.forget_idle(Duration::from_secs(60)), 1);
    assert!(layer.snapshot().keys.is_empty());
}

/// An error answer with an empty body (never polled by a server) is settled
/// at once: its output reservation comes back.
#[tokio::test(start_paused = true)]
async fn empty_error_answer_is_settled_without_being_read() {
    let (layer, _) = budget(Limits::new().rpm(50).itpm(30_000).otpm(8_000));
    let inner = tower::service_fn(|_req: Request<ReplayBody<Full<Bytes>>>| async {
        let mut resp = Response::new(full(Bytes::new()));
        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        Ok::<_, BoxError>(resp)
    });
    let mut svc = layer.layer(inner);
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(request(100, 1_000))
        .await
        .unwrap();
    let snap = layer.snapshot();
    assert_eq!(snap.settled, 1);
    assert_eq!(remaining(&snap, Dimension::OutputTokens), 8_000.0);
    assert_eq!(remaining(&snap, Dimension::InputTokens), 29_900.0);
    drop(resp);
    assert_eq!(layer.snapshot().settled, 1);
}

/// The recommended stack composes: retry, then the budget, then the
/// concurrency cap, then the client; the budget paces what reaches the client.
#[tokio::test(start_paused = true)]
async fn full_stack_retry_budget_concurrency() {
    use tower_llm_limits::concurrency::ConcurrencyLayer;
    use tower_llm_limits::retry::RetryAfterLayer;

    let log = Arc::new(Log::default());
    let (budget_layer, _) = budget(Limits::new().rpm(1_000).itpm(10_000).otpm(1_000_000));
    let upstream_log = log.clone();
    let inner = tower::service_fn(move |req: Request<ReplayBody<ReplayBody<Full<Bytes>>>>| {
        let log = upstream_log.clone();
        async move {
            let bytes = req.into_body().collect().await?.to_bytes();
            let input = estimate_json(&bytes).input_tokens;
            log.sent.lock().unwrap().push(Sent {
                at: Instant::now(),
                input,
                max_tokens: None,
            });
            Ok::<_, BoxError>(Response::new(full(json_usage(input, 1))))
        }
    });
    // `boxed_clone` first: an `async` block holding a stack of several
    // generic layers whose errors are `BoxError` is refused by rustc's Send
    // check ("implementation of From is not general enough", a known
    // limitation with erased lifetimes); the boxed stack is a concrete type.
    let client = tower::ServiceBuilder::new()
        .boxed_clone()
        .layer(RetryAfterLayer::anthropic())
        .layer(budget_layer.clone())
        .layer(ConcurrencyLayer::fixed(2))
        .service(inner);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let resp = client.ready().await?.call(request(5_000, 10)).await?;
            resp.into_body().collect().await?;
            Ok::<_, BoxError>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // 30,000 tokens through a 10,000 ITPM budget: two at once, then one per 30 s.
    let elapsed = Instant::now() - start;
    assert!(
        elapsed >= Duration::from_secs(120) && elapsed <= Duration::from_secs(121),
        "{elapsed:?}"
    );
    assert_eq!(log.sent().len(), 6);
    assert_eq!(budget_layer.snapshot().admitted, 6);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// For any arrivals (sizes, gaps) and cancellations: every request not
    /// cancelled is sent, in order of arrival except for small requests that
    /// pass a waiting head within the bound (2 s of refill: 333 tokens at
    /// 10,000 per minute, per head); a cancelled one is never sent after it
    /// was cancelled; and a token bucket server with the same limit never
    /// has to refuse what was sent.
    #[test]
    fn waiters_are_served_in_order_within_the_limit(
        reqs in proptest::collection::vec((1u64..=10_000, 0u64..20_000, proptest::option::weighted(0.3, 0u64..60_000)), 1..25)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let (sent, cancelled_at, arrived) = rt.block_on(async {
            let log = Arc::new(Log::default());
            let (layer, _) = budget(Limits::new().rpm(100_000).itpm(10_000).otpm(100_000_000));
            let svc = layer.layer(upstream(log.clone(), 1));
            let mut handles = Vec::new();
            let mut arrived = Vec::new();
            for (i, (size, gap, cancel)) in reqs.iter().enumerate() {
                tokio::time::sleep(Duration::from_millis(*gap)).await;
                let mut svc = svc.clone();
                // Tagged with its index in max_tokens.
                let (size, tag) = (*size, 1_000 + i as u64);
                arrived.push((i, Instant::now()));
                let h = tokio::spawn(async move {
                    let resp = svc.ready().await?.call(request(size, tag)).await?;
                    resp.into_body().collect().await?;
                    Ok::<_, BoxError>(())
                });
                handles.push((h, *cancel));
            }
            let mut cancelled_at = vec![None; handles.len()];
            // Cancel those asked for, at their time after the last arrival.
            let mut cancels: Vec<(u64, usize)> = handles
                .iter()
                .enumerate()
                .filter_map(|(i, (_, c))| c.map(|c| (c, i)))
                .collect();
            cancels.sort();
            let base = Instant::now();
            for (at, i) in cancels {
                tokio::time::sleep_until(base + Duration::from_millis(at)).await;
                handles[i].0.abort();
                cancelled_at[i] = Some(Instant::now());
            }
            for (h, _) in handles {
                let _ = h.await;
            }
            let sent = log.sent();
            (sent, cancelled_at, arrived)
        });
        // Sent in order of arrival; only cancelled requests are skipped, and
        // none is sent after it was cancelled.
        let order: Vec<usize> = sent
            .iter()
            .map(|s| s.max_tokens.unwrap_or(0).saturating_sub(1_000) as usize)
            .collect();
        // Who went before an earlier request: small ones only, and while a
        // request was the head (everything before it sent), at most the
        // bound's worth in all.
        for (pos, &i) in order.iter().enumerate() {
            let overtakers: Vec<usize> = order[..pos].iter().copied().filter(|&j| j > i).collect();
            for &j in &overtakers {
                proptest::prop_assert!(reqs[j].0 <= 333, "{} passed {}: order {:?}", j, i, order);
            }
            let head_since = order[..pos]
                .iter()
                .enumerate()
                .filter(|(_, &k)| k < i)
                .map(|(p, _)| p)
                .max();
            let passed_as_head: u64 = order[..pos]
                .iter()
                .enumerate()
                .filter(|(p, &j)| j > i && head_since.is_none_or(|h| *p > h))
                .map(|(_, &j)| reqs[j].0)
                .sum();
            proptest::prop_assert!(passed_as_head <= 334, "{} passed {}: order {:?}", passed_as_head, i, order);
        }
        for (s, &i) in sent.iter().zip(&order) {
            proptest::prop_assert_eq!(s.input, reqs[i].0);
            proptest::prop_assert!(s.at >= arrived[i].1);
            if let Some(c) = cancelled_at[i] {
                proptest::prop_assert!(s.at <= c, "sent after it was cancelled");
            }
        }
        for (i, cancelled) in cancelled_at.iter().enumerate() {
            if cancelled.is_none() {
                proptest::prop_assert!(order.contains(&i), "request {} never sent", i);
            }
        }
        // A token bucket server with the same limit would accept all of it.
        let rate = 10_000.0 / 60.0;
        let mut level = 10_000.0f64;
        let mut prev = sent.first().map(|s| s.at);
        for s in &sent {
            if let Some(p) = prev {
                level = (level + (s.at - p).as_secs_f64() * rate).min(10_000.0);
            }
            prev = Some(s.at);
            level -= s.input as f64;
            proptest::prop_assert!(level >= -1e-6, "level {}", level);
        }
    }
}

/// The gateway's own service in the loopback test (an axum Router would be
/// one): the SSE stream for a streamed request, else a JSON answer with 7
/// output tokens. Its error type is concrete (`Infallible`); see the module
/// docs on why a `BoxError` there cannot be held by hyper's connection task.
async fn answer_over_http(
    req: Request<ReplayBody<hyper::body::Incoming>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let bytes = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let est = estimate_json(&bytes);
    if !est.stream {
        return Ok(Response::new(Full::new(json_usage(est.input_tokens, 7))));
    }
    let mut r = Response::new(Full::new(Bytes::from_static(SSE.as_bytes())));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    Ok(r)
}

/// Over real HTTP on loopback (hyper server and client): the gateway's
/// answers, a streamed one among them, settle and carry their headers as
/// hyper reads them.
#[tokio::test]
async fn enforce_mode_over_loopback_http() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(2).itpm(30_000).otpm(8_000))
        .estimator(Arc::new(ExactEstimator::default()))
        .enforce(one_caller())
        .build();
    let gateway = layer.layer(tower::service_fn(answer_over_http));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let gateway = gateway.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| gateway.clone().oneshot(req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let post = |body: String| {
        Request::post(format!("http://{addr}/v1/messages"))
            .header("x-api-key", "sk-ant-loopback")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    // A streamed answer: settled at message_stop as hyper passed the frames.
    let streamed = client
        .request(post(format!(
            r#"{{"model":"{MODEL}","max_tokens":1000,"input":1000,"stream":true}}"#
        )))
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    let limits = RateLimitSnapshot::from_headers(streamed.headers());
    assert_eq!(limits.requests.remaining, Some(1));
    assert_eq!(limits.input_tokens.remaining, Some(29_000));
    let got = streamed.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got, Bytes::from_static(SSE.as_bytes()));
    let key = layer.snapshot().keys[0].clone();
    // 500 input counted (472 + 28 cache writes), 15 output.
    let input = key.dimension(Dimension::InputTokens).remaining.unwrap();
    assert!((29_500.0..29_600.0).contains(&input), "{input}");

    // A JSON answer, then the caller's second request in the minute is refused.
    let ok = client
        .request(post(request_body(2_000, 100)))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    ok.into_body().collect().await.unwrap();
    let refused = client.request(post(request_body(10, 100))).await.unwrap();
    assert_eq!(refused.status(), 429);
    let limits = RateLimitSnapshot::from_headers(refused.headers());
    assert_eq!(limits.requests.limit, Some(2));
    assert_eq!(limits.should_retry, Some(true));
    assert!(limits
        .retry_after
        .is_some_and(|d| d <= Duration::from_secs(30)));
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["type"], "rate_limit_error");
    assert!(json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("2 requests per minute"));
}

/// In enforce mode a caller sees its own rate-limit headers only: the
/// upstream's (the organization's limits) never reach it, not even for a
/// dimension the caller's budget does not limit.
#[tokio::test(start_paused = true)]
async fn enforce_mode_never_passes_the_upstreams_rate_limit_headers_on() {
    let upstream_headers = headers(&[
        ("anthropic-ratelimit-requests-limit", "4000"),
        ("anthropic-ratelimit-requests-remaining", "3999"),
        ("anthropic-ratelimit-input-tokens-limit", "2000000"),
        ("anthropic-ratelimit-input-tokens-remaining", "1999000"),
        ("anthropic-ratelimit-tokens-limit", "2400000"),
        ("anthropic-ratelimit-tokens-remaining", "2399000"),
        ("anthropic-ratelimit-tokens-reset", "2026-11-28T07:15:00Z"),
        ("x-upstream", "kept"),
    ]);
    let script = Arc::new(Mutex::new(vec![(StatusCode::OK, upstream_headers)]));
    // The caller is limited on requests only.
    let caller = Limits {
        requests_per_minute: Some(5),
        input_tokens_per_minute: None,
        output_tokens_per_minute: None,
    };
    let layer = TokenBudgetLayer::builder()
        .limits(caller)
        .estimator(Arc::new(ExactEstimator::default()))
        .enforce(one_caller())
        .build();
    let mut gateway = layer.layer(scripted(script, Arc::new(AtomicUsize::new(0))));
    let r = gateway
        .ready()
        .await
        .unwrap()
        .call(request(10, 10))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let h = r.headers();
    assert_eq!(h["anthropic-ratelimit-requests-limit"], "5");
    assert_eq!(h["anthropic-ratelimit-requests-remaining"], "4");
    let leaked: Vec<_> = h
        .keys()
        .map(|k| k.as_str())
        .filter(|k| k.starts_with("anthropic-ratelimit-") && !k.contains("-requests-"))
        .collect();
    assert!(
        leaked.is_empty(),
        "upstream headers reached the caller: {leaked:?}"
    );
    assert_eq!(h["x-upstream"], "kept");
}

// ---------------------------------------------------------------------------
// A ledger across a network: answers after a round trip, may fail or hang.

use std::future::Future;
use std::sync::atomic::AtomicBool;
use tower_llm_limits::budget::ledger::{
    BucketState, CostDelta, Costs, InMemoryLedger, Ledger, LedgerError, LedgerFuture, Reservation,
};
use tower_llm_limits::headers::LimitStatus;

#[derive(Debug)]
struct RoundTripLedger {
    inner: Arc<InMemoryLedger>,
    delay: Duration,
    fail: AtomicBool,
    /// Reservations for this key never answer.
    hang: Option<&'static str>,
    reserves: AtomicUsize,
}

impl RoundTripLedger {
    fn new(delay: Duration) -> Self {
        RoundTripLedger {
            inner: Arc::new(InMemoryLedger::new()),
            delay,
            fail: AtomicBool::new(false),
            hang: None,
            reserves: AtomicUsize::new(0),
        }
    }
}

impl Ledger for RoundTripLedger {
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation> {
        self.reserves.fetch_add(1, Ordering::SeqCst);
        if self.hang == Some(key) {
            return LedgerFuture::new(std::future::pending());
        }
        let (inner, key, limits) = (Arc::clone(&self.inner), key.to_owned(), *limits);
        let (delay, fail) = (self.delay, self.fail.load(Ordering::SeqCst));
        LedgerFuture::new(async move {
            tokio::time::sleep(delay).await;
            if fail {
                return Err(LedgerError::new("connection refused"));
            }
            inner.reserve(&key, &limits, costs).await
        })
    }

    fn settle(&self, key: &str, limits: &Limits, delta: CostDelta) -> LedgerFuture<()> {
        let (inner, key, limits, delay) =
            (Arc::clone(&self.inner), key.to_owned(), *limits, self.delay);
        LedgerFuture::new(async move {
            tokio::time::sleep(delay).await;
            inner.settle(&key, &limits, delta).await
        })
    }

    fn sync(
        &self,
        key: &str,
        limits: &Limits,
        dimension: Dimension,
        sync: LimitStatus,
    ) -> LedgerFuture<()> {
        self.inner.sync(key, limits, dimension, sync)
    }

    fn state(&self, key: &str, limits: &Limits) -> LedgerFuture<Option<[BucketState; 3]>> {
        self.inner.state(key, limits)
    }
}

fn budget_over(ledger: Arc<RoundTripLedger>, limits: Limits) -> TokenBudgetLayer {
    TokenBudgetLayer::builder()
        .limits(limits)
        .estimator(Arc::new(ExactEstimator::default()))
        .ledger(ledger)
        .build()
}

/// A ledger that answers after a round trip paces as the in-memory one does:
/// in order, each request waiting for the refill it needs.
#[tokio::test(start_paused = true)]
async fn a_ledger_across_a_round_trip_paces_in_order() {
    let log = Arc::new(Log::default());
    let ledger = Arc::new(RoundTripLedger::new(Duration::from_millis(10)));
    let layer = budget_over(
        Arc::clone(&ledger),
        Limits::new().rpm(1_000).itpm(10_000).otpm(1_000_000),
    );
    let svc = layer.layer(upstream(log.clone(), 1));
    let start = Instant::now();
    let mut handles = Vec::new();
    for input in [6_000, 6_000, 3_000] {
        let mut s = svc.clone();
        handles.push(tokio::spawn(async move {
            let resp = s.ready().await?.call(request(input, 10)).await?;
            resp.into_body().collect().await?;
            Ok::<_, BoxError>(())
        }));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    let sent = log.sent();
    let order: Vec<u64> = sent.iter().map(|s| s.input).collect();
    assert_eq!(order, vec![6_000, 6_000, 3_000]);
    // The second needs 2,000 tokens of refill at 166.7/s: 12 s, then a round trip.
    let second = sent[1].at - start;
    assert!(second >= Duration::from_secs(12), "{second:?}");
    assert!(second <= Duration::from_millis(12_100), "{second:?}");
    // The third, queued behind, waits its own 18 s more (3,000 tokens).
    let third = sent[2].at - start;
    assert!(third >= Duration::from_secs(30), "{third:?}");
    assert!(third <= Duration::from_millis(30_200), "{third:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(layer.snapshot().key(KEY).unwrap().waiting, 0);
}

/// Dropped while the ledger was answering its reservation: the request gives
/// back its place (the one behind asks next) and the reservation the ledger
/// made for it is refunded once the answer comes.
#[tokio::test(start_paused = true)]
async fn dropped_while_the_ledger_answers_gives_back_place_and_reservation() {
    let log = Arc::new(Log::default());
    let ledger = Arc::new(RoundTripLedger::new(Duration::from_millis(10)));
    let layer = budget_over(
        Arc::clone(&ledger),
        Limits::new().rpm(1_000).itpm(10_000).otpm(1_000_000),
    );
    let svc = layer.layer(upstream(log.clone(), 1));
    let mut first = svc.clone();
    let first = tokio::spawn(async move {
        first
            .ready()
            .await?
            .call(request(8_000, 10))
            .await
            .map(drop)
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    let mut second = svc.clone();
    let second = tokio::spawn(async move {
        let resp = second.ready().await?.call(request(8_000, 10)).await?;
        resp.into_body().collect().await?;
        Ok::<_, BoxError>(Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(2)).await;
    // The first holds the head while its reservation is in flight.
    assert_eq!(ledger.reserves.load(Ordering::SeqCst), 1);
    assert_eq!(layer.snapshot().key(KEY).unwrap().waiting, 2);
    let dropped_at = Instant::now();
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    let sent_at = second.await.unwrap().unwrap();
    // The ledger admitted the dropped request's 8,000 tokens; the refund came
    // a round trip later, so the second waited only for that, not for 48 s of
    // refill.
    assert!(
        sent_at - dropped_at <= Duration::from_secs(2),
        "{:?}",
        sent_at - dropped_at
    );
    let sent: Vec<u64> = log.sent().iter().map(|s| s.input).collect();
    assert_eq!(sent, vec![8_000]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let snap = layer.snapshot();
    assert_eq!(snap.key(KEY).unwrap().waiting, 0);
    // Only the second's 8,000 are charged (minus 1 refilled second at most).
    let input = remaining(&snap, Dimension::InputTokens);
    assert!((2_000.0..2_400.0).contains(&input), "{input}");
}

/// A ledger that fails: the request fails with the ledger's typed error, is
/// never sent, and its place goes to the next request.
#[tokio::test(start_paused = true)]
async fn a_failing_ledger_fails_the_request_with_a_typed_error() {
    let log = Arc::new(Log::default());
    let ledger = Arc::new(RoundTripLedger::new(Duration::from_millis(10)));
    ledger.fail.store(true, Ordering::SeqCst);
    let layer = budget_over(
        Arc::clone(&ledger),
        Limits::new().rpm(1_000).itpm(10_000).otpm(1_000_000),
    );
    let mut svc = layer.layer(upstream(log.clone(), 1));
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request(1_000, 10))
        .await
        .unwrap_err();
    let ledger_error = err.downcast_ref::<LedgerError>().expect("a LedgerError");
    assert_eq!(ledger_error.to_string(), "ledger operation failed");
    let source = std::error::Error::source(ledger_error).map(ToString::to_string);
    assert_eq!(source.as_deref(), Some("connection refused"));
    assert!(log.sent().is_empty());
    assert_eq!(layer.snapshot().key(KEY).unwrap().waiting, 0);

    ledger.fail.store(false, Ordering::SeqCst);
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(request(1_000, 10))
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap();
    assert_eq!(log.sent().len(), 1);
}

/// A ledger operation that never answers for one key holds back that key's
/// requests only.
#[tokio::test(start_paused = true)]
async fn a_pending_ledger_operation_on_one_key_does_not_hold_back_another() {
    let log = Arc::new(Log::default());
    let mut ledger = RoundTripLedger::new(Duration::from_millis(10));
    ledger.hang = Some(KEY);
    let layer = budget_over(
        Arc::new(ledger),
        Limits::new().rpm(1_000).itpm(10_000).otpm(1_000_000),
    );
    let svc = layer.layer(upstream(log.clone(), 1));
    let mut stuck = svc.clone();
    let stuck = tokio::spawn(async move {
        stuck
            .ready()
            .await?
            .call(request(1_000, 10))
            .await
            .map(drop)
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    let haiku = Request::post("http://localhost/v1/messages")
        .body(Full::new(Bytes::from(
            r#"{"model":"claude-haiku-4-5","max_tokens":10,"input":1000,"messages":[]}"#,
        )))
        .unwrap();
    let mut other = svc.clone();
    let resp = tokio::time::timeout(
        Duration::from_secs(1),
        other.ready().await.unwrap().call(haiku),
    )
    .await
    .expect("another key is not held back")
    .unwrap();
    resp.into_body().collect().await.unwrap();
    assert_eq!(log.sent().len(), 1);
    assert!(!stuck.is_finished());
    stuck.abort();
}

/// Polling the response future again after it returned `Ready` panics, with a
/// message naming the future.
#[tokio::test(start_paused = true)]
async fn response_future_polled_after_completion_panics() {
    let (layer, _) = budget(Limits::new().rpm(1_000).itpm(10_000).otpm(1_000_000));
    let mut svc = layer.layer(upstream(Arc::new(Log::default()), 1));
    ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
        .await
        .unwrap();
    let mut fut = Box::pin(svc.call(request(1_000, 10)));
    let resp = (&mut fut).await.unwrap();
    resp.into_body().collect().await.unwrap();
    let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let _ = fut.as_mut().poll(&mut cx);
    }));
    let panic = again.expect_err("a second poll panics");
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    assert_eq!(message, "`budget::ResponseFuture` polled after completion");
}

/// Every request is one caller's (enforce mode with one shared budget).
fn one_caller() -> KeyExtractor {
    KeyExtractor::new(|_: &Parts| Some("all".to_owned()))
}

/// A request of `input` tokens sending these auth headers.
fn with_auth(headers: &[(&str, &str)], input: u64) -> Request<Full<Bytes>> {
    let mut r = request(input, 10);
    for (name, value) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_str(value).unwrap(),
        );
    }
    r
}

/// Enforce mode with configured callers: a caller that rotates its key is
/// refused with 401 (it cannot evade its budget), and the caller's own key is
/// held to its limit (20 of 25 admitted at 20 RPM).
#[tokio::test(start_paused = true)]
async fn rotating_keys_do_not_evade_the_budget() {
    let log = Arc::new(Log::default());
    let callers = Callers::new().caller("team-a", "gw-key-a");
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(20).itpm(1_000_000).otpm(1_000_000))
        .estimator(Arc::new(ExactEstimator::default()))
        .enforce(callers)
        .build();
    let mut gateway = layer.layer(upstream(log.clone(), 1));
    let mut rotating = Vec::new();
    let mut same = Vec::new();
    for i in 0..25 {
        let key = format!("gw-key-rotated-{i}");
        let r = with_auth(&[("x-api-key", &key)], 10);
        let resp = gateway.ready().await.unwrap().call(r).await.unwrap();
        rotating.push(resp.status().as_u16());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["type"], "authentication_error", "{json}");
    }
    assert!(rotating.iter().all(|s| *s == 401), "{rotating:?}");
    assert!(log.sent().is_empty(), "refused before anything was sent");
    assert!(layer.snapshot().keys.is_empty(), "no budget touched");
    for _ in 0..25 {
        let r = with_auth(&[("x-api-key", "gw-key-a")], 10);
        let resp = gateway.ready().await.unwrap().call(r).await.unwrap();
        same.push(resp.status().as_u16());
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(same.iter().filter(|s| **s == 200).count(), 20, "{same:?}");
    assert_eq!(same.iter().filter(|s| **s == 429).count(), 5, "{same:?}");
    let snap = layer.snapshot();
    assert_eq!(snap.keys.len(), 1);
    assert!(snap.keys[0].key.starts_with("caller-team-a/"), "{snap:?}");
}

/// Callers that send only `authorization: Bearer` are told apart (each has
/// its own budget), and a request with no key is refused with 401 instead of
/// sharing an anonymous budget.
#[tokio::test(start_paused = true)]
async fn bearer_callers_have_their_own_budgets_and_no_key_is_refused() {
    let log = Arc::new(Log::default());
    let callers = Callers::new()
        .caller("a", "gw-key-a")
        .caller("b", "gw-key-b");
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1).itpm(1_000_000).otpm(1_000_000))
        .estimator(Arc::new(ExactEstimator::default()))
        .enforce(callers)
        .build();
    let mut gateway = layer.layer(upstream(log.clone(), 1));
    let mut statuses = Vec::new();
    for headers in [
        &[][..],
        &[("authorization", "Bearer gw-key-a")][..],
        &[][..],
        &[("authorization", "Bearer gw-key-b")][..],
        &[("x-api-key", "gw-key-a")][..],
    ] {
        let resp = gateway
            .ready()
            .await
            .unwrap()
            .call(with_auth(headers, 10))
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(statuses, [401, 200, 401, 200, 429]);
    assert_eq!(log.sent().len(), 2);
}

/// Two `x-api-key` headers, or an `x-api-key` and a different bearer token,
/// are refused with 400 before any budget is touched: the first header no
/// longer decides.
#[tokio::test(start_paused = true)]
async fn duplicate_auth_headers_are_refused() {
    let log = Arc::new(Log::default());
    let callers = Callers::new()
        .caller("a", "gw-key-a")
        .caller("b", "gw-key-b");
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(10).itpm(1_000_000).otpm(1_000_000))
        .estimator(Arc::new(ExactEstimator::default()))
        .enforce(callers)
        .build();
    let mut gateway = layer.layer(upstream(log.clone(), 1));
    for headers in [
        &[("x-api-key", "gw-key-a"), ("x-api-key", "gw-key-b")][..],
        &[("x-api-key", "gw-key-a"), ("x-api-key", "gw-key-a")][..],
        &[
            ("x-api-key", "gw-key-a"),
            ("authorization", "Bearer gw-key-b"),
        ][..],
        &[
            ("authorization", "Bearer gw-key-a"),
            ("authorization", "Bearer gw-key-b"),
        ][..],
    ] {
        let resp = gateway
            .ready()
            .await
            .unwrap()
            .call(with_auth(headers, 10))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{headers:?}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["type"], "invalid_request_error", "{json}");
    }
    assert!(log.sent().is_empty());
    assert!(layer.snapshot().keys.is_empty());
}

/// The number of budget keys is bounded: a new caller past the bound is
/// refused with 529 `overloaded_error` (nothing reserved, nothing sent),
/// callers already held are still served, and once keys went idle a new
/// caller takes their place.
#[tokio::test(start_paused = true)]
async fn the_number_of_caller_keys_is_bounded() {
    let log = Arc::new(Log::default());
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(10).itpm(1_000_000).otpm(1_000_000))
        .estimator(Arc::new(ExactEstimator::default()))
        .enforce(Callers::any_key_unauthenticated())
        .max_keys(3)
        .idle_key_eviction(Duration::from_secs(120))
        .build();
    let mut gateway = layer.layer(upstream(log.clone(), 1));
    let mut statuses = Vec::new();
    for key in ["k1", "k2", "k3", "k4", "k1"] {
        let resp = gateway
            .ready()
            .await
            .unwrap()
            .call(with_auth(&[("x-api-key", key)], 10))
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        if key == "k4" {
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["error"]["type"], "overloaded_error", "{json}");
        }
    }
    assert_eq!(statuses, [200, 200, 200, 529, 200]);
    assert_eq!(log.sent().len(), 4);
    assert_eq!(layer.snapshot().keys.len(), 3);
    tokio::time::sleep(Duration::from_secs(121)).await;
    let resp = gateway
        .ready()
        .await
        .unwrap()
        .call(with_auth(&[("x-api-key", "k4")], 10))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    assert_eq!(layer.snapshot().keys.len(), 1);
}

// ---------------------------------------------------------------------------
// Unknown limits: one probe, then what its headers teach.

/// Answers after `delay` with `headers` and a JSON usage of 10 output
/// tokens; logs when each request arrived.
fn slow_upstream(log: Arc<Log>, headers: HeaderMap, delay: Duration) -> Upstream {
    BoxCloneService::new(tower::service_fn(
        move |req: Request<ReplayBody<Full<Bytes>>>| {
            let (log, headers) = (Arc::clone(&log), headers.clone());
            async move {
                let bytes = req.into_body().collect().await?.to_bytes();
                let est = estimate_json(&bytes);
                log.sent.lock().unwrap().push(Sent {
                    at: Instant::now(),
                    input: est.input_tokens,
                    max_tokens: est.max_tokens,
                });
                tokio::time::sleep(delay).await;
                let mut resp = Response::new(full(json_usage(est.input_tokens, 10)));
                *resp.headers_mut() = headers;
                Ok::<_, BoxError>(resp)
            }
        },
    ))
}

fn limit_headers(output_remaining: &str) -> HeaderMap {
    headers(&[
        ("anthropic-ratelimit-requests-limit", "50"),
        ("anthropic-ratelimit-requests-remaining", "49"),
        ("anthropic-ratelimit-input-tokens-limit", "30000"),
        ("anthropic-ratelimit-input-tokens-remaining", "29000"),
        ("anthropic-ratelimit-output-tokens-limit", "8000"),
        (
            "anthropic-ratelimit-output-tokens-remaining",
            output_remaining,
        ),
    ])
}

/// Sends `n` requests of `input` tokens and `max_tokens` at once; returns
/// their handles.
fn burst(
    svc: &tower_llm_limits::budget::TokenBudget<Upstream>,
    n: usize,
    input: u64,
    max_tokens: u64,
) -> Vec<tokio::task::JoinHandle<Result<(), BoxError>>> {
    (0..n)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                let resp = svc.ready().await?.call(request(input, max_tokens)).await?;
                resp.into_body().collect().await?;
                Ok::<_, BoxError>(())
            })
        })
        .collect()
}

/// With no limit configured, one request goes first; the rest wait for its
/// response head, whose headers teach the limits that pace them: no blind
/// burst.
#[tokio::test(start_paused = true)]
async fn unknown_limits_send_one_probe_then_pace_to_its_headers() {
    let log = Arc::new(Log::default());
    let (layer, _) = budget(Limits::new());
    let svc = layer.layer(slow_upstream(
        log.clone(),
        limit_headers("8000"),
        Duration::from_secs(2),
    ));
    let start = Instant::now();
    // Eight of 10,000 input tokens: 30,000 per minute allows three at once.
    for h in burst(&svc, 8, 10_000, 100) {
        h.await.unwrap().unwrap();
    }
    let sent = log.sent();
    assert_eq!(sent.len(), 8);
    let at: Vec<Duration> = sent.iter().map(|s| s.at - start).collect();
    assert_eq!(at[0], Duration::ZERO);
    // Nothing else before the probe's answer (2 s).
    assert!(
        at[1..].iter().all(|t| *t >= Duration::from_secs(2)),
        "{at:?}"
    );
    // Then paced: the server said 29,000 left, refilled at 500 per second.
    // Requests 2 and 3 fit at once (19,000 left after them... 9,000), the
    // fourth waits 2 s for 10,000, each later one 20 s more.
    let later: Vec<Duration> = at[1..].to_vec();
    assert!(later[1] < Duration::from_secs(3), "{at:?}");
    assert!(later[2] >= Duration::from_secs(3), "{at:?}");
    assert!(at[7] >= Duration::from_secs(80), "{at:?}");
}

/// A probe that was never sent hands the role on: the next request probes.
#[tokio::test(start_paused = true)]
async fn a_cancelled_probe_hands_the_role_on() {
    let log = Arc::new(Log::default());
    let (layer, _) = budget(Limits::new());
    // The inner service takes a while to become ready: the probe is
    // cancelled while it waits there, before it is sent.
    let inner = slow_upstream(log.clone(), limit_headers("8000"), Duration::from_secs(1));
    let svc = layer.layer(inner);
    let mut first = svc.clone();
    let probe = tokio::spawn(async move {
        let fut = first.ready().await?.call(request(100, 100));
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(fut);
        Ok::<_, BoxError>(())
    });
    probe.await.unwrap().unwrap();
    // The next ones are not held forever: one probes, the rest follow.
    for h in burst(&svc, 3, 100, 100) {
        tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("held forever")
            .unwrap()
            .unwrap();
    }
    assert_eq!(log.sent().len(), 3);
}

/// The probe's `output-tokens-remaining` tells the output rule: the server
/// held the probe's whole `max_tokens`, so it reserves at admission, and the
/// key paces to `max_tokens` per request (in realtime accounting with a
/// small expected output, both would have gone at once).
#[tokio::test(start_paused = true)]
async fn the_output_rule_is_learned_from_the_probe() {
    for (remaining, reserve) in [("4000", true), ("8000", false)] {
        let log = Arc::new(Log::default());
        let layer = TokenBudgetLayer::builder()
            .limits(Limits::new())
            .estimator(Arc::new(ExactEstimator::default()))
            .output_mode(OutputMode::Realtime)
            .output_ratio_prior(0.1)
            .build();
        let svc = layer.layer(slow_upstream(
            log.clone(),
            limit_headers(remaining),
            Duration::from_secs(1),
        ));
        let start = Instant::now();
        let probe = burst(&svc, 1, 100, 4000);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let rest = burst(&svc, 2, 100, 4000);
        for h in probe.into_iter().chain(rest) {
            h.await.unwrap().unwrap();
        }
        let at: Vec<Duration> = log.sent().iter().map(|s| s.at - start).collect();
        assert_eq!(at.len(), 3);
        if reserve {
            // 4,000 left at the probe's head: one more fits; the third waits
            // for 4,000 more (the probe's 10 tokens settle at 1 s, refunding
            // 3,990; the rest refills at 133 per second).
            assert!(at[1] < Duration::from_secs(2), "{at:?}");
            assert!(at[2] > at[1] + Duration::from_millis(500), "{at:?}");
        } else {
            assert!(at[2] - at[1] < Duration::from_millis(100), "{at:?}");
        }
    }
}

/// The input headroom stays free in the bucket: a request is admitted only
/// when it leaves that much; one that fits only into the headroom still goes
/// once the bucket is full.
#[tokio::test(start_paused = true)]
async fn input_headroom_is_kept_free() {
    let log = Arc::new(Log::default());
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(10_000).itpm(10_000).otpm(10_000_000))
        .estimator(Arc::new(ExactEstimator::default()))
        .input_headroom(0.1)
        .build();
    let svc = layer.layer(upstream(log.clone(), 1));
    let start = Instant::now();
    // 9,500 of 10,000: only into the headroom, and the bucket is full.
    for h in burst(&svc, 1, 9_500, 10) {
        h.await.unwrap().unwrap();
    }
    // 500 left; 4,000 more needs 4,000 + 1,000 of headroom: 4,500 to refill
    // at 166.7 per second, 27 s.
    for h in burst(&svc, 1, 4_000, 10) {
        h.await.unwrap().unwrap();
    }
    let at: Vec<Duration> = log.sent().iter().map(|s| s.at - start).collect();
    assert_eq!(at[0], Duration::ZERO);
    assert!(
        at[1] >= Duration::from_secs(26) && at[1] <= Duration::from_secs(28),
        "{at:?}"
    );
    // The headroom was given back: the bucket holds what was charged only.
    let snap = layer.snapshot();
    let left = remaining(&snap, Dimension::InputTokens);
    assert!((990.0..=1_010.0).contains(&left), "{left}");
}

/// Counts the ledger's syncs, delegating to an in-memory ledger.
#[derive(Debug, Default)]
struct SyncCounting {
    inner: InMemoryLedger,
    syncs: AtomicUsize,
    sync_alls: Mutex<Vec<[LimitStatus; 3]>>,
}

impl Ledger for SyncCounting {
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation> {
        self.inner.reserve(key, limits, costs)
    }

    fn settle(&self, key: &str, limits: &Limits, delta: CostDelta) -> LedgerFuture<()> {
        self.inner.settle(key, limits, delta)
    }

    fn sync(
        &self,
        key: &str,
        limits: &Limits,
        dimension: Dimension,
        sync: LimitStatus,
    ) -> LedgerFuture<()> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        self.inner.sync(key, limits, dimension, sync)
    }

    fn sync_all(&self, key: &str, limits: &Limits, statuses: [LimitStatus; 3]) -> LedgerFuture<()> {
        self.sync_alls.lock().unwrap().push(statuses);
        self.inner.sync_all(key, limits, statuses)
    }

    fn state(&self, key: &str, limits: &Limits) -> LedgerFuture<Option<[BucketState; 3]>> {
        self.inner.state(key, limits)
    }
}

/// One response's rate-limit headers reach the ledger in one `sync_all`
/// (one lock in the in-memory ledger), not one `sync` per dimension.
#[tokio::test(start_paused = true)]
async fn a_response_is_synced_in_one_ledger_call() {
    let h = headers(&[
        ("anthropic-ratelimit-requests-limit", "1000"),
        ("anthropic-ratelimit-requests-remaining", "990"),
        ("anthropic-ratelimit-input-tokens-limit", "100000"),
        ("anthropic-ratelimit-input-tokens-remaining", "50000"),
        ("anthropic-ratelimit-output-tokens-limit", "100000"),
        ("anthropic-ratelimit-output-tokens-remaining", "99000"),
    ]);
    let script = Arc::new(Mutex::new(vec![(StatusCode::OK, h)]));
    let ledger = Arc::new(SyncCounting::default());
    let shared: Arc<dyn Ledger> = Arc::clone(&ledger) as Arc<dyn Ledger>;
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1_000).itpm(100_000).otpm(100_000))
        .estimator(Arc::new(ExactEstimator::default()))
        .ledger(shared)
        .build();
    let mut svc = layer.layer(scripted(script, Arc::new(AtomicUsize::new(0))));
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(request(1_000, 100))
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap();
    assert_eq!(ledger.syncs.load(Ordering::SeqCst), 0);
    let all = ledger.sync_alls.lock().unwrap().clone();
    assert_eq!(all.len(), 1, "{all:?}");
    let remaining = all[0].map(|s| s.remaining);
    assert_eq!(remaining, [Some(990), Some(50_000), Some(99_000)]);
    let snap = layer.snapshot();
    let input = snap.key(KEY).unwrap().dimension(Dimension::InputTokens);
    assert!(input.remaining.unwrap() <= 50_500.0, "{input:?}");
}

/// A budget built without a ledger keeps its buckets in its own key entries
/// (one map of keys); `ledger()` is a view of them: what it reserves and
/// refunds shows in the snapshot and in its own `state`, and a key it never
/// saw is unknown.
#[tokio::test(start_paused = true)]
async fn the_budgets_own_ledger_is_seen_through_ledger() {
    use tower_llm_limits::budget::ledger::{CostDelta, Costs, Reservation};
    let limits = Limits::new().rpm(60).itpm(10_000).otpm(5_000);
    let layer = TokenBudgetLayer::builder().limits(limits).build();
    let ledger = Arc::clone(layer.ledger());
    assert_eq!(ledger.state("sonnet-4", &limits).await.unwrap(), None);
    let costs = Costs {
        requests: 1,
        input_tokens: 1_000,
        output_tokens: 100,
    };
    let answer = ledger.reserve("sonnet-4", &limits, costs).await.unwrap();
    assert_eq!(answer, Reservation::Admitted);
    let input = |snap: &BudgetSnapshot| {
        snap.key("sonnet-4")
            .and_then(|k| k.dimensions[1].remaining)
            .unwrap_or(-1.0)
    };
    assert_eq!(input(&layer.snapshot()), 9_000.0);
    let state = ledger.state("sonnet-4", &limits).await.unwrap().unwrap();
    assert_eq!(state[1].available, 9_000.0);
    ledger
        .settle("sonnet-4", &limits, CostDelta::refund(costs))
        .await
        .unwrap();
    assert_eq!(input(&layer.snapshot()), 10_000.0);
    // More than the limit: never.
    let huge = Costs {
        input_tokens: 20_000,
        ..costs
    };
    assert!(matches!(
        ledger.reserve("sonnet-4", &limits, huge).await.unwrap(),
        Reservation::Never { .. }
    ));
}

/// A ledger across a network in miniature: asks for the header sync to go
/// with the settlement and checks the headroom in the reservation, and
/// records what the budget asks of it (over an in-memory ledger).
#[derive(Debug, Default)]
struct HeldSync {
    inner: InMemoryLedger,
    calls: Mutex<Vec<&'static str>>,
    held: Mutex<Vec<[LimitStatus; 3]>>,
}

impl HeldSync {
    fn note(&self, call: &'static str) {
        self.calls.lock().unwrap().push(call);
    }
}

impl Ledger for HeldSync {
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation> {
        self.note("reserve");
        self.inner.reserve(key, limits, costs)
    }

    fn reserve_with_headroom(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
    ) -> Option<LedgerFuture<Reservation>> {
        self.note("reserve_with_headroom");
        let with = Costs {
            input_tokens: costs.input_tokens + headroom.input_tokens,
            ..costs
        };
        let answer = self.inner.reserve(key, limits, with).into_ready().ok()?;
        if let Ok(Reservation::Admitted) = answer {
            let _ = self
                .inner
                .settle(key, limits, CostDelta::refund(headroom))
                .into_ready();
        }
        Some(LedgerFuture::ready(answer))
    }

    fn sync_with_settlement(&self) -> bool {
        true
    }

    fn settle_and_sync(
        &self,
        key: &str,
        limits: &Limits,
        delta: CostDelta,
        statuses: [LimitStatus; 3],
    ) -> LedgerFuture<()> {
        self.note("settle_and_sync");
        self.held.lock().unwrap().push(statuses);
        let _ = self.inner.sync_all(key, limits, statuses).into_ready();
        self.inner.settle(key, limits, delta)
    }

    fn settle(&self, key: &str, limits: &Limits, delta: CostDelta) -> LedgerFuture<()> {
        self.note("settle");
        self.inner.settle(key, limits, delta)
    }

    fn sync(
        &self,
        key: &str,
        limits: &Limits,
        dimension: Dimension,
        sync: LimitStatus,
    ) -> LedgerFuture<()> {
        self.note("sync");
        self.inner.sync(key, limits, dimension, sync)
    }

    fn sync_all(&self, key: &str, limits: &Limits, statuses: [LimitStatus; 3]) -> LedgerFuture<()> {
        self.note("sync_all");
        self.inner.sync_all(key, limits, statuses)
    }

    fn state(&self, key: &str, limits: &Limits) -> LedgerFuture<Option<[BucketState; 3]>> {
        self.inner.state(key, limits)
    }
}

/// With a ledger that asks for it, a response's header sync is held until
/// its body is settled and goes in the same `settle_and_sync`; the input
/// headroom is checked by the reservation itself (no settlement gives it
/// back). So the ledger is asked twice for the request: a reservation,
/// then one write.
#[tokio::test(start_paused = true)]
async fn a_ledger_across_a_network_gets_one_write_per_response() {
    let h = headers(&[
        ("anthropic-ratelimit-requests-limit", "1000"),
        ("anthropic-ratelimit-requests-remaining", "990"),
        ("anthropic-ratelimit-input-tokens-limit", "100000"),
        ("anthropic-ratelimit-input-tokens-remaining", "50000"),
        ("anthropic-ratelimit-output-tokens-limit", "100000"),
        ("anthropic-ratelimit-output-tokens-remaining", "99000"),
    ]);
    let script = Arc::new(Mutex::new(vec![(StatusCode::OK, h)]));
    let ledger = Arc::new(HeldSync::default());
    let shared: Arc<dyn Ledger> = Arc::clone(&ledger) as Arc<dyn Ledger>;
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1_000).itpm(100_000).otpm(100_000))
        .input_headroom(0.02)
        .estimator(Arc::new(ExactEstimator::default()))
        .ledger(shared)
        .build();
    let mut svc = layer.layer(scripted(script, Arc::new(AtomicUsize::new(0))));
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(request(1_000, 100))
        .await
        .unwrap();
    assert_eq!(
        *ledger.calls.lock().unwrap(),
        ["reserve_with_headroom"],
        "the head alone writes nothing"
    );
    resp.into_body().collect().await.unwrap();
    assert_eq!(
        *ledger.calls.lock().unwrap(),
        ["reserve_with_headroom", "settle_and_sync"]
    );
    let held = ledger.held.lock().unwrap().clone();
    assert_eq!(
        held[0].map(|s| s.remaining),
        [Some(990), Some(50_000), Some(99_000)]
    );
    let snap = layer.snapshot();
    let input = snap.key(KEY).unwrap().dimension(Dimension::InputTokens);
    assert!(input.remaining.unwrap() <= 50_500.0, "{input:?}");
}

/// A request admitted on an estimate that runs under the server's count: the
/// server's `remaining` (at the response's head) already holds what the
/// estimate missed, and the settlement (at the body) must not charge it a
/// second time. Estimated 1,000, counted 4,321: the bucket ends at 30,000 -
/// 4,321, where the server is, not 3,321 below.
#[tokio::test(start_paused = true)]
async fn a_sync_and_the_settlement_charge_an_under_estimate_once() {
    let answer = BoxCloneService::new(tower::service_fn(
        |req: Request<ReplayBody<Full<Bytes>>>| async move {
            let bytes = req.into_body().collect().await?.to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&bytes)?;
            let actual = v["actual"].as_u64().unwrap_or(0);
            let mut resp = Response::new(full(json_usage(actual, 10)));
            *resp.headers_mut() = headers(&[
                ("anthropic-ratelimit-input-tokens-limit", "30000"),
                (
                    "anthropic-ratelimit-input-tokens-remaining",
                    &(30_000 - actual).to_string(),
                ),
            ]);
            Ok::<_, BoxError>(resp)
        },
    ));
    let (layer, _) = budget(Limits::new().rpm(1_000).itpm(30_000).otpm(100_000));
    let svc = layer.layer(answer);
    let body = format!(
        r#"{{"model":"{MODEL}","max_tokens":10,"input":1000,"actual":4321,"messages":[]}}"#
    );
    let req = Request::post("http://localhost/v1/messages")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = svc.oneshot(req).await.unwrap();
    resp.into_body().collect().await.unwrap();
    let left = remaining(&layer.snapshot(), Dimension::InputTokens);
    assert!((left - 25_679.0).abs() < 1.0, "{left}");
}

/// A request whose body an outer layer already read (the preset's retry
/// layer does) takes its place in the budget's line when it is called, as
/// in the concurrency queue: the first called goes first, whichever future
/// is polled first.
#[tokio::test(start_paused = true)]
async fn a_read_request_takes_its_place_in_line_when_called() {
    let (layer, _) = budget(Limits::new().rpm(1).itpm(1_000_000).otpm(1_000_000));
    let log = Arc::new(Log::default());
    let mut svc = layer.layer(upstream(Arc::clone(&log), 1));
    let read = |input| {
        let mut req = request(input, 10);
        let body = Bytes::from(request_body(input, 10));
        req.extensions_mut().insert(BufferedBytes(body));
        req
    };
    ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
        .await
        .unwrap();
    let first = svc.call(read(100));
    ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
        .await
        .unwrap();
    let mut second = Box::pin(svc.call(read(200)));
    // Polled first, the second waits for the next request of the minute.
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    assert!(second.as_mut().poll(&mut cx).is_pending());
    let resp = first.await.unwrap();
    resp.into_body().collect().await.unwrap();
    let sent: Vec<u64> = log.sent().iter().map(|s| s.input).collect();
    assert_eq!(sent, vec![100]);
    assert!(second.as_mut().poll(&mut cx).is_pending());
}

/// Under the realtime rule the server charges output as it is produced, so
/// the `output-tokens-remaining` of an answer already holds what the
/// request's reservation missed; its settlement must not charge it again.
/// Reserved 410 output tokens (a prior of 0.1 of `max_tokens` 4,096),
/// produced 3,000: the bucket ends at 8,000 - 3,000, where the server is,
/// not 2,590 below.
#[tokio::test(start_paused = true)]
async fn a_sync_and_the_settlement_charge_an_output_beyond_its_reservation_once() {
    let answer = BoxCloneService::new(tower::service_fn(
        |req: Request<ReplayBody<Full<Bytes>>>| async move {
            let bytes = req.into_body().collect().await?.to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&bytes)?;
            let produced = v["produced"].as_u64().unwrap_or(0);
            let mut resp = Response::new(full(json_usage(100, produced)));
            *resp.headers_mut() = headers(&[
                ("anthropic-ratelimit-output-tokens-limit", "8000"),
                (
                    "anthropic-ratelimit-output-tokens-remaining",
                    &(8_000 - produced).to_string(),
                ),
            ]);
            Ok::<_, BoxError>(resp)
        },
    ));
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1_000).itpm(100_000).otpm(8_000))
        .estimator(Arc::new(ExactEstimator::default()))
        .output_ratio_prior(0.1)
        .build();
    let svc = layer.layer(answer);
    let body = format!(
        r#"{{"model":"{MODEL}","max_tokens":4096,"input":100,"produced":3000,"messages":[]}}"#
    );
    let req = Request::post("http://localhost/v1/messages")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = svc.oneshot(req).await.unwrap();
    resp.into_body().collect().await.unwrap();
    let left = remaining(&layer.snapshot(), Dimension::OutputTokens);
    assert!((left - 5_000.0).abs() < 1.0, "{left}");
}

/// Requests that wait ask with the output the budget expects when they
/// ask, not when they arrived: six requests of `max_tokens` 1,000 arrive
/// together under an output limit of 1,000 per minute, each answering 50
/// tokens. The first reserves the whole `max_tokens` (nothing learned
/// yet); once it has answered, the others reserve what answers produce
/// and go at once, instead of waiting a minute's refill each.
#[tokio::test(start_paused = true)]
async fn a_waiting_request_reserves_the_output_learned_while_it_waited() {
    let answer = BoxCloneService::new(tower::service_fn(
        |_req: Request<ReplayBody<Full<Bytes>>>| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, BoxError>(Response::new(full(json_usage(100, 50))))
        },
    ));
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1_000).itpm(100_000).otpm(1_000))
        .estimator(Arc::new(ExactEstimator::default()))
        .output_ratio_min_samples(1)
        .build();
    let svc = layer.layer(answer);
    let start = Instant::now();
    let calls = (0..6).map(|_| {
        let svc = svc.clone();
        async move {
            let resp = svc.oneshot(request(100, 1_000)).await.unwrap();
            resp.into_body().collect().await.unwrap();
        }
    });
    futures_util::future::join_all(calls).await;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
    // What the six produced (300) is charged, not their `max_tokens`.
    let left = remaining(&layer.snapshot(), Dimension::OutputTokens);
    assert!(left > 600.0, "{left}");
}

/// Before a key's first answers, nothing has measured how far its estimates
/// are from what the server counts, and the whole bucket is there to be
/// filled at once: the input headroom is at least 10 % of the limit (1,000
/// of 10,000 for a share of 2 %), so 5,000 + 4,500 tokens do not go together
/// at the start. Once 5 answers have settled, the same pair does.
#[tokio::test(start_paused = true)]
async fn the_first_burst_keeps_a_larger_input_headroom() {
    let log = Arc::new(Log::default());
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1_000).itpm(10_000).otpm(100_000))
        .estimator(Arc::new(ExactEstimator::default()))
        .input_headroom(0.02)
        .build();
    let svc = layer.layer(upstream(Arc::clone(&log), 10));
    let pair = |svc: &tower_llm_limits::budget::TokenBudget<Upstream>| {
        let (a, b) = (svc.clone(), svc.clone());
        async move {
            let first = async move {
                let resp = a.oneshot(request(5_000, 100)).await.unwrap();
                resp.into_body().collect().await.unwrap();
            };
            let second = async move {
                let resp = b.oneshot(request(4_500, 100)).await.unwrap();
                resp.into_body().collect().await.unwrap();
            };
            tokio::join!(first, second);
        }
    };
    let start = Instant::now();
    pair(&svc).await;
    let sent = log.sent();
    assert_eq!(sent.len(), 2);
    assert!(
        sent[1].at > start,
        "the second went at once: {:?}",
        sent[1].at - start
    );
    // Five small answers, then a full bucket.
    for _ in 0..5 {
        let resp = svc.clone().oneshot(request(10, 100)).await.unwrap();
        resp.into_body().collect().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    let again = Instant::now();
    pair(&svc).await;
    let sent = log.sent();
    assert_eq!(sent.len(), 9);
    assert!(
        sent[7].at == again && sent[8].at == again,
        "{:?}",
        &sent[7..]
    );
}

/// Before the first answers, a request on an estimate with none of its
/// key's other estimates in flight can only miss by its own error: its
/// headroom is at most half its input (here 300 of 600), not 10 % of the
/// limit (1,000), so it goes in the 1,000 tokens a settled request left.
#[tokio::test(start_paused = true)]
async fn a_lone_small_estimate_keeps_a_headroom_of_its_size_while_cold() {
    let log = Arc::new(Log::default());
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1_000).itpm(10_000).otpm(100_000))
        .estimator(Arc::new(ExactEstimator::default()))
        .input_headroom(0.02)
        .build();
    let svc = layer.layer(upstream(Arc::clone(&log), 10));
    let resp = svc.clone().oneshot(request(9_000, 100)).await.unwrap();
    resp.into_body().collect().await.unwrap();
    let settled = Instant::now();
    let resp = svc.clone().oneshot(request(600, 100)).await.unwrap();
    resp.into_body().collect().await.unwrap();
    let sent = log.sent();
    assert_eq!(sent.len(), 2);
    assert!(
        sent[1].at == settled,
        "the small request waited {:?} for a headroom of 10 % of the limit",
        sent[1].at - settled
    );
}
