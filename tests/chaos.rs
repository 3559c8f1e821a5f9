//! A seeded chaos run: an in-process upstream that fails one request in five
//! (529, 500, a connection refused before the request is sent, a reset after
//! it was processed, `event: error` mid-stream, slow and stalled bodies),
//! callers that give up on one request in four at a random moment, through
//! the three layers in every order and through the preset under a burst.
//!
//! It checks that every request ends ok or with a typed error, that the
//! budget and the concurrency layer return to idle (no reservation, waiter
//! or slot left), that what the budget admits never exceeds the limits in
//! any window (requests, input and output tokens: every charge the ledger
//! takes is recorded with its time and checked window by window against the
//! bucket's capacity plus its refill over the window), and that every replay
//! the upstream sees is counted by the retry layer.
//!
//! Everything runs under tokio's paused clock. `CHAOS_SOAK=1` runs a soak:
//! ten times as many requests per layer order, over three seeds, and a
//! burst of 200,000 through the preset.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tokio::time::{Instant, Sleep};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_llm_limits::budget::ledger::BucketState;
use tower_llm_limits::budget::ledger::{
    CostDelta, Costs, InMemoryLedger, Ledger, LedgerFuture, Reservation,
};
use tower_llm_limits::budget::{Limits, TokenBudgetLayer};
use tower_llm_limits::concurrency::{ConcurrencyBuilder, ConcurrencyLayer};
use tower_llm_limits::headers::LimitStatus;
use tower_llm_limits::preset::LimitsLayer;
use tower_llm_limits::retry::{RetryAfterLayer, RETRY_COUNT};
use tower_llm_limits::{BoxError, Dimension, Error};

/// A small seeded generator (SplitMix64): the run is the same for a seed.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// How a body ends once its chunks are out.
#[derive(Debug, Clone, Copy)]
enum End {
    Complete,
    Stall,
}

/// A response body sent in chunks, `gap` apart; it may stall forever.
struct Chunks {
    chunks: VecDeque<Bytes>,
    gap: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    end: End,
}

impl Chunks {
    fn new(chunks: Vec<String>, gap: Duration, end: End) -> Self {
        Chunks {
            chunks: chunks.into_iter().map(Bytes::from).collect(),
            gap,
            sleep: None,
            end,
        }
    }

    fn whole(text: String) -> Self {
        Chunks::new(vec![text], Duration::ZERO, End::Complete)
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Some(sleep) = self.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
        }
        match self.chunks.pop_front() {
            Some(chunk) => {
                if !self.gap.is_zero() {
                    self.sleep = Some(Box::pin(tokio::time::sleep(self.gap)));
                }
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            None => match self.end {
                End::Complete => Poll::Ready(None),
                // Never wakes: only the caller giving up ends it.
                End::Stall => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && matches!(self.end, End::Complete) && self.sleep.is_none()
    }
}

/// What the upstream saw.
#[derive(Debug, Default)]
struct Seen {
    /// Requests that reached it.
    arrivals: AtomicU64,
    /// Arrivals that carried the retry layer's retry count (replays).
    replays: AtomicU64,
    /// Requests it failed on purpose.
    faults: AtomicU64,
    /// Requests it refused before a byte was sent (connection refused).
    refused: AtomicU64,
}

fn usage_json(input: u64, output: u64) -> String {
    format!(
        r#"{{"id":"msg_1","type":"message","role":"assistant","content":[{{"type":"text","text":"ok"}}],"usage":{{"input_tokens":{input},"output_tokens":{output}}}}}"#
    )
}

fn sse_events(input: u64, output: u64, error_mid_stream: bool) -> Vec<String> {
    let mut events = vec![format!(
        "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"usage\":{{\"input_tokens\":{input},\"output_tokens\":1}}}}}}\n\n"
    )];
    events.push("event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"ok\"}}\n\n".to_owned());
    if error_mid_stream {
        events.push("event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n".to_owned());
    } else {
        events.push(format!(
            "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\"}},\"usage\":{{\"output_tokens\":{output}}}}}\n\n"
        ));
        events.push("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_owned());
    }
    events
}

fn respond(status: StatusCode, content_type: &str, body: Chunks) -> Response<Chunks> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

/// One answer of the upstream, drawn from the seeded generator: one in five
/// is a fault, of seven kinds.
async fn answer(rng: Arc<Mutex<Rng>>, seen: Arc<Seen>) -> Result<Response<Chunks>, std::io::Error> {
    let (draw, kind, latency, output) = {
        let mut rng = rng
            .lock()
            .map_err(|_| std::io::Error::other("rng poisoned"))?;
        (
            rng.below(100),
            rng.below(7),
            rng.millis(20, 400),
            10 + rng.below(50),
        )
    };
    let input = 30;
    let faulty = draw < 20;
    if faulty {
        seen.faults.fetch_add(1, Ordering::Relaxed);
        if kind == 2 {
            // Refused before a byte of the request was sent.
            seen.refused.fetch_add(1, Ordering::Relaxed);
            return Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        }
    }
    tokio::time::sleep(latency).await;
    if !faulty {
        return Ok(if draw % 2 == 0 {
            respond(
                StatusCode::OK,
                "application/json",
                Chunks::whole(usage_json(input, output)),
            )
        } else {
            let events = sse_events(input, output, false);
            respond(
                StatusCode::OK,
                "text/event-stream",
                Chunks::new(events, Duration::from_millis(5), End::Complete),
            )
        });
    }
    Ok(match kind {
        0 => respond(
            StatusCode::from_u16(529).map_err(std::io::Error::other)?,
            "application/json",
            Chunks::whole(r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#.to_owned()),
        ),
        1 => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "application/json",
            Chunks::whole(r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#.to_owned()),
        ),
        // Processed, then the connection reset before the answer.
        3 => return Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        4 => respond(
            StatusCode::OK,
            "text/event-stream",
            Chunks::new(sse_events(input, output, true), Duration::from_millis(5), End::Complete),
        ),
        // A slow body: 2 s between chunks.
        5 => respond(
            StatusCode::OK,
            "text/event-stream",
            Chunks::new(sse_events(input, output, false), Duration::from_secs(2), End::Complete),
        ),
        // A stalled body: the first event, then nothing.
        _ => respond(
            StatusCode::OK,
            "text/event-stream",
            Chunks::new(sse_events(input, output, false)[..1].to_vec(), Duration::ZERO, End::Stall),
        ),
    })
}

/// The fault-injecting upstream.
fn upstream<B: Send + 'static>(
    seed: u64,
    seen: Arc<Seen>,
) -> impl Service<
    Request<B>,
    Response = Response<Chunks>,
    Error = std::io::Error,
    Future = impl Future<Output = Result<Response<Chunks>, std::io::Error>> + Send,
> + Clone
       + Send
       + 'static {
    let rng = Arc::new(Mutex::new(Rng(seed)));
    tower::service_fn(move |req: Request<B>| {
        seen.arrivals.fetch_add(1, Ordering::Relaxed);
        if req.headers().contains_key(RETRY_COUNT) {
            seen.replays.fetch_add(1, Ordering::Relaxed);
        }
        answer(Arc::clone(&rng), Arc::clone(&seen))
    })
}

fn request(i: u64) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":64,"stream":{},"messages":[{{"role":"user","content":"request {i}: hello there"}}]}}"#,
        i % 2 == 1
    );
    Request::post("/v1/messages")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
}

/// How one request ended.
#[derive(Debug, Default, Clone, Copy)]
struct Outcomes {
    ok: u64,
    error_status: u64,
    crate_error: u64,
    transport_error: u64,
    cancelled: u64,
}

impl Outcomes {
    fn total(&self) -> u64 {
        self.ok + self.error_status + self.crate_error + self.transport_error + self.cancelled
    }
}

enum Ended {
    Ok,
    GaveUp,
    Status,
    Crate,
    Transport,
}

/// Whether an error is typed: this crate's `Error` or an I/O error, at the
/// top or among its sources.
fn typed(err: &BoxError) -> Option<Ended> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&**err);
    while let Some(e) = next {
        if e.is::<Error>() {
            return Some(Ended::Crate);
        }
        if e.is::<std::io::Error>() {
            return Some(Ended::Transport);
        }
        next = e.source();
    }
    None
}

async fn one<S, RB>(svc: S, i: u64) -> Result<Ended, String>
where
    S: Service<Request<Full<Bytes>>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: Body,
    RB::Error: Into<BoxError>,
{
    let response = match svc.oneshot(request(i)).await {
        Ok(response) => response,
        Err(e) => {
            let e: BoxError = e.into();
            return typed(&e).ok_or_else(|| format!("untyped error: {e}"));
        }
    };
    let success = response.status().is_success();
    // The caller reads a body for 10 s at most (a stalled body never ends).
    let read = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect());
    match read.await {
        Err(_elapsed) => Ok(Ended::GaveUp),
        Ok(Ok(_)) if success => Ok(Ended::Ok),
        Ok(Ok(_)) => Ok(Ended::Status),
        Ok(Err(e)) => {
            let e: BoxError = e.into();
            typed(&e).ok_or_else(|| format!("untyped body error: {e}"))
        }
    }
}

/// The requests the budget keeps charged, sampled every 100 ms: admitted,
/// less those refunded (refused by the server, or never sent).
#[derive(Debug, Default)]
struct Samples(Mutex<Vec<(Instant, u64)>>);

fn kept(budget: &TokenBudgetLayer) -> u64 {
    let s = budget.snapshot();
    s.admitted - s.refunded_429 - s.refunded_unsent
}

/// What a run watches: the three layers and the upstream.
struct Watch<'a> {
    budget: &'a TokenBudgetLayer,
    ledger: &'a Recorder,
    concurrency: &'a ConcurrencyLayer,
    retry: &'a RetryAfterLayer,
    seen: &'a Seen,
}

/// Samples [`kept`] every 100 ms until aborted.
fn sample(budget: &TokenBudgetLayer) -> (Arc<Samples>, tokio::task::JoinHandle<()>) {
    let samples = Arc::new(Samples::default());
    let (into, budget) = (Arc::clone(&samples), budget.clone());
    let sampler = tokio::spawn(async move {
        loop {
            if let Ok(mut s) = into.0.lock() {
                s.push((Instant::now(), kept(&budget)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (samples, sampler)
}

/// Runs `n` requests at once through `svc`: one in four given up by its
/// caller at a random moment, the others after four hours at most, or 10 s
/// into reading a body. Panics on a panic or an untyped error.
async fn callers<S, RB>(label: &str, svc: S, n: u64, seed: u64) -> Outcomes
where
    S: Service<Request<Full<Bytes>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    RB: Body + Send + 'static,
    RB::Data: Send,
    RB::Error: Into<BoxError>,
{
    let mut rng = Rng(seed ^ 0xC0FF_EE00);
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let give_up = if rng.below(4) == 0 {
            rng.millis(0, 3_000)
        } else {
            Duration::from_secs(4 * 3_600)
        };
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(give_up, one(svc, i)).await
        }));
    }
    let mut out = Outcomes::default();
    for task in tasks {
        match task.await {
            Err(e) => panic!("{label}: a request panicked: {e}"),
            Ok(Err(_elapsed)) => out.cancelled += 1,
            Ok(Ok(Err(untyped))) => panic!("{label}: {untyped}"),
            Ok(Ok(Ok(Ended::Ok))) => out.ok += 1,
            Ok(Ok(Ok(Ended::GaveUp))) => out.cancelled += 1,
            Ok(Ok(Ok(Ended::Status))) => out.error_status += 1,
            Ok(Ok(Ok(Ended::Crate))) => out.crate_error += 1,
            Ok(Ok(Ok(Ended::Transport))) => out.transport_error += 1,
        }
    }
    out
}

/// Runs the chaos through `svc` and checks every invariant.
async fn chaos<S, RB>(label: &str, svc: S, n: u64, seed: u64, watch: Watch<'_>)
where
    S: Service<Request<Full<Bytes>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    RB: Body + Send + 'static,
    RB::Data: Send,
    RB::Error: Into<BoxError>,
{
    let (samples, sampler) = sample(watch.budget);
    let out = callers(label, svc, n, seed).await;
    let seen = watch.seen;
    let (arrivals, replays) = (load(&seen.arrivals), load(&seen.replays));
    let retries = watch.retry.snapshot().retries;
    eprintln!(
        "{label}: {out:?}; arrivals {arrivals}, faults {}, replays {replays}, retries {retries}, kept {}",
        load(&seen.faults),
        kept(watch.budget),
    );
    assert_eq!(out.total(), n, "{label}: {out:?}");
    assert!(out.ok > n / 2 && out.cancelled > 0, "{label}: {out:?}");
    assert!(load(&seen.faults) > 0, "{label}");

    // The budget keeps a charge only for a request that may have reached
    // the server: never more than the arrivals it did not refuse at once.
    let sent = arrivals - load(&seen.refused);
    let kept_now = kept(watch.budget);
    assert!(kept_now <= sent, "{label}: {kept_now} kept for {sent} sent");

    // Every replay the upstream saw was counted as a retry.
    assert!(replays > 0, "{label}: the faults caused no replay");
    assert!(
        replays <= retries,
        "{label}: {replays} replays seen, {retries} counted"
    );

    // Idle: no slot, no waiter, every bucket full again.
    let c = watch.concurrency.snapshot();
    assert_eq!((c.in_flight, c.waiting.total()), (0, 0), "{label}: {c:?}");
    tokio::time::sleep(Duration::from_secs(120)).await;
    sampler.abort();
    idle(label, watch.budget);
    let samples = samples.0.lock().map(|s| s.clone()).unwrap_or_default();
    windows(label, watch.budget, &samples);
    token_windows(label, watch.budget, &watch.ledger.charges());
}

/// One charge the ledger took: an admitted reservation, or a correction
/// after admission (a refund when negative).
#[derive(Debug, Clone, Copy)]
enum Charge {
    Reserved(Costs),
    Settled(CostDelta),
}

impl Charge {
    /// The signed amount in one dimension.
    fn amount(&self, dimension: Dimension) -> f64 {
        match (self, dimension) {
            (Charge::Reserved(c), Dimension::Requests) => c.requests as f64,
            (Charge::Reserved(c), Dimension::InputTokens) => c.input_tokens as f64,
            (Charge::Reserved(c), Dimension::OutputTokens) => c.output_tokens as f64,
            (Charge::Settled(d), Dimension::Requests) => d.requests as f64,
            (Charge::Settled(d), Dimension::InputTokens) => d.input_tokens as f64,
            (Charge::Settled(d), Dimension::OutputTokens) => d.output_tokens as f64,
        }
    }
}

/// An in-memory ledger that records every charge it takes, with its time
/// on tokio's clock (the clock the in-memory ledger reads).
#[derive(Debug, Default)]
struct Recorder {
    inner: InMemoryLedger,
    charges: Mutex<Vec<(Instant, Charge)>>,
}

impl Recorder {
    fn record(&self, charge: Charge) {
        if let Ok(mut charges) = self.charges.lock() {
            charges.push((Instant::now(), charge));
        }
    }

    fn charges(&self) -> Vec<(Instant, Charge)> {
        self.charges.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Ledger for Recorder {
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation> {
        let answer = self
            .inner
            .reserve(key, limits, costs)
            .into_ready()
            .unwrap_or_else(|_| panic!("the in-memory ledger answers at once"));
        if let Ok(Reservation::Admitted) = answer {
            self.record(Charge::Reserved(costs));
        }
        LedgerFuture::ready(answer)
    }

    fn settle(&self, key: &str, limits: &Limits, delta: CostDelta) -> LedgerFuture<()> {
        self.record(Charge::Settled(delta));
        self.inner.settle(key, limits, delta)
    }

    fn sync(
        &self,
        key: &str,
        limits: &Limits,
        dimension: Dimension,
        sync: LimitStatus,
    ) -> LedgerFuture<()> {
        // A sync only lowers what is left: it can only make admission stricter.
        self.inner.sync(key, limits, dimension, sync)
    }

    fn state(&self, key: &str, limits: &Limits) -> LedgerFuture<Option<[BucketState; 3]>> {
        self.inner.state(key, limits)
    }
}

/// What the ledger charged in any window never exceeds the bucket: its
/// capacity plus its refill over the window, in every dimension.
///
/// The ledger admits a reservation only when the bucket holds its cost, so
/// right after an admission the level is at least zero. Over a window
/// `[t1, t2]` ending at an admission, the net charges (reservations and
/// corrections, refunds counted at what was asked, which is at least what
/// was applied) are then at most the level at `t1` (at most the capacity)
/// plus the refill over the window (at most `limit / 60` per second).
/// Checked in one pass: the largest `S(t2) - S(t1-) - rate * (t2 - t1)`.
fn token_windows(label: &str, budget: &TokenBudgetLayer, charges: &[(Instant, Charge)]) {
    let snapshot = budget.snapshot();
    let key = snapshot
        .keys
        .first()
        .unwrap_or_else(|| panic!("{label}: the budget saw no request"));
    assert_eq!(snapshot.keys.len(), 1, "{label}: one key expected");
    let start = charges.first().map_or_else(Instant::now, |c| c.0);
    for dimension in Dimension::ALL {
        let bucket = key.dimension(dimension);
        let (Some(capacity), Some(limit)) = (bucket.capacity, bucket.limit) else {
            panic!("{label}: {dimension:?} has no limit: {bucket:?}");
        };
        let rate = limit as f64 / 60.0;
        let (mut sum, mut lowest, mut worst, mut admissions) = (0.0_f64, f64::INFINITY, 0.0_f64, 0);
        for (at, charge) in charges {
            let t = at.duration_since(start).as_secs_f64();
            // A window may start at this charge: S(t1-) - rate * t1.
            lowest = lowest.min(sum - rate * t);
            sum += charge.amount(dimension);
            if matches!(charge, Charge::Reserved(_)) {
                admissions += 1;
                worst = worst.max(sum - rate * t - lowest);
            }
        }
        eprintln!(
            "{label}: {dimension:?}: {admissions} admissions, the fullest window took {worst:.0} of {capacity}"
        );
        assert!(admissions > 0, "{label}: nothing admitted");
        // One unit of slack for the ledger's fixed-point refill.
        assert!(
            worst <= capacity + 1.0,
            "{label}: {dimension:?}: {worst} charged in a window allowing {capacity} plus its refill"
        );
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// No request waits for the budget, and every bucket is full again.
fn idle(label: &str, budget: &TokenBudgetLayer) {
    for key in &budget.snapshot().keys {
        assert_eq!(key.waiting, 0, "{label}: {key:?}");
        for d in Dimension::ALL {
            let d = key.dimension(d);
            assert_eq!(d.remaining, d.capacity, "{label}: not back to idle: {d:?}");
        }
    }
}

/// Requests kept charged in any window never exceed the bucket: its
/// capacity plus its refill over the window.
fn windows(label: &str, budget: &TokenBudgetLayer, samples: &[(Instant, u64)]) {
    let (capacity, per_sec) = budget
        .snapshot()
        .keys
        .iter()
        .map(|k| k.dimension(Dimension::Requests))
        .filter_map(|d| Some((d.capacity?, d.limit? as f64 / 60.0)))
        .next()
        .unwrap_or_else(|| panic!("{label}: the budget saw no request"));
    for (i, &(t1, k1)) in samples.iter().enumerate() {
        for &(t2, k2) in &samples[i + 1..] {
            let allowed = capacity + per_sec * t2.duration_since(t1).as_secs_f64();
            let used = k2.saturating_sub(k1) as f64;
            assert!(
                used <= allowed + 1e-6,
                "{label}: {used} kept in a window allowing {allowed}"
            );
        }
    }
}

fn soak() -> bool {
    std::env::var_os("CHAOS_SOAK").is_some_and(|v| v == "1")
}

/// Limits under which each dimension binds in turn: about 600 requests, 400
/// requests' input or 250 requests' reserved output per minute.
const LIMITS: Limits = Limits {
    requests_per_minute: Some(600),
    input_tokens_per_minute: Some(5_200),
    output_tokens_per_minute: Some(15_000),
};

/// The budget the preset builds (`TokenBudgetLayer::anthropic`), over a
/// recording ledger.
fn recorded_budget(limits: Limits, ledger: &Arc<Recorder>) -> TokenBudgetLayer {
    TokenBudgetLayer::builder()
        .limits(limits)
        .ledger(Arc::clone(ledger) as Arc<dyn Ledger>)
        .build()
}

fn retry_layer() -> RetryAfterLayer {
    RetryAfterLayer::anthropic()
}

fn concurrency_layer() -> ConcurrencyLayer {
    ConcurrencyBuilder::adaptive(1..=32)
        .initial_limit(8)
        .build()
        .unwrap_or_else(|_| ConcurrencyLayer::adaptive(1..=32))
}

/// Builds the stack in one order (outermost first) and runs the chaos.
macro_rules! order {
    ($label:expr, $n:expr, $seed:expr, $a:ident, $b:ident, $c:ident) => {{
        let ledger = Arc::new(Recorder::default());
        let budget = recorded_budget(LIMITS, &ledger);
        let concurrency = concurrency_layer();
        let retry = retry_layer();
        let seen = Arc::new(Seen::default());
        let pick = Layers {
            budget: &budget,
            concurrency: &concurrency,
            retry: &retry,
        };
        let svc = ServiceBuilder::new()
            .layer(pick.$a())
            .layer(pick.$b())
            .layer(pick.$c())
            .service(upstream($seed, Arc::clone(&seen)));
        let watch = Watch {
            budget: &budget,
            ledger: &ledger,
            concurrency: &concurrency,
            retry: &retry,
            seen: &seen,
        };
        chaos($label, svc, $n, $seed, watch).await;
    }};
}

struct Layers<'a> {
    budget: &'a TokenBudgetLayer,
    concurrency: &'a ConcurrencyLayer,
    retry: &'a RetryAfterLayer,
}

impl Layers<'_> {
    fn b(&self) -> TokenBudgetLayer {
        self.budget.clone()
    }
    fn c(&self) -> ConcurrencyLayer {
        self.concurrency.clone()
    }
    fn r(&self) -> RetryAfterLayer {
        self.retry.clone()
    }
}

#[tokio::test(start_paused = true)]
async fn chaos_in_every_layer_order() {
    let (n, seeds): (u64, &[u64]) = if soak() {
        (10_000, &[1, 2, 3])
    } else {
        (1_000, &[7])
    };
    for &seed in seeds {
        order!("budget, concurrency, retry", n, seed, b, c, r);
        order!("budget, retry, concurrency", n, seed, b, r, c);
        order!("concurrency, budget, retry", n, seed, c, b, r);
        order!("concurrency, retry, budget", n, seed, c, r, b);
        order!("retry, budget, concurrency", n, seed, r, b, c);
        order!("retry, concurrency, budget", n, seed, r, c, b);
    }
}

#[tokio::test(start_paused = true)]
async fn chaos_through_the_preset_under_a_burst() {
    let n = if soak() { 200_000 } else { 50_000 };
    let burst = Limits {
        requests_per_minute: Some(30_000),
        input_tokens_per_minute: Some(10_000_000),
        output_tokens_per_minute: Some(10_000_000),
    };
    let ledger = Arc::new(Recorder::default());
    let limits = LimitsLayer::anthropic(burst).with_budget(recorded_budget(burst, &ledger));
    let seen = Arc::new(Seen::default());
    let svc = ServiceBuilder::new()
        .layer(limits.clone())
        .service(upstream(42, Arc::clone(&seen)));
    let watch = Watch {
        budget: limits.budget(),
        ledger: &ledger,
        concurrency: limits.concurrency(),
        retry: limits.retry(),
        seen: &seen,
    };
    chaos("preset", svc, n, 42, watch).await;
}
