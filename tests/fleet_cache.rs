//! A fleet's shared prompt-cache view, through the budget layer and a
//! ledger that keeps one (`Ledger::prompt_cache`), without Redis: a request
//! that waits reads a prefix the fleet says is cached, and the budget tells
//! the ledger the prefixes its responses wrote; a request holds for another
//! process's writer of its prefix.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    Reservation, ServedSize, PREFIX_WRITING_WAIT, WRITER_GRACE,
};
use tower_llm_limits::budget::{Limits, TokenBudget, TokenBudgetLayer};
use tower_llm_limits::estimate::SharedPromptCache;
use tower_llm_limits::headers::LimitStatus;
use tower_llm_limits::Dimension;

/// What the other processes of the fleet know: nothing, then (once
/// `cached` is set) that every prefix is cached, and (once `served` is not
/// zero) its size as the server counted it.
#[derive(Debug, Default)]
struct Fleet {
    cached: AtomicBool,
    served: AtomicU64,
}

impl SharedPromptCache for Fleet {
    fn hash_key(&self) -> [u8; 16] {
        [9; 16]
    }

    fn is_cached(&self, _hash: u64) -> bool {
        self.cached.load(Ordering::SeqCst)
    }

    fn served(&self, _hash: u64) -> Option<u64> {
        Some(self.served.load(Ordering::SeqCst)).filter(|s| *s > 0)
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
async fn waiting_request(learns: bool, served: u64) -> (u64, Duration) {
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
    ledger.fleet.served.store(served, Ordering::SeqCst);
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
/// follows the prefix (its estimate less the prefix's size as the server
/// counted it, which the fleet told; without a size, with half the prefix
/// as uncached input), and leaves the rest of the bucket to the requests
/// after it. (It asks again when its wait is over: a change of the fleet's
/// view does not wake it.)
#[tokio::test(start_paused = true)]
async fn a_waiting_request_reads_a_prefix_the_fleet_cached() {
    let (read, read_wait) = waiting_request(true, 3_000).await;
    let (no_size, _) = waiting_request(true, 0).await;
    let (full, full_wait) = waiting_request(false, 0).await;
    assert!(full > 3_000, "charged the whole prompt: {full}");
    assert!(
        read + 3_000 <= full,
        "charged as a read of the size the fleet told: {read} against {full}"
    );
    // Without a size told, half the prefix is charged as uncached input.
    assert!(
        read < no_size && no_size < full,
        "charged with a margin: {no_size} between {read} and {full}"
    );
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
    /// The prefixes' sizes as the server counted them, as the responses
    /// that confirmed them said.
    served: Mutex<HashMap<u64, u64>>,
    writing: Mutex<HashMap<u64, Vec<usize>>>,
    held: Mutex<HashSet<(u64, usize)>>,
    watchers: Mutex<Vec<Waker>>,
    /// Prefixes queued requests will write: (budget, request, tokens of
    /// its longest write, until when).
    queued: Mutex<HashMap<u64, Vec<QueuedBy>>>,
    /// Per budget, when its head of the line asks again (its last wait's
    /// end), as `RedisLedger` remembers it.
    head_asks: Mutex<HashMap<usize, Instant>>,
}

/// How long past its request's next ask a queued marker lives (the
/// `InMemoryLedger`'s grace, as `RedisLedger`'s `claim_grace`).
const GRACE: Duration = Duration::from_secs(1);

/// A queued request's marker: its budget, its id, the tokens of its
/// longest write, until when.
type QueuedBy = (usize, u64, u64, Instant);

impl Markers {
    /// Whether a queued request of a budget other than `id` writes `hash`,
    /// its longest write below `below` tokens.
    fn queued_by_another(&self, hash: u64, id: usize, below: u64) -> bool {
        let now = Instant::now();
        let queued = self.queued.lock().expect("lock");
        queued.get(&hash).is_some_and(|by| {
            by.iter()
                .any(|&(b, _, tokens, until)| b != id && tokens < below && until > now)
        })
    }

    /// Whether a queued request of a budget other than `id` writes `hash`
    /// and no admitted request does.
    fn only_queued(&self, hash: u64, id: usize) -> bool {
        let written = self
            .writing
            .lock()
            .expect("lock")
            .get(&hash)
            .is_some_and(|by| by.iter().any(|w| *w != id));
        !written && self.queued_by_another(hash, id, u64::MAX)
    }

    /// When the marker of a queued request of a budget other than `id`
    /// that writes `hash` expires, the latest of them.
    fn queued_until(&self, hash: u64, id: usize) -> Option<Instant> {
        let queued = self.queued.lock().expect("lock");
        queued
            .get(&hash)?
            .iter()
            .filter(|&&(b, ..)| b != id)
            .map(|&(.., until)| until)
            .filter(|until| *until > Instant::now())
            .max()
    }

    /// A budget's head was answered a wait of `retry_in`: its other queued
    /// requests' markers live at least until it asks again, plus the
    /// grace (as `RedisLedger`'s script renews them).
    fn head_waits(&self, id: usize, request: u64, retry_in: Duration) {
        let next = Instant::now() + retry_in;
        self.head_asks.lock().expect("lock").insert(id, next);
        let mut queued = self.queued.lock().expect("lock");
        for list in queued.values_mut() {
            for entry in list.iter_mut() {
                if entry.0 == id && entry.1 != request {
                    entry.3 = entry.3.max(next + GRACE);
                }
            }
        }
    }

    /// Whether any budget writes `hash`, will write it from its queue, or
    /// confirmed it cached.
    fn marked(&self, hash: u64) -> bool {
        let now = Instant::now();
        let written = self
            .writing
            .lock()
            .expect("lock")
            .get(&hash)
            .is_some_and(|by| !by.is_empty());
        let queued = self
            .queued
            .lock()
            .expect("lock")
            .get(&hash)
            .is_some_and(|by| by.iter().any(|&(.., until)| until > now));
        written || queued || self.cached.lock().expect("lock").contains(&hash)
    }

    fn queue(&self, id: usize, request: u64, writes: &[u64], tokens: u64, for_: Duration) {
        let now = Instant::now();
        let head = self.head_asks.lock().expect("lock").get(&id).copied();
        let until = (now + for_).max(head.map_or(now, |at| at + GRACE));
        let mut queued = self.queued.lock().expect("lock");
        for h in writes {
            let list = queued.entry(*h).or_default();
            list.retain(|&(b, r, _, _)| (b, r) != (id, request));
            list.push((id, request, tokens, until));
        }
    }

    /// Clears a request's queued markers; wakes the held requests if
    /// `wake`.
    fn dequeue(&self, id: usize, request: u64, wake: bool) {
        let mut queued = self.queued.lock().expect("lock");
        for list in queued.values_mut() {
            list.retain(|&(b, r, _, _)| (b, r) != (id, request));
        }
        queued.retain(|_, list| !list.is_empty());
        drop(queued);
        if wake {
            let watchers = std::mem::take(&mut *self.watchers.lock().expect("lock"));
            watchers.into_iter().for_each(Waker::wake);
        }
    }
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

    fn served(&self, hash: u64) -> Option<u64> {
        self.0.served.lock().expect("lock").get(&hash).copied()
    }
}

/// One budget's handle (`id`); with `holds` false it keeps no marker of
/// prefixes being written (the view before them); with `queues` false no
/// marker of prefixes queued requests will write (the view before them);
/// with `round_trip`, reservations answer after a round trip as
/// `RedisLedger`'s do (so no request passes a waiting head locally); with
/// `graces`, a writer's first ask waits the writer grace while a shorter
/// prefix of it has no marker, as `RedisLedger`'s script does.
#[derive(Debug)]
struct View {
    markers: Arc<Markers>,
    id: usize,
    holds: bool,
    queues: bool,
    round_trip: bool,
    graces: bool,
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
        let busy = prefixes.pending.iter().copied().find(|h| {
            self.written_by_another(*h)
                || (self.queues
                    && !prefixes.writes.contains(h)
                    && self.markers.queued_by_another(*h, self.id, prefixes.tokens))
        });
        let graced = self.graces
            && busy.is_none()
            && prefixes.shorter.iter().any(|h| !self.markers.marked(*h));
        let answer = match graced {
            // Kept from going for the grace, its place and costs kept.
            true => self.markers.ledger.reserve_in_line_or_grace_at(
                key,
                limits,
                costs,
                headroom,
                place,
                WRITER_GRACE,
                Instant::now(),
            ),
            false => self.markers.ledger.reserve_in_line_or_hold_at(
                key,
                limits,
                costs,
                headroom,
                place,
                busy.map(|_| prefixes.hold),
                Instant::now(),
            ),
        };
        match (answer, busy) {
            (Reservation::Wait { retry_in, .. }, Some(h)) if retry_in == PREFIX_WRITING_WAIT => {
                self.markers.held.lock().expect("lock").insert((h, self.id));
            }
            (Reservation::Admitted, _) => {
                let mut writing = self.markers.writing.lock().expect("lock");
                for h in prefixes.writes {
                    writing.entry(*h).or_default().push(self.id);
                }
                drop(writing);
                self.markers.dequeue(self.id, place.request, false);
            }
            _ => {}
        }
        if let (true, Reservation::Wait { retry_in, .. }) = (self.queues, answer) {
            if place.head {
                self.markers.head_waits(self.id, place.request, retry_in);
            }
            if !prefixes.queued_for.is_zero() {
                self.markers.queue(
                    self.id,
                    place.request,
                    prefixes.writes,
                    prefixes.tokens,
                    prefixes.queued_for.max(retry_in + GRACE),
                );
            }
        }
        Some(match self.round_trip {
            true => LedgerFuture::new(async move { Ok(answer) }),
            false => LedgerFuture::ready(Ok(answer)),
        })
    }

    fn prefixes_queued(
        &self,
        _key: &str,
        request: u64,
        writes: &[u64],
        tokens: u64,
        queued_for: Duration,
    ) {
        if self.queues {
            self.markers
                .queue(self.id, request, writes, tokens, queued_for);
        }
    }

    fn prefixes_dequeued(&self, _key: &str, request: u64) {
        self.markers.dequeue(self.id, request, true);
    }

    fn prefix_writing(&self, hash: u64, waker: &Waker) -> bool {
        let held = self
            .markers
            .held
            .lock()
            .expect("lock")
            .contains(&(hash, self.id));
        if !held
            || !(self.written_by_another(hash)
                || self.markers.queued_by_another(hash, self.id, u64::MAX))
        {
            return false;
        }
        self.markers
            .watchers
            .lock()
            .expect("lock")
            .push(waker.clone());
        let queued = self.markers.only_queued(hash, self.id);
        if let Some(until) = self.markers.queued_until(hash, self.id).filter(|_| queued) {
            // As `RedisLedger`'s watch: the held request learns when the
            // queued marker expired.
            let waker = waker.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(until).await;
                waker.wake();
            });
        }
        true
    }

    fn prefix_queued(&self, hash: u64) -> bool {
        self.markers.only_queued(hash, self.id)
    }

    fn writer_grace(&self) -> Duration {
        match self.graces {
            true => WRITER_GRACE,
            false => Duration::ZERO,
        }
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

    fn prefixes_cached_sized(&self, key: &str, hashes: &[u64], served: Option<ServedSize>) {
        if let Some(size) = served {
            let mut sizes = self.markers.served.lock().expect("lock");
            sizes.insert(size.hash, size.tokens);
        }
        self.prefixes_cached(key, hashes);
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
                queues: true,
                round_trip: false,
                graces: false,
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
    assert!(
        held + 3_000 <= full,
        "charged as a read of the size the writer told: {held} against {full}"
    );
    assert!(
        held_sent >= Duration::from_secs(2) && held_sent < Duration::from_millis(2_200),
        "sent once the writer's answer began: {held_sent:?}"
    );
}

// ---------------------------------------------------------------------------
// A conversation's turns in two processes: the shorter prefix first.

/// A conversation's turn 1 (its first question, a breakpoint at its end)
/// or turn 2 (the same, the answer, a second question with the breakpoint
/// at its end), after a system prompt of about 3,000 tokens: turn 1's
/// cache prefix is a prefix of turn 2's.
fn turn(n: usize) -> Request<Full<Bytes>> {
    turn_of(
        "Answer as the reference manual of the tower-llm-limits crate would. ",
        n,
    )
}

/// [`turn`] of a conversation whose system prompt is `sentence` repeated
/// (another sentence: another conversation, sharing no prefix with it).
fn turn_of(sentence: &str, n: usize) -> Request<Full<Bytes>> {
    let system = sentence.repeat(230);
    let question = |text: &str, breakpoint: bool| {
        let mut block = serde_json::json!({"type": "text", "text": text});
        if breakpoint {
            block["cache_control"] = serde_json::json!({"type": "ephemeral"});
        }
        serde_json::json!({"role": "user", "content": [block]})
    };
    let messages = match n {
        1 => vec![question("What is a ledger?", true)],
        2 => vec![
            question("What is a ledger?", false),
            serde_json::json!({"role": "assistant", "content": "The budget's record of what was reserved."}),
            question("And a reservation?", true),
        ],
        _ => vec![
            question("What is a ledger?", false),
            serde_json::json!({"role": "assistant", "content": "The budget's record of what was reserved."}),
            question("And a reservation?", false),
            serde_json::json!({"role": "assistant", "content": "What the ledger answered a request."}),
            question("And a hold?", true),
        ],
    };
    let body = serde_json::json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "system": system,
        "messages": messages,
    });
    Request::post("/v1/messages")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

/// A request of about 1.46 input tokens a word, without a breakpoint.
fn large(words: usize) -> Request<Full<Bytes>> {
    let body = serde_json::json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "ledger ".repeat(words)}],
    });
    Request::post("/v1/messages")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

/// When each request reached the server, and when its answer began.
#[derive(Debug, Default)]
struct Server {
    sent: Mutex<HashMap<&'static str, (Instant, Instant)>>,
}

/// Answers after 1 s (writing what the request's breakpoint asks), and
/// records when, under the name in the request's `x-name` header.
fn recording_upstream(server: Arc<Server>) -> Upstream {
    BoxCloneService::new(tower::service_fn(move |req: Request<_>| {
        let name: &'static str = match req.headers().get("x-name").and_then(|v| v.to_str().ok()) {
            Some("t1") => "t1",
            Some("t2") => "t2",
            Some("t3") => "t3",
            Some("h1") => "h1",
            Some("y1") => "y1",
            Some("y2") => "y2",
            _ => "h2",
        };
        let server = Arc::clone(&server);
        async move {
            let sent = Instant::now();
            tokio::time::sleep(Duration::from_secs(1)).await;
            server
                .sent
                .lock()
                .expect("lock")
                .insert(name, (sent, Instant::now()));
            let body = r#"{"type":"message","usage":{"input_tokens":20,"cache_read_input_tokens":0,"cache_creation_input_tokens":3000,"output_tokens":10}}"#;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
        }
    }))
}

/// A budget of the turn tests over `ledger`: limits the turns fit at once,
/// a 5 s cache hold, answered by [`recording_upstream`] into `server`.
fn turn_budget(server: &Arc<Server>, ledger: Arc<dyn Ledger>) -> TokenBudget<Upstream> {
    TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1_000).itpm(180_000).otpm(1_000_000))
        .ledger(ledger)
        .cache_hold(Duration::from_secs(5))
        .build()
        .layer(recording_upstream(Arc::clone(server)))
}

/// Sends `req` through `svc` on a task of its own, its answer read whole.
fn send(svc: &TokenBudget<Upstream>, req: Request<Full<Bytes>>) -> tokio::task::JoinHandle<()> {
    let svc = svc.clone();
    tokio::spawn(async move {
        let response = svc.oneshot(req).await.expect("sent");
        response.into_body().collect().await.expect("body");
    })
}

fn named(mut req: Request<Full<Bytes>>, name: &'static str) -> Request<Full<Bytes>> {
    req.headers_mut()
        .insert("x-name", http::HeaderValue::from_static(name));
    req
}

/// Budget B (another process) sends a large request that drains the
/// input bucket, a second one that waits for the refill, and then a
/// conversation's turn 1, queued behind it; budget A then sends turn 2,
/// which could go at once (it passes B's waiting head within the fleet's
/// 2 s bound). Returns when each reached the server and when its answer
/// began.
async fn turns_split(
    a: Arc<dyn Ledger>,
    b: Arc<dyn Ledger>,
) -> HashMap<&'static str, (Instant, Instant)> {
    let server = Arc::new(Server::default());
    let budget = |ledger| turn_budget(&server, ledger);
    let (a, b) = (budget(a), budget(b));
    let h1 = send(&b, named(large(116_000), "h1"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let h2 = send(&b, named(large(8_200), "h2"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let t1 = send(&b, named(turn(1), "t1"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let t2 = send(&a, named(turn(2), "t2"));
    for task in [h1, h2, t1, t2] {
        task.await.expect("task");
    }
    let sent = server.sent.lock().expect("lock").clone();
    sent
}

/// Two processes' views (ids 1 and 2) of one set of markers, which they
/// hold for, with a round trip, marking their queued writes when `queues`.
fn two_views(queues: bool) -> (Arc<Markers>, Arc<dyn Ledger>, Arc<dyn Ledger>) {
    let markers = Arc::new(Markers::default());
    let view = |id| -> Arc<dyn Ledger> {
        Arc::new(View {
            markers: Arc::clone(&markers),
            id,
            holds: true,
            queues,
            round_trip: true,
            graces: false,
        })
    };
    let (a, b) = (view(1), view(2));
    (markers, a, b)
}

/// A conversation's later turn that could go at once in one process holds
/// while its earlier turn, whose cache prefix is a prefix of its own, is
/// queued in another process, and goes once that turn's answer began
/// (reading its prefix at the server: written once); without the queued
/// markers it went at once and the server wrote turn 1's prefix twice.
#[tokio::test(start_paused = true)]
async fn a_later_turn_holds_for_an_earlier_turn_queued_in_another_process() {
    let start = Instant::now();
    let (_, a, b) = two_views(true);
    let sent = turns_split(a, b).await;
    let at = |name| sent[name].0 - start;
    let began = |name| sent[name].1 - start;
    assert!(at("t1") > at("h2"), "turn 1 queued behind B's head");
    assert!(
        at("t2") >= began("t1"),
        "turn 2 went after turn 1's answer began: {:?} {:?}",
        at("t2"),
        began("t1")
    );
    assert!(
        at("t2") < Duration::from_secs(5),
        "held within the bound: {:?}",
        at("t2")
    );

    let start = Instant::now();
    let (_, a, b) = two_views(false);
    let sent = turns_split(a, b).await;
    let at = |name| sent[name].0 - start;
    assert!(
        at("t2") < at("t1"),
        "without the markers turn 2 went first: {:?} {:?}",
        at("t2"),
        at("t1")
    );
}

/// What becomes of process B, whose turn 1 is queued.
#[derive(Debug, Clone, Copy)]
enum B {
    /// It stays queued.
    Stays,
    /// It is cancelled 300 ms after turn 2 arrived.
    Cancels,
    /// Its process goes away (its marker stays, nothing clears it), this
    /// long before turn 2 arrives.
    Vanished(Duration),
}

/// A turn 2 that would go now in process A while turn 1 is queued in
/// process B (behind a request that does not fit for about 50 s);
/// returns when turn 2 reached the server, counted from its arrival.
async fn held_turn_two(then: B) -> Duration {
    let (start, sent) = held_turns(then).await;
    sent["t2"].0 - start
}

/// As [`held_turn_two`], returning when turn 2 arrived, and when each
/// request reached the server and its answer began.
async fn held_turns(then: B) -> (Instant, HashMap<&'static str, (Instant, Instant)>) {
    let (markers, a, b) = two_views(true);
    // Turn 1's writes, as its budget names them: learned from a request
    // of turn 1 through a third budget with no capacity problem.
    let server = Arc::new(Server::default());
    let budget = |ledger| turn_budget(&server, ledger);
    let recorder = Arc::new(Recorder {
        inner: b,
        queued: Mutex::new(Vec::new()),
    });
    let b = budget(Arc::clone(&recorder) as Arc<dyn Ledger>);
    // B's turn 1 waits behind a head that never fits (its writes are
    // marked as queued), then is given up: B is the process that goes away.
    let filler = tokio::spawn(b.clone().oneshot(named(large(116_000), "h1")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let blocker = tokio::spawn(b.clone().oneshot(named(large(110_000), "h2")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let t1 = tokio::spawn(async move {
        // Its answer read whole: its write begins (and ends) with it.
        let response = b.oneshot(named(turn(1), "t1")).await.expect("sent");
        response.into_body().collect().await.expect("body");
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let queued = recorder.queued.lock().expect("lock").clone();
    assert_eq!(queued.len(), 1, "turn 1 marked as queued: {queued:?}");
    if let B::Vanished(ago) = then {
        // Its marker, as a process that then went away left it.
        let (request, writes, tokens, queued_for) = queued[0].clone();
        markers.queue(3, request, &writes, tokens, queued_for);
        t1.abort();
        for task in [&blocker, &filler] {
            task.abort();
        }
        tokio::time::sleep(ago).await;
    }
    let start = Instant::now();
    let a = budget(a);
    let t2 = tokio::spawn(a.oneshot(named(turn(2), "t2")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let B::Cancels = then {
        t1.abort();
    }
    let _ = t2.await.expect("task").expect("sent");
    if let B::Stays = then {
        // Turn 1 goes (after the blocker): its answer is recorded.
        t1.await.expect("task");
    }
    for task in [blocker, filler] {
        task.abort();
    }
    let sent = server.sent.lock().expect("lock").clone();
    (start, sent)
}

/// Records the queued markers a budget publishes, over another ledger.
#[derive(Debug)]
struct Recorder {
    inner: Arc<dyn Ledger>,
    queued: Mutex<Vec<Published>>,
}

/// A published marker: the request, its writes, the tokens of the
/// longest, how long it lives.
type Published = (u64, Vec<u64>, u64, Duration);

impl Ledger for Recorder {
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation> {
        self.inner.reserve(key, limits, costs)
    }

    fn reserve_in_line(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
        place: LinePlace,
    ) -> Option<LedgerFuture<Reservation>> {
        self.inner
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
        self.inner
            .reserve_in_line_with_prefixes(key, limits, costs, headroom, place, prefixes)
    }

    fn prefix_writing(&self, hash: u64, waker: &Waker) -> bool {
        self.inner.prefix_writing(hash, waker)
    }

    fn prefix_queued(&self, hash: u64) -> bool {
        self.inner.prefix_queued(hash)
    }

    fn writer_grace(&self) -> Duration {
        self.inner.writer_grace()
    }

    fn prefixes_written(&self, hashes: &[u64]) {
        self.inner.prefixes_written(hashes)
    }

    fn prefixes_queued(
        &self,
        key: &str,
        request: u64,
        writes: &[u64],
        tokens: u64,
        queued_for: Duration,
    ) {
        self.queued
            .lock()
            .expect("lock")
            .push((request, writes.to_vec(), tokens, queued_for));
        self.inner
            .prefixes_queued(key, request, writes, tokens, queued_for);
    }

    fn prefixes_dequeued(&self, key: &str, request: u64) {
        self.inner.prefixes_dequeued(key, request);
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
        self.inner.prompt_cache()
    }

    fn prefixes_cached(&self, key: &str, hashes: &[u64]) {
        self.inner.prefixes_cached(key, hashes)
    }
}

/// A held turn 2 holds on past its bound (5 s, the cache hold) while turn
/// 1 stays queued in its process's line behind a head that waits about
/// 50 s (turn 1's marker renewed by that head's refused ask): it goes
/// once turn 1, admitted, has begun its answer, reading turn 1's prefix
/// (written once). Before, it went at the bound, 46 s before turn 1, and
/// the server wrote turn 1's prefix twice.
#[tokio::test(start_paused = true)]
async fn a_held_turn_holds_while_the_earlier_turn_stays_queued() {
    let (start, sent) = held_turns(B::Stays).await;
    let at = |name| sent[name].0 - start;
    let began = |name| sent[name].1 - start;
    assert!(
        at("t1") > Duration::from_secs(30),
        "turn 1 stayed queued: {:?}",
        at("t1")
    );
    assert!(
        at("t2") >= began("t1"),
        "turn 2 went after turn 1's answer began: {:?} {:?}",
        at("t2"),
        began("t1")
    );
    assert!(
        at("t2") < began("t1") + Duration::from_secs(2),
        "and soon after: {:?} {:?}",
        at("t2"),
        began("t1")
    );
}

/// A held turn 2 goes as soon as turn 1 leaves its line unadmitted (its
/// request cancelled: its budget removes its marker, and the held request
/// is woken).
#[tokio::test(start_paused = true)]
async fn a_cancelled_requests_queued_marker_is_removed() {
    let cancelled = held_turn_two(B::Cancels).await;
    assert!(
        cancelled >= Duration::from_millis(300) && cancelled < Duration::from_millis(400),
        "went when the marker was removed: {cancelled:?}"
    );
}

/// The marker of a process that went away holds a request while it lives,
/// past the hold's bound (5 s) but not beyond its expiry (nothing renews
/// it: the longest hold for a write of its size plus the line's grace,
/// 6 s here), and none once it expired.
#[tokio::test(start_paused = true)]
async fn a_vanished_processes_queued_marker_expires() {
    let fresh = held_turn_two(B::Vanished(Duration::ZERO)).await;
    assert!(
        fresh >= Duration::from_millis(5_900) && fresh < Duration::from_millis(6_100),
        "held until the marker expired: {fresh:?}"
    );
    let expired = held_turn_two(B::Vanished(Duration::from_secs(6))).await;
    assert!(
        expired < Duration::from_millis(100),
        "not held: {expired:?}"
    );
}

/// Three processes' views (ids 1 to 3) of one set of markers, as
/// [`two_views`] with queued markers.
fn three_views() -> [Arc<dyn Ledger>; 3] {
    let markers = Arc::new(Markers::default());
    [1, 2, 3].map(|id| -> Arc<dyn Ledger> {
        Arc::new(View {
            markers: Arc::clone(&markers),
            id,
            holds: true,
            queues: true,
            round_trip: true,
            graces: false,
        })
    })
}

/// Process B's (`ledgers[1]`) turn 1 stays queued behind a head of
/// `blocker` words that waits for the refill; process A's turn 2 holds for
/// it (asking nothing meanwhile); process C's turn 3 arrives 2 s later and
/// holds for turn 2's queued marker. With `cancel`, turn 2 is cancelled
/// that long after it arrived. Returns when turn 2 arrived, and when each
/// request reached the server and its answer began.
async fn three_turns(
    [a, b, c]: [Arc<dyn Ledger>; 3],
    blocker: usize,
    cancel: Option<Duration>,
) -> (Instant, HashMap<&'static str, (Instant, Instant)>) {
    let server = Arc::new(Server::default());
    let budget = |ledger| turn_budget(&server, ledger);
    let (a, b, c) = (budget(a), budget(b), budget(c));
    // Its answer is held unread: nothing settles it meanwhile.
    let filler = tokio::spawn(b.clone().oneshot(named(large(116_000), "h1")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let blocker = tokio::spawn(b.clone().oneshot(named(large(blocker), "h2")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t1 = send(&b, named(turn(1), "t1"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    let t2 = send(&a, named(turn(2), "t2"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t3 = send(&c, named(turn(3), "t3"));
    if let Some(after) = cancel {
        tokio::time::sleep_until(start + after).await;
        t2.abort();
    } else {
        t2.await.expect("task");
    }
    t3.await.expect("task");
    t1.await.expect("task");
    for task in [blocker, filler] {
        task.abort();
    }
    let sent = server.sent.lock().expect("lock").clone();
    (start, sent)
}

/// Turn 3 held on for held turn 2, which went after turn 1's answer
/// began, and went soon after turn 2's answer began.
fn turn_three_held_on(start: Instant, sent: &HashMap<&'static str, (Instant, Instant)>) {
    let at = |name| sent[name].0 - start;
    let began = |name| sent[name].1 - start;
    assert!(
        at("t2") >= began("t1"),
        "turn 2 held for turn 1: {:?} {:?}",
        at("t2"),
        began("t1")
    );
    assert!(
        at("t3") >= began("t2"),
        "turn 3 held on for turn 2: {:?} {:?}",
        at("t3"),
        began("t2")
    );
    assert!(
        at("t3") < began("t2") + Duration::from_secs(2),
        "and went soon after: {:?} {:?}",
        at("t3"),
        began("t2")
    );
}

/// A held request renews its queued marker while it holds, past the
/// marker's first lifetime (6 s here): turn 3, holding for held turn 2's
/// marker in another process, holds on until turn 2's answer began (after
/// turn 1's, about 50 s), and reads its prefix. Before, turn 2's marker
/// lapsed at 6 s and turn 3 went then, first, writing the prefix it
/// shares with turns 1 and 2.
#[tokio::test(start_paused = true)]
async fn a_held_requests_queued_marker_lives_while_it_holds() {
    let (start, sent) = three_turns(three_views(), 110_000, None).await;
    let at = |name| sent[name].0 - start;
    assert!(
        at("t1") > Duration::from_secs(30),
        "turn 1 stayed queued: {:?}",
        at("t1")
    );
    turn_three_held_on(start, &sent);
}

/// A request waiting in its process's line behind a held head renews its
/// own queued marker while it waits (the held head asks nothing that
/// would): process A's turn 2 of conversation X holds for X's turn 1,
/// queued in process B behind a head that waits about 40 s; behind it in
/// A's line waits turn 1 of conversation Y, and process C's turn 2 of Y,
/// arriving 2 s later, holds for it. Y's turn 2 holds on until Y's turn
/// 1's answer began, and reads its prefix (written once). Before, Y's
/// turn 1's marker lapsed at 6 s (the longest hold for its write, 5 s,
/// plus the line's grace) and Y's turn 2 went then, first, writing the
/// prefix Y's turn 1 then wrote again (the double write of 16-process
/// runs on Redis).
#[tokio::test(start_paused = true)]
async fn a_request_behind_a_held_head_keeps_its_queued_marker() {
    let [a, b, c] = three_views();
    let server = Arc::new(Server::default());
    let budget = |ledger| turn_budget(&server, ledger);
    let (a, b, c) = (budget(a), budget(b), budget(c));
    let y = |n| turn_of("Answer as the changelog of the emulator crate would. ", n);
    // Its answer is held unread: nothing settles it meanwhile.
    let filler = tokio::spawn(b.clone().oneshot(named(large(116_000), "h1")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let blocker = tokio::spawn(b.clone().oneshot(named(large(90_000), "h2")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let x1 = send(&b, named(turn(1), "t1"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    let x2 = send(&a, named(turn(2), "t2"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let y1 = send(&a, named(y(1), "y1"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let y2 = send(&c, named(y(2), "y2"));
    for task in [x1, x2, y1, y2] {
        task.await.expect("task");
    }
    for task in [blocker, filler] {
        task.abort();
    }
    let sent = server.sent.lock().expect("lock").clone();
    let at = |name| sent[name].0 - start;
    let began = |name| sent[name].1 - start;
    assert!(
        at("t1") > Duration::from_secs(30),
        "X's turn 1 stayed queued: {:?}",
        at("t1")
    );
    assert!(
        at("t2") >= began("t1") && at("y1") >= at("t2"),
        "X's turn 2 held for turn 1, Y's turn 1 waited behind it: {:?} {:?} {:?}",
        began("t1"),
        at("t2"),
        at("y1")
    );
    assert!(
        at("y2") >= began("y1"),
        "Y's turn 2 held on for Y's turn 1: {:?} {:?}",
        at("y2"),
        began("y1")
    );
    assert!(
        at("y2") < began("y1") + Duration::from_secs(2),
        "and went soon after: {:?} {:?}",
        at("y2"),
        began("y1")
    );
}

/// A held turn 2 holds on past a minute (`MAX_QUEUED_HOLD`) while turn 1,
/// queued in process B behind two heads that wait about 50 s and 40 s for
/// the refill, still waits its turn (its marker renewed by those heads'
/// refused asks): it goes once turn 1's answer began, about 90 s in,
/// reading its prefix. Before, the hold ended at 60 s, turn 2 went first
/// and the server wrote turn 1's prefix twice (the 1,713-token double
/// write of a 16-process run on Redis: turn 4 held 60 s for turn 3, which
/// went 11 s after it).
#[tokio::test(start_paused = true)]
async fn a_held_turn_holds_past_a_minute_while_the_earlier_turn_waits_its_turn() {
    let (_, a, b) = two_views(true);
    let server = Arc::new(Server::default());
    let budget = |ledger| turn_budget(&server, ledger);
    let (a, b) = (budget(a), budget(b));
    // Its answer is held unread: nothing settles it meanwhile.
    let filler = tokio::spawn(b.clone().oneshot(named(large(116_000), "h1")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let first = tokio::spawn(b.clone().oneshot(named(large(110_000), "h2")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = tokio::spawn(b.clone().oneshot(named(large(80_000), "h3")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t1 = send(&b, named(turn(1), "t1"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    let t2 = send(&a, named(turn(2), "t2"));
    for task in [t1, t2] {
        task.await.expect("task");
    }
    for task in [first, second, filler] {
        task.abort();
    }
    let sent = server.sent.lock().expect("lock").clone();
    let at = |name| sent[name].0 - start;
    let began = |name| sent[name].1 - start;
    assert!(
        at("t1") > Duration::from_secs(70),
        "turn 1 stayed queued past a minute: {:?}",
        at("t1")
    );
    assert!(
        at("t2") >= began("t1"),
        "turn 2 held on for turn 1: {:?} {:?}",
        at("t2"),
        began("t1")
    );
    assert!(
        at("t2") < began("t1") + Duration::from_secs(2),
        "and went soon after: {:?} {:?}",
        at("t2"),
        began("t1")
    );
}

/// A held request cancelled after its marker was renewed takes the marker
/// with it at once: turn 3, holding for it, goes then.
#[tokio::test(start_paused = true)]
async fn a_cancelled_held_requests_renewed_marker_goes_at_once() {
    let (start, sent) = three_turns(three_views(), 110_000, Some(Duration::from_secs(20))).await;
    let at = |name| sent[name].0 - start;
    assert!(!sent.contains_key("t2"), "turn 2 was cancelled");
    assert!(
        at("t3") >= Duration::from_secs(20) && at("t3") < Duration::from_millis(20_100),
        "turn 3 went when turn 2 was cancelled: {:?}",
        at("t3")
    );
}

/// The same two processes over `RedisLedger` (`REDIS_URL`; skipped with a
/// notice without it, except under `CI=true`): turn 2 goes once turn 1's
/// answer began, not before turn 1 (on Redis's clock: real time, about
/// 3 s).
#[cfg(feature = "redis")]
#[tokio::test]
async fn over_redis_a_later_turn_holds_for_an_earlier_turn_queued_in_another_process() {
    let Some(connect) = redis_ledgers("turns") else {
        return;
    };
    let start = Instant::now();
    let sent = turns_split(connect.ledger().await, connect.ledger().await).await;
    let at = |name| sent[name].0 - start;
    let began = |name| sent[name].1 - start;
    assert!(at("t1") > at("h2"), "turn 1 queued behind B's head");
    assert!(
        at("t2") >= began("t1"),
        "turn 2 went after turn 1's answer began: {:?} {:?}",
        at("t2"),
        began("t1")
    );
    assert!(
        at("t2") < Duration::from_secs(5),
        "held within the bound: {:?}",
        at("t2")
    );
}

/// Process B sends a large request that drains the input bucket, then
/// one of `blocker` words that waits for the refill at the head of its
/// line, then a conversation's turn 1, queued behind it; process A then
/// sends turn 2, which could go at once. Returns when turn 2 arrived,
/// and when each request reached the server and its answer began.
async fn turn_two_behind_a_waiting_head(
    a: Arc<dyn Ledger>,
    b: Arc<dyn Ledger>,
    blocker: usize,
) -> (Instant, HashMap<&'static str, (Instant, Instant)>) {
    let server = Arc::new(Server::default());
    let budget = |ledger| turn_budget(&server, ledger);
    let (a, b) = (budget(a), budget(b));
    // Its answer is held unread: nothing settles it meanwhile.
    let h1 = tokio::spawn(b.clone().oneshot(named(large(116_000), "h1")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let h2 = send(&b, named(large(blocker), "h2"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t1 = send(&b, named(turn(1), "t1"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    let t2 = send(&a, named(turn(2), "t2"));
    for task in [h2, t1, t2] {
        task.await.expect("task");
    }
    h1.abort();
    let sent = server.sent.lock().expect("lock").clone();
    (start, sent)
}

/// Over `RedisLedger` (`REDIS_URL`; skipped with a notice without it,
/// except under `CI=true`), in real time: turn 2 holds past its bound (5
/// s) while turn 1 stays queued in process B behind a head that waits
/// about 8 s for the refill (turn 1's marker renewed by that head's
/// refused ask), and goes once turn 1's answer began. While turn 1 stays
/// queued, process A asks Redis for the markers less and less often:
/// about a dozen times in those 8 s, not 80 (one every 100 ms).
#[cfg(feature = "redis")]
#[tokio::test]
async fn over_redis_a_held_turn_holds_while_the_earlier_turn_stays_queued() {
    let Some(connect) = redis_ledgers("queued") else {
        return;
    };
    let a = connect.redis_ledger().await;
    let (start, sent) =
        turn_two_behind_a_waiting_head(Arc::clone(&a) as _, connect.ledger().await, 24_000).await;
    let at = |name| sent[name].0 - start;
    let began = |name| sent[name].1 - start;
    assert!(
        at("t1") > Duration::from_secs(6),
        "turn 1 stayed queued past the bound: {:?}",
        sent.iter()
            .map(|(name, (at, began))| (name, *at - start, *began - start))
            .collect::<Vec<_>>()
    );
    assert!(
        at("t2") >= began("t1"),
        "turn 2 went after turn 1's answer began: {:?} {:?}",
        at("t2"),
        began("t1")
    );
    assert!(
        at("t2") < began("t1") + Duration::from_secs(1),
        "and soon after it: {:?} {:?}",
        at("t2"),
        began("t1")
    );
    let watched = a.stats().watch_calls;
    assert!(
        (1..=25).contains(&watched),
        "A watched turn 1's marker {watched} times in {:?}",
        at("t2")
    );
}

/// Over `RedisLedger` (`REDIS_URL`; skipped with a notice without it,
/// except under `CI=true`), in real time: turn 2, held about 9 s for turn
/// 1 queued behind a head that waits for the refill, renews its queued
/// marker (first lifetime 6 s), and turn 3 in a third process holds on
/// for it until its answer began.
#[cfg(feature = "redis")]
#[tokio::test]
async fn over_redis_a_held_requests_queued_marker_lives_while_it_holds() {
    let Some(connect) = redis_ledgers("renewed") else {
        return;
    };
    let ledgers = [
        connect.ledger().await,
        connect.ledger().await,
        connect.ledger().await,
    ];
    let (start, sent) = three_turns(ledgers, 24_000, None).await;
    assert!(
        sent["t1"].0 - start > Duration::from_secs(7),
        "turn 1 stayed queued past turn 2's first marker: {:?}",
        sent["t1"].0 - start
    );
    turn_three_held_on(start, &sent);
}

/// Where the Redis tests connect (`REDIS_URL`), under a prefix of their
/// own (`tll-test-<tag>-<pid>-<nanos>`); `None`, with a printed notice,
/// without `REDIS_URL` (a failure under `CI=true`: there they must run).
#[cfg(feature = "redis")]
fn redis_ledgers(tag: &str) -> Option<RedisLedgers> {
    let Ok(url) = std::env::var("REDIS_URL") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "REDIS_URL is not set: with CI=true the Redis tests must run"
        );
        eprintln!("NOTICE tests/fleet_cache.rs: REDIS_URL is not set, the Redis test is skipped");
        return None;
    };
    let prefix = format!(
        "tll-test-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    Some(RedisLedgers { url, prefix })
}

/// The processes of one Redis test: each ledger shares the prompt cache
/// under the test's prefix.
#[cfg(feature = "redis")]
struct RedisLedgers {
    url: String,
    prefix: String,
}

#[cfg(feature = "redis")]
impl RedisLedgers {
    /// One more process's ledger.
    async fn ledger(&self) -> Arc<dyn Ledger> {
        self.redis_ledger().await
    }

    /// As [`ledger`](Self::ledger), its calls counted.
    async fn redis_ledger(&self) -> Arc<tower_llm_limits::budget::redis::RedisLedger> {
        let ledger = tower_llm_limits::budget::redis::RedisLedger::builder(&self.url)
            .prefix(&self.prefix)
            .share_prompt_cache(true)
            .connect()
            .await
            .expect("connect");
        Arc::new(ledger)
    }
}

// ---------------------------------------------------------------------------
// The writer grace: a conversation's turns arriving together in two
// processes.

/// A conversation's turn `n` (0: no breakpoint at all) after a system
/// prompt of about 3,000 tokens: its questions and answers so far, the
/// breakpoint at the end of its last question, so that turn k's cache
/// prefix is a prefix of turn n's for k < n. The `x-turn` header names it
/// for the server.
fn conversation(n: usize) -> Request<Full<Bytes>> {
    let system = "Answer as the reference manual of the tower-llm-limits crate would. ".repeat(230);
    let mut messages = Vec::new();
    for k in 1..=n.max(1) {
        let mut block = serde_json::json!({
            "type": "text",
            "text": format!("Question {k}: what does part {k} of the ledger keep?"),
        });
        if k == n {
            block["cache_control"] = serde_json::json!({"type": "ephemeral"});
        }
        messages.push(serde_json::json!({"role": "user", "content": [block]}));
        if k < n {
            messages.push(serde_json::json!({
                "role": "assistant",
                "content": format!("Answer {k}: the record of what part {k} reserved."),
            }));
        }
    }
    let body = serde_json::json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "system": system,
        "messages": messages,
    });
    Request::post("/v1/messages")
        .header("x-turn", n.to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

/// The server's size of turn `n`'s cache prefix.
fn turn_size(n: usize) -> u64 {
    2_000 + 100 * n as u64
}

/// What the server did with one request.
#[derive(Debug, Clone, Copy)]
struct Served {
    turn: usize,
    sent: Instant,
    read: u64,
    write: u64,
}

/// A server with one prompt cache, as the API's: a request of turn n reads
/// the longest entry of its conversation's turns up to n (the look-back
/// from its breakpoint reaches shorter entries, never a longer one), writes
/// the rest of its prefix, and its entry becomes readable when its answer
/// begins (after 1 s).
#[derive(Debug, Default)]
struct LookBack {
    cached: Mutex<HashSet<usize>>,
    served: Mutex<Vec<Served>>,
}

impl LookBack {
    fn upstream(self: &Arc<Self>) -> Upstream {
        let server = Arc::clone(self);
        BoxCloneService::new(tower::service_fn(move |req: Request<_>| {
            let turn: usize = req
                .headers()
                .get("x-turn")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let server = Arc::clone(&server);
            async move {
                let (read, write) = match turn {
                    0 => (0, 0),
                    n => {
                        let cached = server.cached.lock().expect("lock");
                        let read = (1..=n)
                            .filter(|k| cached.contains(k))
                            .map(turn_size)
                            .max()
                            .unwrap_or(0);
                        (read, turn_size(n) - read)
                    }
                };
                let sent = Instant::now();
                server.served.lock().expect("lock").push(Served {
                    turn,
                    sent,
                    read,
                    write,
                });
                tokio::time::sleep(Duration::from_secs(1)).await;
                server.cached.lock().expect("lock").insert(turn);
                let body = format!(
                    r#"{{"type":"message","usage":{{"input_tokens":20,"cache_read_input_tokens":{read},"cache_creation_input_tokens":{write},"output_tokens":10}}}}"#
                );
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            }
        }))
    }

    /// What the server did with turn `n`'s request (the first of them).
    fn turn(&self, n: usize) -> Served {
        let served = self.served.lock().expect("lock");
        *served
            .iter()
            .find(|s| s.turn == n)
            .unwrap_or_else(|| panic!("turn {n} never sent: {served:?}"))
    }

    /// The prefix tokens the server wrote, in all.
    fn written(&self) -> u64 {
        self.served
            .lock()
            .expect("lock")
            .iter()
            .map(|s| s.write)
            .sum()
    }
}

/// Two processes' budgets (ids 1 and 2) over one set of markers, with a
/// round trip, as the turn tests': with `graces`, the writer grace.
fn grace_budgets(
    server: &Arc<LookBack>,
    graces: bool,
) -> (TokenBudget<Upstream>, TokenBudget<Upstream>) {
    let markers = Arc::new(Markers::default());
    let budget = |id| {
        let view = View {
            markers: Arc::clone(&markers),
            id,
            holds: true,
            queues: true,
            round_trip: true,
            graces,
        };
        TokenBudgetLayer::builder()
            .limits(Limits::new().rpm(1_000).itpm(180_000).otpm(1_000_000))
            .ledger(Arc::new(view))
            .cache_hold(Duration::from_secs(5))
            .build()
            .layer(server.upstream())
    };
    (budget(1), budget(2))
}

/// Process A sends a conversation's turn `first`; `gap` later, process B
/// sends its turn `second`. Returns the server's record and when A's
/// request arrived.
async fn two_turns(
    graces: bool,
    first: usize,
    gap: Duration,
    second: usize,
) -> (Arc<LookBack>, Instant) {
    let server = Arc::new(LookBack::default());
    let (a, b) = grace_budgets(&server, graces);
    let start = Instant::now();
    let one = send(&a, conversation(first));
    tokio::time::sleep(gap).await;
    let two = send(&b, conversation(second));
    for task in [one, two] {
        task.await.expect("task");
    }
    (server, start)
}

/// A conversation's turn 2 that could go at once in process A, and its
/// turn 1 arriving 20 ms later in process B: with the writer grace, turn 2
/// does not go at its first ask (turn 1's prefix, a shorter prefix of its
/// own, has no marker yet), turn 1 goes first, and turn 2, held for its
/// writer, goes once turn 1's answer began, reading turn 1's prefix at the
/// server: the shared part written once. Without it, turn 2 went at once
/// and the server wrote turn 1's prefix twice (turn 1's look-back cannot
/// reach turn 2's longer entry).
#[tokio::test(start_paused = true)]
async fn a_later_turn_waits_the_grace_for_an_earlier_turn_arriving_in_another_process() {
    let gap = Duration::from_millis(20);
    let (server, _) = two_turns(true, 2, gap, 1).await;
    let (one, two) = (server.turn(1), server.turn(2));
    assert!(one.sent < two.sent, "turn 1 sent first: {one:?} {two:?}");
    assert!(
        two.sent >= one.sent + Duration::from_secs(1),
        "turn 2 went once turn 1's answer began: {one:?} {two:?}"
    );
    assert_eq!(two.read, turn_size(1), "turn 2 read turn 1's prefix");
    assert_eq!(
        server.written(),
        turn_size(2),
        "the shared part written once"
    );

    let (server, _) = two_turns(false, 2, gap, 1).await;
    let (one, two) = (server.turn(1), server.turn(2));
    assert!(two.sent < one.sent, "without it turn 2 went first");
    assert_eq!(
        server.written(),
        turn_size(2) + turn_size(1),
        "and turn 1's prefix was written twice"
    );
}

/// With no other writer, a writer with a shorter prefix no process marked
/// goes after exactly the writer grace, no more; a request that writes
/// nothing, and a writer whose prefix has no shorter one (a system prompt's
/// breakpoint), pay none.
#[tokio::test(start_paused = true)]
async fn the_grace_is_only_for_a_writer_with_an_unmarked_shorter_prefix() {
    let server = Arc::new(LookBack::default());
    let (a, _) = grace_budgets(&server, true);
    let start = Instant::now();
    send(&a, conversation(3)).await.expect("task");
    assert_eq!(
        server.turn(3).sent - start,
        WRITER_GRACE,
        "exactly the grace"
    );

    let start = Instant::now();
    send(&a, conversation(0)).await.expect("task");
    assert_eq!(
        server.turn(0).sent - start,
        Duration::ZERO,
        "writes nothing"
    );

    let called = Arc::new(Mutex::new(Vec::new()));
    let markers = Arc::new(Markers::default());
    let view = View {
        markers,
        id: 1,
        holds: true,
        queues: true,
        round_trip: true,
        graces: true,
    };
    let system_writer = TokenBudgetLayer::builder()
        .limits(Limits::new().rpm(1_000).itpm(180_000).otpm(1_000_000))
        .ledger(Arc::new(view))
        .cache_hold(Duration::from_secs(5))
        .build()
        .layer(timed_upstream(
            Duration::ZERO,
            0,
            3_000,
            Arc::clone(&called),
        ));
    let start = Instant::now();
    let response = system_writer.oneshot(message(true)).await.expect("sent");
    let _ = response.into_body().collect().await.expect("body");
    let called = called.lock().expect("lock").clone();
    assert_eq!(called, vec![start], "no shorter prefix: no grace");
}

/// Two writers that both wait the grace do not wait for each other: a
/// conversation's turns 2 and 3 arriving together in two processes go
/// shortest first (turn 3 held for turn 2's writer, then reading its
/// prefix), and the same turn in both goes once, then is read.
#[tokio::test(start_paused = true)]
async fn two_writers_in_their_grace_do_not_wait_for_each_other() {
    let (server, start) = two_turns(true, 3, Duration::ZERO, 2).await;
    let (two, three) = (server.turn(2), server.turn(3));
    assert_eq!(two.sent - start, WRITER_GRACE, "turn 2 after its grace");
    assert!(
        three.sent >= two.sent + Duration::from_secs(1),
        "turn 3 after turn 2's answer began: {two:?} {three:?}"
    );
    assert_eq!(three.read, turn_size(2));
    assert_eq!(server.written(), turn_size(3));

    let (server, start) = two_turns(true, 2, Duration::ZERO, 2).await;
    let served = server.served.lock().expect("lock").clone();
    assert_eq!(served.len(), 2, "{served:?}");
    assert_eq!(served[0].sent - start, WRITER_GRACE, "{served:?}");
    assert!(served[1].sent >= served[0].sent + Duration::from_secs(1));
    assert_eq!(served[1].read, turn_size(2), "{served:?}");
    assert_eq!(server.written(), turn_size(2));
}

/// The same as [`a_later_turn_waits_the_grace_for_an_earlier_turn_arriving_in_another_process`]
/// over `RedisLedger` (`REDIS_URL`; skipped with a notice without it,
/// except under `CI=true`), in real time: turn 1 arrives in process B
/// 20 ms after turn 2 in process A, goes first, and turn 2 reads its
/// prefix.
#[cfg(feature = "redis")]
#[tokio::test]
async fn over_redis_a_later_turn_waits_the_grace_for_an_earlier_turn() {
    let Some(connect) = redis_ledgers("grace") else {
        return;
    };
    let server = Arc::new(LookBack::default());
    let budget = |ledger| {
        TokenBudgetLayer::builder()
            .limits(Limits::new().rpm(1_000).itpm(180_000).otpm(1_000_000))
            .ledger(ledger)
            .cache_hold(Duration::from_secs(5))
            .build()
            .layer(server.upstream())
    };
    let (a, b) = (
        budget(connect.ledger().await),
        budget(connect.ledger().await),
    );
    let later = send(&a, conversation(2));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let earlier = send(&b, conversation(1));
    for task in [later, earlier] {
        task.await.expect("task");
    }
    let (one, two) = (server.turn(1), server.turn(2));
    assert!(one.sent < two.sent, "turn 1 sent first: {one:?} {two:?}");
    assert_eq!(two.read, turn_size(1), "turn 2 read turn 1's prefix");
    assert_eq!(
        server.written(),
        turn_size(2),
        "the shared part written once"
    );
}

/// A hold whose bound (5 s) fires after the earlier turn it holds for,
/// queued in another process, was admitted there, but before that turn's
/// answer began, goes on until that answer begins: turn 2 reads turn 1's
/// prefix instead of writing it beside it (before, it went at its bound,
/// the server writing the prefix twice).
#[tokio::test(start_paused = true)]
async fn a_hold_whose_queued_writer_is_admitted_at_its_bound_waits_for_the_answer() {
    let (_, a, b) = two_views(true);
    let (start, sent) = turn_two_behind_a_waiting_head(a, b, 15_000).await;
    let at = |name| sent[name].0 - start;
    let began = |name| sent[name].1 - start;
    let bound = Duration::from_secs(5);
    assert!(
        at("t1") > Duration::from_secs(4) && at("t1") < bound && began("t1") > bound,
        "turn 1 admitted before turn 2's bound, its answer after it: {:?} {:?}",
        at("t1"),
        began("t1")
    );
    assert!(
        at("t2") >= began("t1"),
        "turn 2 held on for turn 1's answer: {:?} {:?}",
        at("t2"),
        began("t1")
    );
    assert!(
        at("t2") < began("t1") + Duration::from_millis(500),
        "and went when it began: {:?} {:?}",
        at("t2"),
        began("t1")
    );
}
