//! A budget over a ledger that answers after a round trip (as `RedisLedger`
//! does), in `count_tokens` mode, on tokio's paused clock: a count that
//! comes back while the request's question is in flight changes what the
//! request costs, and the ledger must end up charged what the request
//! costs, and the request must not wait for the costs it no longer has.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Layer, ServiceExt};
use tower_llm_limits::body::ReplayBody;
use tower_llm_limits::budget::ledger::{
    BucketState, CostDelta, Costs, InMemoryLedger, Ledger, LedgerFuture, LinePlace, Reservation,
};
use tower_llm_limits::budget::{CountTokens, Limits, TokenBudget, TokenBudgetLayer};
use tower_llm_limits::estimate::{Estimate, TokenEstimator};
use tower_llm_limits::headers::LimitStatus;
use tower_llm_limits::Dimension;

/// The budget key of the requests below (their model's class).
const KEY: &str = "sonnet-4";

/// Each answer of the ledger takes this long (a network round trip).
const ROUND_TRIP: Duration = Duration::from_millis(50);

/// An `InMemoryLedger` whose reservations answer after [`ROUND_TRIP`],
/// decided when the answer arrives (as a script call decides when it runs).
#[derive(Debug, Default)]
struct RoundTrip {
    inner: Arc<InMemoryLedger>,
}

impl Ledger for RoundTrip {
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation> {
        let (inner, key, limits) = (Arc::clone(&self.inner), key.to_owned(), *limits);
        LedgerFuture::new(async move {
            tokio::time::sleep(ROUND_TRIP).await;
            inner.reserve(&key, &limits, costs).await
        })
    }

    fn reserve_in_line(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
        place: LinePlace,
    ) -> Option<LedgerFuture<Reservation>> {
        let (inner, key, limits) = (Arc::clone(&self.inner), key.to_owned(), *limits);
        Some(LedgerFuture::new(async move {
            tokio::time::sleep(ROUND_TRIP).await;
            match inner.reserve_in_line(&key, &limits, costs, headroom, place) {
                Some(answer) => answer.await,
                None => inner.reserve(&key, &limits, costs).await,
            }
        }))
    }

    fn settle(&self, key: &str, limits: &Limits, delta: CostDelta) -> LedgerFuture<()> {
        self.inner.settle(key, limits, delta)
    }

    fn sync(&self, key: &str, limits: &Limits, d: Dimension, s: LimitStatus) -> LedgerFuture<()> {
        self.inner.sync(key, limits, d, s)
    }

    fn state(&self, key: &str, limits: &Limits) -> LedgerFuture<Option<[BucketState; 3]>> {
        self.inner.state(key, limits)
    }
}

/// Estimates a request at its `"input"` field.
#[derive(Debug)]
struct Field;

fn field(body: &[u8], name: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v[name].as_u64().unwrap_or(0)
}

impl TokenEstimator for Field {
    fn estimate(&self, _parts: &Parts, body: &[u8]) -> Estimate {
        let input = field(body, "input");
        Estimate {
            model: Some("claude-sonnet-4-5".into()),
            input_tokens: input,
            raw_input_tokens: input,
            max_tokens: Some(1),
            ..Estimate::default()
        }
    }

    fn estimate_unbuffered(&self, _parts: &Parts, _body_len: Option<u64>) -> Estimate {
        Estimate::default()
    }
}

type Upstream =
    BoxCloneService<Request<ReplayBody<Full<Bytes>>>, Response<Full<Bytes>>, Infallible>;

/// Messages: answers the request's `"actual"` input tokens and records when
/// it was sent. `count_tokens` (which is sent only the request's model and
/// messages): answers the `"actual"` that the messages' one text says,
/// after a fifth of the ledger's round trip.
fn upstream(sent: Arc<Mutex<Vec<Instant>>>) -> Upstream {
    BoxCloneService::new(tower::service_fn(
        move |req: Request<ReplayBody<Full<Bytes>>>| {
            let sent = Arc::clone(&sent);
            async move {
                let counting = req.uri().path().ends_with("/count_tokens");
                let bytes = req
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                let actual: u64 = v["messages"][0]["content"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let body = if counting {
                    // Back within the ledger's round trip.
                    tokio::time::sleep(ROUND_TRIP / 5).await;
                    format!(r#"{{"input_tokens":{actual}}}"#)
                } else {
                    sent.lock().expect("lock").push(Instant::now());
                    format!(
                        r#"{{"type":"message","usage":{{"input_tokens":{actual},"output_tokens":1}}}}"#
                    )
                };
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            }
        },
    ))
}

/// A request estimated at `input` tokens that the server counts as
/// `actual`.
fn request(input: u64, actual: u64) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":1,"input":{input},"messages":[{{"role":"user","content":"{actual}"}}]}}"#
    );
    Request::post("/v1/messages")
        .body(Full::new(Bytes::from(body)))
        .expect("request")
}

/// 60,000 ITPM: 1,000 tokens a second.
fn limits() -> Limits {
    Limits::new().rpm(100_000).itpm(60_000).otpm(1_000_000)
}

fn budget(ledger: Arc<RoundTrip>, sent: Arc<Mutex<Vec<Instant>>>) -> TokenBudget<Upstream> {
    TokenBudgetLayer::builder()
        .limits(limits())
        .estimator(Arc::new(Field))
        .count_tokens(Some(CountTokens::new(1_000)))
        .ledger(ledger)
        .build()
        .layer(upstream(sent))
}

async fn send(svc: &TokenBudget<Upstream>, input: u64, actual: u64) {
    let response = svc
        .clone()
        .oneshot(request(input, actual))
        .await
        .expect("answered");
    let _ = response.into_body().collect().await;
}

async fn input_available(ledger: &RoundTrip) -> f64 {
    let state = ledger.state(KEY, &limits()).await.expect("state");
    state.expect("the key is known")[1].available
}

/// The count (6,000) comes back while the question asked with the estimate
/// (10,000) is in flight, and the ledger admits the estimate: the ledger is
/// then charged the count, not the estimate (4,000 tokens of the key's
/// input-token bucket would otherwise stay taken until they refill).
#[tokio::test(start_paused = true)]
async fn a_count_that_comes_back_during_the_round_trip_is_what_the_ledger_keeps() {
    let ledger = Arc::new(RoundTrip::default());
    let sent = Arc::new(Mutex::new(Vec::new()));
    let svc = budget(Arc::clone(&ledger), Arc::clone(&sent));
    let start = Instant::now();
    send(&svc, 10_000, 6_000).await;
    assert_eq!(sent.lock().expect("lock").len(), 1);
    // The bucket was full until the admission, one round trip in.
    let refilled = (start.elapsed() - ROUND_TRIP).as_secs_f64() * 1_000.0;
    let available = input_available(&ledger).await;
    // 60,000 less the 6,000 the server counted, plus the refill since.
    let expected = 54_000.0 + refilled;
    assert!(
        (available - expected).abs() < 1.0,
        "available {available}, expected {expected} (10,000 charged would leave {})",
        expected - 4_000.0
    );
}

/// With 6,000 tokens left, a request estimated at 10,000 asks; its count
/// (6,000) comes back while the question is in flight, and the ledger
/// answers a 4 s wait for the estimate. The request asks again at once with
/// its count and goes then, not after the wait named for the estimate.
#[tokio::test(start_paused = true)]
async fn a_request_counted_during_the_round_trip_does_not_wait_for_its_estimate() {
    let ledger = Arc::new(RoundTrip::default());
    let sent = Arc::new(Mutex::new(Vec::new()));
    let svc = budget(Arc::clone(&ledger), Arc::clone(&sent));
    let first = Instant::now();
    send(&svc, 54_000, 54_000).await;
    let start = Instant::now();
    send(&svc, 10_000, 6_000).await;
    let sent = sent.lock().expect("lock").clone();
    assert_eq!(sent.len(), 2);
    let waited = sent[1] - start;
    assert!(
        waited < Duration::from_millis(500),
        "sent after {waited:?}: it waited for the estimate's 4 s"
    );
    // And the ledger holds what the server charged: 60,000 less both
    // requests, plus the refill since the first's admission, one round
    // trip in (the bucket was full until then).
    let refilled = (first.elapsed() - ROUND_TRIP).as_secs_f64() * 1_000.0;
    let available = input_available(&ledger).await;
    assert!(
        (available - refilled).abs() < 2.0,
        "available {available}, expected {refilled}"
    );
}

/// Before a key's first answers a budget keeps a larger input headroom
/// (10 % of ITPM) for its own estimates, which nothing has measured yet.
/// On a shared ledger, a counted request, with none of its budget's
/// estimates in flight, keeps the configured share (2 % here): its own
/// input is exact, and its budget's coldness says nothing of the other
/// processes' estimates. With 10,000 tokens left, a request estimated at
/// 8,500 and counted at 8,000 goes once counted, not after the 4 s that
/// 10 % would take.
#[tokio::test(start_paused = true)]
async fn a_counted_request_on_a_shared_ledger_keeps_the_configured_headroom_while_cold() {
    let ledger = Arc::new(RoundTrip::default());
    let sent = Arc::new(Mutex::new(Vec::new()));
    let svc = TokenBudgetLayer::builder()
        .limits(limits())
        .estimator(Arc::new(Field))
        .count_tokens(Some(CountTokens::new(1_000)))
        .input_headroom(0.02)
        .ledger(Arc::clone(&ledger) as Arc<dyn Ledger>)
        .build()
        .layer(upstream(Arc::clone(&sent)));
    // An estimate, admitted at once with the cold 6,000 kept free.
    send(&svc, 50_000, 50_000).await;
    let start = Instant::now();
    send(&svc, 8_500, 8_000).await;
    let sent = sent.lock().expect("lock").clone();
    assert_eq!(sent.len(), 2);
    let waited = sent[1] - start;
    assert!(
        waited < Duration::from_millis(500),
        "sent after {waited:?}: it kept the cold headroom"
    );
}
