//! The fleet's line through the budget layer, without Redis: two budgets
//! (two processes of a fleet) over one `InMemoryLedger`, on tokio's paused
//! clock. A large request waiting in one is not starved by the other's
//! stream of small requests (`Ledger::reserve_in_line`).

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
    BucketState, CostDelta, Costs, InMemoryLedger, Ledger, LedgerFuture, Reservation, REASK_WITHIN,
};
use tower_llm_limits::budget::{Limits, TokenBudgetLayer};
use tower_llm_limits::estimate::{Estimate, TokenEstimator};
use tower_llm_limits::headers::LimitStatus;
use tower_llm_limits::Dimension;

/// The request says what it costs (`"input": N`).
#[derive(Debug)]
struct Exact;

fn input_of(body: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["input"].as_u64().unwrap_or(0)
}

impl TokenEstimator for Exact {
    fn estimate(&self, _parts: &Parts, body: &[u8]) -> Estimate {
        let input = input_of(body);
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

/// When each request reached the upstream, and the input it said.
type Sent = Arc<Mutex<Vec<(Instant, u64)>>>;

/// Answers with the input the request said; records when each was sent.
fn upstream(sent: Sent) -> Upstream {
    answering(sent, Duration::ZERO)
}

/// Answers after 1 s with the input the request says it used (`"used"`),
/// not what it asked for (`"input"`); records when each was sent.
fn overestimated_upstream(sent: Sent) -> Upstream {
    answering(sent, Duration::from_secs(1))
}

/// Records when each request was sent and the input it asked for; answers
/// after `delay` with the input it says it used (`"used"`, else `"input"`).
fn answering(sent: Sent, delay: Duration) -> Upstream {
    BoxCloneService::new(tower::service_fn(
        move |req: Request<ReplayBody<Full<Bytes>>>| {
            let sent = Arc::clone(&sent);
            async move {
                let bytes = req
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let input = input_of(&bytes);
                sent.lock().expect("lock").push((Instant::now(), input));
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                let used = v["used"].as_u64().unwrap_or(input);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let body = format!(
                    r#"{{"type":"message","usage":{{"input_tokens":{used},"output_tokens":1}}}}"#
                );
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            }
        },
    ))
}

fn request(input: u64) -> Request<Full<Bytes>> {
    let body = format!(r#"{{"model":"claude-sonnet-4-5","max_tokens":1,"input":{input}}}"#);
    Request::post("/v1/messages")
        .body(Full::new(Bytes::from(body)))
        .expect("request")
}

/// Two budgets (two processes) over one `InMemoryLedger`, 60,000 ITPM
/// (1,000 tokens a second), each over an upstream made by `upstream` that
/// records into `sent`.
fn two_budgets(
    sent: &Sent,
    upstream: fn(Sent) -> Upstream,
) -> (
    tower_llm_limits::budget::TokenBudget<Upstream>,
    tower_llm_limits::budget::TokenBudget<Upstream>,
) {
    let limits = Limits::new().rpm(100_000).itpm(60_000).otpm(1_000_000);
    let ledger: Arc<dyn Ledger> = Arc::new(InMemoryLedger::new());
    let budget = || {
        TokenBudgetLayer::builder()
            .limits(limits)
            .estimator(Arc::new(Exact))
            .ledger(Arc::clone(&ledger))
            .build()
            .layer(upstream(Arc::clone(sent)))
    };
    (budget(), budget())
}

/// B takes the whole bucket (60,000 tokens); then A sends a 30,000-token
/// request while B sends a 500-token request every half second, 120 of
/// them. Returns when A's request was answered, from its sending; every
/// request has been answered.
async fn large_among_small(
    a: &tower_llm_limits::budget::TokenBudget<Upstream>,
    b: &tower_llm_limits::budget::TokenBudget<Upstream>,
) -> Duration {
    let go = |svc: &tower_llm_limits::budget::TokenBudget<Upstream>, input| {
        let svc = svc.clone();
        async move {
            let response = svc.oneshot(request(input)).await.expect("answered");
            let _ = response.into_body().collect().await;
            Instant::now()
        }
    };
    go(b, 60_000).await;
    let start = Instant::now();
    let large = tokio::spawn(go(a, 30_000));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut small = Vec::new();
    for _ in 0..120 {
        small.push(tokio::spawn(go(b, 500)));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let admitted = large.await.expect("large") - start;
    for s in small {
        s.await.expect("small");
    }
    admitted
}

/// Budget A's 30,000-token request waits for 30 s of refill while budget B
/// sends a 500-token request every half second, as much as the refill:
/// without the fleet's line B's requests would take the refill as it comes
/// and A's would wait until B stops (60 s). With it, B passes A only within
/// the head-of-line bound (2 s of A's refill in all), and A goes at 32 s.
#[tokio::test(start_paused = true)]
async fn a_large_request_is_not_starved_by_another_budget_on_the_same_ledger() {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let (a, b) = two_budgets(&sent, upstream);
    let admitted = large_among_small(&a, &b).await;
    assert!(
        admitted >= Duration::from_secs(30),
        "it needs 30 s of refill: {admitted:?}"
    );
    assert!(
        admitted <= Duration::from_millis(32_100),
        "delayed by at most the 2 s bound: {admitted:?}"
    );
    // B's requests went on before and after it: none was lost.
    let sent = sent.lock().expect("lock").clone();
    assert_eq!(sent.len(), 122);
}

/// A ledger shared by two budgets that keeps no fleet's line (a ledger of
/// the user's that implements only the required operations).
#[derive(Debug)]
struct NoLine(InMemoryLedger);

impl Ledger for NoLine {
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation> {
        self.0.reserve(key, limits, costs)
    }

    fn settle(&self, key: &str, limits: &Limits, delta: CostDelta) -> LedgerFuture<()> {
        self.0.settle(key, limits, delta)
    }

    fn sync(&self, key: &str, limits: &Limits, d: Dimension, s: LimitStatus) -> LedgerFuture<()> {
        self.0.sync(key, limits, d, s)
    }

    fn state(&self, key: &str, limits: &Limits) -> LedgerFuture<Option<[BucketState; 3]>> {
        self.0.state(key, limits)
    }
}

/// Without the fleet's line, two budgets on one ledger still serve every
/// request, each waking a bounded number of times: the large request waits
/// until the other budget's stream leaves room (it may be overtaken: that
/// is what the line prevents), and nobody polls in a loop at one instant.
#[tokio::test(start_paused = true)]
async fn without_the_line_two_budgets_on_one_ledger_serve_everything_without_spinning() {
    let limits = Limits::new().rpm(100_000).itpm(60_000).otpm(1_000_000);
    let ledger: Arc<dyn Ledger> = Arc::new(NoLine(InMemoryLedger::new()));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let budget = || {
        TokenBudgetLayer::builder()
            .limits(limits)
            .estimator(Arc::new(Exact))
            .ledger(Arc::clone(&ledger))
            .build()
    };
    let (layer_a, layer_b) = (budget(), budget());
    let (a, b) = (
        layer_a.layer(upstream(Arc::clone(&sent))),
        layer_b.layer(upstream(Arc::clone(&sent))),
    );
    let admitted = large_among_small(&a, &b).await;
    assert!(admitted >= Duration::from_secs(30), "{admitted:?}");
    assert!(admitted <= Duration::from_secs(95), "{admitted:?}");
    assert_eq!(sent.lock().expect("lock").len(), 122);
    let (snap_a, snap_b) = (layer_a.snapshot(), layer_b.snapshot());
    assert!(
        snap_a.wakeups + snap_b.wakeups < 2_000,
        "wakeups {} and {}",
        snap_a.wakeups,
        snap_b.wakeups
    );
}

/// Budget A's head waits for its costs and its headroom; budget B's head,
/// behind it in the fleet's line, does not fit beside it. Nothing in A
/// wakes B when A's head goes, and A's head leaves its headroom in the
/// bucket: B asks again 20 ms after A's head was due
/// (`LINE_RECHECK`), and goes once the refill covers its own costs from
/// what A left, not once the bucket holds both (6 s later).
#[tokio::test(start_paused = true)]
async fn a_head_behind_another_budgets_head_asks_again_when_that_head_goes() {
    // 60,000 ITPM: 1,000 tokens a second; 10 % headroom: 6,000 tokens.
    let limits = Limits::new().rpm(100_000).itpm(60_000).otpm(1_000_000);
    let ledger: Arc<dyn Ledger> = Arc::new(InMemoryLedger::new());
    let sent = Arc::new(Mutex::new(Vec::new()));
    let budget = || {
        TokenBudgetLayer::builder()
            .limits(limits)
            .estimator(Arc::new(Exact))
            .input_headroom(0.1)
            .ledger(Arc::clone(&ledger))
            .build()
            .layer(upstream(Arc::clone(&sent)))
    };
    let (a, b) = (budget(), budget());
    let go = |svc: &tower_llm_limits::budget::TokenBudget<Upstream>, input| {
        let svc = svc.clone();
        async move {
            let response = svc.oneshot(request(input)).await.expect("answered");
            let _ = response.into_body().collect().await;
            Instant::now()
        }
    };
    // B empties the bucket (the headroom kept: 54,000 of 60,000).
    go(&b, 54_000).await;
    let start = Instant::now();
    let first = tokio::spawn(go(&a, 20_000));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let second = tokio::spawn(go(&b, 20_000));
    let (first, second) = (
        first.await.expect("a") - start,
        second.await.expect("b") - start,
    );
    // A's head needs 26,000 with its headroom, from 6,000: 20 s.
    assert!(
        first >= Duration::from_secs(20) && first <= Duration::from_millis(20_010),
        "{first:?}"
    );
    // B's then needs 26,000 from the 6,000 A left: 20 s more, not the
    // 26 s it takes for the bucket to hold both.
    assert!(
        second >= Duration::from_secs(40) && second <= Duration::from_millis(40_100),
        "{second:?}"
    );
    assert_eq!(sent.lock().expect("lock").len(), 3);
}

/// Budget A's request reserves 50,000 input tokens and uses 5,000; budget
/// B's request of 30,000, arriving while A's is in flight, is told to wait
/// 20 s for the refill. A's settlement gives 45,000 back 1 s later, which
/// wakes nothing in B: B's head asks again within
/// `ledger::REASK_WITHIN` (2 s) of its first ask and goes then, not at
/// 20 s.
#[tokio::test(start_paused = true)]
async fn a_head_learns_of_another_budgets_settlement_within_the_reask_bound() {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let (a, b) = two_budgets(&sent, overestimated_upstream);
    let go = |svc: &tower_llm_limits::budget::TokenBudget<Upstream>, input: u64, used: u64| {
        let svc = svc.clone();
        async move {
            let body = format!(
                r#"{{"model":"claude-sonnet-4-5","max_tokens":1,"input":{input},"used":{used}}}"#
            );
            let req = Request::post("/v1/messages")
                .body(Full::new(Bytes::from(body)))
                .expect("request");
            let response = svc.oneshot(req).await.expect("answered");
            let _ = response.into_body().collect().await;
        }
    };
    let start = Instant::now();
    let first = tokio::spawn(go(&a, 50_000, 5_000));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let second = tokio::spawn(go(&b, 30_000, 30_000));
    first.await.expect("a");
    second.await.expect("b");
    let sent = sent.lock().expect("lock").clone();
    let b_sent = sent
        .iter()
        .find(|(_, input)| *input == 30_000)
        .map(|(at, _)| *at - start)
        .expect("B sent");
    assert!(
        b_sent >= Duration::from_secs(1) && b_sent <= REASK_WITHIN + Duration::from_millis(100),
        "B went at its first ask again after A's settlement (1 s), not at 20 s: {b_sent:?}"
    );
}
