//! The whole preset (`LimitsLayer::anthropic`) against tower's own stack and
//! against the bare service, in memory and over TCP, in the same run.
//!
//! Run: `cargo bench --bench preset -- --warm-up-time 1 --measurement-time 3`
//!
//! - `preset_in_memory/*`: one request at a time through an inner service
//!   that answers a 300-byte Messages JSON with the 12
//!   `anthropic-ratelimit-*` headers, its body read to the end: the bare
//!   service, tower's `Retry` (with its `TpsBudget`) + `ConcurrencyLimit` +
//!   `Buffer` + `RateLimit`, and the preset.
//! - Before the timings, one-shot figures are printed: the three in-memory
//!   stacks in interleaved rounds (the median of each round's ratio of added
//!   costs, robust to the machine's load changing), allocations per
//!   request (counting global allocator) for each of the three, the memory
//!   per request waiting in the preset's queue (for a concurrency slot) and
//!   in the budget's line (with the blocks each waiter keeps, by size; in
//!   the queue also for a request of six headers, whose header map has no
//!   spare room), and the TCP
//!   benchmark: a hyper-util client against a hyper server on loopback
//!   answering the same response, 64 requests in flight, requests per second
//!   bare and through the preset, on a current-thread runtime and on two
//!   worker threads: after a warm-up round, seven rounds of 20,000 requests
//!   on the same two clients, interleaved (alternating which goes first);
//!   the median of the rounds' ratios, with the lowest and highest.

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use criterion::{criterion_group, Criterion};
use http::{HeaderMap, Request, Response};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::retry::budget::{Budget, TpsBudget};
use tower::retry::Policy;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_llm_limits::budget::Limits;
use tower_llm_limits::preset::{LimitsLayer, TransportBody};
use tower_llm_limits::wire::ratelimit::{insert_rate_limit_headers, LimitState};
use tower_llm_limits::BoxError;

// ---------------------------------------------------------------------------
// A global allocator that counts allocations.

struct Counting;
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// While set, [`BY_SIZE`] counts live blocks by size (the waiter figure's
/// breakdown).
static TRACK: AtomicBool = AtomicBool::new(false);
/// Live blocks per size in bytes (sizes of 4,096 and more in the last slot).
static BY_SIZE: [AtomicIsize; 4097] = [const { AtomicIsize::new(0) }; 4097];

fn track(size: usize, delta: isize) {
    if TRACK.load(Ordering::Relaxed) {
        BY_SIZE[size.min(4096)].fetch_add(delta, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        track(layout.size(), 1);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        track(layout.size(), -1);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        track(new, 1);
        track(layout.size(), -1);
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ---------------------------------------------------------------------------

const REQUEST: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Summarise the attached report in three bullet points, keeping every figure."}]}"#;
/// A 300-byte Messages answer.
const ANSWER: &str = r#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"- Revenue rose 12%.\n- Costs fell.\n- Two hires."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":42,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":19}}"#;

/// Limits far above what a bench sends, reported by the answers too (so the
/// learned limits never slow the bench down).
const HUGE: u64 = 1_000_000_000_000;

fn limits() -> Limits {
    Limits::new().rpm(HUGE).itpm(HUGE).otpm(HUGE)
}

fn answer_headers() -> HeaderMap {
    let state = Some(LimitState {
        limit: HUGE,
        remaining: HUGE - 1,
        reset_in: Duration::from_millis(10),
    });
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    insert_rate_limit_headers(&mut h, &[state; 3], SystemTime::now());
    h
}

fn request() -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::from_static(REQUEST.as_bytes())));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static("http://127.0.0.1/v1/messages");
    let h = req.headers_mut();
    h.insert(
        "anthropic-version",
        http::HeaderValue::from_static("2023-06-01"),
    );
    h.insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    req
}

/// [`request`] with four more headers, as an SDK sends: six, the most a
/// header map holds before it grows, so that it has no spare room (a
/// request's map keeps the room it grew to; a copy of it has none).
fn six_header_request() -> Request<Full<Bytes>> {
    let mut req = request();
    let h = req.headers_mut();
    for (name, value) in [
        ("x-api-key", "sk-ant-api03-0123456789abcdef0123456789abcdef"),
        ("user-agent", "Anthropic/Python 0.40.0"),
        ("x-stainless-lang", "python"),
        ("x-stainless-package-version", "0.40.0"),
    ] {
        h.insert(name, http::HeaderValue::from_static(value));
    }
    req
}

fn answer(headers: &HeaderMap) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(ANSWER.as_bytes())));
    *resp.headers_mut() = headers.clone();
    resp
}

type Answer = Ready<Result<Response<Full<Bytes>>, Infallible>>;

/// The in-memory upstream: the same answer to every request.
fn inner<B>(
) -> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future = Answer>
       + Clone
       + Send
       + Sync
       + 'static {
    let headers = Arc::new(answer_headers());
    service_fn(move |req: Request<B>| {
        drop(black_box(req));
        ready(Ok(answer(&headers)))
    })
}

/// tower's retry policy with its own `TpsBudget` (deposit per success), the
/// like-for-like of the preset's retry layer.
#[derive(Clone)]
struct CloneWithBudget(Arc<TpsBudget>);

impl<B: Clone, Res, E> Policy<Request<B>, Res, E> for CloneWithBudget {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut Request<B>, result: &mut Result<Res, E>) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                self.0.deposit();
                None
            }
            Err(_) => self.0.withdraw().then(|| ready(())),
        }
    }

    fn clone_request(&mut self, req: &Request<B>) -> Option<Request<B>> {
        let mut clone = Request::new(req.body().clone());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        *clone.extensions_mut() = req.extensions().clone();
        Some(clone)
    }
}

fn tps_budget() -> CloneWithBudget {
    CloneWithBudget(Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)))
}

async fn one<S, B>(svc: &mut S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let resp = svc
        .ready()
        .await
        .expect("ready")
        .call(request())
        .await
        .expect("ok");
    black_box(resp.into_body().collect().await.expect("body"));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The three stacks, in memory; each a boxed cloneable service.
type Boxed = tower::util::BoxCloneService<
    Request<Full<Bytes>>,
    Response<UnsyncBoxBody<Bytes, BoxError>>,
    BoxError,
>;

type MakeStack = fn() -> Boxed;

fn boxed_body<B>(resp: Response<B>) -> Response<UnsyncBoxBody<Bytes, BoxError>>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    resp.map(|b| b.map_err(Into::into).boxed_unsync())
}

fn bare() -> Boxed {
    tower::util::BoxCloneService::new(
        ServiceBuilder::new()
            .map_response(boxed_body)
            .map_err(BoxError::from)
            .service(inner()),
    )
}

/// Must be built inside a runtime (`Buffer` spawns its worker).
fn tower_stack() -> Boxed {
    tower::util::BoxCloneService::new(
        ServiceBuilder::new()
            .map_response(boxed_body)
            .retry(tps_budget())
            .concurrency_limit(64)
            .buffer(1024)
            .rate_limit(HUGE, Duration::from_secs(1))
            .service(inner()),
    )
}

fn preset() -> Boxed {
    tower::util::BoxCloneService::new(
        ServiceBuilder::new()
            .map_response(boxed_body)
            .layer(LimitsLayer::anthropic(limits()))
            .service(inner()),
    )
}

/// One layer of the preset alone, over the same upstream.
fn layer_alone(which: usize) -> Boxed {
    let preset = LimitsLayer::anthropic(limits());
    match which {
        0 => tower::util::BoxCloneService::new(
            ServiceBuilder::new()
                .map_response(boxed_body)
                .layer(preset.retry().clone())
                .service(inner()),
        ),
        1 => tower::util::BoxCloneService::new(
            ServiceBuilder::new()
                .map_response(boxed_body)
                .layer(preset.budget().clone())
                .service(inner()),
        ),
        _ => tower::util::BoxCloneService::new(
            ServiceBuilder::new()
                .map_response(boxed_body)
                .layer(preset.concurrency().clone())
                .map_err(BoxError::from)
                .service(inner()),
        ),
    }
}

fn retry_alone() -> Boxed {
    layer_alone(0)
}

fn budget_alone() -> Boxed {
    layer_alone(1)
}

fn concurrency_alone() -> Boxed {
    layer_alone(2)
}

fn in_memory(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("preset_in_memory");
    let stacks: [(&str, MakeStack); 3] = [
        ("bare", bare),
        ("tower_retry_concurrency_buffer_ratelimit", tower_stack),
        ("preset", preset),
    ];
    for (name, make) in stacks {
        let mut svc = rt.block_on(async { make() });
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        one(&mut svc).await;
                    }
                    t.elapsed()
                })
            })
        });
    }
    g.finish();
}

/// `preset_in_memory`'s three stacks in interleaved rounds: each round
/// times a batch through the bare service, tower's stack and the preset,
/// one after the other, so that a change in the machine's load moves all
/// three alike. The figure: the median over the rounds of each round's
/// ratio of added costs, `(preset - bare) / (tower - bare)`.
fn interleaved_in_memory() {
    // Short batches (about a millisecond, under a scheduler's time slice),
    // many rounds: a round the loaded machine preempted is an outlier the
    // median drops.
    const ROUNDS: usize = 301;
    const BATCH: usize = 200;
    async fn batch(svc: &mut Boxed) -> f64 {
        let t = Instant::now();
        for _ in 0..BATCH {
            one(svc).await;
        }
        t.elapsed().as_nanos() as f64 / BATCH as f64
    }
    let rt = runtime();
    let rows: Vec<[f64; 3]> = rt.block_on(async {
        let mut stacks = [bare(), tower_stack(), preset()];
        for s in &mut stacks {
            batch(s).await;
        }
        let mut rows = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            let mut row = [0.0; 3];
            for (slot, s) in row.iter_mut().zip(&mut stacks) {
                *slot = batch(s).await;
            }
            rows.push(row);
        }
        rows
    });
    let sorted = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v
    };
    let col = |i: usize| sorted(rows.iter().map(|r| r[i]).collect())[ROUNDS / 2];
    let ratios = sorted(
        rows.iter()
            .map(|[b, t, p]| (p - b) / (t - b))
            .filter(|r| r.is_finite())
            .collect(),
    );
    let (lo, mid, hi) = match ratios.as_slice() {
        [] => (f64::NAN, f64::NAN, f64::NAN),
        r => (r[r.len() / 4], r[r.len() / 2], r[r.len() * 3 / 4]),
    };
    println!(
        "in memory, {ROUNDS} interleaved rounds of {BATCH} requests (medians): bare {:.0} ns, \
         tower's stack {:.0} ns, preset {:.0} ns; added cost, preset / tower's stack, per round: \
         median {mid:.2}x (quartiles {lo:.2}x and {hi:.2}x; target <= 1.5x)",
        col(0),
        col(1),
        col(2),
    );
}

/// Allocations per request through each stack, after a warm-up.
fn allocation_figures() {
    const N: usize = 2_000;
    let rt = runtime();
    let mut per = Vec::new();
    for (name, make) in [
        ("bare", bare as MakeStack),
        ("tower stack", tower_stack),
        ("preset", preset),
        ("its retry layer alone", retry_alone),
        ("its budget layer alone", budget_alone),
        ("its concurrency layer alone", concurrency_alone),
    ] {
        let count = rt.block_on(async {
            let mut svc = make();
            for _ in 0..N {
                one(&mut svc).await;
            }
            let before = ALLOCATIONS.load(Ordering::SeqCst);
            for _ in 0..N {
                one(&mut svc).await;
            }
            (ALLOCATIONS.load(Ordering::SeqCst) - before) as f64 / N as f64
        });
        per.push((name, count));
    }
    let bare = per[0].1;
    for (name, count) in &per {
        println!(
            "allocations per request, in memory: {name}: {count:.1} ({:+.1} over bare)",
            count - bare
        );
    }
}

/// Where the waiters of [`waiters_in`] wait.
#[derive(Clone, Copy)]
enum Line {
    /// The concurrency queue: the budget admits every request (limits far
    /// above what is sent), the upstream never answers and holds every slot.
    Slots,
    /// The budget's line for the model's key: one request a minute.
    Budget,
}

/// Bytes per request waiting in the preset's queue (the concurrency
/// layer's), and in the budget's line: see [`waiters_in`].
fn waiter_figure() {
    waiters_in(Line::Slots, request, "");
    waiters_in(Line::Budget, request, "");
    waiters_in(Line::Slots, six_header_request, ", six headers");
}

/// Bytes per request waiting in `line`: `WAITERS` requests made by
/// `request` called (each polled once) while an upstream that never answers
/// holds every slot, less the bytes of the same requests merely kept in a
/// `Vec`.
fn waiters_in(line: Line, request: fn() -> Request<Full<Bytes>>, shape: &str) {
    const WAITERS: usize = 10_000;
    let rt = runtime();
    let _guard = rt.enter();
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let before = LIVE.load(Ordering::SeqCst);
    let requests: Vec<Request<Full<Bytes>>> = (0..WAITERS).map(|_| request()).collect();
    let bare = LIVE.load(Ordering::SeqCst) - before;
    drop(requests);
    let limits = LimitsLayer::anthropic(match line {
        Line::Slots => limits(),
        Line::Budget => Limits::new().rpm(1).itpm(HUGE).otpm(HUGE),
    });
    let mut svc = ServiceBuilder::new()
        .layer(limits.clone())
        .service(service_fn(|_req: Request<_>| {
            std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>()
        }));
    let before = LIVE.load(Ordering::SeqCst);
    let mut futures = Vec::with_capacity(WAITERS);
    let mut inline = 0;
    TRACK.store(true, Ordering::SeqCst);
    for _ in 0..WAITERS {
        let mut f = Box::pin(svc.call(request()));
        inline = std::mem::size_of_val(&*f);
        assert!(std::future::Future::poll(f.as_mut(), &mut cx).is_pending());
        futures.push(f);
    }
    TRACK.store(false, Ordering::SeqCst);
    let held = LIVE.load(Ordering::SeqCst) - before;
    let (waiting, queue) = match line {
        Line::Slots => (
            limits.concurrency().snapshot().waiting.total(),
            "the preset's queue (for a slot)",
        ),
        Line::Budget => (
            limits
                .budget()
                .snapshot()
                .keys
                .iter()
                .map(|k| k.waiting)
                .sum(),
            "the budget's line (for its turn)",
        ),
    };
    println!(
        "memory per waiter, full preset, in {queue}{shape}: {:.0} B ({waiting} of {WAITERS} \
         requests waiting; the requests themselves, {:.0} B each, not counted; target <= 600 \
         B), of which the response future's own {inline} B",
        (held.saturating_sub(bare)) as f64 / WAITERS as f64,
        bare as f64 / WAITERS as f64,
    );
    // What each waiter keeps, by block size: the blocks alive for most of
    // them (the requests' own included: they are held too).
    let blocks: Vec<String> = BY_SIZE
        .iter()
        .enumerate()
        .filter_map(|(size, n)| {
            let n = n.swap(0, Ordering::SeqCst);
            (n >= WAITERS as isize / 2)
                .then(|| format!("{size} B x{:.2}", n as f64 / WAITERS as f64))
        })
        .collect();
    println!(
        "  blocks per waiter, requests included: {}",
        blocks.join(", ")
    );
    drop(futures);
}

// ---------------------------------------------------------------------------
// Over TCP.

const TCP_REQUESTS: usize = 20_000;
const IN_FLIGHT: usize = 64;

async fn serve(listener: tokio::net::TcpListener) {
    let headers = Arc::new(answer_headers());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let headers = Arc::clone(&headers);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let headers = Arc::clone(&headers);
                async move {
                    // Read the request to its end, as a server does.
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(answer(&headers))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Sends `TCP_REQUESTS` through clones of `svc`, `IN_FLIGHT` at a time;
/// returns requests per second.
async fn drive<S, B>(svc: S, uri: &http::Uri) -> f64
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
    S::Future: Send,
    B: http_body::Body + Send,
    B::Data: Send,
    B::Error: std::fmt::Debug,
{
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(IN_FLIGHT);
    for _ in 0..IN_FLIGHT {
        let mut svc = svc.clone();
        let uri = uri.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..TCP_REQUESTS / IN_FLIGHT {
                let mut req = request();
                *req.uri_mut() = uri.clone();
                let resp = svc
                    .ready()
                    .await
                    .expect("ready")
                    .call(req)
                    .await
                    .expect("ok");
                black_box(resp.into_body().collect().await.expect("body"));
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    (TCP_REQUESTS / IN_FLIGHT * IN_FLIGHT) as f64 / t.elapsed().as_secs_f64()
}

/// Interleaved rounds over TCP, after a warm-up round (connections opened,
/// the preset's adaptive concurrency limit grown, allocator warm) on the
/// same two clients: each round drives the bare client and the preset,
/// alternating which goes first, so that a change in the machine's load
/// moves both alike. Returns each round's (bare, preset) requests per second.
async fn tcp_rounds(uri: &http::Uri) -> Vec<(f64, f64)> {
    let bare = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    // The transport takes the preset's own request body, unboxed (as the
    // preset's docs say a hyper-util client goes under it).
    let client = Client::builder(TokioExecutor::new()).build_http::<TransportBody<Full<Bytes>>>();
    let stack = ServiceBuilder::new()
        .layer(LimitsLayer::anthropic(limits()))
        .service(client);
    drive(bare.clone(), uri).await;
    drive(stack.clone(), uri).await;
    let mut out = Vec::with_capacity(TCP_ROUNDS);
    for round in 0..TCP_ROUNDS {
        let (b, p) = if round % 2 == 0 {
            let b = drive(bare.clone(), uri).await;
            (b, drive(stack.clone(), uri).await)
        } else {
            let p = drive(stack.clone(), uri).await;
            (drive(bare.clone(), uri).await, p)
        };
        out.push((b, p));
    }
    out
}

/// Interleaved rounds (see [`tcp_rounds`]) over TCP.
const TCP_ROUNDS: usize = 7;

fn tcp_figures(name: &str, rt: &tokio::runtime::Runtime) {
    let rounds: Vec<(f64, f64)> = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(listener));
        let uri: http::Uri = format!("http://{addr}/v1/messages").parse().expect("uri");
        tcp_rounds(&uri).await
    });
    let mut r: Vec<f64> = rounds.iter().map(|(b, p)| p / b).collect();
    r.sort_by(f64::total_cmp);
    for (bare, preset) in &rounds {
        println!(
            "tcp {name}: bare {bare:.0} req/s, preset {preset:.0} req/s ({:.2}x)",
            preset / bare
        );
    }
    println!(
        "tcp {name}: preset / bare requests per second, {TCP_ROUNDS} interleaved rounds of \
         {TCP_REQUESTS} requests: median {:.2}x (min {:.2}x, max {:.2}x; target >= 0.9x)",
        r[r.len() / 2],
        r[0],
        r[r.len() - 1]
    );
}

criterion_group!(benches, in_memory);

/// `PRESET_PROFILE=<stack>[:<requests>]` (`bare`, `tower`, `preset`, or one
/// layer alone: `retry`, `budget`, `concurrency`): only that stack, in
/// memory, for a fixed number of requests (default 100,000) after a warm-up,
/// then exit. For an instruction-counting profiler, whose counts do not
/// depend on the machine's load:
/// `PRESET_PROFILE=preset valgrind --tool=callgrind target/release/deps/preset-*`.
/// `PRESET_PROFILE=interleaved` prints only the interleaved in-memory figure,
/// `PRESET_PROFILE=waiter` only the memory per waiter,
/// `PRESET_PROFILE=allocations` only the allocations per request,
/// `PRESET_PROFILE=tcp` only the TCP figures.
fn profile(spec: &str) {
    if spec == "interleaved" {
        interleaved_in_memory();
        return;
    }
    if spec == "waiter" {
        waiter_figure();
        return;
    }
    if spec == "allocations" {
        allocation_figures();
        return;
    }
    if spec == "tcp" {
        tcp_figures("current_thread", &runtime());
        tcp_figures("2 workers", &two_workers());
        return;
    }
    let (name, n) = match spec.split_once(':') {
        Some((name, n)) => (name, n.parse().expect("PRESET_PROFILE=<stack>:<requests>")),
        None => (spec, 100_000u64),
    };
    let make: MakeStack = match name {
        "bare" => bare,
        "tower" => tower_stack,
        "preset" => preset,
        "retry" => retry_alone,
        "budget" => budget_alone,
        "concurrency" => concurrency_alone,
        other => panic!("PRESET_PROFILE: unknown stack {other:?}"),
    };
    let rt = runtime();
    rt.block_on(async {
        let mut svc = make();
        for _ in 0..1_000 {
            one(&mut svc).await;
        }
        let t = Instant::now();
        for _ in 0..n {
            one(&mut svc).await;
        }
        let per = t.elapsed().as_nanos() as f64 / n as f64;
        println!("{name}: {n} requests, {per:.0} ns each");
    });
}

fn two_workers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn main() {
    if let Ok(spec) = std::env::var("PRESET_PROFILE") {
        profile(&spec);
        return;
    }
    interleaved_in_memory();
    allocation_figures();
    waiter_figure();
    tcp_figures("current_thread", &runtime());
    tcp_figures("2 workers", &two_workers());
    benches();
    Criterion::default().configure_from_args().final_summary();
}
