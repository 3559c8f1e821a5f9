//! The learned output shared by a fleet: budgets over one ledger that keeps
//! the key's output samples (`Ledger::output_learned`,
//! `Ledger::outputs_learned`, as `RedisLedger` does) learn what each
//! other's answers produced, so a process that has seen few answers itself
//! reserves what the fleet's answers say, not `max_tokens`.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Layer, ServiceExt};
use tower_llm_limits::body::ReplayBody;
use tower_llm_limits::budget::ledger::{
    BucketState, CostDelta, Costs, InMemoryLedger, Ledger, LedgerFuture, OutputSample, Reservation,
};
use tower_llm_limits::budget::{Limits, OutputMode, TokenBudgetLayer};
use tower_llm_limits::headers::LimitStatus;
use tower_llm_limits::Dimension;

/// One ledger for every budget, and the outputs each budget told it.
#[derive(Debug, Default)]
struct Fleet {
    inner: InMemoryLedger,
    outputs: Mutex<Vec<(usize, OutputSample)>>,
}

/// A budget's handle on the [`Fleet`]; `share` false: a ledger that keeps
/// no outputs (the trait's defaults).
#[derive(Debug)]
struct View {
    fleet: Arc<Fleet>,
    id: usize,
    share: bool,
}

impl Ledger for View {
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation> {
        self.fleet.inner.reserve(key, limits, costs)
    }

    fn settle(&self, key: &str, limits: &Limits, delta: CostDelta) -> LedgerFuture<()> {
        self.fleet.inner.settle(key, limits, delta)
    }

    fn sync(&self, key: &str, limits: &Limits, d: Dimension, s: LimitStatus) -> LedgerFuture<()> {
        self.fleet.inner.sync(key, limits, d, s)
    }

    fn state(&self, key: &str, limits: &Limits) -> LedgerFuture<Option<[BucketState; 3]>> {
        self.fleet.inner.state(key, limits)
    }

    fn output_learned(&self, _key: &str, sample: OutputSample) {
        if self.share {
            let mut outputs = self.fleet.outputs.lock().expect("lock");
            outputs.push((self.id, sample));
        }
    }

    fn outputs_learned(&self, _key: &str, after: u64, into: &mut Vec<OutputSample>) -> u64 {
        if !self.share {
            return after;
        }
        let outputs = self.fleet.outputs.lock().expect("lock");
        let from = usize::try_from(after).expect("position").min(outputs.len());
        into.extend(
            outputs[from..]
                .iter()
                .filter(|(id, _)| *id != self.id)
                .map(|(_, s)| *s),
        );
        outputs.len() as u64
    }
}

type Upstream =
    BoxCloneService<Request<ReplayBody<Full<Bytes>>>, Response<Full<Bytes>>, Infallible>;

/// Answers every request with 100 output tokens, after 2 s.
fn upstream() -> Upstream {
    BoxCloneService::new(tower::service_fn(|_req| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let body = r#"{"type":"message","usage":{"input_tokens":20,"output_tokens":100}}"#;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    }))
}

fn message() -> Request<Full<Bytes>> {
    let body = serde_json::json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": "What is a ledger?"}],
    });
    Request::post("/v1/messages")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

/// A budget over `ledger` (8,000 output tokens a minute, output charged as
/// produced), and the output tokens each settled request had reserved.
fn budget(ledger: View) -> (TokenBudgetLayer, Arc<Mutex<Vec<u64>>>) {
    let reserved = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&reserved);
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1_000).itpm(100_000).otpm(8_000))
        .output_mode(OutputMode::Realtime)
        .ledger(Arc::new(ledger))
        .on_settle(move |e| seen.lock().expect("lock").push(e.reserved_output_tokens))
        .build();
    (layer, reserved)
}

async fn send(layer: &TokenBudgetLayer) {
    let response = layer
        .layer(upstream())
        .oneshot(message())
        .await
        .expect("sent");
    let _ = response.into_body().collect().await.expect("body");
}

/// Process 0 sends 30 requests one after another; then process 1, which has
/// seen no answer itself, sends three at once. Returns what process 1's
/// requests reserved, and how long the last of them took.
async fn joining_process(share: bool) -> (Vec<u64>, Duration) {
    let fleet = Arc::new(Fleet::default());
    let view = |id| View {
        fleet: Arc::clone(&fleet),
        id,
        share,
    };
    let (warm, warm_reserved) = budget(view(0));
    for _ in 0..30 {
        send(&warm).await;
    }
    // Process 0 learned its answers: it reserves about 100 tokens now.
    let last = *warm_reserved.lock().expect("lock").last().expect("settled");
    assert!(last <= 100, "process 0 learned its outputs: {last}");
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (cold, reserved) = budget(view(1));
    let start = Instant::now();
    let sends: Vec<_> = (0..3)
        .map(|_| {
            let cold = cold.clone();
            tokio::spawn(async move { send(&cold).await })
        })
        .collect();
    for s in sends {
        s.await.expect("task");
    }
    let reserved = reserved.lock().expect("lock").clone();
    (reserved, start.elapsed())
}

/// A process that joins a warm fleet reserves the output the fleet's
/// answers taught (at most the 90th percentile of 100-token answers), not
/// `max_tokens`: its three requests of `max_tokens` 4,096 go at once under
/// 8,000 output tokens a minute, where without the fleet's samples they
/// reserve 4,096 each and the third waits for the first two to settle.
#[tokio::test(start_paused = true)]
async fn a_process_joining_a_warm_fleet_reserves_the_learned_output() {
    let (shared, shared_took) = joining_process(true).await;
    assert_eq!(shared.len(), 3);
    assert!(shared.iter().all(|r| *r <= 100), "{shared:?}");
    assert!(
        shared_took < Duration::from_secs(3),
        "all three went at once: {shared_took:?}"
    );

    let (alone, alone_took) = joining_process(false).await;
    assert!(alone.iter().all(|r| *r == 4_096), "{alone:?}");
    assert!(
        alone_took > Duration::from_secs(3),
        "the third waited: {alone_took:?}"
    );
}
