//! A fleet's shared prompt-cache view, through the budget layer and a
//! ledger that keeps one (`Ledger::prompt_cache`), without Redis: a request
//! that waits reads a prefix the fleet says is cached, and the budget tells
//! the ledger the prefixes its responses wrote; a request holds for another
//! process's writer of its prefix.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Layer, ServiceExt};
use tower_llm_limits::body::ReplayBody;
use tower_llm_limits::budget::ledger::{
    BucketState, CostDelta, Costs, InMemoryLedger, Ledger, LedgerFuture, LinePlace, PrefixIntent,
    Reservation, PREFIX_WRITING_WAIT,
};
use tower_llm_limits::budget::{Limits, TokenBudgetLayer};
use tower_llm_limits::estimate::SharedPromptCache;
use tower_llm_limits::headers::LimitStatus;
use tower_llm_limits::Dimension;

/// What the other processes of the fleet know: nothing, then (once
/// `cached` is set) that every prefix is cached.
#[derive(Debug, Default)]
struct Fleet {
    cached: AtomicBool,
}

impl SharedPromptCache for Fleet {
    fn hash_key(&self) -> [u8; 16] {
        [9; 16]
    }

    fn is_cached(&self, _hash: u64) -> bool {
        self.cached.load(Ordering::SeqCst)
    }
}

/// An in-memory ledger that keeps a fleet's view and records what it is
/// told.
#[derive(Debug)]
struct Shared {
    inner: InMemoryLedger,
    fleet: Arc<Fleet>,
    told: Mutex<Vec<(String, Vec<u64>)>>,
}

impl Ledger for Shared {
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation> {
        self.inner.reserve(key, limits, costs)
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

    fn prompt_cache(&self) -> Option<Arc<dyn SharedPromptCache>> {
        Some(Arc::clone(&self.fleet) as Arc<dyn SharedPromptCache>)
    }

    fn prefixes_cached(&self, key: &str, hashes: &[u64]) {
        self.told
            .lock()
            .expect("lock")
            .push((key.to_owned(), hashes.to_vec()));
    }
}

type Upstream =
    BoxCloneService<Request<ReplayBody<Full<Bytes>>>, Response<Full<Bytes>>, Infallible>;

/// Answers every request with this usage.
fn upstream(input: u64, cache_read: u64, cache_write: u64) -> Upstream {
    BoxCloneService::new(tower::service_fn(move |_req| async move {
        let body = format!(
            r#"{{"type":"message","usage":{{"input_tokens":{input},"cache_read_input_tokens":{cache_read},"cache_creation_input_tokens":{cache_write},"output_tokens":10}}}}"#
        );
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    }))
}

/// A request of about 3,000 tokens of system prompt (with a breakpoint, if
/// `breakpoint`) and a question.
fn message(breakpoint: bool) -> Request<Full<Bytes>> {
    let system = "Answer as the reference manual of the tower-llm-limits crate would. ".repeat(230);
    let mut block = serde_json::json!({"type": "text", "text": system});
    if breakpoint {
        block["cache_control"] = serde_json::json!({"type": "ephemeral"});
    }
    let body = serde_json::json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "system": [block],
        "messages": [{"role": "user", "content": "What is a ledger?"}],
    });
    Request::post("/v1/messages")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

/// A budget of 5,000 input tokens a minute over the fleet's ledger, and the
/// input tokens each settled request had reserved.
fn budget(ledger: Arc<Shared>) -> (TokenBudgetLayer, Arc<Mutex<Vec<u64>>>) {
    let reserved = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&reserved);
    let layer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1_000).itpm(5_000).otpm(100_000))
        .ledger(ledger)
        .on_settle(move |e| seen.lock().expect("lock").push(e.reserved_input_tokens))
        .build();
    (layer, reserved)
}

fn fleet_ledger() -> Arc<Shared> {
    Arc::new(Shared {
        inner: InMemoryLedger::new(),
        fleet: Arc::new(Fleet::default()),
        told: Mutex::new(Vec::new()),
    })
}

/// The input tokens the prefixed request reserved, and how long it waited:
/// a first request without a breakpoint takes the input bucket, the second
/// (with one) waits; one second into its wait, the fleet learns (if
/// `learns`) that its prefix is cached.
async fn waiting_request(learns: bool) -> (u64, Duration) {
    let ledger = fleet_ledger();
    let (layer, reserved) = budget(Arc::clone(&ledger));
    let first = layer
        .layer(upstream(4_000, 0, 0))
        .oneshot(message(false))
        .await
        .expect("first");
    let _ = first.into_body().collect().await.expect("body");
    let start = Instant::now();
    let second = tokio::spawn(layer.layer(upstream(20, 3_000, 0)).oneshot(message(true)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    ledger.fleet.cached.store(learns, Ordering::SeqCst);
    let response = second.await.expect("task").expect("second");
    let waited = start.elapsed();
    let _ = response.into_body().collect().await.expect("body");
    let reserved = reserved.lock().expect("lock").clone();
    assert_eq!(reserved.len(), 2, "{reserved:?}");
    (reserved[1], waited)
}

/// A request estimated before another process made its prefix warm, and
/// waiting for the budget, is charged as reading that prefix once the
/// fleet's view says it is cached: from its next ask on, it reserves what
/// follows the prefix, and leaves the rest of the bucket to the requests
/// after it. (It asks again when its wait is over: a change of the fleet's
/// view does not wake it.)
#[tokio::test(start_paused = true)]
async fn a_waiting_request_reads_a_prefix_the_fleet_cached() {
    let (read, read_wait) = waiting_request(true).await;
    let (full, full_wait) = waiting_request(false).await;
    assert!(full > 3_000, "charged the whole prompt: {full}");
    assert!(read * 10 < full, "charged as a read: {read} against {full}");
    assert!(
        read_wait <= full_wait,
        "{read_wait:?} against {full_wait:?}"
    );
}

/// The budget tells the ledger the prefixes a response confirmed cached,
/// under the request's budget key, and nothing for a response that reports
/// no cache use.
#[tokio::test(start_paused = true)]
async fn responses_tell_the_ledger_the_prefixes_they_wrote() {
    let ledger = fleet_ledger();
    let (layer, _) = budget(Arc::clone(&ledger));
    for (usage, breakpoint) in [
        (upstream(20, 0, 0), true),
        (upstream(20, 0, 3_000), false),
        (upstream(20, 0, 3_000), true),
    ] {
        let response = layer
            .layer(usage)
            .oneshot(message(breakpoint))
            .await
            .expect("sent");
        let _ = response.into_body().collect().await.expect("body");
    }
    let told = ledger.told.lock().expect("lock").clone();
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].0, "sonnet-4");
    assert_eq!(told[0].1.len(), 1, "one breakpoint: {told:?}");
}

// ---------------------------------------------------------------------------
// Prefixes being written by another process.

/// Budgets sharing one in-memory ledger and a fleet's view that keeps, as
/// `RedisLedger` does with `share_prompt_cache`, the prefixes confirmed
/// cached and the ones being written (by which budget), through the
/// `Ledger` methods the budget calls.
#[derive(Debug, Default)]
struct Markers {
    ledger: InMemoryLedger,
    cached: Mutex<HashSet<u64>>,
    writing: Mutex<HashMap<u64, Vec<usize>>>,
    held: Mutex<HashSet<(u64, usize)>>,
    watchers: Mutex<Vec<Waker>>,
}

#[derive(Debug)]
struct MarkersCache(Arc<Markers>);

impl SharedPromptCache for MarkersCache {
    fn hash_key(&self) -> [u8; 16] {
        [7; 16]
    }

    fn is_cached(&self, hash: u64) -> bool {
        self.0.cached.lock().expect("lock").contains(&hash)
    }
}

/// One budget's handle (`id`); with `holds` false it keeps no marker of
/// prefixes being written (the view before them).
#[derive(Debug)]
struct View {
    markers: Arc<Markers>,
    id: usize,
    holds: bool,
}

impl View {
    fn written_by_another(&self, hash: u64) -> bool {
        let writing = self.markers.writing.lock().expect("lock");
        writing
            .get(&hash)
            .is_some_and(|by| by.iter().any(|w| *w != self.id))
    }
}

impl Ledger for View {
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation> {
        self.markers.ledger.reserve(key, limits, costs)
    }

    fn reserve_in_line(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
        place: LinePlace,
    ) -> Option<LedgerFuture<Reservation>> {
        self.markers
            .ledger
            .reserve_in_line(key, limits, costs, headroom, place)
    }

    fn reserve_in_line_with_prefixes(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
        place: LinePlace,
        prefixes: PrefixIntent<'_>,
    ) -> Option<LedgerFuture<Reservation>> {
        if !self.holds {
            return self.reserve_in_line(key, limits, costs, headroom, place);
        }
        let busy = prefixes
            .pending
            .iter()
            .copied()
            .find(|h| self.written_by_another(*h));
        let answer = self.markers.ledger.reserve_in_line_or_hold_at(
            key,
            limits,
            costs,
            headroom,
            place,
            busy.map(|_| prefixes.hold),
            Instant::now(),
        );
        match (answer, busy) {
            (Reservation::Wait { retry_in, .. }, Some(h)) if retry_in == PREFIX_WRITING_WAIT => {
                self.markers.held.lock().expect("lock").insert((h, self.id));
            }
            (Reservation::Admitted, _) => {
                let mut writing = self.markers.writing.lock().expect("lock");
                for h in prefixes.writes {
                    writing.entry(*h).or_default().push(self.id);
                }
            }
            _ => {}
        }
        Some(LedgerFuture::ready(Ok(answer)))
    }

    fn prefix_writing(&self, hash: u64, waker: &Waker) -> bool {
        let held = self
            .markers
            .held
            .lock()
            .expect("lock")
            .contains(&(hash, self.id));
        if !held || !self.written_by_another(hash) {
            return false;
        }
        self.markers
            .watchers
            .lock()
            .expect("lock")
            .push(waker.clone());
        true
    }

    fn prefixes_written(&self, hashes: &[u64]) {
        {
            let mut writing = self.markers.writing.lock().expect("lock");
            for h in hashes {
                if let Some(by) = writing.get_mut(h) {
                    by.retain(|w| *w != self.id);
                }
            }
        }
        let watchers = std::mem::take(&mut *self.markers.watchers.lock().expect("lock"));
        watchers.into_iter().for_each(Waker::wake);
    }

    fn settle(&self, key: &str, limits: &Limits, delta: CostDelta) -> LedgerFuture<()> {
        self.markers.ledger.settle(key, limits, delta)
    }

    fn sync(&self, key: &str, limits: &Limits, d: Dimension, s: LimitStatus) -> LedgerFuture<()> {
        self.markers.ledger.sync(key, limits, d, s)
    }

    fn state(&self, key: &str, limits: &Limits) -> LedgerFuture<Option<[BucketState; 3]>> {
        self.markers.ledger.state(key, limits)
    }

    fn prompt_cache(&self) -> Option<Arc<dyn SharedPromptCache>> {
        Some(Arc::new(MarkersCache(Arc::clone(&self.markers))) as Arc<dyn SharedPromptCache>)
    }

    fn prefixes_cached(&self, _key: &str, hashes: &[u64]) {
        self.markers
            .cached
            .lock()
            .expect("lock")
            .extend(hashes.iter().copied());
    }
}

/// Answers after `delay` with this usage, and records when it was called.
fn timed_upstream(
    delay: Duration,
    cache_read: u64,
    cache_write: u64,
    called: Arc<Mutex<Vec<Instant>>>,
) -> Upstream {
    BoxCloneService::new(tower::service_fn(move |_req| {
        called.lock().expect("lock").push(Instant::now());
        async move {
            tokio::time::sleep(delay).await;
            let body = format!(
                r#"{{"type":"message","usage":{{"input_tokens":20,"cache_read_input_tokens":{cache_read},"cache_creation_input_tokens":{cache_write},"output_tokens":10}}}}"#
            );
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
        }
    }))
}

/// Budget A sends a request writing a prefix, whose answer comes after
/// 2 s; budget B (another process), 0.1 s later, the same prompt. With
/// the markers, B holds for A's answer and goes charged as reading the
/// prefix; without them, it goes at once and pays the whole prompt.
/// Returns B's reserved input and when B's request was sent.
async fn second_writer(holds: bool) -> (u64, Duration) {
    let markers = Arc::new(Markers::default());
    let start = Instant::now();
    let budget = |id| {
        let reserved = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&reserved);
        let layer = TokenBudgetLayer::builder()
            .limits(Limits::new().rpm(1_000).itpm(50_000).otpm(100_000))
            .ledger(Arc::new(View {
                markers: Arc::clone(&markers),
                id,
                holds,
            }))
            .cache_hold(Duration::from_secs(5))
            .on_settle(move |e| seen.lock().expect("lock").push(e.reserved_input_tokens))
            .build();
        (layer, reserved)
    };
    let (a, _) = budget(1);
    let (b, reserved_b) = budget(2);
    let (called_a, called_b) = (Arc::default(), Arc::default());
    let writer = a.layer(timed_upstream(Duration::from_secs(2), 0, 3_000, called_a));
    let first = tokio::spawn(async move {
        let response = writer.oneshot(message(true)).await.expect("a");
        response.into_body().collect().await.expect("body")
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let upstream_b = timed_upstream(Duration::ZERO, 3_000, 0, Arc::clone(&called_b));
    let second = b.layer(upstream_b).oneshot(message(true)).await.expect("b");
    let _ = second.into_body().collect().await.expect("body");
    let _ = first.await.expect("task");
    let sent = called_b.lock().expect("lock")[0] - start;
    let reserved = reserved_b.lock().expect("lock").clone();
    assert_eq!(reserved.len(), 1, "{reserved:?}");
    (reserved[0], sent)
}

/// A request of one process whose prefix another process is writing does
/// not pay for it a second time: it holds for the writer's answer (the
/// server makes the prefix readable only then) and is charged what
/// follows the prefix, where before the markers it was sent at once,
/// charged (and, at the server, written) in full.
#[tokio::test(start_paused = true)]
async fn a_request_holds_for_another_processes_writer_of_its_prefix() {
    let (held, held_sent) = second_writer(true).await;
    let (full, full_sent) = second_writer(false).await;
    assert!(full > 3_000, "charged the whole prompt: {full}");
    assert!(full_sent < Duration::from_millis(200), "{full_sent:?}");
    assert!(held * 10 < full, "charged as a read: {held} against {full}");
    assert!(
        held_sent >= Duration::from_secs(2) && held_sent < Duration::from_millis(2_200),
        "sent once the writer's answer began: {held_sent:?}"
    );
}
