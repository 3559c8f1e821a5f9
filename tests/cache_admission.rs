//! Cache-aware admission: a request that would wait anyway holds for the
//! prompt-cache prefix a request in flight is writing, and is then charged
//! only for what follows the prefix.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt};
use tower_llm_limits::body::ReplayBody;
use tower_llm_limits::budget::{CountTokens, Limits, TokenBudgetLayer};
use tower_llm_limits::estimate::{CachePrefix, Estimate, TokenEstimator};
use tower_llm_limits::{BoxError, Dimension};

const MODEL: &str = "claude-sonnet-4-5";
const KEY: &str = "sonnet-4";
/// The prefix both requests share, and its tokens.
const PREFIX: u64 = 7;
const PREFIX_TOKENS: u64 = 5_000;

type ResBody = UnsyncBoxBody<Bytes, Infallible>;
type Upstream = BoxCloneService<Request<ReplayBody<Full<Bytes>>>, Response<ResBody>, BoxError>;

/// Reads the estimate from the body: `input` (uncached tokens), `writes` and
/// `pending` (`[[hash, tokens]]`).
#[derive(Debug, Default)]
struct JsonEstimator;

fn prefixes(v: &serde_json::Value) -> Vec<CachePrefix> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|p| CachePrefix {
                    hash: p[0].as_u64().unwrap_or(0),
                    tokens: p[1].as_u64().unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default()
}

impl TokenEstimator for JsonEstimator {
    fn estimate(&self, _parts: &Parts, body: &[u8]) -> Estimate {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let input = v["input"].as_u64().unwrap_or(0);
        Estimate {
            model: Some(MODEL.into()),
            input_tokens: input,
            raw_input_tokens: input,
            max_tokens: Some(10),
            cache_writes: prefixes(&v["writes"]),
            cache_pending: prefixes(&v["pending"]),
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

/// What the upstream saw: the request's name and when.
type Log = Arc<Mutex<Vec<(String, Instant)>>>;

/// Answers after `delay_ms` (the response head), with `status` (200 by
/// default) and a usage: `input` minus `read` uncached, `read` from cache.
fn upstream(log: Log) -> Upstream {
    BoxCloneService::new(tower::service_fn(
        move |req: Request<ReplayBody<Full<Bytes>>>| {
            let log = Arc::clone(&log);
            async move {
                let counting = req.uri().path().ends_with("/count_tokens");
                let bytes = req.into_body().collect().await?.to_bytes();
                let v: serde_json::Value = serde_json::from_slice(&bytes)?;
                if counting {
                    // The whole prompt as the server counts it, carried in
                    // the system prompt (`count_tokens` takes only its own
                    // fields).
                    let n: u64 = v["system"].as_str().unwrap_or("0").parse()?;
                    let answer = Full::new(Bytes::from(format!(r#"{{"input_tokens":{n}}}"#)))
                        .map_err(|e: Infallible| match e {})
                        .boxed_unsync();
                    return Ok(Response::new(answer));
                }
                let name = v["name"].as_str().unwrap_or("").to_owned();
                log.lock().unwrap().push((name, Instant::now()));
                let delay = v["delay_ms"].as_u64().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let status = v["status"].as_u64().unwrap_or(200) as u16;
                let input = v["input"].as_u64().unwrap_or(0);
                let read = v["read"].as_u64().unwrap_or(0);
                let created = v["created"].as_u64().unwrap_or(0);
                let body = format!(
                    r#"{{"type":"message","usage":{{"input_tokens":{},"cache_read_input_tokens":{read},"cache_creation_input_tokens":{created},"output_tokens":1}}}}"#,
                    input.saturating_sub(read).saturating_sub(created)
                );
                let body = Full::new(Bytes::from(body))
                    .map_err(|e: Infallible| match e {})
                    .boxed_unsync();
                let mut response = Response::new(body);
                *response.status_mut() = StatusCode::from_u16(status)?;
                Ok::<_, BoxError>(response)
            }
        },
    ))
}

fn layer() -> TokenBudgetLayer {
    TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(10_000).itpm(10_000).otpm(1_000_000))
        .estimator(Arc::new(JsonEstimator))
        .build()
}

fn request(json: serde_json::Value) -> Request<Full<Bytes>> {
    let mut json = json;
    if json.get("system").is_none() {
        // What `count_tokens` answers (the mock reads it from the system
        // prompt): the whole prompt, as the estimate says.
        json["system"] = json["input"].as_u64().unwrap_or(0).to_string().into();
    }
    json["model"] = MODEL.into();
    json["max_tokens"] = 10.into();
    json["messages"] = serde_json::json!([]);
    Request::post("http://localhost/v1/messages")
        .body(Full::new(Bytes::from(json.to_string())))
        .unwrap()
}

/// The writer: 6,000 input tokens, writes the prefix (its usage says the
/// server cached 5,000 of them), its response head arrives after
/// `delay_ms` with `status`.
fn writer(delay_ms: u64, status: u16) -> Request<Full<Bytes>> {
    request(serde_json::json!({
        "name": "writer", "input": 6_000, "delay_ms": delay_ms, "status": status,
        "created": PREFIX_TOKENS, "writes": [[PREFIX, PREFIX_TOKENS]],
    }))
}

/// A request of `input` uncached tokens (as estimated) whose prefix the
/// writer is writing.
fn reader(input: u64) -> Request<Full<Bytes>> {
    reader_answered_after(input, 0)
}

/// [`reader`], its response head arriving after `delay_ms`.
fn reader_answered_after(input: u64, delay_ms: u64) -> Request<Full<Bytes>> {
    request(serde_json::json!({
        "name": "reader", "input": input, "read": PREFIX_TOKENS,
        "pending": [[PREFIX, PREFIX_TOKENS]], "delay_ms": delay_ms,
    }))
}

fn remaining_input(layer: &TokenBudgetLayer) -> f64 {
    layer
        .snapshot()
        .key(KEY)
        .and_then(|k| k.dimension(Dimension::InputTokens).remaining)
        .unwrap_or(f64::NAN)
}

fn sent_at(log: &Log, name: &str) -> Option<Duration> {
    let log = log.lock().unwrap();
    let first = log.first()?.1;
    log.iter()
        .find(|(n, _)| n == name)
        .map(|(_, at)| *at - first)
}

async fn send(
    svc: impl Service<Request<Full<Bytes>>, Response = Response<impl http_body::Body>, Error = BoxError>,
    req: Request<Full<Bytes>>,
) -> Result<(), BoxError> {
    let resp = svc.oneshot(req).await?;
    let _ = resp.into_body().collect().await;
    Ok(())
}

/// A request that would wait for input-token room holds for the writer's
/// response head, then goes charged only for what follows the prefix:
/// sent when the head arrives (1 s), not when 6,000 tokens refilled (12 s).
#[tokio::test(start_paused = true)]
async fn a_waiting_request_reads_the_prefix_being_written() {
    let log = Log::default();
    let layer = layer();
    let svc = layer.layer(upstream(Arc::clone(&log)));
    let w = tokio::spawn(send(svc.clone(), writer(1_000, 200)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let r = tokio::spawn(send(svc.clone(), reader(6_000)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Held out of line, nothing reserved for it.
    assert_eq!(sent_at(&log, "reader"), None);
    let input = remaining_input(&layer);
    assert!((4_000.0..4_200.0).contains(&input), "{input}");
    w.await.unwrap().unwrap();
    r.await.unwrap().unwrap();
    let at = sent_at(&log, "reader").expect("the reader was sent");
    assert!(
        at >= Duration::from_millis(1_000) && at < Duration::from_millis(1_100),
        "{at:?}"
    );
    // Charged 1,000 (then settled at the 1,000 the server counted): about
    // 4,000 + 1 s of refill (167) - 1,000 left.
    let input = remaining_input(&layer);
    assert!((3_100.0..3_300.0).contains(&input), "{input}");
}

/// A request that fits now at full charge goes now: the writer in flight
/// does not hold it.
#[tokio::test(start_paused = true)]
async fn a_request_that_fits_now_is_not_held() {
    let log = Log::default();
    let layer = layer();
    let svc = layer.layer(upstream(Arc::clone(&log)));
    let w = tokio::spawn(send(svc.clone(), writer(5_000, 200)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let slow = reader_answered_after(3_000, 1_000);
    let r = tokio::spawn(send(svc.clone(), slow));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let at = sent_at(&log, "reader").expect("sent at once");
    assert!(at <= Duration::from_millis(10), "{at:?}");
    // Charged in full: 10,000 - 6,000 - 3,000 (+ a little refill).
    let input = remaining_input(&layer);
    assert!((1_000.0..1_100.0).contains(&input), "{input}");
    w.await.unwrap().unwrap();
    r.await.unwrap().unwrap();
}

fn holding_layer(hold: Duration) -> TokenBudgetLayer {
    TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(10_000).itpm(20_000).otpm(1_000_000))
        .estimator(Arc::new(JsonEstimator))
        .cache_hold(hold)
        .count_tokens(Some(CountTokens::new(100)))
        .build()
}

/// With a cache hold, a request that fits now holds for the writer in
/// flight, at most that long or, for a prefix whose refill takes longer,
/// its refill time (5,000 tokens at 20,000 ITPM: 15 s): it goes when the
/// write begins (1 s, or 5 s: past the 2 s hold, within the refill time),
/// charged only what follows the prefix; for a writer slower than the
/// bound, it goes at the bound (15 s), charged in full.
#[tokio::test(start_paused = true)]
async fn a_request_that_fits_now_holds_for_at_most_the_cache_hold_or_the_prefixs_refill() {
    for (writer_ms, sent_ms, charged) in [
        (1_000, 1_000, 1_000.0),
        (5_000, 5_000, 1_000.0),
        (20_000, 15_000, 6_000.0),
    ] {
        let log = Log::default();
        let layer = holding_layer(Duration::from_secs(2));
        let svc = layer.layer(upstream(Arc::clone(&log)));
        let w = tokio::spawn(send(svc.clone(), writer(writer_ms, 200)));
        tokio::time::sleep(Duration::from_millis(10)).await;
        // 6,000 of 20,000 taken by the writer: the reader's 6,000 fit now.
        // The reader's answer takes a while, so its charge can be read.
        let reader = reader_answered_after(6_000, 10_000);
        let before = remaining_input(&layer);
        let r = tokio::spawn(send(svc.clone(), reader));
        tokio::time::sleep(Duration::from_millis(sent_ms + 100)).await;
        let at = sent_at(&log, "reader").expect("the reader was sent");
        let want = Duration::from_millis(sent_ms);
        assert!(
            at >= want && at < want + Duration::from_millis(100),
            "writer {writer_ms} ms: sent at {at:?}"
        );
        // What it reserved: the remaining input fell by its charge, less
        // the refill while it held (20,000 a minute) and the writer's own
        // settlement (6,000 reserved, 6,000 counted).
        let refill = (sent_ms + 100) as f64 * 20_000.0 / 60_000.0;
        let spent = before + refill - remaining_input(&layer);
        assert!(
            (spent - charged).abs() < 20.0,
            "writer {writer_ms} ms: charged {spent}, want {charged}"
        );
        w.await.unwrap().unwrap();
        r.await.unwrap().unwrap();
    }
}

/// A writer answered with an error status releases the request holding for
/// it, which is then charged in full: it goes when 6,000 tokens fit.
#[tokio::test(start_paused = true)]
async fn a_failed_writer_releases_the_waiter_in_full() {
    let log = Log::default();
    let layer = layer();
    let svc = layer.layer(upstream(Arc::clone(&log)));
    let w = tokio::spawn(send(svc.clone(), writer(1_000, 500)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let r = tokio::spawn(send(svc.clone(), reader(6_000)));
    w.await.unwrap().unwrap();
    r.await.unwrap().unwrap();
    let at = sent_at(&log, "reader").expect("the reader was sent");
    // 4,000 left at 0 s; 2,000 more refill in 12 s.
    assert!(at >= Duration::from_secs(11), "{at:?}");
}

/// A writer cancelled before its response head releases the waiter, charged
/// in full; the waiter holding out of line loses nothing and its own
/// cancellation leaves no reservation.
#[tokio::test(start_paused = true)]
async fn a_cancelled_writer_releases_the_waiter_in_full() {
    let log = Log::default();
    let layer = layer();
    let svc = layer.layer(upstream(Arc::clone(&log)));
    let w = tokio::spawn(send(svc.clone(), writer(60_000, 200)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let r = tokio::spawn(send(svc.clone(), reader(6_000)));
    let gone = tokio::spawn(send(svc.clone(), reader(6_000)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    w.abort();
    assert!(w.await.unwrap_err().is_cancelled());
    r.await.unwrap().unwrap();
    let at = sent_at(&log, "reader").expect("the reader was sent");
    // The writer's 6,000 stay charged (it was sent); the reader waits for
    // its full 6,000 to fit: 12 s of refill.
    assert!(at >= Duration::from_secs(11), "{at:?}");
    assert_eq!(layer.snapshot().key(KEY).unwrap().waiting, 0);
}

/// A request that arrives after the writer's response head is not charged
/// as a read by the budget (the estimator does so once a response confirmed
/// the write): charged in full, it waits for 6,000 tokens of room.
#[tokio::test(start_paused = true)]
async fn a_request_after_the_writers_head_is_charged_in_full() {
    let log = Log::default();
    let layer = layer();
    let svc = layer.layer(upstream(Arc::clone(&log)));
    // Hold the writer's body unread: its response has begun.
    let resp = svc.clone().oneshot(writer(100, 200)).await.unwrap();
    let r = tokio::spawn(send(svc.clone(), reader(6_000)));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(sent_at(&log, "reader"), None);
    drop(resp);
    r.await.unwrap().unwrap();
    let at = sent_at(&log, "reader").expect("the reader was sent");
    assert!(at >= Duration::from_secs(11), "{at:?}");
}

/// A streamed writer: its head and `message_start` at once, its first
/// `content_block_delta` after `first_ms`, its end `first_ms` later.
fn streaming_upstream(log: Log, first_ms: u64) -> Upstream {
    BoxCloneService::new(tower::service_fn(
        move |req: Request<ReplayBody<Full<Bytes>>>| {
            let log = Arc::clone(&log);
            async move {
                let bytes = req.into_body().collect().await?.to_bytes();
                let v: serde_json::Value = serde_json::from_slice(&bytes)?;
                let name = v["name"].as_str().unwrap_or("").to_owned();
                log.lock().unwrap().push((name, Instant::now()));
                let input = v["input"].as_u64().unwrap_or(0);
                let read = v["read"].as_u64().unwrap_or(0);
                let created = v["created"].as_u64().unwrap_or(0);
                let start = format!(
                    "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"usage\":{{\"input_tokens\":{},\"cache_read_input_tokens\":{read},\"cache_creation_input_tokens\":{created},\"output_tokens\":1}}}}}}\n\n",
                    input.saturating_sub(read).saturating_sub(created)
                );
                let delta = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n".to_owned();
                let stop = "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":2}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_owned();
                let steps = vec![(0, start), (first_ms, delta), (first_ms, stop)];
                let frames = futures_util::stream::iter(steps).then(|(ms, text)| async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok::<_, Infallible>(Frame::data(Bytes::from(text)))
                });
                let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
                response
                    .headers_mut()
                    .insert("content-type", "text/event-stream".parse()?);
                Ok::<_, BoxError>(response)
            }
        },
    ))
}

/// A streamed writer's head and `message_start` come before its answer has
/// begun (the server makes the prefix readable at the first output): the
/// waiting reader goes at the first `content_block_delta` (1 s), not at the
/// head (at once), charged only for what follows the prefix.
#[tokio::test(start_paused = true)]
async fn a_streamed_writer_is_readable_at_its_first_output() {
    let log = Log::default();
    let layer = layer();
    let svc = layer.layer(streaming_upstream(Arc::clone(&log), 1_000));
    let w = tokio::spawn(send(svc.clone(), writer(0, 200)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let r = tokio::spawn(send(svc.clone(), reader(6_000)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The writer's head arrived at once; the reader still holds.
    assert_eq!(sent_at(&log, "reader"), None);
    w.await.unwrap().unwrap();
    r.await.unwrap().unwrap();
    let at = sent_at(&log, "reader").expect("the reader was sent");
    assert!(
        at >= Duration::from_millis(1_000) && at < Duration::from_millis(1_100),
        "{at:?}"
    );
    // Charged about 1,000, not 6,000: 4,000 + 3 s of refill (the reader's
    // own stream ends at 3 s) - 1,000.
    let input = remaining_input(&layer);
    assert!((3_300.0..3_700.0).contains(&input), "{input}");
}

/// A conversation's turns queued together: the next turn was estimated
/// before the turn that writes its prefix was even sent, so nothing was in
/// flight to hold for. While it waits in line, that turn goes and its
/// answer says the server cached the prefix (4,000 of its tokens): the
/// waiting turn is charged only what follows it at its next try, and goes
/// when 2,000 tokens have refilled rather than 6,000.
#[tokio::test(start_paused = true)]
async fn a_turn_waiting_in_line_reads_the_prefix_written_meanwhile() {
    let log = Log::default();
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(10_000).itpm(10_000).otpm(1_000_000))
        .estimator(Arc::new(JsonEstimator))
        .count_tokens(Some(CountTokens::new(100)))
        .build();
    let svc = layer.layer(upstream(Arc::clone(&log)));
    // Takes 9,000 of the 10,000 at once.
    let first = request(serde_json::json!({"name": "first", "input": 9_000}));
    send(svc.clone(), first).await.unwrap();
    // The writer waits for 6,000 (30 s at 10,000 a minute), the next turn
    // behind it.
    let writer = request(serde_json::json!({
        "name": "writer", "input": 6_000, "created": 4_000,
        "writes": [[PREFIX, PREFIX_TOKENS]],
    }));
    // Counted while it waits: 6,000 in all, as the estimate says.
    let turn = request(serde_json::json!({
        "name": "turn", "input": 6_000, "read": 4_000,
        "pending": [[PREFIX, PREFIX_TOKENS]],
    }));
    let w = tokio::spawn(send(svc.clone(), writer));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let r = tokio::spawn(send(svc.clone(), turn));
    w.await.unwrap().unwrap();
    r.await.unwrap().unwrap();
    let (w_at, r_at) = (
        sent_at(&log, "writer").expect("the writer was sent"),
        sent_at(&log, "turn").expect("the turn was sent"),
    );
    assert!(w_at >= Duration::from_secs(29), "{w_at:?}");
    // After the writer: 2,000 (6,000 less the 4,000 the server sized the
    // prefix at) refill in 12 s; in full it would take 36 s.
    let gap = r_at - w_at;
    assert!(
        gap >= Duration::from_secs(11) && gap < Duration::from_secs(14),
        "{gap:?}"
    );
}

/// A request waiting in line whose prefix begins to be written while it
/// waits holds, keeping its place, until that write begins (at most the
/// cache hold) rather than paying the prefix again: the writer, admitted at
/// 18 s, answers at 48 s; the turn, whose 6,000 would fit at 36 s, goes at
/// 48 s charged 2,000 (6,000 less the 4,000 the server sized the prefix
/// at).
#[tokio::test(start_paused = true)]
async fn a_turn_in_line_holds_for_a_prefix_written_meanwhile() {
    let log = Log::default();
    let layer = holding_layer(Duration::from_secs(60));
    let svc = layer.layer(upstream(Arc::clone(&log)));
    let first = request(serde_json::json!({"name": "first", "input": 20_000}));
    send(svc.clone(), first).await.unwrap();
    let writer = request(serde_json::json!({
        "name": "writer", "input": 6_000, "created": 4_000, "delay_ms": 30_000,
        "writes": [[PREFIX, PREFIX_TOKENS]],
    }));
    // Counted while it waits: 6,000 in all, as the estimate says.
    let turn = request(serde_json::json!({
        "name": "turn", "input": 6_000, "read": 4_000, "delay_ms": 10_000,
        "pending": [[PREFIX, PREFIX_TOKENS]],
    }));
    let w = tokio::spawn(send(svc.clone(), writer));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let r = tokio::spawn(send(svc.clone(), turn));
    tokio::time::sleep(Duration::from_secs(49)).await;
    let w_at = sent_at(&log, "writer").expect("the writer was sent");
    assert!(
        w_at >= Duration::from_secs(17) && w_at < Duration::from_secs(19),
        "{w_at:?}"
    );
    let r_at = sent_at(&log, "turn").expect("the turn was sent");
    assert!(
        r_at >= Duration::from_secs(47) && r_at < Duration::from_secs(49),
        "{r_at:?}"
    );
    // 30 s of refill (10,000) after the writer took the bucket, less the
    // turn's 2,000.
    let input = remaining_input(&layer);
    assert!((7_500.0..8_500.0).contains(&input), "{input}");
    w.await.unwrap().unwrap();
    r.await.unwrap().unwrap();
}

/// Reads `input` (uncached) and `cached` (a cache read) from the body; the
/// read leaves the cache at `cold_at` (`TokenEstimator::recheck_cache_read`).
#[derive(Debug)]
struct ExpiringRead {
    cold_at: Instant,
    /// The estimates settled, as the budget handed them back.
    settled: Mutex<Vec<Estimate>>,
}

impl TokenEstimator for ExpiringRead {
    fn estimate(&self, _parts: &Parts, body: &[u8]) -> Estimate {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let input = v["input"].as_u64().unwrap_or(0);
        Estimate {
            model: Some(MODEL.into()),
            input_tokens: input,
            raw_input_tokens: input,
            cache_read_tokens: v["cached"].as_u64().unwrap_or(0),
            max_tokens: Some(10),
            ..Estimate::default()
        }
    }

    fn estimate_unbuffered(&self, parts: &Parts, len: Option<u64>) -> Estimate {
        JsonEstimator.estimate_unbuffered(parts, len)
    }

    fn observe(&self, estimate: &Estimate, _usage: &tower_llm_limits::wire::Usage) {
        self.settled.lock().unwrap().push(estimate.clone());
    }

    fn recheck_cache_read(&self, e: &Estimate) -> Option<Estimate> {
        (e.cache_read_tokens > 0 && Instant::now() >= self.cold_at).then(|| Estimate {
            input_tokens: e.input_tokens + e.cache_read_tokens,
            raw_input_tokens: e.raw_input_tokens + e.cache_read_tokens,
            cache_read_tokens: 0,
            ..e.clone()
        })
    }
}

/// When `waiting` (1,000 tokens, 5,000 more read from the cache) is sent, and
/// what was settled for it, if its read leaves the cache `cold_after` in.
/// `big` takes the whole bucket (10,000 ITPM) first.
async fn expiring_read(cold_after: Duration) -> (Duration, Vec<Estimate>) {
    let log = Log::default();
    let estimator = Arc::new(ExpiringRead {
        cold_at: Instant::now() + cold_after,
        settled: Mutex::new(Vec::new()),
    });
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(10_000).itpm(10_000).otpm(1_000_000))
        .estimator(Arc::clone(&estimator) as Arc<dyn TokenEstimator>)
        .build();
    let svc = layer.layer(upstream(Arc::clone(&log)));
    send(
        svc.clone(),
        request(serde_json::json!({"name": "big", "input": 10_000})),
    )
    .await
    .unwrap();
    let waiting = request(serde_json::json!({"name": "waiting", "input": 1_000, "cached": 5_000}));
    send(svc, waiting).await.unwrap();
    let at = sent_at(&log, "waiting").expect("sent");
    let settled = estimator.settled.lock().unwrap().clone();
    (at, settled)
}

/// A request charged as reading a prefix from the cache waits in line; its
/// read leaves the cache meanwhile: it is charged the whole prompt (6,000
/// tokens: 36 s of refill), not the 1,000 that follow the prefix (6 s), and
/// settles against the estimate without the read.
#[tokio::test(start_paused = true)]
async fn a_read_that_leaves_the_cache_while_waiting_is_charged_in_full() {
    let (at, settled) = expiring_read(Duration::from_secs(3)).await;
    assert!(
        at >= Duration::from_secs(35) && at < Duration::from_secs(37),
        "{at:?}"
    );
    let waiting = settled.last().expect("settled");
    assert_eq!(
        (waiting.cache_read_tokens, waiting.input_tokens),
        (0, 6_000)
    );
    // The read that stands: sent after 6 s, charged 1,000.
    let (at, settled) = expiring_read(Duration::from_secs(3_600)).await;
    assert!(
        at >= Duration::from_secs(5) && at < Duration::from_secs(7),
        "{at:?}"
    );
    assert_eq!(settled.last().map(|e| e.cache_read_tokens), Some(5_000));
}
