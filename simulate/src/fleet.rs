//! `--fleet N[,N...]`: N independent stacks of the crate (the preset,
//! `RetryAfter -> TokenBudget -> Concurrency`), one process each in spirit,
//! that share nothing but their ledger's store, against one emulator with
//! one key's limits. With `--redis URL` each N runs twice, sharing one
//! `RedisLedger` budget, then with a ledger per stack (in memory, the
//! contrast: N stacks pace to N times the limit), in one table. The client
//! workers (`--concurrency`) are dealt round-robin to the stacks.
//!
//! Redis reads its own clock, so a run with `--redis` is on the wall clock
//! (as `--real-time`), and prints before the table what the shared budget
//! cost: Redis calls per request, reserve latency (p50, p99), and the
//! script's operations per second against a plain `INCR` measured in the
//! same run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder};
use tower_llm_limits::budget::ledger::{
    BucketState, CostDelta, Costs, InMemoryLedger, Ledger, LedgerFuture, LinePlace, OutputSample,
    PrefixIntent, Reservation, ServedSize, LINE_GRACE, PREFIX_WRITING_WAIT, WRITER_GRACE,
};
use tower_llm_limits::budget::redis::RedisLedger;
use tower_llm_limits::budget::{Limits, LimitsConfig, OutputMode, TokenBudgetBuilder};
use tower_llm_limits::clock::WallClock;
use tower_llm_limits::estimate::SharedPromptCache;
use tower_llm_limits::headers::LimitStatus;
use tower_llm_limits::preset::LimitsLayer;
use tower_llm_limits::retry::RetryAfterLayer;
use tower_llm_limits::{BoxError, Dimension};

use super::args::Args;
use super::report::{self, LimitSpec, Row};
use super::run::{self, box_response, Body, Client, Log, Meter};
use super::workload::{Item, Workload};
use super::{emu, progress};

/// Runs every fleet size asked for; returns the workload, the limits and
/// one row per (size, ledger).
pub async fn run(
    args: &Args,
    sizes: &[usize],
    virtual_time: bool,
) -> Result<(Workload, LimitSpec, Vec<Row>), String> {
    let limits = emu::limit_spec(args);
    let workload = super::load_workload(args)?;
    if !args.json {
        println!(
            "{}",
            super::describe(args, &workload, &limits, virtual_time)
        );
    }
    if let Some(url) = &args.redis {
        let figures = script_vs_incr(url).await?;
        if !args.json {
            println!("{figures}");
        }
    }
    let items = Arc::new(workload.items.clone());
    // The workload's bound (every cacheable prefix read after its first
    // write), the same for every row.
    let truth = super::Truth::of(args, &workload)?;
    let mut rows = Vec::new();
    for &n in sizes {
        let mut stores = Vec::new();
        for share in [true, false] {
            if !share && !args.fleet_unshared {
                continue;
            }
            if let Some(url) = &args.redis {
                stores.push(Store::Redis { url, share });
            }
            if args.fleet_one_ledger {
                stores.push(Store::One { share });
            }
        }
        if !args.no_contrast {
            stores.push(Store::Each);
        }
        let mut runs = Vec::new();
        for store in stores {
            runs.push(run_fleet(args, n, store, &items, &limits, virtual_time).await?);
        }
        for (mut row, cache_read_tokens) in runs {
            truth.complete(&mut row, args, &limits, &items, None, cache_read_tokens);
            rows.push(row);
        }
    }
    Ok((workload, limits, rows))
}

/// One stack of the crate with the given ledger (the simulation's
/// `tower-llm-limits` strategy, without its estimate recording): the
/// preset's budget (`TokenBudgetBuilder::anthropic`, every setting of it)
/// given the ledger.
fn stack(meter: Meter, args: &Args, clock: WallClock, ledger: Arc<dyn Ledger>) -> Client {
    let limits = LimitsConfig::from(Limits::new().rpm(args.rpm).itpm(args.itpm).otpm(args.otpm));
    let budget = TokenBudgetBuilder::anthropic(limits.clone())
        .output_mode(if args.reserve_mode() {
            OutputMode::Reserve
        } else {
            OutputMode::Realtime
        })
        .ledger(ledger)
        .build();
    let retry = RetryAfterLayer::builder().wall_clock(clock).build();
    let layer = LimitsLayer::anthropic(limits)
        .with_budget(budget)
        .with_retry(retry);
    let svc = ServiceBuilder::new()
        .map_response(box_response)
        .layer(layer)
        .service(meter);
    BoxCloneService::new(svc)
}

/// What the stacks of a fleet share: a Redis (and there the prompt cache,
/// if `share`), one in-memory ledger, or nothing (a ledger each).
#[derive(Debug, Clone, Copy)]
enum Store<'a> {
    Redis { url: &'a str, share: bool },
    One { share: bool },
    Each,
}

async fn run_fleet(
    args: &Args,
    n: usize,
    store: Store<'_>,
    items: &Arc<Vec<Item>>,
    limits: &LimitSpec,
    virtual_time: bool,
) -> Result<(Row, u64), String> {
    let clock = super::wall_clock(virtual_time);
    let (transport, emulator) = emu::transport(args, clock)?;
    let log = Log::new();
    let timing = Arc::new(Timing::default());
    let prefix = format!("tll-simulate-{}-{}-{n}", std::process::id(), now_nanos());
    let mut clients = Vec::with_capacity(n);
    let mut shared = Vec::new();
    let one = Arc::new(OneLedger::default());
    for _ in 0..n {
        let ledger: Arc<dyn Ledger> = match store {
            Store::Redis { url, share } => {
                let ledger = RedisLedger::builder(url)
                    .prefix(&prefix)
                    .replicas(u32::try_from(n).unwrap_or(u32::MAX))
                    .share_prompt_cache(share)
                    .connect()
                    .await
                    .map_err(|e| format!("--redis {url}: {e}"))?;
                shared.push(ledger.clone());
                Arc::new(Timed {
                    inner: ledger,
                    timing: timing.clone(),
                })
            }
            Store::One { share } => Arc::new(OneView {
                stack: clients.len(),
                view: share.then(|| {
                    Arc::new(OnePromptView {
                        prompt: Arc::clone(&one.prompt),
                        stack: clients.len(),
                    })
                }),
                one: Arc::clone(&one),
            }),
            Store::Each => Arc::new(InMemoryLedger::new()),
        };
        clients.push(stack(
            Meter::new(transport.clone(), log.clone()),
            args,
            clock,
            ledger,
        ));
    }
    let name = match store {
        Store::Redis { share: true, .. } => format!("fleet {n}, redis"),
        Store::Redis { share: false, .. } => format!("fleet {n}, redis, own cache"),
        Store::One { share: true } => format!("fleet {n}, one ledger"),
        Store::One { share: false } => format!("fleet {n}, one ledger, own cache"),
        Store::Each => format!("fleet {n}, in-memory"),
    };
    let progress = progress::Progress::new(&name, items.len(), !virtual_time && !args.json);
    let client = BoxCloneService::new(Fleet::new(clients));
    let path = "/v1/messages".to_string();
    let outcomes = run::drive(
        client,
        items.clone(),
        args.concurrency,
        log.clone(),
        None,
        path,
        progress.clone(),
    )
    .await;
    progress.finish();
    if tracing::enabled!(target: "simulate", tracing::Level::DEBUG) {
        // Who wrote what: each attempt's usage, in the order sent.
        for a in log.snapshot() {
            let u = a.usage.as_ref();
            tracing::debug!(
                target: "simulate",
                item = a.request,
                sent_ms = a.sent.as_millis() as u64,
                status = a.status,
                input = u.map(|u| u.input_tokens),
                cache_write = u.map(|u| u.cache_creation_input_tokens),
                cache_read = u.map(|u| u.cache_read_input_tokens),
                "attempt"
            );
        }
    }
    let charged = emu::charged(&emulator, args.reserve_mode());
    let cache_read_tokens = emu::cache_tokens(&emulator).0;
    let row = report::row(&name, &outcomes, log.snapshot(), charged, limits, None);
    if matches!(store, Store::Redis { .. }) && !args.json {
        println!("{}", redis_figures(&name, &row, &shared, &timing));
    }
    Ok((row, cache_read_tokens))
}

/// Calls per request and reserve latency of one Redis run.
fn redis_figures(name: &str, row: &Row, ledgers: &[RedisLedger], timing: &Timing) -> String {
    let (calls, reserves, batches, watches, fallback) =
        ledgers.iter().fold((0, 0, 0, 0, 0), |(c, r, b, w, f), l| {
            let s = l.stats();
            (
                c + s.calls,
                r + s.reserves,
                b + s.write_batches,
                w + s.watch_calls,
                f + s.fallback_answers,
            )
        });
    let mut samples = timing.samples.lock().map(|s| s.clone()).unwrap_or_default();
    samples.sort();
    let pick = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).saturating_sub(1);
        samples.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let attempts = row.attempts.max(1) as f64;
    format!(
        "{name}: {:.2} Redis calls per request attempt ({calls} calls for {} attempts: \
{:.2} reservations per attempt, the first ask and the asks again after a wait, \
{:.2} write batches per attempt, a response's sync and settlement, \
{:.2} watch calls per attempt, asking for markers while a request holds for another \
process's writer), {fallback} fallback answers; reserve latency p50 {:.0} us, p99 {:.0} us",
        calls as f64 / attempts,
        row.attempts,
        reserves as f64 / attempts,
        batches as f64 / attempts,
        watches as f64 / attempts,
        pick(0.5),
        pick(0.99),
    )
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The client the workers call: each clone (one per worker) is bound to the
/// next stack, round-robin.
struct Fleet {
    stacks: Arc<Mutex<Vec<Client>>>,
    next: Arc<AtomicUsize>,
    mine: Client,
    /// The index of `mine`, for the trace (`SIMULATE_TRACE`).
    index: usize,
}

impl Fleet {
    fn new(stacks: Vec<Client>) -> Self {
        let mine = stacks[0].clone();
        let stacks = Arc::new(Mutex::new(stacks));
        Fleet {
            stacks,
            next: Arc::new(AtomicUsize::new(1)),
            mine,
            index: 0,
        }
    }
}

impl Clone for Fleet {
    fn clone(&self) -> Self {
        let stacks = self.stacks.lock().unwrap_or_else(|e| e.into_inner());
        let i = self.next.fetch_add(1, Ordering::Relaxed) % stacks.len();
        Fleet {
            stacks: self.stacks.clone(),
            next: self.next.clone(),
            mine: stacks[i].clone(),
            index: i,
        }
    }
}

impl Service<Request<Full<Bytes>>> for Fleet {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future =
        tracing::instrument::Instrumented<<Client as Service<Request<Full<Bytes>>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.mine.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        use tracing::Instrument;
        // The trace's events of this request carry its stack and index.
        let item = req
            .headers()
            .get(run::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<usize>().ok());
        let span = tracing::debug_span!("req", stack = self.index, item);
        self.mine.call(req).instrument(span)
    }
}

/// One in-memory ledger and prompt-cache view for every stack
/// (`--fleet-one-ledger`).
#[derive(Debug, Default)]
struct OneLedger {
    ledger: InMemoryLedger,
    prompt: Arc<OnePrompt>,
    /// Per key, the outputs the stacks' answers reported, and which stack
    /// told each (`Ledger::output_learned`): what a `RedisLedger` shares.
    outputs: Mutex<std::collections::HashMap<String, Vec<(usize, OutputSample)>>>,
}

/// The prefixes a response confirmed cached (until when, and which stack
/// said so last), and the prefixes being written: by which stacks (one
/// entry per request in flight, admitted and its answer not begun), and
/// the requests of other stacks holding for them. The same rules as a
/// `RedisLedger` with a shared prompt cache, with no network between.
#[derive(Debug, Default)]
struct OnePrompt {
    cached: Mutex<std::collections::HashMap<u64, (Instant, usize)>>,
    /// The prefixes' sizes as the server counted them, as the responses
    /// that confirmed them said (`Ledger::prefixes_cached_sized`).
    served: Mutex<std::collections::HashMap<u64, u64>>,
    writing: Mutex<std::collections::HashMap<u64, Vec<usize>>>,
    watchers: Mutex<std::collections::HashMap<u64, Vec<Waker>>>,
    /// (prefix, stack): a reservation of the stack was held for the
    /// prefix's writer.
    held: Mutex<std::collections::HashSet<(u64, usize)>>,
    /// The prefixes that queued requests will write: by which stack and
    /// request, the tokens of that request's longest write, and until when
    /// the marker lives.
    queued: Mutex<std::collections::HashMap<u64, Vec<Queued>>>,
    /// Per stack, when its head of the line asks again (its last wait's
    /// end): a queued marker lives at least until then plus the grace, as
    /// a `RedisLedger` marks and renews it.
    head_asks: Mutex<std::collections::HashMap<usize, Instant>>,
}

/// A queued request's marker on one prefix it will write.
#[derive(Debug, Clone, Copy)]
struct Queued {
    stack: usize,
    request: u64,
    tokens: u64,
    until: Instant,
}

impl OnePrompt {
    /// Whether any stack writes `hash`, will write it from its queue, or
    /// confirmed it cached (the writer grace looks for a prefix with no
    /// marker at all, as a `RedisLedger`'s script does).
    fn marked(&self, hash: u64) -> bool {
        let now = Instant::now();
        let writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        if writing.get(&hash).is_some_and(|by| !by.is_empty()) {
            return true;
        }
        drop(writing);
        let queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        if queued
            .get(&hash)
            .is_some_and(|by| by.iter().any(|q| q.until > now))
        {
            return true;
        }
        drop(queued);
        let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        cached.get(&hash).is_some_and(|(until, _)| *until > now)
    }

    /// Whether a stack other than `stack` writes `hash`.
    fn written_by_another(&self, hash: u64, stack: usize) -> bool {
        let writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        writing
            .get(&hash)
            .is_some_and(|by| by.iter().any(|s| *s != stack))
    }

    /// Whether a queued request of a stack other than `stack` writes
    /// `hash`, with a longest write shorter than `below` tokens.
    fn queued_by_another(&self, hash: u64, stack: usize, below: u64) -> bool {
        let now = Instant::now();
        let queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        queued.get(&hash).is_some_and(|by| {
            by.iter()
                .any(|q| q.stack != stack && q.tokens < below && q.until > now)
        })
    }

    /// Whether a queued request of a stack other than `stack` writes
    /// `hash` and no admitted request of another stack does.
    fn only_queued(&self, hash: u64, stack: usize) -> bool {
        !self.written_by_another(hash, stack) && self.queued_by_another(hash, stack, u64::MAX)
    }

    /// When the latest marker of another stack's queued request that
    /// writes `hash` expires.
    fn queued_until(&self, hash: u64, stack: usize) -> Option<Instant> {
        let queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        queued
            .get(&hash)?
            .iter()
            .filter(|q| q.stack != stack)
            .map(|q| q.until)
            .filter(|until| *until > Instant::now())
            .max()
    }

    /// A stack's head was answered a wait of `retry_in`: its other queued
    /// requests' markers live until it asks again, plus the grace.
    fn head_waits(&self, stack: usize, request: u64, retry_in: Duration) {
        let next = Instant::now() + retry_in;
        let mut asks = self.head_asks.lock().unwrap_or_else(|e| e.into_inner());
        asks.insert(stack, next);
        drop(asks);
        let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        for q in queued.values_mut().flatten() {
            if q.stack == stack && q.request != request {
                q.until = q.until.max(next + LINE_GRACE);
            }
        }
    }

    /// Marks `writes` as queued by a stack's request, at least until its
    /// stack's head asks again, plus the grace.
    fn mark_queued(&self, stack: usize, request: u64, writes: &[u64], tokens: u64, for_: Duration) {
        let now = Instant::now();
        let asks = self.head_asks.lock().unwrap_or_else(|e| e.into_inner());
        let head = asks.get(&stack).map_or(now, |at| *at + LINE_GRACE);
        drop(asks);
        let until = (now + for_).max(head);
        let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        for h in writes {
            let list = queued.entry(*h).or_default();
            list.retain(|q| (q.stack, q.request) != (stack, request) && q.until > now);
            list.push(Queued {
                stack,
                request,
                tokens,
                until,
            });
        }
    }

    /// Clears a stack's request's queued markers; returns the wakers of the
    /// requests holding for prefixes no longer written nor queued.
    fn unmark_queued(&self, stack: usize, request: u64) -> Vec<Waker> {
        let mut gone = Vec::new();
        {
            let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
            queued.retain(|h, list| {
                let before = list.len();
                list.retain(|q| (q.stack, q.request) != (stack, request));
                if list.len() < before {
                    gone.push(*h);
                }
                !list.is_empty()
            });
        }
        let mut wake = Vec::new();
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        for h in gone {
            if let Some(list) = watchers.remove(&h) {
                wake.extend(list);
            }
        }
        wake
    }
}

/// One stack's view of the [`OnePrompt`]: the prefixes the other stacks
/// confirmed.
#[derive(Debug)]
struct OnePromptView {
    prompt: Arc<OnePrompt>,
    stack: usize,
}

impl SharedPromptCache for OnePromptView {
    fn hash_key(&self) -> [u8; 16] {
        [0x5a; 16]
    }

    fn is_cached(&self, hash: u64) -> bool {
        let cached = self.prompt.cached.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .get(&hash)
            .is_some_and(|(until, by)| *by != self.stack && Instant::now() < *until)
    }

    fn served(&self, hash: u64) -> Option<u64> {
        let served = self.prompt.served.lock().unwrap_or_else(|e| e.into_inner());
        served.get(&hash).copied()
    }
}

/// A stack's handle on the [`OneLedger`]; with `share`, its prompt-cache
/// view too.
#[derive(Debug)]
struct OneView {
    one: Arc<OneLedger>,
    stack: usize,
    view: Option<Arc<OnePromptView>>,
}

impl Ledger for OneView {
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation> {
        self.one.ledger.reserve(key, limits, costs)
    }

    fn reserve_in_line(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
        place: LinePlace,
    ) -> Option<LedgerFuture<Reservation>> {
        self.one
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
        let Some(view) = self.view.as_ref() else {
            return self.reserve_in_line(key, limits, costs, headroom, place);
        };
        let prompt = &self.one.prompt;
        // Held for a writer admitted, or for a queued request that writes
        // a shorter prefix of it (nested prefixes are written shortest
        // first: `Ledger::prefixes_queued`).
        let busy = prefixes
            .pending
            .iter()
            .find(|h| {
                prompt.written_by_another(**h, view.stack)
                    || (!prefixes.writes.contains(h)
                        && prompt.queued_by_another(**h, view.stack, prefixes.tokens))
            })
            .copied();
        // At its first ask, a writer waits the writer grace while a
        // shorter prefix of it has no marker, as on a `RedisLedger`.
        let graced = busy.is_none() && prefixes.shorter.iter().any(|h| !prompt.marked(*h));
        let answer = match graced {
            // Kept from going for the grace, its place and costs kept.
            true => self.one.ledger.reserve_in_line_or_grace_at(
                key,
                limits,
                costs,
                headroom,
                place,
                WRITER_GRACE,
                Instant::now(),
            ),
            false => self.one.ledger.reserve_in_line_or_hold_at(
                key,
                limits,
                costs,
                headroom,
                place,
                busy.map(|_| prefixes.hold),
                Instant::now(),
            ),
        };
        match answer {
            Reservation::Wait { retry_in, .. }
                if busy.is_some() && retry_in == PREFIX_WRITING_WAIT =>
            {
                // It would go now while another stack writes its prefix:
                // held for that writer's answer, nothing debited.
                if let Some(h) = busy {
                    let mut held = prompt.held.lock().unwrap_or_else(|e| e.into_inner());
                    held.insert((h, view.stack));
                }
            }
            Reservation::Admitted => {
                let mut writing = prompt.writing.lock().unwrap_or_else(|e| e.into_inner());
                for h in prefixes.writes {
                    writing.entry(*h).or_default().push(view.stack);
                }
                drop(writing);
                // Its queued markers became a writer's: whoever held for
                // them holds on.
                let _ = prompt.unmark_queued(view.stack, place.request);
            }
            _ => {}
        }
        if let Reservation::Wait { retry_in, .. } = answer {
            if place.head {
                prompt.head_waits(view.stack, place.request, retry_in);
            }
            if !prefixes.queued_for.is_zero() {
                prompt.mark_queued(
                    view.stack,
                    place.request,
                    prefixes.writes,
                    prefixes.tokens,
                    prefixes.queued_for.max(retry_in + LINE_GRACE),
                );
            }
        }
        Some(LedgerFuture::ready(Ok(answer)))
    }

    fn prefixes_queued(
        &self,
        _key: &str,
        request: u64,
        writes: &[u64],
        tokens: u64,
        queued_for: Duration,
    ) {
        if let Some(view) = self.view.as_ref() {
            let prompt = &self.one.prompt;
            prompt.mark_queued(view.stack, request, writes, tokens, queued_for);
        }
    }

    fn prefixes_dequeued(&self, _key: &str, request: u64) {
        if let Some(view) = self.view.as_ref() {
            let wake = self.one.prompt.unmark_queued(view.stack, request);
            wake.into_iter().for_each(Waker::wake);
        }
    }

    fn prefix_writing(&self, hash: u64, waker: &Waker) -> bool {
        let Some(view) = self.view.as_ref() else {
            return false;
        };
        let prompt = &self.one.prompt;
        let held = prompt.held.lock().unwrap_or_else(|e| e.into_inner());
        if !held.contains(&(hash, view.stack))
            || !(prompt.written_by_another(hash, view.stack)
                || prompt.queued_by_another(hash, view.stack, u64::MAX))
        {
            return false;
        }
        drop(held);
        let mut watchers = prompt.watchers.lock().unwrap_or_else(|e| e.into_inner());
        let list = watchers.entry(hash).or_default();
        if !list.iter().any(|w| w.will_wake(waker)) {
            list.push(waker.clone());
        }
        drop(watchers);
        let queued = prompt.only_queued(hash, view.stack);
        if let Some(until) = prompt.queued_until(hash, view.stack).filter(|_| queued) {
            // As a `RedisLedger`'s watch: the held request learns when the
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
        self.view
            .as_ref()
            .is_some_and(|view| self.one.prompt.only_queued(hash, view.stack))
    }

    /// As a `RedisLedger` sharing the prompt cache, by default.
    fn writer_grace(&self) -> Duration {
        match self.view {
            Some(_) => WRITER_GRACE,
            None => Duration::ZERO,
        }
    }

    fn prefixes_written(&self, hashes: &[u64]) {
        let Some(view) = self.view.as_ref() else {
            return;
        };
        let prompt = &self.one.prompt;
        let mut wake = Vec::new();
        {
            let mut writing = prompt.writing.lock().unwrap_or_else(|e| e.into_inner());
            let mut watchers = prompt.watchers.lock().unwrap_or_else(|e| e.into_inner());
            for h in hashes {
                if let Some(by) = writing.get_mut(h) {
                    if let Some(i) = by.iter().position(|s| *s == view.stack) {
                        by.swap_remove(i);
                    }
                    if by.is_empty() {
                        writing.remove(h);
                    }
                }
                if let Some(list) = watchers.remove(h) {
                    wake.extend(list);
                }
                if !writing.contains_key(h) {
                    let mut held = prompt.held.lock().unwrap_or_else(|e| e.into_inner());
                    held.retain(|(p, _)| p != h);
                }
            }
        }
        wake.into_iter().for_each(Waker::wake);
    }

    fn settle(&self, key: &str, limits: &Limits, delta: CostDelta) -> LedgerFuture<()> {
        self.one.ledger.settle(key, limits, delta)
    }

    fn sync(&self, key: &str, limits: &Limits, d: Dimension, s: LimitStatus) -> LedgerFuture<()> {
        self.one.ledger.sync(key, limits, d, s)
    }

    fn sync_all(&self, key: &str, limits: &Limits, statuses: [LimitStatus; 3]) -> LedgerFuture<()> {
        self.one.ledger.sync_all(key, limits, statuses)
    }

    fn state(&self, key: &str, limits: &Limits) -> LedgerFuture<Option<[BucketState; 3]>> {
        self.one.ledger.state(key, limits)
    }

    fn prompt_cache(&self) -> Option<Arc<dyn SharedPromptCache>> {
        let view = self.view.as_ref()?;
        Some(Arc::clone(view) as Arc<dyn SharedPromptCache>)
    }

    fn output_learned(&self, key: &str, sample: OutputSample) {
        let mut outputs = self.one.outputs.lock().unwrap_or_else(|e| e.into_inner());
        outputs
            .entry(key.to_owned())
            .or_default()
            .push((self.stack, sample));
    }

    fn outputs_learned(&self, key: &str, after: u64, into: &mut Vec<OutputSample>) -> u64 {
        let outputs = self.one.outputs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(log) = outputs.get(key) else {
            return after;
        };
        let from = usize::try_from(after).unwrap_or(usize::MAX).min(log.len());
        into.extend(
            log[from..]
                .iter()
                .filter(|(stack, _)| *stack != self.stack)
                .map(|(_, sample)| *sample),
        );
        log.len() as u64
    }

    fn prefixes_cached(&self, key: &str, hashes: &[u64]) {
        self.prefixes_cached_sized(key, hashes, None);
    }

    fn prefixes_cached_sized(&self, _key: &str, hashes: &[u64], size: Option<ServedSize>) {
        let Some(view) = self.view.as_ref() else {
            return;
        };
        if let Some(size) = size {
            let mut served = self
                .one
                .prompt
                .served
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            served.insert(size.hash, size.tokens);
        }
        let until = (Instant::now() + Duration::from_secs(300), view.stack);
        let mut cached = self
            .one
            .prompt
            .cached
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for h in hashes {
            cached.insert(*h, until);
        }
    }
}

/// Reserve latencies, as the budget layer waited for them.
#[derive(Debug, Default)]
struct Timing {
    samples: Mutex<Vec<Duration>>,
}

/// A [`RedisLedger`] that times its reservations.
#[derive(Debug)]
struct Timed {
    inner: RedisLedger,
    timing: Arc<Timing>,
}

impl Timed {
    fn time(&self, fut: LedgerFuture<Reservation>) -> LedgerFuture<Reservation> {
        let timing = self.timing.clone();
        let start = Instant::now();
        LedgerFuture::new(async move {
            let answer = fut.await;
            if let Ok(mut s) = timing.samples.lock() {
                s.push(start.elapsed());
            }
            answer
        })
    }
}

impl Ledger for Timed {
    fn reserve(&self, key: &str, limits: &Limits, costs: Costs) -> LedgerFuture<Reservation> {
        self.time(self.inner.reserve(key, limits, costs))
    }

    fn reserve_with_headroom(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
    ) -> Option<LedgerFuture<Reservation>> {
        let fut = self
            .inner
            .reserve_with_headroom(key, limits, costs, headroom)?;
        Some(self.time(fut))
    }

    fn reserve_in_line(
        &self,
        key: &str,
        limits: &Limits,
        costs: Costs,
        headroom: Costs,
        place: LinePlace,
    ) -> Option<LedgerFuture<Reservation>> {
        let fut = self
            .inner
            .reserve_in_line(key, limits, costs, headroom, place)?;
        Some(self.time(fut))
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
        let fut = self
            .inner
            .reserve_in_line_with_prefixes(key, limits, costs, headroom, place, prefixes)?;
        Some(self.time(fut))
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

    fn prefixes_queued(
        &self,
        key: &str,
        request: u64,
        writes: &[u64],
        tokens: u64,
        queued_for: Duration,
    ) {
        self.inner
            .prefixes_queued(key, request, writes, tokens, queued_for);
    }

    fn prefixes_dequeued(&self, key: &str, request: u64) {
        self.inner.prefixes_dequeued(key, request);
    }

    fn prefixes_written(&self, hashes: &[u64]) {
        self.inner.prefixes_written(hashes);
    }

    fn sync_with_settlement(&self) -> bool {
        self.inner.sync_with_settlement()
    }

    fn settle_and_sync(
        &self,
        key: &str,
        limits: &Limits,
        delta: CostDelta,
        statuses: [LimitStatus; 3],
    ) -> LedgerFuture<()> {
        self.inner.settle_and_sync(key, limits, delta, statuses)
    }

    fn sync_all(&self, key: &str, limits: &Limits, statuses: [LimitStatus; 3]) -> LedgerFuture<()> {
        self.inner.sync_all(key, limits, statuses)
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
        self.inner.prefixes_cached(key, hashes);
    }

    fn prefixes_cached_sized(&self, key: &str, hashes: &[u64], served: Option<ServedSize>) {
        self.inner.prefixes_cached_sized(key, hashes, served);
    }

    fn output_learned(&self, key: &str, sample: OutputSample) {
        self.inner.output_learned(key, sample);
    }

    fn outputs_learned(&self, key: &str, after: u64, into: &mut Vec<OutputSample>) -> u64 {
        self.inner.outputs_learned(key, after, into)
    }
}

/// The apply script's reservations per second against a plain `INCR`, each
/// for one second with 16 concurrent callers on one connection.
async fn script_vs_incr(url: &str) -> Result<String, String> {
    let err = |e: &dyn std::fmt::Display| format!("--redis {url}: {e}");
    let ledger = RedisLedger::builder(url)
        .prefix(format!("tll-simulate-bench-{}", now_nanos()))
        .connect()
        .await
        .map_err(|e| err(&e))?;
    let client = redis::Client::open(url).map_err(|e| err(&e))?;
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| err(&e))?;
    let incr_key = format!("tll-simulate-bench-incr-{}", now_nanos());
    let limits = Limits::new().rpm(u64::MAX / 4);
    let script = ops_per_second(move |i| {
        let ledger = ledger.clone();
        async move {
            let key = format!("k{}", i % 64);
            ledger
                .reserve(
                    &key,
                    &limits,
                    Costs {
                        requests: 1,
                        input_tokens: 0,
                        output_tokens: 0,
                    },
                )
                .await
                .is_ok()
        }
    })
    .await;
    let bench_conn = conn.clone();
    let bench_key = incr_key.clone();
    let incr = ops_per_second(move |_| {
        let mut conn = bench_conn.clone();
        let key = bench_key.clone();
        async move {
            redis::cmd("INCR")
                .arg(&key)
                .query_async::<i64>(&mut conn)
                .await
                .is_ok()
        }
    })
    .await;
    let _: Result<(), _> = redis::cmd("DEL")
        .arg(&incr_key)
        .query_async(&mut conn.clone())
        .await;
    Ok(format!(
        "redis: reserve script {script:.0} ops/s, plain INCR {incr:.0} ops/s (ratio {:.2}), 16 callers, 1 s each",
        script / incr.max(1.0)
    ))
}

async fn ops_per_second<F, Fut>(op: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicUsize::new(0));
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for caller in 0..16 {
        let (op, done) = (op.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = caller;
            while start.elapsed() < Duration::from_secs(1) {
                if op(i).await {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                i += 16;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &str) -> Result<Args, clap::Error> {
        Args::try_from_iter(std::iter::once("simulate").chain(flags.split_whitespace()))
    }

    #[test]
    fn fleet_flags_parse_and_bad_ones_are_refused() {
        let a = args("--fleet 4,16 --redis redis://127.0.0.1:1/").expect("parses");
        assert_eq!(a.fleet, Some(vec![4, 16]));
        assert_eq!(a.redis.as_deref(), Some("redis://127.0.0.1:1/"));
        assert!(args("--fleet 0").is_err());
        assert!(
            args("--redis redis://127.0.0.1:1/").is_err(),
            "--redis needs --fleet"
        );
    }

    /// Stacks that share one ledger pace as one: no request lost, no more
    /// 429s than one stack meets, with the prompt-cache view shared or not;
    /// the rows are named for what they share.
    #[test]
    fn stacks_sharing_one_ledger_pace_as_one() {
        let a = args("--json --fleet 4 --fleet-one-ledger --fleet-unshared --no-contrast")
            .expect("parses");
        assert!(args("--fleet-unshared").is_err(), "needs --fleet");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        let (_, _, rows) = rt.block_on(run(&a, &[4], true)).expect("runs");
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["fleet 4, one ledger", "fleet 4, one ledger, own cache"]
        );
        for row in &rows {
            assert_eq!((row.ok, row.failed), (30, 0), "{}", row.name);
            assert_eq!(row.rate_limited, 0, "{}", row.name);
        }
    }

    /// Without Redis, N stacks with a ledger each pace to N times the limit:
    /// the contrast row meets 429s that one stack would not.
    #[test]
    fn stacks_with_a_ledger_each_overshoot_the_shared_limit() {
        let a = args("--json --fleet 1,4 --requests 120").expect("parses");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        let (_, _, rows) = rt.block_on(run(&a, &[1, 4], true)).expect("runs");
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["fleet 1, in-memory", "fleet 4, in-memory"]);
        assert_eq!(rows[0].ok, 120, "one stack loses no request");
        assert!(
            rows[0].rate_limited <= 1,
            "one stack paces: {}",
            rows[0].rate_limited
        );
        assert!(
            rows[1].rate_limited > 5 * rows[0].rate_limited.max(1),
            "four stacks overshoot: {} 429s",
            rows[1].rate_limited
        );
    }
}
